"""What a run writes while it trains: ``metrics.csv`` and TensorBoard events."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

__all__ = ["CSV_COLUMNS", "MetricsLog"]

CSV_COLUMNS = ["step", "epoch", "train_s", "loss", "grad_norm", "ms_per_iter", "examples_per_s", "lr",
               "skipped_steps", "dropped_examples", "val_nll", "val_bpd", "test_nll", "test_bpd", "kl", "fisher"]


class MetricsLog:
    """``metrics.csv`` plus TensorBoard events; on resume, rows after the resumed step go."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.csv"
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()
                        and int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, values: Mapping[str, float | int | str]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore").writerow({"step": step, **values})
        if self.writer is not None:
            for k, v in values.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


