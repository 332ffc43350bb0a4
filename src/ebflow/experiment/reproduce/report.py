"""The report of a reproduction (``report.md``, ``results.json``, ``val_nll_vs_time.png``),
rebuilt from the cells' run directories every time, also with ``--report-only``: the paper's
values next to ours."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import MissingDependencyError
from ..images.plots import pyplot
from .seeds import render_seed_summary, seed_summary
from .tables import PAPER_TOLERANCE, Cell

__all__ = [
    "collect",
    "format_value",
    "last_failure",
    "machine_description",
    "render_report",
    "write_report",
    "plot_curves",
    "zoom_limits",
]

logger = logging.getLogger(__name__)


def _read_curve(run_dir: Path) -> list[tuple[float, float]]:
    import csv

    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("val_nll") and row.get("train_s"):
                out.append((float(row["train_s"]), float(row["val_nll"])))
    return out


def last_failure(log_path: Path) -> str | None:
    """The first sentence of the ``error:`` line of the last ``ebflow train`` call in a cell's
    log (e.g. "training stopped at step 154: 20 consecutive steps were skipped (...)"), or None
    when that call did not fail (finished, interrupted to be resumed, still running, no log)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
    for line in lines[starts[-1] + 1 :] if starts else lines:
        before, sep, message = line.partition("error: ")
        if sep and not before:  # the CLI's one-line report of a failure
            sentence = message.split(". ", 1)[0].rstrip(".")
            return sentence.replace("|", "/")
    return None


def _backfill_toy_metrics(run_dir: Path, res: dict[str, Any], offsets: dict[str, float]) -> None:
    """Fill in the toy metrics a finished cell's ``results.json`` predates, as its training run
    would have recorded them: the reference code's p·log p "KL" (its KL plus the offset of its
    test points, the same for every model scored on them, so computed once per data recipe) and
    the median per-point Fisher term (from its evaluated checkpoint). A run that cannot be read
    back leaves them None."""
    need_reference = res.get("test_kl_reference") is None and res.get("test_kl") is not None
    need_median = res.get("test_fisher_median") is None and res.get("test_fisher") is not None
    if not (need_reference or need_median):
        return
    from ...errors import EBFlowError
    from ..evaluation.toy_metrics import fisher_terms, reference_kl_offset
    from ..rundir.load import load_run

    try:
        checkpoint = run_dir / "checkpoints" / str(res.get("checkpoint", "best.pt"))
        run = load_run(checkpoint if checkpoint.is_file() else run_dir)
        splits = run.splits()
        if splits.mixture is None:
            return
        x = splits.split("test")
        if need_reference:
            key = repr(run.config.data)
            if key not in offsets:
                offsets[key] = reference_kl_offset(splits.mixture, x)
            res["test_kl_reference"] = float(res["test_kl"]) + offsets[key]
        if need_median:
            batch_size = run.config.bookkeeping.eval_batch_size
            res["test_fisher_median"] = float(fisher_terms(run.model, splits.mixture, x, batch_size).median())
    except (EBFlowError, OSError) as err:
        logger.warning("%s: no reference-formula KL or median Fisher term (%s)", run_dir.name, err)


def collect(table: str, cells: Sequence[Cell], out_dir: Path) -> list[dict[str, Any]]:
    """One record per cell: the paper's value, ours, and how the run went."""
    records = []
    offsets: dict[str, float] = {}
    for cell in cells:
        run_dir = out_dir / table / cell.name
        rec: dict[str, Any] = {
            "table": table,
            "cell": cell.name,
            "preset": cell.preset,
            "loss": cell.loss,
            "group": cell.group,
            "paper": cell.paper,
            "metric": cell.metric,
            "overrides": cell.overrides,
            "seed": cell.seed,
            "run_dir": str(run_dir),
        }
        results = run_dir / "results.json"
        if results.exists():
            res = json.loads(results.read_text())
            rec.update(status="finished", results=res)
            if cell.metric == "kl":
                _backfill_toy_metrics(run_dir, res, offsets)
            ours = res.get("test_kl") if cell.metric == "kl" else res.get("test_nll")
            rec["ours"] = ours
            if cell.paper is not None and ours is not None:
                rec["diff"] = ours - cell.paper
                rec["rel_diff"] = (ours - cell.paper) / abs(cell.paper)
        elif failure := last_failure(out_dir / table / f"{cell.name}.log"):
            rec["status"] = f"failed: {failure}"
        elif (run_dir / "checkpoints" / "last.pt").exists():
            rec["status"] = "unfinished (resume with the same command)"
        else:
            rec["status"] = "not run"
        marker = run_dir / "cell.json"
        if marker.exists():
            rec["budget_minutes"] = json.loads(marker.read_text()).get("budget_minutes")
        rec["curve"] = _read_curve(run_dir)
        records.append(rec)
    return records


