r"""Exact divergences between a model and smoothed toy data.

The data density is the Gaussian smoothing of ``n`` training points :math:`c_i`,

.. math:: p(x) = \frac1n \sum_i \mathcal N(x; c_i, s^2 I),

whose log-density and score :math:`\nabla_x \log p(x) = \sum_i w_i(x)\,(c_i - x)/s^2`
(:math:`w = \mathrm{softmax}_i(-\|x - c_i\|^2 / 2s^2)`) are exact. With samples
:math:`x_k \sim p`:

* ``kl``     -- :math:`\mathrm{KL}(p\,\|\,q) \approx \frac1K\sum_k \log p(x_k) - \log q(x_k)`;
* ``fisher`` -- :math:`\frac1K\sum_k \tfrac12\|\nabla\log p(x_k) - \nabla\log q(x_k)\|^2`;
* ``fisher_median`` -- the median over :math:`k` of those per-sample terms: the mean is a
  heavy-tailed estimate, which one sample where the model's score is steep can dominate;
* ``kl_reference`` -- the paper's code's toy "KL", :math:`\frac1K\sum_k p(x_k)\log p(x_k) - \log q(x_k)`
  (a density where a log-density belongs): ``kl`` plus a constant of the data points
  (:func:`reference_kl_offset`), kept only to compare with numbers computed that way.

The model :math:`q` is scored with its own prior -- the one it was trained with -- through
:meth:`EBFlow.log_prob` and :meth:`EBFlow.score`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...flow import EBFlow
from ..data.splits import ToyMixture

__all__ = [
    "mixture_log_prob",
    "mixture_score",
    "kl_divergence",
    "fisher_divergence",
    "fisher_terms",
    "reference_kl_offset",
    "toy_metrics",
]


def _sq_dists(x: Tensor, centres: Tensor) -> Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ centres.T + centres.pow(2).sum(1)).clamp_min(0)


def mixture_log_prob(mix: ToyMixture, x: Tensor, chunk: int = 4096) -> Tensor:
    r""":math:`\log p(x)` of the smoothed data, shape ``(N,)``, in float64."""
    c = mix.centres.to(torch.float64)
    n, d = c.shape
    s2 = mix.noise**2
    const = -math.log(n) - 0.5 * d * math.log(2 * math.pi * s2)
    out = [
        torch.logsumexp(-_sq_dists(xb, c) / (2 * s2), dim=1) + const
        for xb in x.to(torch.float64).split(chunk)
    ]
    return torch.cat(out)


def mixture_score(mix: ToyMixture, x: Tensor, chunk: int = 4096) -> Tensor:
    r""":math:`\nabla_x \log p(x)` of the smoothed data, shape ``(N, D)``, in float64."""
    c = mix.centres.to(torch.float64)
    s2 = mix.noise**2
    out = []
    for xb in x.to(torch.float64).split(chunk):
        w = torch.softmax(-_sq_dists(xb, c) / (2 * s2), dim=1)
        out.append((w @ c - xb) / s2)
    return torch.cat(out)


def _batches(x: Tensor, size: int) -> list[Tensor]:
    return list(x.split(size))


def _model_log_prob(model: EBFlow, x: Tensor, batch_size: int) -> Tensor:
    """``log q(x_k)`` of the model, shape ``(K,)``, in float64 on the CPU."""
    with torch.no_grad():
        return torch.cat(
            [
                model.log_prob(xb.to(model.dtype).to(model.device)).double().cpu()
                for xb in _batches(x, batch_size)
            ]
        )


def kl_divergence(model: EBFlow, mix: ToyMixture, x: Tensor, batch_size: int = 5000) -> float:
    """Monte-Carlo KL(data || model) over samples ``x`` of the data density (nats)."""
    return _kl_given_log_p(model, mixture_log_prob(mix, x), x, batch_size)


def _kl_given_log_p(model: EBFlow, log_p: Tensor, x: Tensor, batch_size: int) -> float:
    """``mean_k log p(x_k) − log q(x_k)`` with the data's ``log p(x_k)`` already computed."""
    return float((log_p - _model_log_prob(model, x, batch_size)).mean())


def fisher_terms(model: EBFlow, mix: ToyMixture, x: Tensor, batch_size: int = 5000) -> Tensor:
    """Per-sample ``½‖∇log p(x_k) − ∇log q(x_k)‖²``, shape ``(K,)``, in float64."""
    s_q = torch.cat(
        [
            model.score(xb.to(model.dtype).to(model.device)).detach().double().cpu()
            for xb in _batches(x, batch_size)
        ]
    )
    return 0.5 * (mixture_score(mix, x) - s_q).pow(2).sum(1)


def fisher_divergence(model: EBFlow, mix: ToyMixture, x: Tensor, batch_size: int = 5000) -> float:
    """Monte-Carlo Fisher divergence ``E ½‖∇log p − ∇log q‖²`` over samples ``x`` of the data."""
    return float(fisher_terms(model, mix, x, batch_size).mean())


def reference_kl_offset(mix: ToyMixture, x: Tensor) -> float:
    r"""The reference code's toy "KL" minus the true one on samples ``x``:
    :math:`\frac1K\sum_k p(x_k)\log p(x_k) - \log p(x_k)`. It depends on the data points only,
    so it is the same for every model scored on them."""
    return _reference_kl_offset(mixture_log_prob(mix, x))


def _reference_kl_offset(log_p: Tensor) -> float:
    return float((log_p.exp() * log_p - log_p).mean())


def toy_metrics(model: EBFlow, mix: ToyMixture, x: Tensor, batch_size: int = 5000) -> dict[str, float]:
    """``{"kl", "fisher", "fisher_median", "kl_reference"}`` of ``model`` against the smoothed
    data, on samples ``x`` (``kl_reference``: the reference code's p·log p formula)."""
    log_p = mixture_log_prob(mix, x)  # once: the KL and the reference's offset share it
    kl = _kl_given_log_p(model, log_p, x, batch_size)
    terms = fisher_terms(model, mix, x, batch_size)
    return {
        "kl": kl,
        "fisher": float(terms.mean()),
        "fisher_median": float(terms.median()),
        "kl_reference": kl + _reference_kl_offset(log_p),
    }
