"""Small tensor helpers shared by the library modules."""

from __future__ import annotations

from torch import Tensor

__all__ = ["grad_ready", "step_seed", "sum_except_batch"]


def sum_except_batch(t: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``(batch, ...) -> (batch,)``.

    One helper for the per-example sums of layers, priors and objectives (PyTorch has no public
    equivalent; this replaces four private copies)."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def grad_ready(h: Tensor) -> Tensor:
    """``h`` itself when it requires grad, else a detached leaf copy that does, so that autograd
    can differentiate with respect to ``h`` even when nothing before it requires grad (e.g. the
    output of a model's linear prefix when no parameter is trained)."""
    return h if h.requires_grad else h.detach().requires_grad_(True)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed determined by ``(seed, step, stream)`` alone (NumPy's ``SeedSequence``
    mixing: nearby tuples give unrelated seeds). Seeds the noise of training step ``step`` and of
    evaluation batch ``step``."""
    import numpy as np

    words = np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])