def format_value(v: Any, digits: int = 1) -> str:
    """A table cell: "–" for a missing or non-finite value, floats with ``digits`` decimals and
    thousands separators, ints with separators, anything else as its text."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def render_report(table: str, records: Sequence[dict[str, Any]], machine: str) -> str:
    """Markdown: one row per cell with the paper's value, ours, the difference, the budget,
    iterations and time, then the checks of the paper's claims that the table allows."""
    kl = any(r["metric"] == "kl" for r in records)
    head = (
        "| cell | objective | paper | ours (EMA) | diff | diff % | raw weights | bits/dim | "
        "budget (min) | iterations (evaluated / trained) | train min | ms/iter | dropped | device, threads |"
    )
    if kl:
        head = (
            "| cell | objective | KL(data‖model) | KL, reference's p·log p formula | Fisher divergence | "
            "Fisher, median per point | test NLL | budget (min) | "
            "iterations (evaluated / trained) | train min | ms/iter | device, threads |"
        )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        res = r.get("results", {})
        where = f"{res.get('device', '–')}, {res.get('threads', '–')}" if res else "–"
        common = [
            format_value(r.get("budget_minutes"), 1),
            _iterations(res),
            format_value(res.get("train_seconds", math.nan) / 60 if res else None, 1),
            format_value(res.get("ms_per_iter"), 1),
        ]
        if r["status"] != "finished":
            lines.append(
                f"| {r['cell']} | {r['loss']} | {format_value(r['paper'])} | {r['status']} |"
                + " |" * (head.count("|") - 5)
            )
            continue
        if kl:
            lines.append(
                "| "
                + " | ".join(
                    [
                        r["cell"],
                        r["loss"],
                        format_value(res.get("test_kl"), 4),
                        format_value(res.get("test_kl_reference"), 4),
                        format_value(res.get("test_fisher"), 4),
                        format_value(res.get("test_fisher_median"), 4),
                        format_value(res.get("test_nll"), 3),
                        *common,
                        where,
                    ]
                )
                + " |"
            )
            continue
        dropped = res.get("dropped_fraction")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["cell"],
                    r["loss"],
                    format_value(r["paper"]),
                    format_value(r.get("ours")),
                    format_value(r.get("diff")),
                    format_value(100 * r["rel_diff"], 2) if "rel_diff" in r else "–",
                    format_value(res.get("test_raw_nll")),
                    format_value(res.get("test_bpd"), 3),
                    *common,
                    f"{100 * dropped:.1f} %" if dropped else "0",
                    where,
                ]
            )
            + " |"
        )
    metrics = (
        [
            ("test_kl", "KL(data‖model)", 4),
            ("test_kl_reference", "KL, reference's formula", 4),
            ("test_fisher", "Fisher divergence", 4),
            ("test_fisher_median", "Fisher, median per point", 4),
            ("test_nll", "test NLL", 3),
        ]
        if kl
        else [("test_nll", "test NLL (EMA)", 1), ("test_bpd", "bits/dim", 3)]
    )
    summary = render_seed_summary(seed_summary(records, [k for k, _, _ in metrics]), metrics)
    lines += ["", *summary, *([""] if summary else []), *_claims(table, records), "", f"Machine: {machine}."]
    return "\n".join(lines) + "\n"


def _iterations(res: dict[str, Any]) -> str:
    """``evaluated / trained``: the step of the checkpoint the test metrics come from (the best
    validation) and the steps trained."""
    if not res:
        return "–"
    return f"{format_value(res.get('checkpoint_step'))} / {format_value(res.get('iterations'))}"


