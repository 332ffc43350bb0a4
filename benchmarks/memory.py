"""Peak memory allocated by one call (tensors created during the call, at their highest total).

* CUDA: the allocator's peak statistic (``max_memory_allocated``) minus what was allocated
  before the call.
* CPU: PyTorch has no peak counter for CPU tensors, so the call runs under the profiler with
  memory profiling; every allocation and release made during the call is an event, and the peak
  is the highest running total of those events. Memory allocated before the call (parameters,
  optimiser state) is not counted, on either device.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator

import torch

__all__ = ["peak_memory_bytes"]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C-level messages on file descriptor 2 (the profiler prints start/stop lines)."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _cpu_peak(call: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        with _quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                call()
            prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    changes = sorted(
        (float(e.get("ts", 0)), int(e["args"]["Bytes"]))
        for e in events
        if e.get("name") == "[memory]"
        and "Bytes" in e.get("args", {})
        and str(e["args"].get("Device Type", 0)) in ("0", "cpu", "CPU")
    )
    total = peak = 0
    for _, nbytes in changes:
        total += nbytes
        peak = max(peak, total)
    return peak


def _cuda_peak(call: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def peak_memory_bytes(call: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensors allocated during ``call()`` on ``device`` (see module docstring)."""
    if device.type == "cuda":
        return _cuda_peak(call, device)
    if device.type == "cpu":
        return _cpu_peak(call)
    raise ValueError(f"peak memory is measured on cpu or cuda devices, not {device}")
