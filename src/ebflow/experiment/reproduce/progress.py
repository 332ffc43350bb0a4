"""The progress of a table's reproduction while its cells train: cells done / running / left,
an ETA from the per-cell budgets, and each running cell's latest validation, read from the
cell's ``metrics.csv`` (polled: the cells are separate ``ebflow train`` processes).

Everything goes through the ``logging`` module (logger ``ebflow.experiment.reproduce.progress``,
level INFO), which the command line shows."""

from __future__ import annotations

import csv
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..training.progress import format_seconds

__all__ = ["latest_row", "TableProgress"]

logger = logging.getLogger(__name__)


def latest_row(run_dir: Path, column: str) -> dict[str, str] | None:
    """The last row of ``run_dir/metrics.csv`` with a value in ``column`` (None: no file yet,
    no such row, or a file that cannot be read: the cell may be writing it right now)."""
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get(column)]
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    return rows[-1] if rows else None


def _float(row: dict[str, str] | None, column: str) -> float | None:
    try:
        return float(row[column]) if row is not None and row.get(column) else None
    except ValueError:
        return None


class TableProgress:
    """Counts the cells of one reproduction and reports them: :meth:`started` and
    :meth:`finished` from the cells' threads, :meth:`poll` (or the thread of :meth:`watching`)
    for the running cells' latest validations. ``budgets`` gives cells their own training
    minutes (the scaling table's per-D budgets); the others have ``budget_minutes``."""

    def __init__(
        self,
        table_dir: Path,
        todo: Sequence[str],
        skipped: int,
        budget_minutes: float | None,
        parallel: int,
        budgets: Mapping[str, float | None] | None = None,
    ) -> None:
        self.table_dir, self.budget, self.parallel = table_dir, budget_minutes, max(1, parallel)
        self.budgets = dict(budgets or {})
        self.total = len(todo) + skipped
        self.done = skipped
        self.running: dict[str, float] = {}  # cell -> wall time it started
        self.waiting = list(todo)
        self.left = len(todo)
        self.failed = 0
        self.shown: dict[str, str] = {}  # cell -> the last validation shown
        self.lock = threading.RLock()  # the counts and their line together

    # -- events from the cells' threads ---------------------------------------------------
    def started(self, cell: str) -> None:
        with self.lock:
            self.left -= 1
            if cell in self.waiting:
                self.waiting.remove(cell)
            self.running[cell] = time.time()
            logger.info("%s", self.summary())

    def finished(self, cell: str, code: int) -> None:
        with self.lock:
            self.running.pop(cell, None)
            self.done += 1
            self.failed += code != 0
            self._show_validation(cell)  # the cell's last word
            logger.info("%s", self.summary())

    # -- what is shown ----------------------------------------------------------------------
    def budget_of(self, cell: str) -> float | None:
        """A cell's training minutes (None: no time budget)."""
        return self.budgets.get(cell, self.budget)

    def cell_fraction(self, cell: str) -> float:
        """The part of its training budget a running cell has spent (0 without a budget)."""
        budget = self.budget_of(cell)
        if not budget:
            return 0.0
        seconds = _float(latest_row(self.table_dir / cell, "train_s"), "train_s") or 0.0
        return min(1.0, max(0.0, seconds / (60 * budget)))

    def eta_seconds(self) -> float | None:
        """Training time left over the running and waiting cells, spread over the parallel
        slots (None when a cell has no time budget: the presets' epochs give no time)."""
        with self.lock:
            running, waiting = list(self.running), list(self.waiting)
        budgets = [self.budget_of(c) for c in running + waiting]
        if not all(budgets) or (not budgets and not self.budget):
            return None
        minutes = sum((1 - self.cell_fraction(c)) * (self.budget_of(c) or 0.0) for c in running)
        minutes += sum(self.budget_of(c) or 0.0 for c in waiting)
        return 60 * minutes / min(self.parallel, max(1, len(running) + len(waiting)))

    def summary(self) -> str:
        with self.lock:
            done, running, left, failed = self.done, len(self.running), self.left, self.failed
        text = (
            f"progress: {done}/{self.total} cells done"
            + (f" ({failed} failed)" if failed else "")
            + f", {running} running, {left} left"
        )
        eta = self.eta_seconds()
        if eta is not None and (running or left):
            text += f"; ETA ~{format_seconds(eta)} of training (from the budgets)"
        return text

    def _show_validation(self, cell: str) -> bool:
        row = latest_row(self.table_dir / cell, "val_nll")
        nll, step = _float(row, "val_nll"), _float(row, "step")
        if row is None or nll is None or step is None:
            return False
        bpd, seconds = _float(row, "val_bpd"), _float(row, "train_s")
        text = (
            f"[{cell}] step {int(step)}: val NLL {nll:.4f} nats"
            + (f", {bpd:.4f} bits/dim" if bpd is not None and math.isfinite(bpd) else "")
            + (f" ({format_seconds(seconds)} of training)" if seconds is not None else "")
        )
        if self.shown.get(cell) == text:
            return False
        self.shown[cell] = text
        logger.info("%s", text)
        return True

    def poll(self) -> None:
        """Show each running cell's latest validation when it is new."""
        with self.lock:
            shown = [self._show_validation(c) for c in list(self.running)]  # every cell, no short cut
            if any(shown):
                logger.info("%s", self.summary())

    def watching(self, every: float) -> _Watcher:
        """A context manager that polls every ``every`` seconds in a daemon thread."""
        return _Watcher(self, every)


class _Watcher:
    def __init__(self, progress: TableProgress, every: float) -> None:
        self.progress, self.every = progress, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="reproduce-progress", daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.progress.poll()
            except Exception as err:  # noqa: BLE001 - the display must never stop a reproduction
                logger.debug("progress poll failed: %s", err)

    def __enter__(self) -> TableProgress:
        self.thread.start()
        return self.progress

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
