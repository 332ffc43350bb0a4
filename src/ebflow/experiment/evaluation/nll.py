"""Exact evaluation of a model on a data split: NLL in nats per example and bits per dimension,
in data space (the preprocessing's log-determinant added back)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...flow import EBFlow
from ...preprocessing import ImagePreprocessing
from ...runtime import full_precision
from ..data.batches import model_input, step_seed
from ..parallel.process_group import SINGLE_PROCESS, Distributed

__all__ = ["EVAL_SEED_OFFSET", "evaluate_nll"]

EVAL_SEED_OFFSET = 9_999_991


@torch.no_grad()
@full_precision()
def evaluate_nll(
    model: EBFlow, data: Tensor, preprocessing: ImagePreprocessing | None, use_map: bool,
    batch_size: int = 500, seed: int = 0, *, dist: Distributed | None = None,
) -> dict[str, float]:
    r"""Exact NLL of ``data`` in data space: ``nll`` (nats per example) and
    ``bpd`` = nll / (D ln 2). The dequantisation noise of batch ``k`` comes from a generator
    seeded by ``(seed, k)``, so repeated evaluations are comparable and the result does not
    depend on how the batches are spread over processes.

    With ``dist`` (a data-parallel run) process ``r`` of ``N`` evaluates batches
    ``k = r (mod N)``; the sums of log-likelihoods and the counts are then all-reduced, so
    :math:`\text{nll} = -\sum_i \log p(x_i) / n` exactly as in one process (not an average of
    per-process averages)."""
    ctx = dist if dist is not None else SINGLE_PROCESS
    total, n = 0.0, 0
    for k, xb in enumerate(data.split(batch_size)):
        if k % ctx.world_size != ctx.rank:
            continue
        g = torch.Generator().manual_seed(step_seed(seed, k))
        # dequantisation and preprocessing (and its log-determinant) in float64
        inp, logdet = model_input(xb.to("cpu", torch.float64), preprocessing, use_map, generator=g)
        inp = inp.to(model.device, model.dtype)
        log_p = model.log_prob(inp).double().cpu()
        if logdet is not None:
            log_p = log_p + logdet.double()
        total += float(-log_p.sum())
        n += xb.shape[0]
    total, count = ctx.all_reduce_sum([total, n])
    n = int(count)
    nll = total / n if n else math.nan
    d = math.prod(data.shape[1:])
    return {"nll": nll, "bpd": nll / (d * math.log(2)), "n": n}


