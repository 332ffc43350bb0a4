"""Exact evaluation of a model on a data split: NLL in nats per example and bits per dimension,
in data space (the preprocessing's log-determinant added back, by :class:`ebflow.ImageFlow`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...flow import EBFlow
from ...image_flow import ImageFlow
from ...preprocessing import ImagePreprocessing
from ...runtime import full_precision
from ..parallel.process_group import SINGLE_PROCESS, Distributed

__all__ = ["EVAL_SEED_OFFSET", "evaluate_nll"]

EVAL_SEED_OFFSET = 9_999_991


@torch.no_grad()
@full_precision()
def evaluate_nll(
    model: EBFlow,
    data: Tensor,
    preprocessing: ImagePreprocessing | None,
    use_map: bool,
    batch_size: int = 500,
    seed: int = 0,
    *,
    dist: Distributed | None = None,
) -> dict[str, float]:
    r"""Exact NLL of ``data`` in data space: ``nll`` (nats per example) and
    ``bpd`` = nll / (D ln 2). Images go through :meth:`ebflow.ImageFlow.sum_log_prob` (the
    dequantisation noise of batch ``k`` comes from a generator seeded by ``(seed, k)``, so
    repeated evaluations are comparable and the result does not depend on how the batches are
    spread over processes); other data through ``model.log_prob``.

    With ``dist`` (a data-parallel run) process ``r`` of ``N`` evaluates batches
    ``k = r (mod N)``; the sums of log-likelihoods and the counts are then all-reduced, so
    :math:`\text{nll} = -\sum_i \log p(x_i) / n` exactly as in one process (not an average of
    per-process averages)."""
    ctx = dist if dist is not None else SINGLE_PROCESS

    def mine(k: int) -> bool:
        return k % ctx.world_size == ctx.rank

    if preprocessing is not None:
        log_p_sum, n = ImageFlow(model, preprocessing, use_map=use_map).sum_log_prob(
            data, seed=seed, batch_size=batch_size, include=mine
        )
    else:
        log_p_sum, n = 0.0, 0
        for k, xb in enumerate(data.split(batch_size)):
            if mine(k):
                log_p_sum += float(model.log_prob(xb.to(model.device, model.dtype)).double().sum())
                n += xb.shape[0]
    total, count = ctx.all_reduce_sum([-log_p_sum, n])
    n = int(count)
    nll = total / n if n else math.nan
    d = math.prod(data.shape[1:])
    return {"nll": nll, "bpd": nll / (d * math.log(2)), "n": n}
