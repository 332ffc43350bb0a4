"""The figure of the scaling study: validation NLL against training time, one column per D,
every objective; the whole curves on a log axis (top) and a zoom on their ends and the target,
maximum likelihood's final validation NLL (bottom, dashed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..images.plots import pyplot
from .report import zoom_limits
from .tables import SCALING_OBJECTIVES, scaling_key

__all__ = ["plot_scaling_curves"]


def plot_scaling_curves(
    summary: dict[str, Any], records: Sequence[dict[str, Any]], path: Path
) -> Path | None:
    """Write the figure to ``path``; None (no file) when no cell has a validation yet."""
    by_d: dict[int, list[dict[str, Any]]] = {}
    for rec in records:
        if rec.get("curve"):
            by_d.setdefault(scaling_key(rec["cell"])[0], []).append(rec)
    if not by_d:
        return None
    targets = {dim["dimension"]: dim["target_nll"] for dim in summary["dimensions"]}
    plt = pyplot(path.name)
    cols = len(by_d)
    fig, axes = plt.subplots(2, cols, figsize=(5 * cols, 8), squeeze=False)
    for col, d in enumerate(sorted(by_d)):
        full, zoom = axes[0][col], axes[1][col]
        for rec in by_d[d]:
            t, v = zip(*rec["curve"], strict=True)
            label = scaling_key(rec["cell"])[1]
            color = f"C{list(SCALING_OBJECTIVES).index(label)}"  # one colour per objective in every panel
            for ax in (full, zoom):
                ax.plot([s / 60 for s in t], v, marker=".", ms=3, color=color, label=label.upper())
        target = targets.get(d)
        for ax in (full, zoom):
            if target is not None:
                ax.axhline(target, color="0.4", ls="--", lw=0.8, label="target (ML's final)")
            ax.set_xlabel("training time (min, optimisation steps only)")
        if all(v > 0 for rec in by_d[d] for _, v in rec["curve"] if math.isfinite(v)):
            full.set_yscale("log")
        full.set_title(f"D = {d:,}: whole run" + (" (log scale)" if full.get_yscale() == "log" else ""))
        limits = zoom_limits(by_d[d])
        if limits is not None:
            zoom.set_ylim(*limits)
        zoom.set_title(f"D = {d:,}: zoom on the ends of the curves")
        zoom.legend(fontsize=7)
        if col == 0:
            full.set_ylabel("validation NLL (nats, EMA weights)")
            zoom.set_ylabel("validation NLL (nats, EMA weights)")
    fig.suptitle("scaling: validation NLL against training time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
