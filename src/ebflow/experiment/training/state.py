"""The state of a training run that outlives a step: its counters (:class:`TrainState`, stored in
every checkpoint), the request to stop it (:class:`StopRequest`) and the ways it ends early
(:class:`TrainingDivergedError`, :class:`TrainingInterrupted`)."""

from __future__ import annotations

import math
import signal
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ...errors import EBFlowError

__all__ = [
    "TrainingDivergedError",
    "TrainingDivergenceWarning",
    "TrainingInterrupted",
    "StopRequest",
    "TrainState",
]


class TrainingDivergedError(EBFlowError):
    """Too many consecutive non-finite steps; the last checkpoint holds the last finite state."""


class TrainingDivergenceWarning(UserWarning):
    """A validation NLL far above the run's best (the run goes on; see
    :func:`ebflow.experiment.training.progress.diverging` for the threshold)."""


class TrainingInterrupted(EBFlowError):
    """Training stopped on a signal; ``step`` is the step of the checkpoint written on the way
    out (None: stopped outside the training loop, the last checkpoint as it was)."""

    def __init__(self, signum: int, run_dir: str | Path, step: int | None = None) -> None:
        super().__init__(int(signum), Path(run_dir), step)  # its args rebuild it (pickle)
        self.signum, self.run_dir, self.step = int(signum), Path(run_dir), step

    def __str__(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        return f"interrupted by {signal.Signals(self.signum).name}{at}"


@dataclass
class StopRequest:
    """A request to stop training, set by a signal handler (the command line installs one; the
    library none) and honoured by :meth:`Trainer.after_step`: a checkpoint at the current step,
    then :class:`TrainingInterrupted`. ``polling`` is True while the training loop checks it."""

    signum: int = 0
    polling: bool = False


@dataclass
class TrainState:
    """The counters of a training run, in one place: the :class:`Trainer` holds one, a
    checkpoint stores its fields under their names (:meth:`to_checkpoint`,
    :meth:`from_checkpoint`), and :class:`~ebflow.experiment.training.results.TrainResult` reports it."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  #: steps done in the current epoch
    train_seconds: float = 0.0  #: training time (evaluation and checkpoints excluded)
    compile_seconds: float = 0.0  #: of train_seconds: compiling (config ``compile``), every (re)start
    skipped_steps: int = 0  #: non-finite steps, all in all
    consecutive_nonfinite: int = 0  #: non-finite steps since the last finite one
    dropped_examples: int = 0  #: outside the model's domain (drop_out_of_domain), of seen_examples
    seen_examples: int = 0  #: training examples this process's objective has seen
    best_val_nll: float = math.inf
    run_id: str | None = None  #: the run directory's id, carried by every checkpoint
    device_type: str | None = None  #: the kind of device that trained the run (cpu, cuda)

    def resume_on(self, device_type: str, *, warn: bool = True) -> None:
        """Record that the run goes on on ``device_type``; warn (``warn``) when it trained on another
        kind of device: it continues correctly, but its random streams (noise, dequantisation) are
        the new device's, so it no longer repeats an uninterrupted run bit for bit."""
        before = self.device_type
        if warn and before is not None and before != device_type:
            warnings.warn(
                f"this run trained on {before} and resumes on {device_type}: it continues correctly, "
                f"but its noise streams are {device_type}'s from here on, so it will not repeat an "
                f"uninterrupted {before} run bit for bit",
                UserWarning,
                stacklevel=3,
            )
        self.device_type = device_type

    def to_checkpoint(self) -> dict[str, Any]:
        """The counters as a checkpoint holds them: one key per field."""
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> TrainState:
        """The counters of a checkpoint's state; the keys that older checkpoints lack
        (``dropped_examples``, ``seen_examples``, ``run_id``) take their defaults, any other
        missing key is a ``KeyError``."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in state and f.name not in _ADDED_LATER:
                raise KeyError(f.name)
            default: Any = f.default  # every field has one (never dataclasses.MISSING)
            value = state.get(f.name, default)
            values[f.name] = value if default is None else type(default)(value)
        return cls(**values)


#: Checkpoint keys that the first checkpoints did not have.
_ADDED_LATER = frozenset({"dropped_examples", "seen_examples", "run_id", "device_type", "compile_seconds"})
