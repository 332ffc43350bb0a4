"""The peak memory of a training process, recorded in its ``results.json``."""

from __future__ import annotations

import sys

__all__ = ["peak_memory_bytes"]


def peak_memory_bytes() -> int | None:
    """The largest resident set size this process has had so far, in bytes: ``getrusage``'s
    ``ru_maxrss`` (KiB on Linux, bytes on macOS); None where the platform has no ``resource``
    module (Windows). A resumed run reports its own process's peak, not that of earlier ones."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else 1024 * peak)
