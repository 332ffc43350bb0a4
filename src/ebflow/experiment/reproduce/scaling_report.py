"""The report of the scaling study (``ebflow reproduce scaling``): ``report.md``, ``results.json``
and ``val_nll_vs_time.png``, rebuilt from the cells' run directories every time (also with
``--report-only``, and for any subset of cells: a missing cell or D is reported as such).

At each D the target is maximum likelihood's final validation NLL (full matrices, the paper's
baseline); each objective's time to target is the training time at which its validation curve
first reaches it (:func:`~ebflow.experiment.reproduce.scaling_metrics.time_to_target`), and the
speed-up of the fastest score-matching objective is ML's time (or ML-LU's) over its time."""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import MissingDependencyError
from .progress import latest_row
from .report import collect, format_value, machine_description
from .scaling_metrics import growth_exponent, time_to_target
from .scaling_plot import plot_scaling_curves
from .tables import SCALING_DIMENSIONS, SCALING_OBJECTIVES, Cell, scaling_key

__all__ = ["SCORE_MATCHING", "render_scaling_report", "summarise", "write_scaling_report"]

logger = logging.getLogger(__name__)

#: The score-matching objectives of the study (no log-determinant in training).
SCORE_MATCHING = ("ssm", "dsm", "fdssm")


def _steps_and_seconds(rec: dict[str, Any]) -> tuple[int | None, float | None]:
    """Steps trained and training seconds: a finished cell's results, else its metrics so far."""
    res = rec.get("results")
    if res:
        return res.get("iterations"), res.get("train_seconds")
    row = latest_row(Path(rec["run_dir"]), "train_s")
    if row is None or not row.get("step"):
        return None, None
    return int(row["step"]), float(row["train_s"])


def _row(rec: dict[str, Any], target: float | None) -> dict[str, Any]:
    """One objective at one D: its test numbers, its cost, and its time to ``target``."""
    res = rec.get("results") or {}
    steps, seconds = _steps_and_seconds(rec)
    curve = [(t, v) for t, v in rec.get("curve", ()) if math.isfinite(v)]
    return {
        "objective": rec["label"],
        "cell": rec["cell"],
        "status": rec["status"].split(" (")[0],
        "test_nll": res.get("test_nll"),
        "test_bpd": res.get("test_bpd"),
        "checkpoint_step": res.get("checkpoint_step"),
        "steps": steps,
        "train_minutes": seconds / 60 if seconds is not None else None,
        "ms_per_step": 1000 * seconds / steps if steps and seconds is not None else None,
        "train_peak_memory_bytes": res.get("train_peak_memory_bytes"),
        "peak_memory_bytes": res.get("peak_memory_bytes"),
        "budget_minutes": rec.get("budget_minutes"),
        "best_val_nll": min(v for _, v in curve) if curve else None,
        "final_val_nll": curve[-1][1] if curve else None,
        "last_val_seconds": curve[-1][0] if curve else None,
        "time_to_target_s": time_to_target(rec.get("curve", ()), target) if target is not None else None,
    }


