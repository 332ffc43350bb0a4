"""The numbers of the scaling study's report (``ebflow reproduce scaling``): the training time at
which a validation curve first reaches a target NLL, and the growth exponent of the time per
step in D."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["growth_exponent", "time_to_target"]


def time_to_target(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    r"""The training time (s) at which a validation curve of ``(time, NLL)`` points, in time order,
    first reaches ``target``: between the last validation above it, :math:`(t_0, v_0)`, and the first
    at or below it, :math:`(t_1, v_1)`, linearly, :math:`t = t_0 + (t_1 - t_0)(v_0 - T)/(v_0 - v_1)`;
    the first validation's own time when it is already at or below (or follows a non-finite one);
    None when no validation reaches it."""
    before: tuple[float, float] | None = None
    for t, v in curve:
        if math.isfinite(v) and v <= target:
            if before is None or not math.isfinite(before[1]):
                return float(t)
            t0, v0 = before
            return t0 + (t - t0) * (v0 - target) / (v0 - v)
        before = (t, v)
    return None


def growth_exponent(ms_per_step: Mapping[int, float]) -> float | None:
    r"""The least-squares slope :math:`a` of :math:`\log(\text{ms/step}) = a \log D + b` over the
    dimensions given (``{D: ms per step}``, positive values only); None with fewer than two."""
    points = [(math.log(d), math.log(ms)) for d, ms in ms_per_step.items() if d > 0 and ms > 0]
    if len({x for x, _ in points}) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx
