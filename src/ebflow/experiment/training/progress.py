"""What a training run shows while it trains (rank 0 only): the progress bar, one line per
validation, ``curves.png``, the sample grid in TensorBoard and the divergence warning.

* The bar counts steps when the run has a step total (``max_iters`` or ``epochs``); with only a
  time budget (``max_minutes``) it counts training seconds, so it has a total and an ETA. Its
  postfix holds the training loss (the mean over the last ``log_every`` steps) and the latest
  validation NLL.
* Each validation is one line through the ``logging`` module (logger
  ``ebflow.experiment.training.progress``, level INFO: silent in a library, shown by the
  command line): step, validation NLL (nats), bits/dim and the training time so far.
* ``curves.png`` is redrawn at a validation when :data:`CURVES_EVERY_SECONDS` of wall-clock
  have passed since the last drawing (the first validation always draws), and once more when
  the run ends (finished, stopped or failed) if a validation is not drawn yet: a plot costs
  about 0.2 s (0.9 s the first, with matplotlib's import), about 4 % of a small model's run
  when it was drawn at every validation.
* A validation NLL far above the run's best (:func:`diverging`) gets a
  :class:`~ebflow.experiment.training.state.TrainingDivergenceWarning`; the run goes on.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ...errors import EBFlowError, MissingDependencyError
from ..config.schema import RunConfig
from ..images.plots import save_curves
from ..rundir.metrics import MetricsLog
from .state import TrainingDivergenceWarning

__all__ = [
    "DIVERGENCE_MIN_NATS",
    "DIVERGENCE_FRACTION",
    "diverging",
    "ProgressBar",
    "ValidationReport",
    "CURVES_EVERY_SECONDS",
    "format_seconds",
]

logger = logging.getLogger(__name__)

#: A validation NLL above ``best + max(DIVERGENCE_MIN_NATS, DIVERGENCE_FRACTION * |best|)``
#: (or a non-finite one after a finite best) is taken as a diverging run.
DIVERGENCE_MIN_NATS = 100.0
DIVERGENCE_FRACTION = 0.5

#: Least wall-clock seconds between two drawings of ``curves.png`` during a run.
CURVES_EVERY_SECONDS = 30.0

#: How many samples the TensorBoard grid shows.
TENSORBOARD_SAMPLES = 16


def diverging(val_nll: float, best: float) -> bool:
    """Whether a validation NLL is far above the best so far: above
    ``best + max(100 nats, 50 % of |best|)``, or non-finite after a finite best (no best yet:
    never)."""
    if not math.isfinite(best):
        return False
    if not math.isfinite(val_nll):
        return True
    return val_nll > best + max(DIVERGENCE_MIN_NATS, DIVERGENCE_FRACTION * abs(best))


def format_seconds(seconds: float) -> str:
    """``12.34`` -> ``12.3 s``; ``75.3`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class ProgressBar:
    """The loop's tqdm bar: over steps, or over training seconds when only ``max_minutes``
    bounds the run; :meth:`advance` after each step, :meth:`set` for the postfix."""

    def __init__(self, config: RunConfig, batches_per_epoch: int, step: int, train_seconds: float) -> None:
        from tqdm.auto import tqdm

        c = config.training
        totals = [c.max_iters] if c.max_iters is not None else []
        if c.epochs is not None:
            totals.append(c.epochs * batches_per_epoch)
        desc = f"{config.runtime.name} {config.objective.loss}"
        self.by_time = not totals and c.max_minutes is not None
        self.postfix: dict[str, str] = {}
        if self.by_time:
            total = 60.0 * c.max_minutes  # type: ignore[operator]
            self.bar = tqdm(
                total=total,
                initial=min(train_seconds, total),
                unit="s",
                desc=desc,
                dynamic_ncols=True,
                mininterval=0.5,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of training [{elapsed}<{remaining}{postfix}]",
            )
        else:
            self.bar = tqdm(
                total=min(totals) if totals else None,
                initial=step,
                unit="it",
                desc=desc,
                dynamic_ncols=True,
                mininterval=0.5,
            )

    def advance(self, seconds: float) -> None:
        """One step done, which took ``seconds`` of training time."""
        if self.by_time:
            self.bar.update(max(0.0, min(seconds, self.bar.total - self.bar.n)))
        else:
            self.bar.update(1)

    def set(self, **values: str) -> None:
        self.postfix.update(values)
        self.bar.set_postfix(self.postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()


class ValidationReport:
    """What rank 0 does after each validation: the log line, the bar's postfix, the
    divergence warning, ``curves.png`` and the TensorBoard sample grid."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.run_dir, self.name = run_dir, name
        self.warned = False  # one warning per excursion above the threshold
        self.curves = True  # False once curves.png cannot be drawn (no matplotlib): one warning
        self.drawn_at: float | None = None  # time.monotonic() of the last drawing
        self.pending: MetricsLog | None = None  # a log whose latest validation is not drawn yet

    def __call__(self, trainer: Any, val: dict[str, float], bar: ProgressBar | None) -> None:
        c = trainer.counters
        nll, bpd = val["nll"], val["bpd"]
        logger.info(
            "step %d: val NLL %.4f nats, %.4f bits/dim (%s of training)",
            c.step,
            nll,
            bpd,
            format_seconds(c.train_seconds),
        )
        if bar is not None:
            bar.set(val=f"{nll:.4g}")
        self._check_divergence(c.step, nll, c.best_val_nll)
        log: MetricsLog | None = trainer.log
        if log is None:
            return
        self.pending = log
        if self.drawn_at is None or time.monotonic() - self.drawn_at >= CURVES_EVERY_SECONDS:
            self.flush()
        if log.writer is not None and trainer.pre is not None:
            self._samples_to_tensorboard(trainer, log)

    def flush(self) -> None:
        """Draw ``curves.png`` if a validation is not drawn yet (``train`` calls this when the run ends).
        A failed plot is a warning, never a failed run."""
        log, self.pending = self.pending, None
        if log is None or not self.curves:
            return
        self.drawn_at = time.monotonic()
        try:
            save_curves(log.path, self.run_dir / "curves.png", title=self.name)
        except MissingDependencyError as err:
            self.curves = False
            warnings.warn(f"{err}; the run goes on without it", RuntimeWarning, stacklevel=2)
        except Exception as err:  # noqa: BLE001 - a plot must never stop a run
            warnings.warn(
                f"could not write {self.run_dir / 'curves.png'}: {err}", RuntimeWarning, stacklevel=2
            )

    def _check_divergence(self, step: int, nll: float, best: float) -> None:
        if not diverging(nll, best):
            self.warned = False
            return
        if self.warned:
            return
        self.warned = True
        warnings.warn(
            f"step {step}: the validation NLL {nll:.6g} nats is far above the run's best {best:.6g} "
            f"(threshold: best + max({DIVERGENCE_MIN_NATS:g} nats, {100 * DIVERGENCE_FRACTION:g} % of "
            "|best|)): the run is probably diverging. It goes on (best.pt keeps the best step); "
            "a lower learning rate (--set lr=...) or gradient clipping (--set grad_clip=5) may help",
            TrainingDivergenceWarning,
            stacklevel=2,
        )

    @staticmethod
    def _samples_to_tensorboard(trainer: Any, log: MetricsLog) -> None:
        """A grid of samples with the EMA weights (the validated ones), from a fixed seed."""
        n = TENSORBOARD_SAMPLES
        g = torch.Generator(device=trainer.device).manual_seed(trainer.config.runtime.seed)
        try:
            with trainer.ema.average_parameters(), torch.no_grad():
                trainer.model.eval()
                try:
                    x = trainer.model.sample(n, generator=g)
                finally:
                    trainer.model.train()
        except EBFlowError as err:  # e.g. a layer that cannot be inverted at this step
            logger.debug("no TensorBoard samples at step %d: %s", trainer.counters.step, err)
            return
        pre = trainer.pre
        x = torch.nan_to_num(x.detach().double().cpu(), nan=0.0, posinf=1e6, neginf=-1e6)
        pixels = pre.to_pixels(x) if trainer.use_map else x.floor().clamp(0, pre.num_bins - 1)
        log.log_images(trainer.counters.step, pixels / (pre.num_bins - 1))
