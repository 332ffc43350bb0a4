"""Step-size schedules of Langevin chains."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import ConfigError

__all__ = ["SCHEDULES", "Schedule", "step_sizes"]


def _linear(t: float) -> float:
    return 1.0 - t


def _cosine(t: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * t))


SCHEDULES: tuple[str, ...] = ("constant", "linear", "geometric", "cosine")
Schedule = str | Callable[[int, int], float]


def step_sizes(
    step_size: float, final_step_size: float | None, schedule: Schedule, steps: int
) -> list[float]:
    r"""Step size of each iteration. Decays interpolate :math:`\eta_0 \to \eta_1` over the run."""
    if not (step_size > 0 and math.isfinite(step_size)):
        # A geometric decay from eta_0 <= 0 would give complex or infinite sizes, not this error.
        raise ConfigError(f"step size must be finite and > 0, got {step_size}")
    if callable(schedule):
        sizes = [step_size * float(schedule(i, steps)) for i in range(steps)]
    else:
        if schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown step-size schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if final_step_size is not None and not final_step_size > 0:
            raise ConfigError(f"final step size must be > 0, got {final_step_size}")
        t = [i / max(steps - 1, 1) for i in range(steps)]
        if schedule == "constant":
            sizes = [step_size] * steps
        elif final_step_size is None:
            raise ConfigError(f"schedule {schedule!r} needs final_step_size")
        elif schedule == "geometric":
            sizes = [step_size * (final_step_size / step_size) ** ti for ti in t]
        else:
            shape = _linear if schedule == "linear" else _cosine
            sizes = [final_step_size + (step_size - final_step_size) * shape(ti) for ti in t]
    bad = [s for s in sizes if not (s > 0 and math.isfinite(s))]
    if bad:
        raise ConfigError(f"step sizes must be finite and > 0; the schedule gave {bad[0]}")
    return sizes
