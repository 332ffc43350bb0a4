"""Process-level settings: the float32 precision of exact computations (:func:`full_precision`),
and the allocator setting that makes CPU training faster (:func:`reuse_large_allocations`).

**TF32.** On Ampere and newer GPUs, PyTorch may run float32 convolutions (cuDNN, on by default)
and matrix products (if enabled) in TF32, with a 10-bit mantissa: measured on an MNIST-CNN
(emulated), the exact NLL moves by about 1 nat per image and ``inverse(forward(x))`` by 1e-3.
:func:`full_precision` turns TF32 off for the duration of a call; ebflow wraps its exact
computations in it (``EBFlow.log_prob``, ``inverse``, ``sample``, ``forward_with_log_det`` and
the evaluation of a run), and leaves training to the user's settings (TF32 is a fine speed-up
for a stochastic gradient).

glibc's ``malloc`` serves large blocks (above a threshold that starts at 128 KiB and adapts up
to at most 32 MiB) with a fresh ``mmap``, and returns them to the system on ``free``. A dense
``3072 x 3072`` float32 matrix is 36 MiB, so every weight gradient, every gradient sum and every
optimiser temporary of a CIFAR-sized dense layer is a new mapping whose ~9,000 pages fault in
one by one: about 15 ms per matrix on this project's CPUs, as long as the product that fills
it. :func:`reuse_large_allocations` makes ``malloc`` keep such blocks on its heap and hand them
out again instead. It changes no result, only where memory comes from (and freed memory stays
with the process for reuse).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["full_precision", "reuse_large_allocations", "large_allocation_reuse_active"]


@contextmanager
def full_precision() -> Iterator[None]:
    """Float32 convolutions and matrix products in full IEEE precision (no TF32) inside the
    block; the previous settings are restored on exit. Usable as a decorator."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(precision)


_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_state = {"applied": False}


def reuse_large_allocations(trim_threshold: int = 1 << 30) -> bool:
    """Serve large blocks from the ``malloc`` heap (glibc ``M_MMAP_MAX = 0``) and keep up to
    ``trim_threshold`` bytes of freed memory for reuse. Idempotent.

    Returns True when the setting is in effect, False where it does not apply (not Linux/glibc).
    """
    if _state["applied"]:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    _state["applied"] = ok
    return ok


def large_allocation_reuse_active() -> bool:
    """True once :func:`reuse_large_allocations` took effect in this process (it lasts)."""
    return _state["applied"]
