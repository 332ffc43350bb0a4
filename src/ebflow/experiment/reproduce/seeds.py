"""Repeating a table's cells over several seeds (``ebflow reproduce TABLE --seeds 0 1 2``) and
the spread of their results: mean, sample standard deviation and range over the seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ...errors import ConfigError
from .tables import Cell

__all__ = ["SEED_SUFFIX", "seed_summary", "render_seed_summary", "with_seeds"]

#: a repeated cell's name is ``f"{cell}{SEED_SUFFIX}{seed}"``, e.g. ``sine-ssm-seed2``
SEED_SUFFIX = "-seed"


def with_seeds(cells: Sequence[Cell], seeds: Sequence[int] | None) -> list[Cell]:
    """Each cell once per seed (``None``: the cells unchanged), in seed-major order so that
    every cell has one finished seed before any has two."""
    if not seeds:
        return list(cells)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must not repeat a seed, got {' '.join(map(str, seeds))}")
    return [replace(c, name=f"{c.name}{SEED_SUFFIX}{s}", seed=s) for s in seeds for c in cells]


def _spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (n - 1; NaN for one value), minimum and maximum."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else math.nan,
        "min": min(values),
        "max": max(values),
    }


def seed_summary(records: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per repeated cell (records whose ``seed`` is set), in first-seen order: the seeds
    that finished, those whose training failed (e.g. diverged), and the spread of each metric of
    their ``results.json`` over the finished ones."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("seed") is None:
            continue
        base = r["cell"].rsplit(SEED_SUFFIX, 1)[0]
        groups.setdefault(base, []).append(r)
    rows = []
    for base, members in groups.items():
        done = [m for m in members if m.get("status") == "finished"]
        row: dict[str, Any] = {
            "cell": base,
            "loss": members[0]["loss"],
            "seeds": [m["seed"] for m in done],
            "seeds_failed": [m["seed"] for m in members if str(m.get("status", "")).startswith("failed")],
            "seeds_run": len(members),
        }
        for key in metrics:
            values = [float(m["results"][key]) for m in done if m["results"].get(key) is not None]
            values = [v for v in values if math.isfinite(v)]
            row[key] = _spread(values) if values else None
        rows.append(row)
    return rows


def _cell(spread: dict[str, float] | None, digits: int) -> str:
    if spread is None:
        return "–"
    text = f"{spread['mean']:.{digits}f}"
    if math.isfinite(spread["std"]):
        text += f" ± {spread['std']:.{digits}f} ({spread['min']:.{digits}f}–{spread['max']:.{digits}f})"
    return text


def render_seed_summary(rows: Sequence[dict[str, Any]], metrics: Sequence[tuple[str, str, int]]) -> list[str]:
    """Markdown lines: per repeated cell, the finished seeds and ``mean ± std (min–max)`` of
    each ``(key, heading, digits)`` metric."""
    if not rows:
        return []
    head = "| cell | objective | seeds finished | " + " | ".join(h for _, h, _ in metrics) + " |"
    lines = [
        "### Over seeds: mean ± sample std (min–max)",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for row in rows:
        seeds = f"{len(row['seeds'])} of {row['seeds_run']}" + (
            f" ({', '.join(map(str, row['seeds']))})" if row["seeds"] else ""
        )
        if row.get("seeds_failed"):
            seeds += f"; failed: {', '.join(map(str, row['seeds_failed']))}"
        cells = [_cell(row[key], digits) for key, _, digits in metrics]
        lines.append(f"| {row['cell']} | {row['loss']} | {seeds} | " + " | ".join(cells) + " |")
    return lines
