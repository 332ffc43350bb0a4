"""Reproducing the paper's tables: every cell trained at a stated budget, then our numbers next
to the paper's (the command is ``ebflow reproduce TABLE``, :mod:`ebflow.cli.reproduce`).

A *cell* is one training run (a preset, an objective and a few overrides). Each cell trains in
its own run directory ``OUT/TABLE/CELL`` as a separate ``ebflow train`` process, so a killed
reproduction loses nothing: a rerun resumes unfinished cells from their last checkpoint and
skips finished ones (a larger ``--budget-minutes`` continues finished cells to the new budget).
The report (``report.md``, ``results.json``, ``val_nll_vs_time.png``) is rebuilt from the run
directories every time, also with ``--report-only``.
"""

from __future__ import annotations

import argparse  # the options of a reproduction (see ebflow.cli.reproduce)
import fnmatch
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..objectives import OBJECTIVES

__all__ = ["Cell", "TABLES", "cells_of", "cell_done", "device_slots", "resumable_overrides", "train_cell", "collect", "render_report",
           "write_report", "plot_curves", "zoom_limits"]

SM_LOSSES = ("ml", "sml", "ssm", "dsm", "fdssm")


@dataclass(frozen=True)
class Cell:
    """One training run of a table: ``ebflow train --config preset --loss loss --set overrides``,
    with the paper's value of its metric (``None`` where the paper prints none)."""

    name: str
    preset: str
    loss: str
    paper: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    metric: str = "nll"  # nll | kl (toy data: KL and Fisher divergence)
    group: str = ""  # a line of the plot / a row block of the table


def _likelihood_row(preset: str, paper: Sequence[float]) -> list[Cell]:
    return [Cell(loss, preset, loss, value, group=preset) for loss, value in zip(SM_LOSSES, paper)]


def _ablation() -> list[Cell]:
    # (model, objective) -> (no EMA no MaP, EMA no MaP, EMA + MaP): the paper's Table 4
    paper = {
        ("fc", "ssm"): (1757.5, 1720.5, 1092.8), ("fc", "dsm"): (4660.3, 4455.0, 1099.2),
        ("fc", "fdssm"): (3267.0, 3166.3, 1104.1), ("cnn", "ssm"): (3518.0, 3504.5, 1107.5),
        ("cnn", "dsm"): (3170.0, 3180.0, 1109.5), ("cnn", "fdssm"): (3593.3, 3560.3, 1122.1),
    }
    settings = (("noema-nomap", {"ema_decay": 0.0, "map": False}),
                ("ema-nomap", {"map": False}),
                ("ema-map", {}))
    cells = []
    for (model, loss), values in paper.items():
        for (label, sets), value in zip(settings, values):
            sets = dict(sets)
            if not sets.get("map", True) and OBJECTIVES[loss].perturbs_input:
                sets["drop_out_of_domain"] = True
            cells.append(Cell(f"{model}-{loss}-{label}", f"mnist-{model}", loss, value, sets,
                              group=f"{model}-{label}"))
    return cells


TABLES: dict[str, list[Cell]] = {
    "mnist-fc": _likelihood_row("mnist-fc", (1092.4, 1092.3, 1092.8, 1099.2, 1104.1)),
    "mnist-cnn": _likelihood_row("mnist-cnn", (1101.3, 1098.3, 1107.5, 1109.5, 1122.1)),
    "cifar-fc": _likelihood_row("cifar-fc", (11912.9, 11915.6, 11917.7, 11940.0, 12347.8)),
    "cifar-cnn": _likelihood_row("cifar-cnn", (11408.7, 11553.6, 11435.5, 11462.3, 11766.0)),
    "ablation": _ablation(),
    "toy2d": [Cell(f"{data}-{loss}", f"toy2d-{data}", loss, None, metric="kl", group=data)
              for data in ("sine", "swirl", "checkerboard") for loss in SM_LOSSES],
    "mm10": [Cell(p, f"mm10-{p}", "ml", None, group="mm10") for p in ("full", "tril", "triu", "lu")],
    "glow": [Cell("ssm", "mnist-glow", "ssm", 728.0, group="glow"),
             Cell("dsm", "mnist-glow", "dsm", None, group="glow")],
}
#: The paper's GPU throughput (batches per second) for the likelihood tables (Table 2).
PAPER_BATCHES_PER_S = {
    "mnist-fc": (8.00, 12.27, 33.11, 66.67, 130.21),
    "mnist-cnn": (0.21, 0.29, 7.09, 18.32, 38.76),
    "cifar-fc": (5.05, 7.35, 29.85, 57.14, 62.50),
    "cifar-cnn": (0.02, 0.03, 7.35, 18.41, 39.84),
}


