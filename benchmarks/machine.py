"""How much of the machine other processes used while the benchmark ran.

Timings from a shared machine are only as good as its quietness. On Linux the busy CPU time of
the whole machine (``/proc/stat``) minus this process's own CPU time (``getrusage``), divided by
the wall time and the CPU count, is the share of the CPUs that *other* processes took during
the run. Elsewhere it is unknown (``None``) and the load average is all there is.
"""

from __future__ import annotations

import os
import resource
import time

__all__ = ["OtherProcessLoad", "load_average"]


def _machine_busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...
    ticks = [int(v) for v in fields[1:9]]
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process and of its finished children (the compile probes of the
    ``compiled`` section are this benchmark's own work, not another process's load)."""
    return sum(
        u.ru_utime + u.ru_stime
        for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


class OtherProcessLoad:
    """Call :meth:`start`, run the benchmark, then :attr:`share`: the fraction of all CPUs
    that other processes used meanwhile (``None`` where ``/proc/stat`` is unavailable)."""

    def __init__(self) -> None:
        self._start: tuple[float | None, float, float] | None = None

    def start(self) -> OtherProcessLoad:
        self._start = (_machine_busy_seconds(), _own_seconds(), time.monotonic())
        return self

    @property
    def share(self) -> float | None:
        if self._start is None or self._start[0] is None:
            return None
        busy = _machine_busy_seconds()
        if busy is None:
            return None
        wall = time.monotonic() - self._start[2]
        if wall <= 0:
            return None
        others = (busy - self._start[0]) - (_own_seconds() - self._start[1])
        # clamped: /proc/stat counts in clock ticks and getrusage and the wall clock are read at
        # slightly different moments, so on a loaded machine the quotient can leave [0, 1].
        return min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))


def load_average() -> str:
    """The 1- and 5-minute load averages, as text ("n/a" where unavailable)."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"
