"""The compiled path of a training run (config ``compile``): the model's kernels
(:func:`ebflow.compile_model`) and the compile time, reported once and kept in the counters."""

from __future__ import annotations

import logging

from ...compiled import CompiledEnergy, compile_cache, compile_model
from ...flow import EBFlow
from .state import TrainState

__all__ = ["CompileClock"]

logger = logging.getLogger(__name__)


class CompileClock:
    """Compiles ``model``'s kernels when ``enabled`` and, after each step, adds this process's
    compile time to ``counters.compile_seconds`` (the run's earlier (re)starts included). The
    compilation happens inside the first steps, so it is part of the training time
    (``train_seconds``, the ``max_minutes`` budget) as well; the first step's is logged."""

    def __init__(self, model: EBFlow, enabled: bool, counters: TrainState, *, log: bool = True) -> None:
        self.model, self.log = model, log
        self.before = counters.compile_seconds
        self.reported = not enabled
        if enabled:
            compile_model(model)
            cache = compile_cache()
            if log and model.kernels is not None:
                logger.info(
                    "compile: the first step compiles the training kernels (Inductor cache %s: %s)",
                    "on" if cache.enabled else "OFF, every run compiles from scratch",
                    cache.directory,
                )

    def after_step(self, counters: TrainState) -> None:
        """Update ``counters.compile_seconds``; log the compile time after the first step."""
        kernels = self.model.kernels
        if not isinstance(kernels, CompiledEnergy):
            return
        counters.compile_seconds = self.before + kernels.compile_seconds
        if not self.reported:
            self.reported = True
            if self.log and kernels.enabled:
                logger.info(
                    "compile: %.1f s in the first step (counted in the training time)",
                    kernels.compile_seconds,
                )
