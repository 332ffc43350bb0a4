"""Running the cells of a table: one ``ebflow train`` process per cell, in its own run
directory ``OUT/TABLE/CELL``, resumed when unfinished and skipped when finished
(:mod:`ebflow.experiment.reproduce.tables` defines the cells)."""

from __future__ import annotations

import argparse  # the options of a reproduction (see ebflow.cli.reproduce)
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .tables import Cell

__all__ = ["resumable_overrides", "cell_budget", "cell_done", "device_slots", "train_command", "train_cell"]

logger = logging.getLogger(__name__)


def resumable_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """The ``KEY=VALUE`` overrides that also apply to a resumed cell: the stopping rule and
    bookkeeping keys a checkpoint may change (``epochs``, ``max_iters``, ``eval_every``, ...;
    :data:`ebflow.experiment.config.schema.RESUMABLE_KEYS`). The others shape a new cell only."""
    from ..config.schema import RESUMABLE_KEYS

    out = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() in RESUMABLE_KEYS:
            out[key.strip()] = value.strip()
    return out


def cell_budget(cell: Cell, budget_minutes: float | None) -> float | None:
    """The training minutes of a cell: ``--budget-minutes`` when given (it overrides every
    cell's), else the cell's own default (None: the preset's stopping rule)."""
    return budget_minutes if budget_minutes is not None else cell.budget_minutes


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


def train_command(
    cell: Cell, run_dir: Path, args: argparse.Namespace, device: str | None = None
) -> list[str]:
    """The ``ebflow train`` command of a cell: a fresh run, or a resume when the cell's
    directory holds a checkpoint; ``device`` (default: ``args.device``) is where it trains."""
    sets = ["progress=false"]
    budget = cell_budget(cell, args.budget_minutes)
    if budget is not None:
        sets.append(f"max_minutes={budget}")
    threads = [f"num_threads={args.threads}"] if args.threads is not None else []  # wins over the cell's
    resume = (run_dir / "checkpoints" / "last.pt").exists()
    if not resume:
        if args.data_dir:
            sets += [f"data_dir={args.data_dir}", "download=false"]
        sets += [f"{k}={_yaml_value(v)}" for k, v in cell.overrides.items()]
        sets += threads
        sets += list(args.overrides)
        cmd = [
            "train",
            "--config",
            cell.preset,
            "--loss",
            cell.loss,
            "--out",
            str(run_dir),
            "--seed",
            str(cell.seed if cell.seed is not None else args.seed),
        ]
    else:
        if args.data_dir:
            sets += [f"data_dir={args.data_dir}"]
        cmd = ["train", "--resume", str(run_dir)]
        sets += threads
        sets += [f"{k}={v}" for k, v in resumable_overrides(args.overrides).items()]
    device = device if device is not None else args.device
    if device:
        cmd += ["--device", device]
    return [sys.executable, "-m", "ebflow", *cmd, *[a for s in sets for a in ("--set", s)]]


def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def train_cell(cell: Cell, run_dir: Path, args: argparse.Namespace, device: str | None = None) -> int:
    cmd = train_command(cell, run_dir, args, device)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy()
    threads = args.threads if args.threads is not None else cell.overrides.get("num_threads")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    log_path = run_dir.parent / f"{cell.name}.log"
    logger.info("[%s] %s  (log: %s)", cell.name, " ".join(cmd[1:]), log_path)
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code == 0 and (run_dir / "results.json").exists():
        (run_dir / "cell.json").write_text(
            json.dumps(
                {
                    "cell": cell.name,
                    "preset": cell.preset,
                    "loss": cell.loss,
                    "budget_minutes": cell_budget(cell, args.budget_minutes),
                    "resumable_overrides": resumable_overrides(args.overrides),
                    "wall_seconds_last_call": time.time() - t0,
                }
            )
        )
    logger.info("[%s] exit %d after %.0f s", cell.name, code, time.time() - t0)
    return code