def cells_of(table: str, objectives: Sequence[str] | None = None,
             only: Sequence[str] | None = None) -> list[Cell]:
    """The cells of ``table``, restricted to ``objectives`` and to names matching any of the
    glob patterns ``only``."""
    if table not in TABLES:
        raise ConfigError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
    cells = TABLES[table]
    if objectives:
        unknown = sorted(set(objectives) - set(SM_LOSSES))
        if unknown:
            raise ConfigError(f"unknown objective(s) {', '.join(unknown)}; choose from {', '.join(SM_LOSSES)}")
        cells = [c for c in cells if c.loss in objectives]
    if only:
        cells = [c for c in cells if any(fnmatch.fnmatch(c.name, pat) for pat in only)]
    if not cells:
        raise ConfigError(f"no cell of table {table!r} matches the selection")
    return cells


# -- running ---------------------------------------------------------------------------------------
def resumable_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """The ``KEY=VALUE`` overrides that also apply to a resumed cell: the stopping rule and
    bookkeeping keys a checkpoint may change (``epochs``, ``max_iters``, ``eval_every``, ...;
    :data:`ebflow.experiment.schema.RESUMABLE_KEYS`). The others shape a new cell only."""
    from .schema import RESUMABLE_KEYS

    out = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() in RESUMABLE_KEYS:
            out[key.strip()] = value.strip()
    return out


def cell_done(run_dir: Path, budget: float | None, overrides: Sequence[str] = ()) -> bool:
    """Finished at this budget and with these resumable overrides (a larger budget, or e.g. a
    larger ``epochs=``, continues the cell)."""
    marker = run_dir / "cell.json"
    if not marker.exists() or not (run_dir / "results.json").exists():
        return False
    done = json.loads(marker.read_text())
    if resumable_overrides(overrides) != done.get("resumable_overrides", {}):
        return False
    return budget is None or (done.get("budget_minutes") or 0) >= budget


def device_slots(device: str | None, parallel: int, gpus: int) -> list[str | None]:
    """The device of each of ``parallel`` concurrent cells: with ``cuda`` (no index) and several
    GPUs, the cells spread over them (slot ``i`` on ``cuda:(i mod gpus)``); otherwise every cell
    gets ``device`` as given."""
    if device is None or device.strip() != "cuda" or gpus <= 1:
        return [device] * parallel
    return [f"cuda:{i % gpus}" for i in range(parallel)]


