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

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigError
from ...objectives import OBJECTIVES

__all__ = [
    "COMPILED_CELLS",
    "Cell",
    "TABLES",
    "PAPER_BATCHES_PER_S",
    "PAPER_TOLERANCE",
    "SCALING_DIMENSIONS",
    "SCALING_OBJECTIVES",
    "SM_LOSSES",
    "cells_of",
    "scaling_key",
]

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
    #: training minutes when ``--budget-minutes`` is not given (None: the preset's stopping rule)
    budget_minutes: float | None = None
    #: the cell's random seed (None: the command's ``--seed``); set by ``--seeds`` repetitions
    seed: int | None = None


#: Objectives whose cells train with the compiled step (config ``compile``, docs/compiled.md) per
#: preset: where it pays on a CPU (mnist-cnn SSM: about 0.7x the eager step after about a minute of
#: compilation, so it pays after some 1,800 of the 50,000 steps; DSM and FDSSM gain little or lose).
COMPILED_CELLS: dict[str, tuple[str, ...]] = {
    "mnist-cnn": ("ssm",),
    "cifar-cnn": ("ssm",),
    "mnist-glow": ("ssm",),
}


def _compiled(preset: str, loss: str) -> dict[str, Any]:
    return {"compile": True} if loss in COMPILED_CELLS.get(preset, ()) else {}


def _likelihood_row(preset: str, paper: Sequence[float]) -> list[Cell]:
    return [
        Cell(loss, preset, loss, value, _compiled(preset, loss), group=preset)
        for loss, value in zip(SM_LOSSES, paper, strict=True)
    ]


def _ablation() -> list[Cell]:
    # (model, objective) -> (no EMA no MaP, EMA no MaP, EMA + MaP): the paper's Table 4
    paper = {
        ("fc", "ssm"): (1757.5, 1720.5, 1092.8),
        ("fc", "dsm"): (4660.3, 4455.0, 1099.2),
        ("fc", "fdssm"): (3267.0, 3166.3, 1104.1),
        ("cnn", "ssm"): (3518.0, 3504.5, 1107.5),
        ("cnn", "dsm"): (3170.0, 3180.0, 1109.5),
        ("cnn", "fdssm"): (3593.3, 3560.3, 1122.1),
    }
    settings: tuple[tuple[str, dict[str, Any]], ...] = (
        ("noema-nomap", {"ema_decay": 0.0, "map": False}),
        ("ema-nomap", {"map": False}),
        ("ema-map", {}),
    )
    cells = []
    for (model, loss), values in paper.items():
        for (label, sets), value in zip(settings, values, strict=True):
            sets = dict(sets)
            if not sets.get("map", True) and OBJECTIVES[loss].perturbs_input:
                sets["drop_out_of_domain"] = True
            if sets.get("map", True):  # without MaP the flow's Logit breaks the compiled graph
                sets.update(_compiled(f"mnist-{model}", loss))
            cells.append(
                Cell(f"{model}-{loss}-{label}", f"mnist-{model}", loss, value, sets, group=f"{model}-{label}")
            )
    return cells


#: The scaling study's dimensions: D -> (preset, default budget in training minutes, validation
#: period in seconds of training time: about 30 validations per curve).
SCALING_DIMENSIONS: dict[int, tuple[str, float, float]] = {
    784: ("mnist-fc", 30.0, 60.0),
    3136: ("mnist-mosaic2-fc", 30.0, 60.0),
    7056: ("mnist-mosaic3-fc", 60.0, 120.0),
}
#: The scaling study's objectives: label -> (loss, overrides). ML-LU is maximum likelihood with
#: Dense(parameterization="lu") layers (W = PLU, O(D) log-determinant, O(B D²) per step).
SCALING_OBJECTIVES: dict[str, tuple[str, dict[str, Any]]] = {
    "ml": ("ml", {}),
    "ml-lu": ("ml", {"parameterization": "lu"}),
    "ssm": ("ssm", {}),
    "dsm": ("dsm", {}),
    "fdssm": ("fdssm", {}),
}
#: Steps between checkpoints at each D, full-matrix ML / the others: a few minutes of one busy
#: thread each (ML's step is about D³-bound; a 7,056 checkpoint is about 1.2 GB).
_SCALING_CHECKPOINTS = {784: (1000, 5000), 3136: (100, 1000), 7056: (10, 200)}


