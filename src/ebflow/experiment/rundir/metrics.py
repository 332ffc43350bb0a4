"""What a run writes while it trains: ``metrics.csv`` and TensorBoard events.

TensorBoard's scalars are grouped by what they measure: ``train/...`` (loss, grad_norm, lr,
throughput, skipped and dropped counts), ``val/nll``, ``val/bpd``, ``test/...``; a grid of model
samples (image data) is ``val/samples``. ``metrics.csv`` keeps its flat column names.

TensorBoard needs the ``tensorboard`` package (the ``ebflow[tensorboard]`` extra): without it a
run asking for events warns once and goes on with ``metrics.csv`` only."""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..._optional import require
from ...errors import MissingDependencyError
from ...images import image_grid
from .files import write_text_atomic

__all__ = ["CSV_COLUMNS", "MetricsLog", "tensorboard_tag"]

CSV_COLUMNS = [
    "step",
    "epoch",
    "train_s",
    "loss",
    "grad_norm",
    "ms_per_iter",
    "examples_per_s",
    "lr",
    "skipped_steps",
    "dropped_examples",
    "val_nll",
    "val_bpd",
    "test_nll",
    "test_bpd",
    "kl",
    "fisher",
]


def tensorboard_tag(column: str) -> str:
    """The TensorBoard tag of a ``metrics.csv`` column: ``val_nll`` -> ``val/nll``,
    ``test_bpd`` -> ``test/bpd``, ``kl``/``fisher`` -> ``test/...``, the rest ``train/...``."""
    for split in ("val", "test"):
        if column.startswith(split + "_"):
            return f"{split}/{column[len(split) + 1 :]}"
    if column in ("kl", "fisher"):
        return f"test/{column}"
    return f"train/{column}"


class MetricsLog:
    """``metrics.csv`` plus TensorBoard events; on resume, rows after the resumed step go."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.csv"
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [
                    r
                    for r in csv.DictReader(f)
                    if r.get("step", "").isdigit() and int(r["step"]) <= resume_step
                ]
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        if resume_step is None:  # a new run: a new file with its header
            self.path.write_text(text.getvalue())
        else:  # a resume keeps the rows up to its checkpoint: never a half-written file
            write_text_atomic(self.path, text.getvalue(), "metrics")
        self.writer: Any = None
        if tensorboard:
            try:
                tb = require("torch.utils.tensorboard", purpose="TensorBoard logging")
            except MissingDependencyError as err:  # never lose a run for its TensorBoard events
                warnings.warn(
                    f"{err}; this run writes metrics.csv only (--set tensorboard=false: no warning)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                purge_step = None if resume_step is None else resume_step + 1
                self.writer = tb.SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, values: Mapping[str, float | int | str]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore").writerow({"step": step, **values})
        if self.writer is not None:
            for k, v in values.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(tensorboard_tag(k), v, step)

    def log_images(self, step: int, pixels: Tensor, tag: str = "val/samples") -> None:
        """A grid of images (``(n, C, H, W)`` in ``[0, 1]``) in TensorBoard (no-op without it)."""
        if self.writer is None:
            return
        nrow = max(1, math.ceil(math.sqrt(pixels.shape[0])))
        self.writer.add_image(tag, image_grid(pixels.float().clamp(0, 1), nrow, padding=1), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