def train_command(cell: Cell, run_dir: Path, args: argparse.Namespace,
                  device: str | None = None) -> list[str]:
    """The ``ebflow train`` command of a cell: a fresh run, or a resume when the cell's
    directory holds a checkpoint; ``device`` (default: ``args.device``) is where it trains."""
    sets = ["progress=false"]
    if args.budget_minutes is not None:
        sets.append(f"max_minutes={args.budget_minutes}")
    if args.threads is not None:
        sets.append(f"num_threads={args.threads}")
    resume = (run_dir / "checkpoints" / "last.pt").exists()
    if not resume:
        if args.data_dir:
            sets += [f"data_dir={args.data_dir}", "download=false"]
        sets += [f"{k}={_yaml_value(v)}" for k, v in cell.overrides.items()]
        sets += list(args.overrides)
        cmd = ["train", "--config", cell.preset, "--loss", cell.loss, "--out", str(run_dir),
               "--seed", str(args.seed)]
    else:
        if args.data_dir:
            sets += [f"data_dir={args.data_dir}"]
        cmd = ["train", "--resume", str(run_dir)]
        sets += [f"{k}={v}" for k, v in resumable_overrides(args.overrides).items()]
    device = device if device is not None else args.device
    if device:
        cmd += ["--device", device]
    return [sys.executable, "-m", "ebflow", *cmd, *[a for s in sets for a in ("--set", s)]]


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def train_cell(cell: Cell, run_dir: Path, args: argparse.Namespace, device: str | None = None) -> int:
    cmd = train_command(cell, run_dir, args, device)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy()
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    log_path = run_dir.parent / f"{cell.name}.log"
    print(f"[{cell.name}] {' '.join(cmd[1:])}  (log: {log_path})", flush=True)
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code == 0 and (run_dir / "results.json").exists():
        (run_dir / "cell.json").write_text(json.dumps({
            "cell": cell.name, "preset": cell.preset, "loss": cell.loss,
            "budget_minutes": args.budget_minutes,
            "resumable_overrides": resumable_overrides(args.overrides),
            "wall_seconds_last_call": time.time() - t0}))
    print(f"[{cell.name}] exit {code} after {time.time() - t0:.0f} s", flush=True)
    return code


# -- collecting and reporting ----------------------------------------------------------------------
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