def _speedup(rows: dict[str, dict[str, Any]], best: dict[str, Any] | None, ref: str) -> dict[str, Any] | None:
    """``ref``'s time to target over the fastest score-matching objective's; when ``ref`` stopped
    (finished or failed) without reaching it, a lower bound: its training time over that time.
    None while ``ref`` is unfinished and has not reached it: it may still get there sooner."""
    other = rows.get(ref)
    if best is None or other is None or not best["time_to_target_s"]:
        return None
    if other["time_to_target_s"] is not None:
        return {"factor": other["time_to_target_s"] / best["time_to_target_s"], "lower_bound": False}
    if other["last_val_seconds"] is None or _still_running(other):
        return None
    return {"factor": other["last_val_seconds"] / best["time_to_target_s"], "lower_bound": True}


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per D: the target (ML's final validation NLL), one row per objective, the fastest
    score-matching objective and its speed-ups; per objective: the step-time exponent in D."""
    by_d: dict[int, dict[str, dict[str, Any]]] = {}
    for rec in records:
        d, label = scaling_key(rec["cell"])
        by_d.setdefault(d, {})[label] = {**rec, "label": label}
    dims: list[dict[str, Any]] = []
    for d in sorted(by_d):
        recs = by_d[d]
        ml_curve = [v for _, v in recs["ml"].get("curve", ()) if math.isfinite(v)] if "ml" in recs else []
        target = ml_curve[-1] if ml_curve else None
        rows = {label: _row(recs[label], target) for label in SCALING_OBJECTIVES if label in recs}
        reached = [r for r in rows.values() if r["time_to_target_s"] is not None]
        sm = [r for r in reached if r["objective"] in SCORE_MATCHING]
        best = min(sm, key=lambda r: r["time_to_target_s"]) if sm else None
        dims.append(
            {
                "dimension": d,
                "preset": SCALING_DIMENSIONS[d][0] if d in SCALING_DIMENSIONS else None,
                "target_nll": target,
                "target_final": target is not None and rows["ml"]["status"] == "finished",
                "rows": list(rows.values()),
                "order": [r["objective"] for r in sorted(reached, key=lambda r: r["time_to_target_s"])],
                "best_score_matching": best["objective"] if best else None,
                "speedup_over_ml": _speedup(rows, best, "ml"),
                "speedup_over_ml_lu": _speedup(rows, best, "ml-lu"),
            }
        )
    exponents: dict[str, dict[str, Any]] = {}
    for label in SCALING_OBJECTIVES:
        times = {
            dim["dimension"]: r["ms_per_step"]
            for dim in dims
            for r in dim["rows"]
            if r["objective"] == label and r["ms_per_step"]
        }
        exponents[label] = {"exponent": growth_exponent(times), "ms_per_step": times}
    return {"dimensions": dims, "exponents": exponents}


# -- Markdown ---------------------------------------------------------------------------------------
def _memory(n: int | None) -> str:
    if not n:
        return "–"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _time_to_target(row: dict[str, Any]) -> str:
    """Minutes to target; else "not reached" for a cell that has stopped (finished or failed),
    "not yet" for one that can still reach it (unfinished), "–" for one not run."""
    if row["time_to_target_s"] is not None:
        return f"{row['time_to_target_s'] / 60:.1f}"
    if row["status"] == "not run":
        return "–"
    return "not yet" if row["status"] == "unfinished" else "not reached"


def _still_running(row: dict[str, Any]) -> bool:
    """A cell that has not stopped: it may still reach the target."""
    return row["status"] in ("unfinished", "not run")


def _name(label: str) -> str:
    return label.upper()


def _factor(s: dict[str, Any] | None) -> str:
    if s is None:
        return "–"
    return ("≥ " if s["lower_bound"] else "") + f"{s['factor']:.1f}×"


def _versus(s: dict[str, Any] | None, name: str, verb: str = "reaches it ") -> str:
    """Words for a speed-up: "reaches it 4.6× sooner than ML", or, below 1, "takes 1.3× as long as
    ML-LU" (a speed-up of 0.8× is a slow-down, not "0.8× faster")."""
    if s is None:
        return f"has no time to compare with {name}'s"
    if s["factor"] >= 1 or s["lower_bound"]:
        return f"{verb}{_factor(s)} sooner than {name}"
    return f"takes {1 / s['factor']:.1f}× as long as {name}"


def _dimension_section(dim: dict[str, Any]) -> list[str]:
    d, target = dim["dimension"], dim["target_nll"]
    k = math.isqrt(d // 784)  # MNIST's 28x28, or a k x k mosaic of it
    shape = f", {28 * k}×{28 * k}" if k and 784 * k * k == d else ""
    out = [f"## D = {d:,} ({dim['preset']}{shape})", ""]
    if target is None:
        out += ["No target: the ML cell at this D has no validation yet.", ""]
    else:
        note = "" if dim["target_final"] else " (ML unfinished: provisional)"
        out += [f"Target: **{target:,.1f} nats**, ML's final validation NLL{note}.", ""]
    head = (
        "| objective | status | test NLL (nats) | bits/dim | steps (evaluated / trained) | ms/step | "
        "peak memory (training / with the test) | time to target (min) | trained (min) | budget (min) |"
    )
    out += [head, "|" + "---|" * 10]
    for r in dim["rows"]:
        time = _time_to_target(r) if target is not None else "–"
        steps = f"{format_value(r['checkpoint_step'])} / {format_value(r['steps'])}"
        out.append(
            f"| {_name(r['objective'])} | {r['status']} | {format_value(r['test_nll'])} | "
            f"{format_value(r['test_bpd'], 3)} | "
            f"{steps} | {format_value(r['ms_per_step'])} | "
            f"{_memory(r['train_peak_memory_bytes'])} / {_memory(r['peak_memory_bytes'])} | {time} | "
            f"{format_value(r['train_minutes'])} | {format_value(r['budget_minutes'])} |"
        )
    best = dim["best_score_matching"]
    if best is not None:
        t = next(r["time_to_target_s"] for r in dim["rows"] if r["objective"] == best)
        over = [
            f"{_factor(dim[key])} over {name}"
            for key, name in (("speedup_over_ml", "ML"), ("speedup_over_ml_lu", "ML-LU"))
            if dim[key] is not None
        ]
        bound = any(dim[key] and dim[key]["lower_bound"] for key in ("speedup_over_ml", "speedup_over_ml_lu"))
        out += [
            "",
            f"Speed-up in time to target of the fastest score-matching objective ({_name(best)}, "
            f"{t / 60:.1f} min): {', '.join(over) or '– (no ML run to compare with)'}"
            + (
                " (≥: that objective never reached the target; its training time is the bound)"
                if bound
                else ""
            )
            + ".",
        ]
    return [*out, ""]


def _exponent_section(summary: dict[str, Any]) -> list[str]:
    dims = [dim["dimension"] for dim in summary["dimensions"]]
    head = "| objective | " + " | ".join(f"ms/step at D = {d:,}" for d in dims) + " | exponent |"
    out = ["## Time per step against D", "", head, "|" + "---|" * (len(dims) + 2)]
    for label, e in summary["exponents"].items():
        cells = [format_value(e["ms_per_step"].get(d)) for d in dims]
        out.append(f"| {_name(label)} | " + " | ".join(cells) + f" | {format_value(e['exponent'], 2)} |")
    return [
        *out,
        "",
        "Exponent: the least-squares slope of log(ms/step) against log D over the D values present.",
        "",
    ]


def _findings(summary: dict[str, Any]) -> list[str]:
    out = []
    for dim in summary["dimensions"]:
        d, target = dim["dimension"], dim["target_nll"]
        if target is None:
            out.append(f"- D = {d:,}: no target yet (the ML cell has no validation).")
            continue
        rows = {r["objective"]: r for r in dim["rows"]}
        order = dim["order"]
        line = prefix = f"- D = {d:,}: "
        if order:
            times = ", ".join(f"{_name(o)} {rows[o]['time_to_target_s'] / 60:.1f} min" for o in order)
            line += (
                f"{_name(order[0])} reaches ML's final validation NLL ({target:,.1f} nats) first ({times})"
            )
        unreached = [
            r for r in rows.values() if r["time_to_target_s"] is None and r["best_val_nll"] is not None
        ]
        for still, verb in ((False, "not reached by "), (True, "not yet reached by ")):
            missed = [r for r in unreached if _still_running(r) == still]
            if missed:
                line += (
                    ("; " if line != prefix else "")
                    + verb
                    + ", ".join(
                        f"{_name(r['objective'])} (best {r['best_val_nll']:,.1f}, "
                        f"{r['best_val_nll'] - target:+,.1f})"
                        for r in missed
                    )
                )
        best = dim["best_score_matching"]
        if best is not None:
            line += f". Score matching ({_name(best)}) {_versus(dim['speedup_over_ml'], 'ML')}"
            if dim["speedup_over_ml_lu"]:
                ml = dim["speedup_over_ml"]
                same = ml is not None and (ml["factor"] >= 1 or ml["lower_bound"])
                line += f" and {_versus(dim['speedup_over_ml_lu'], 'ML-LU', '' if same else 'reaches it ')}"
        elif any(o in rows for o in SCORE_MATCHING):
            pending = [o for o in SCORE_MATCHING if o in rows and _still_running(rows[o])]
            line += (
                ". No score-matching objective has reached it yet ("
                + ", ".join(f"{_name(o)} {rows[o]['status']}" for o in pending)
                + ")"
                if pending
                else ". No score-matching objective reaches it within its budget"
            )
        out.append(line + ".")
    exps = [(label, e) for label, e in summary["exponents"].items() if e["exponent"] is not None]
    if exps:
        out.append(
            "- Time per step grows as D^a with a = "
            + ", ".join(
                f"{_name(label)} {e['exponent']:.2f} (D = {', '.join(f'{d:,}' for d in sorted(e['ms_per_step']))})"
                for label, e in exps
            )
            + "."
        )
    else:
        out.append("- No step-time exponent yet: it needs finished or running cells at two D values or more.")
    return out


def render_scaling_report(summary: dict[str, Any], machine: str) -> str:
    """Markdown: per D the target, a row per objective and the speed-ups; the step time against
    D; the findings as sentences; the machine."""
    lines = [
        "Training time to maximum likelihood's NLL as the dimension D grows. ML trains full dense "
        "matrices (a log-determinant, O(D³), every step), ML-LU LU-parameterised ones (O(D²)); "
        "SSM, DSM and FDSSM compute no log-determinant. Times are training time (optimisation "
        "steps only, validation excluded); test NLLs are exact, nats per image, EMA weights of the "
        "best-validation checkpoint. Time to target: the first validation at or below the target, "
        "interpolated linearly from the validation before it.",
        "",
    ]
    for dim in summary["dimensions"]:
        lines += _dimension_section(dim)
    lines += _exponent_section(summary)
    lines += ["## Findings", "", *_findings(summary), "", f"Machine: {machine}."]
    return "\n".join(lines) + "\n"


def write_scaling_report(table: str, cells: Sequence[Cell], out_dir: Path) -> Path:
    """Collect the cells' runs, write ``report.md``, ``results.json`` and the plot into
    ``out_dir/table``, and log the report."""
    records = collect(table, cells, out_dir)
    for rec, cell in zip(records, cells, strict=True):
        rec.setdefault("budget_minutes", cell.budget_minutes)
    summary = summarise(records)
    folder = out_dir / table
    folder.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    text = f"# ebflow reproduce {table}\n\n" + render_scaling_report(summary, machine)
    (folder / "report.md").write_text(text)
    payload = {"table": table, "machine": machine, **summary, "cells": records}
    (folder / "results.json").write_text(json.dumps(payload, indent=2))
    try:
        plot_scaling_curves(summary, records, folder / "val_nll_vs_time.png")
    except MissingDependencyError as err:  # the report is what matters; its plot is optional
        warnings.warn(
            f"{err}; report.md and results.json are written without it", RuntimeWarning, stacklevel=2
        )
    logger.info("%s", text)
    return folder / "report.md"