def _scaling() -> list[Cell]:
    """Every objective at every D, one thread each, stopped by training time only (no epoch
    limit), validated every few seconds of training time rather than every N steps."""
    cells = []
    for d, (preset, minutes, period) in SCALING_DIMENSIONS.items():
        for label, (loss, sets) in SCALING_OBJECTIVES.items():
            full_ml = label == "ml"
            overrides = {
                **sets,
                "epochs": None,
                "eval_every": 10**9,
                "eval_every_seconds": period,
                "checkpoint_every": _SCALING_CHECKPOINTS[d][0 if full_ml else 1],
                "log_every": 50 if d <= 784 else 10 if d <= 3136 else 5,
                "num_threads": 1,
            }
            cells.append(
                Cell(f"d{d}-{label}", preset, loss, None, overrides, group=str(d), budget_minutes=minutes)
            )
    return cells


def scaling_key(cell_name: str) -> tuple[int, str]:
    """``"d3136-ml-lu"`` -> ``(3136, "ml-lu")``: the dimension and objective label of a scaling cell."""
    head, _, label = cell_name.partition("-")
    if not head.startswith("d") or not head[1:].isdigit() or label not in SCALING_OBJECTIVES:
        raise ConfigError(f"{cell_name!r} is not a cell of the scaling table (dD-OBJECTIVE)")
    return int(head[1:]), label


TABLES: dict[str, list[Cell]] = {
    "mnist-fc": _likelihood_row("mnist-fc", (1092.4, 1092.3, 1092.8, 1099.2, 1104.1)),
    "mnist-cnn": _likelihood_row("mnist-cnn", (1101.3, 1098.3, 1107.5, 1109.5, 1122.1)),
    "cifar-fc": _likelihood_row("cifar-fc", (11912.9, 11915.6, 11917.7, 11940.0, 12347.8)),
    "cifar-cnn": _likelihood_row("cifar-cnn", (11408.7, 11553.6, 11435.5, 11462.3, 11766.0)),
    "ablation": _ablation(),
    "toy2d": [
        Cell(f"{data}-{loss}", f"toy2d-{data}", loss, None, metric="kl", group=data)
        for data in ("sine", "swirl", "checkerboard")
        for loss in SM_LOSSES
    ],
    "mm10": [Cell(p, f"mm10-{p}", "ml", None, group="mm10") for p in ("full", "tril", "triu", "lu")],
    "glow": [
        Cell("ssm", "mnist-glow", "ssm", 728.0, _compiled("mnist-glow", "ssm"), group="glow"),
        Cell("dsm", "mnist-glow", "dsm", None, group="glow"),
    ],
    "scaling": _scaling(),
}
#: The paper's GPU throughput (batches per second) for the likelihood tables (Table 2).
PAPER_BATCHES_PER_S = {
    "mnist-fc": (8.00, 12.27, 33.11, 66.67, 130.21),
    "mnist-cnn": (0.21, 0.29, 7.09, 18.32, 38.76),
    "cifar-fc": (5.05, 7.35, 29.85, 57.14, 62.50),
    "cifar-cnn": (0.02, 0.03, 7.35, 18.41, 39.84),
}

#: How close to the paper a finished cell must be (|ours − paper| / paper) to count as
#: reproduced: 1 % for the fully-connected flows, 2 % for the convolutional ones (the
#: project's targets; the paper's own 3-seed intervals are up to ±0.3 %).
PAPER_TOLERANCE = {"mnist-fc": 0.01, "mnist-cnn": 0.02, "cifar-fc": 0.01, "cifar-cnn": 0.02}


def cells_of(
    table: str, objectives: Sequence[str] | None = None, only: Sequence[str] | None = None
) -> list[Cell]:
    """The cells of ``table``, restricted to ``objectives`` and to names matching any of the
    glob patterns ``only``."""
    if table not in TABLES:
        raise ConfigError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}")
    cells = TABLES[table]
    if objectives:
        unknown = sorted(set(objectives) - set(SM_LOSSES))
        if unknown:
            raise ConfigError(
                f"unknown objective(s) {', '.join(unknown)}; choose from {', '.join(SM_LOSSES)}"
            )
        cells = [c for c in cells if c.loss in objectives]
    if only:
        cells = [c for c in cells if any(fnmatch.fnmatch(c.name, pat) for pat in only)]
    if not cells:
        raise ConfigError(f"no cell of table {table!r} matches the selection")
    return cells