def _claims(table: str, records: Sequence[dict[str, Any]]) -> list[str]:
    done = {r["cell"]: r for r in records if r.get("ours") is not None}
    out = []
    if table in PAPER_TOLERANCE and done:
        tolerance = PAPER_TOLERANCE[table]
        within = [
            r["cell"]
            for r in done.values()
            if r.get("rel_diff") is not None and abs(r["rel_diff"]) <= tolerance
        ]
        out.append(
            f"- Within {tolerance * 100:.0f} % of the paper (this table's target): "
            f"{len(within)} of {len(done)} finished cells"
            + (f" ({', '.join(within)})" if within else "")
            + "."
        )
        ours = sorted(done.values(), key=lambda r: r["ours"])
        paper = sorted(done.values(), key=lambda r: r["paper"])
        out.append(
            "- Our order (best first): "
            + " < ".join(f"{r['loss'].upper()} {r['ours']:.1f}" for r in ours)
            + "; the paper's: "
            + " < ".join(f"{r['loss'].upper()} {r['paper']:.1f}" for r in paper)
            + "."
        )
    if table == "ablation" and done:
        for prefix in ("fc", "cnn"):
            for loss in ("ssm", "dsm", "fdssm"):
                vals = [done.get(f"{prefix}-{loss}-{s}") for s in ("noema-nomap", "ema-nomap", "ema-map")]
                if all(v is not None for v in vals):
                    a, b, c = (v["ours"] for v in vals)  # type: ignore[index]
                    line = (
                        f"- {prefix.upper()} {loss.upper()}: no EMA/no MaP {a:.1f} → EMA {b:.1f} "
                        f"→ EMA + MaP {c:.1f}: "
                    )
                    if any(v["results"].get("dropped_fraction", 0) >= 1 for v in vals):  # type: ignore[index]
                        line += (
                            "the no-MaP cells dropped every example, so the objective never trained "
                            "them (only weight decay, if any, moved them): no comparison."
                        )
                    else:
                        line += (
                            f"EMA {'helps' if b < a else 'does not help'}, "
                            f"MaP {'helps' if c < b else 'does not help'}."
                        )
                    out.append(line)
    return out


def zoom_limits(records: Sequence[dict[str, Any]]) -> tuple[float, float] | None:
    """The y range of the zoomed panel: the paper's values and every curve's best and last
    value, with a margin; the early, far larger values of a curve fall outside it. While some
    cells have finished, the others' (still early) curves do not widen the range. The range is
    at least 1 % of its top wide, so a lone curve whose best is its last value stays readable."""
    points = []
    finished = [r for r in records if r.get("status") == "finished"]
    for r in finished or records:
        finite = [v for _, v in r.get("curve", ()) if math.isfinite(v)]
        if finite:
            points += [min(finite), finite[-1]]
        if r["paper"] is not None and r["metric"] == "nll":
            points.append(float(r["paper"]))
    if not points:
        return None
    lo, hi = min(points), max(points)
    span = max(hi - lo, 0.02 * max(abs(hi), 1.0))
    return lo - 0.15 * span, hi + 0.35 * span


def plot_curves(records: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Validation NLL (EMA weights) against training time, one line per cell: the whole curve
    on a log axis (left) and a zoom on the region of the paper's values (right)."""
    curves = [r for r in records if r.get("curve")]
    if not curves:
        return None
    plt = pyplot(path.name)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax in axes:
        for r in curves:
            t, v = zip(*r["curve"], strict=True)
            ax.plot([s / 60 for s in t], v, label=r["cell"])
            if r["paper"] is not None and r["metric"] == "nll":
                ax.axhline(r["paper"], color=ax.lines[-1].get_color(), ls=":", lw=0.8)
        ax.set_xlabel("training time (min, optimisation steps only)")
    full, zoom = axes
    if all(v > 0 for r in curves for _, v in r["curve"] if math.isfinite(v)):
        full.set_yscale("log")
    full.set_ylabel("validation NLL (nats, EMA weights)")
    full.set_title("whole run" + (" (log scale)" if full.get_yscale() == "log" else ""))
    limits = zoom_limits(curves)
    if limits is not None:
        zoom.set_ylim(*limits)
    zoom.set_title("zoom: the paper's values (dotted) and our best and last")
    zoom.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine_description() -> str:
    """The machine a report was written on: architecture, cores, Python and torch versions."""
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def write_report(table: str, cells: Sequence[Cell], out_dir: Path) -> Path:
    records = collect(table, cells, out_dir)
    folder = out_dir / table
    folder.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    text = f"# ebflow reproduce {table}\n\n" + render_report(table, records, machine)
    (folder / "report.md").write_text(text)
    (folder / "results.json").write_text(
        json.dumps(
            {
                "table": table,
                "machine": machine,
                "cells": records,
                "over_seeds": seed_summary(
                    records,
                    [
                        "test_kl",
                        "test_kl_reference",
                        "test_fisher",
                        "test_fisher_median",
                        "test_nll",
                        "test_bpd",
                    ],
                ),
            },
            indent=2,
        )
    )
    try:
        plot_curves(records, folder / "val_nll_vs_time.png", f"{table}: validation NLL")
    except MissingDependencyError as err:  # the report is what matters; its plot is optional
        warnings.warn(
            f"{err}; report.md and results.json are written without it", RuntimeWarning, stacklevel=2
        )
    logger.info("%s", text)
    return folder / "report.md"
