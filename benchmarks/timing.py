"""Timing helpers: round-robin medians (so that ratios survive a noisy machine) and power-law fits.

Several steps are timed *in turns*: every round runs each step once (or a few times when one call
is very short), so a slow spell of the machine hits every step alike and the ratios between
their medians stay meaningful even when the absolute times drift.

Kept hand-written rather than ``torch.utils.benchmark.Timer``: its ``blocked_autorange`` and
``adaptive_autorange`` time one statement at a time, and on a shared machine the ratios need the
methods interleaved round by round.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

__all__ = ["Timing", "synchronize", "time_round_robin", "fit_power_law"]

#: The names of the timed steps.
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Timing:
    """Median and quartiles (milliseconds per call) over ``repeats`` timed rounds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    calls_per_round: int


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU): a clock reading means work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def time_round_robin(
    steps: Mapping[K, Callable[[], object]],
    *,
    device: torch.device,
    warmup: int = 2,
    repeats: int = 7,
    min_round_s: float = 0.02,
    on_round: Callable[[int], None] | None = None,
) -> dict[K, Timing]:
    """Median wall-clock time of each step, measured in interleaved rounds after warm-up.

    A step that takes less than ``min_round_s`` is called several times per round (the round's
    time divided by the calls), so that timer resolution and Python overhead do not dominate;
    the last warm-up call (at least one, untimed, even with ``warmup=0``) calibrates that.
    The order of the steps rotates from round to round.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(steps)
    calls: dict[K, int] = {}
    for name in names:
        last = 0.0
        for _ in range(max(warmup, 1)):
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            last = time.perf_counter() - start
        calls[name] = max(1, min(1000, math.ceil(min_round_s / max(last, 1e-9))))
    samples: dict[K, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            step, n = steps[name], calls[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(n):
                step()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1000.0 / n)
        if on_round is not None:
            on_round(r)
    out = {}
    for name in names:
        q1, med, q3 = _quartiles(samples[name])
        out[name] = Timing(med, q1, q3, repeats, calls[name])
    return out


def fit_power_law(sizes: Sequence[float], times: Sequence[float]) -> float:
    """Exponent ``k`` of the least-squares fit ``log t = k log D + c``; NaN with < 2 points."""
    pts = [(math.log(d), math.log(t)) for d, t in zip(sizes, times, strict=True) if d > 0 and t > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return float("nan")
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