def collect(table: str, cells: Sequence[Cell], out_dir: Path) -> list[dict[str, Any]]:
    """One record per cell: the paper's value, ours, and how the run went."""
    records = []
    for cell in cells:
        run_dir = out_dir / table / cell.name
        rec: dict[str, Any] = {"table": table, "cell": cell.name, "preset": cell.preset,
                               "loss": cell.loss, "group": cell.group, "paper": cell.paper,
                               "metric": cell.metric, "overrides": cell.overrides,
                               "run_dir": str(run_dir)}
        results = run_dir / "results.json"
        if results.exists():
            res = json.loads(results.read_text())
            rec.update(status="finished", results=res)
            ours = res.get("test_kl") if cell.metric == "kl" else res.get("test_nll")
            rec["ours"] = ours
            if cell.paper is not None and ours is not None:
                rec["diff"] = ours - cell.paper
                rec["rel_diff"] = (ours - cell.paper) / abs(cell.paper)
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


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def render_report(table: str, records: Sequence[dict[str, Any]], machine: str) -> str:
    """Markdown: one row per cell with the paper's value, ours, the difference, the budget,
    iterations and time, then the checks of the paper's claims that the table allows."""
    kl = any(r["metric"] == "kl" for r in records)
    head = ("| cell | objective | paper | ours (EMA) | diff | diff % | raw weights | bits/dim | "
            "budget (min) | iterations (evaluated / trained) | train min | ms/iter | dropped | device, threads |")
    if kl:
        head = ("| cell | objective | KL(data‖model) | Fisher divergence | test NLL | budget (min) | "
                "iterations (evaluated / trained) | train min | ms/iter | device, threads |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        res = r.get("results", {})
        where = f"{res.get('device', '–')}, {res.get('threads', '–')}" if res else "–"
        common = [_fmt(r.get("budget_minutes"), 1), _iterations(res),
                  _fmt(res.get("train_seconds", math.nan) / 60 if res else None, 1),
                  _fmt(res.get("ms_per_iter"), 1)]
        if r["status"] != "finished":
            lines.append(f"| {r['cell']} | {r['loss']} | {_fmt(r['paper'])} | {r['status']} |"
                         + " |" * (head.count("|") - 5))
            continue
        if kl:
            lines.append("| " + " | ".join([r["cell"], r["loss"], _fmt(res.get("test_kl"), 4),
                                            _fmt(res.get("test_fisher"), 4), _fmt(res.get("test_nll"), 3),
                                            *common, where]) + " |")
            continue
        dropped = res.get("dropped_fraction")
        lines.append("| " + " | ".join([
            r["cell"], r["loss"], _fmt(r["paper"]), _fmt(r.get("ours")), _fmt(r.get("diff")),
            _fmt(100 * r["rel_diff"], 2) if "rel_diff" in r else "–", _fmt(res.get("test_raw_nll")),
            _fmt(res.get("test_bpd"), 3), *common,
            f"{100 * dropped:.1f} %" if dropped else "0", where]) + " |")
    lines += ["", *_claims(table, records), "", f"Machine: {machine}."]
    return "\n".join(lines) + "\n"


def _iterations(res: dict[str, Any]) -> str:
    """``evaluated / trained``: the step of the checkpoint the test metrics come from (the best
    validation) and the steps trained."""
    if not res:
        return "–"
    return f"{_fmt(res.get('checkpoint_step'))} / {_fmt(res.get('iterations'))}"


def _claims(table: str, records: Sequence[dict[str, Any]]) -> list[str]:
    done = {r["cell"]: r for r in records if r.get("ours") is not None}
    out = []
    if table in PAPER_BATCHES_PER_S and done:
        within = [r["cell"] for r in done.values() if r.get("rel_diff") is not None and abs(r["rel_diff"]) <= 0.01]
        out.append(f"- Within 1 % of the paper: {len(within)} of {len(done)} finished cells"
                   + (f" ({', '.join(within)})" if within else "") + ".")
        order = sorted(done.values(), key=lambda r: r["ours"])
        out.append("- Our order (best first): " + " < ".join(f"{r['loss'].upper()} {r['ours']:.1f}" for r in order)
                   + "; the paper's: " + " < ".join(
                       f"{r['loss'].upper()} {r['paper']:.1f}" for r in sorted(done.values(), key=lambda r: r["paper"])) + ".")
    if table == "ablation" and done:
        for prefix in ("fc", "cnn"):
            for loss in ("ssm", "dsm", "fdssm"):
                vals = [done.get(f"{prefix}-{loss}-{s}") for s in ("noema-nomap", "ema-nomap", "ema-map")]
                if all(v is not None for v in vals):
                    a, b, c = (v["ours"] for v in vals)  # type: ignore[index]
                    line = f"- {prefix.upper()} {loss.upper()}: no EMA/no MaP {a:.1f} → EMA {b:.1f} → EMA + MaP {c:.1f}: "
                    if any(v["results"].get("dropped_fraction", 0) >= 1 for v in vals):  # type: ignore[index]
                        line += ("the no-MaP cells dropped every example, so the objective never trained "
                                 "them (only weight decay, if any, moved them): no comparison.")
                    else:
                        line += (f"EMA {'helps' if b < a else 'does not help'}, "
                                 f"MaP {'helps' if c < b else 'does not help'}.")
                    out.append(line)
    return out


def zoom_limits(records: Sequence[dict[str, Any]]) -> tuple[float, float] | None:
    """The y range of the zoomed panel: the paper's values and every curve's best and last
    value, with a margin; the early, far larger values of a curve fall outside it."""
    points = []
    for r in records:
        finite = [v for _, v in r.get("curve", ()) if math.isfinite(v)]
        if finite:
            points += [min(finite), finite[-1]]
        if r["paper"] is not None and r["metric"] == "nll":
            points.append(float(r["paper"]))
    if not points:
        return None
    lo, hi = min(points), max(points)
    span = max(hi - lo, 1e-3 * max(abs(hi), 1.0))
    return lo - 0.15 * span, hi + 0.35 * span


def plot_curves(records: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Validation NLL (EMA weights) against training time, one line per cell: the whole curve
    on a log axis (left) and a zoom on the region of the paper's values (right)."""
    curves = [r for r in records if r.get("curve")]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax in axes:
        for r in curves:
            t, v = zip(*r["curve"])
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


def _machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def write_report(table: str, cells: Sequence[Cell], out_dir: Path) -> Path:
    records = collect(table, cells, out_dir)
    folder = out_dir / table
    folder.mkdir(parents=True, exist_ok=True)
    machine = _machine()
    text = f"# ebflow reproduce {table}\n\n" + render_report(table, records, machine)
    (folder / "report.md").write_text(text)
    (folder / "results.json").write_text(json.dumps({"table": table, "machine": machine,
                                                     "cells": records}, indent=2))
    plot_curves(records, folder / "val_nll_vs_time.png", f"{table}: validation NLL")
    print(text)
    return folder / "report.md"
