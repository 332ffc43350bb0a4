"""The peak memory of a training process, recorded in its ``results.json``."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["peak_memory_bytes"]

_STATUS = Path("/proc/self/status")


def _high_water_mark() -> int | None:
    """Linux: ``VmHWM`` of ``/proc/self/status`` in bytes, the peak resident set of this
    process's own address space (None where the file or the line is missing)."""
    try:
        lines = _STATUS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            return int(value) * 1024 if unit == "kB" else None
    return None


def peak_memory_bytes() -> int | None:
    """The largest resident set size this process has had so far, in bytes.

    On Linux it is ``VmHWM`` (:func:`_high_water_mark`): ``getrusage``'s ``ru_maxrss`` there keeps
    the peak of the process that spawned this one (it survives ``exec``), so a small cell started
    by a large parent would report the parent's peak. Elsewhere it is ``ru_maxrss`` (KiB on
    other Unixes, bytes on macOS); None where the platform has neither (Windows). A resumed run
    reports its own process's peak, not that of earlier ones."""
    if (hwm := _high_water_mark()) is not None:
        return hwm
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else 1024 * peak)
