"""The objective functions: each takes ``(model, x, ...)`` and returns :class:`LossTerms` (see
:mod:`ebflow.objectives` for the maths and the loss scale)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor

from ..errors import ConfigError
from ..flow import EBFlow
from ..layers.base import unchecked_singularity
from ..prior import StandardNormal
from ..validation import check_count, check_number
from .toolkit import (
    LossTerms,
    Projection,
    checked_batch,
    checked_noise,
    checked_noise_tensor,
    grad_ready,
    in_domain_of_all,
    loss_on_rows,
    on_sphere,
    projections,
    sum_except_batch,
)

__all__ = ["LossTerms", "dsm_loss", "esm_loss", "fdssm_loss", "ml_loss", "sml_loss", "ssm_loss"]

#: What ``torch.func.vjp(f, x, has_aux=True)`` returns, ``(f's output, vjp_fn, aux)``: torch
#: annotates it as a union with the two-element result of ``has_aux=False``.
_VjpWithAux = tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]], Tensor]

#: Objectives evaluate every parametrized weight once per call (e.g. a spectrally normalised
#: convolution: one power-iteration step per layer and loss, one map for the whole loss).
_one_weight_per_loss = torch.nn.utils.parametrize.cached


@_one_weight_per_loss()
def ml_loss(model: EBFlow, x: Tensor) -> LossTerms:
    r"""Maximum likelihood: :math:`E(x) + \log Z = -\log p(x)` per example (nats).

    The linear layers' log-determinants are not checked for singularity here (that would read
    the device once or twice per layer and step): a singular weight gives a non-finite loss,
    which a training loop's finiteness check catches; ``model.log_prob`` checks.

    Example:
        >>> import torch, ebflow
        >>> model = ebflow.dense_flow((3,)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> torch.allclose(ebflow.ml_loss(model, x).loss, -model.log_prob(x))
        True
    """
    x = checked_batch(model, x)
    e = model.energy(x, check=False)
    with unchecked_singularity():  # no device read per linear layer; a singular W: non-finite loss
        log_z = model.log_partition()
    return LossTerms(e + log_z.to(e.dtype), e)


@_one_weight_per_loss()
def sml_loss(
    model: EBFlow,
    x: Tensor,
    num_samples: int | None = None,
    noise: Tensor | None = None,
) -> LossTerms:
    r"""Sampling-based ML: :math:`E(x_i) - \mathbb{E}_{model}[E]` with model samples drawn by
    exact inversion and detached. Its gradient equals the ML gradient in expectation; its value
    is not a likelihood.

    ``noise`` optionally gives the latent draws: standard normal (mapped to the prior's draws by
    its ``from_standard_normal``, e.g. :class:`~ebflow.prior.Laplace`), one row per model sample, each
    row of ``D`` entries (e.g. ``(n, *event_shape)`` from :meth:`Objective.draw_noise`); the
    samples are then ``model.inverse(noise.reshape(n, *model.latent_shape))`` and their number is
    the row count of ``noise`` (a process's share of a global draw may be smaller than
    ``num_samples``). Without ``noise``, ``num_samples`` (default: the batch size) samples are
    drawn by :meth:`EBFlow.sample` from the global random number generator."""
    x = checked_batch(model, x)
    e = model.energy(x, check=False)
    if num_samples is not None:
        num_samples = check_count(num_samples, "SML num_samples")
    with torch.no_grad():
        if noise is None:
            samples = model.sample(x.shape[0] if num_samples is None else num_samples)
        else:
            samples = model.inverse(_latent_noise(model, noise, x))
    return LossTerms(e - model.energy(samples).mean(), e)


def _latent_noise(model: EBFlow, noise: Tensor, like: Tensor) -> Tensor:
    """SML's latent draws ``noise`` as ``(n, *latent_shape)``, with clear errors."""
    latent = math.prod(model.latent_shape)
    checked_noise_tensor(noise, "SML noise", finite=model.validate)
    to_prior = getattr(model.prior, "from_standard_normal", None)
    if not isinstance(model.prior, StandardNormal) and to_prior is None:
        raise ConfigError(
            f"SML noise holds standard normal latent draws, but the model's prior "
            f"{type(model.prior).__name__} has no from_standard_normal; pass noise=None "
            "to sample from the prior"
        )
    if noise.dim() < 1 or noise.shape[0] < 1 or noise[0].numel() != latent:
        raise ConfigError(
            f"SML noise must have one row of {latent} latent entries per model sample "
            f"(shape (n, ...) with prod(...) = {latent}), got shape {tuple(noise.shape)}"
        )
    if noise.dtype != like.dtype or noise.device != like.device:
        raise ConfigError(
            f"SML noise must have the batch's dtype and device ({like.dtype}, {like.device}), "
            f"got ({noise.dtype}, {noise.device})"
        )
    z = noise.reshape(noise.shape[0], *model.latent_shape)
    return z if to_prior is None else to_prior(z)


@_one_weight_per_loss()
@torch.enable_grad()
def ssm_loss(
    model: EBFlow,
    x: Tensor,
    slices: int = 1,
    projection: Projection = "rademacher",
    noise: Tensor | None = None,
) -> LossTerms:
    r"""Sliced score matching (variance reduced), per dimension:
    :math:`\frac1D[-v^\top \nabla^2 E\, v + \tfrac12\|\nabla E\|^2]`, averaged over ``slices``
    projections. ``noise`` optionally gives the projections ``v``, shape ``(slices, *x.shape)``."""
    x = checked_batch(model, x)
    slices = check_count(slices, "SSM slices")
    shape = (slices, *x.shape)
    if noise is None:
        v = projections(shape, projection, dtype=x.dtype, device=x.device)
    else:
        v = checked_noise(noise, shape, "SSM projections", x, finite=model.validate)
    b = x.shape[0]
    xr = x.detach().repeat(slices, *([1] * (x.dim() - 1)))
    vr = v.reshape(xr.shape)

    # Leading linear layers h = A x + c: v^T (d2E/dx2) v = u^T (d2E/dh2) u with u = A v, so the
    # Hessian-vector product stops at h, and dE/dx = A^T dE/dh (the prefix's pull-back). As in
    # EBFlow.energy_and_grad the data never becomes an autograd leaf: torch.func gives h and the
    # pull-back, autograd differentiates with respect to h (a non-leaf), and the loss's graph
    # reaches the parameters only (a plain loss.backward() computes nothing else). A compiled
    # model (ebflow.compile_model) computes E, dE/dh and d2E/dh2 u at h in one compiled kernel.
    to_x: Callable[[Tensor], tuple[Tensor, ...]] | None = None
    if model.linear_prefix_length == 0:
        h, u = xr, vr
    else:
        h, to_x, u = cast(
            _VjpWithAux, torch.func.vjp(lambda z: model.linear_prefix(z, vr, check=False), xr, has_aux=True)
        )
    kernels = model.active_kernels
    if kernels is not None:
        e, g_h, hu = kernels.energy_grad_hvp(model, h, u)
    elif to_x is None:

        def tail_sum(z: Tensor) -> tuple[Tensor, Tensor]:
            e = model.tail_energy(z, check=False)
            return e.sum(), e

        g_h, hessian_vjp, e = cast(
            _VjpWithAux, torch.func.vjp(torch.func.grad(tail_sum, has_aux=True), h, has_aux=True)
        )
        (hu,) = hessian_vjp(u)
    else:
        h = grad_ready(h)
        e = model.tail_energy(h, check=False)
        (g_h,) = torch.autograd.grad(e.sum(), h, create_graph=True)
        (hu,) = torch.autograd.grad(sum_except_batch(g_h * u).sum(), h, create_graph=True)
    g = g_h if to_x is None else to_x(g_h)[0]
    per_slice = (-sum_except_batch(hu * u) + 0.5 * sum_except_batch(g.pow(2))) / x[0].numel()
    return LossTerms(per_slice.view(slices, b).mean(0), e[:b])


def _check_flag(drop_out_of_domain: object) -> None:
    if not isinstance(drop_out_of_domain, bool):
        raise ConfigError(f"drop_out_of_domain must be True or False, got {drop_out_of_domain!r}")


@_one_weight_per_loss()
@torch.enable_grad()
def dsm_loss(
    model: EBFlow,
    x: Tensor,
    sigma: float,
    noise: Tensor | None = None,
    drop_out_of_domain: bool = False,
) -> LossTerms:
    r"""Denoising score matching at noise level ``sigma``, per dimension:
    :math:`\frac1{2D}\|\nabla E(\tilde x) - \epsilon/\sigma\|^2`,
    :math:`\tilde x = x + \sigma\epsilon`; ``noise`` optionally gives :math:`\epsilon`
    (shape of ``x``). No energy at ``x`` is computed: the energy returned (for the energy
    regulariser) is :math:`E(\tilde x)`, as in the reference implementation.

    Example:
        >>> import torch, ebflow
        >>> model = ebflow.dense_flow((3,)).double()
        >>> x, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        >>> terms = ebflow.dsm_loss(model, x, sigma=0.1, noise=eps)  # one loss per example
        >>> by_hand = 0.5 * (model.score(x + 0.1 * eps) + eps / 0.1).pow(2).sum(1) / 3  # D = 3
        >>> torch.allclose(terms.loss, by_hand)
        True
    """
    x = checked_batch(model, x)
    sigma = check_number(sigma, "DSM noise level sigma", positive=True)
    _check_flag(drop_out_of_domain)
    eps = (
        torch.randn_like(x)
        if noise is None
        else checked_noise(noise, tuple(x.shape), "DSM noise", x, finite=model.validate)
    )
    d = x[0].numel()

    def compute(rows: Tensor) -> LossTerms:
        xs, es = (x, eps) if rows.dim() == 0 else (x[rows], eps[rows])
        e, g = model.energy_and_grad(xs + sigma * es, check=False)
        return LossTerms(0.5 * sum_except_batch((g - es / sigma).pow(2)) / d, e)

    if not drop_out_of_domain:
        return compute(x.new_ones((), dtype=torch.bool))
    return loss_on_rows(model, in_domain_of_all(model, x + sigma * eps), x.shape[0], x, compute)


def _fdssm_per_example(model: EBFlow, x: Tensor, v: Tensor) -> LossTerms:
    r"""FDSSM terms for given directions ``v`` (``\|v\| = \varepsilon`` per example), divided by
    :math:`\varepsilon^2`: an estimate of the per-dimension SSM objective."""
    b = x.shape[0]
    # E(x +- v) = tail(h +- A v) after the leading linear layers h = A x + c: those layers run
    # on x and v (2 batches) instead of x, x + v, x - v (3 batches).
    h, u = model.linear_prefix(x, v, check=False)
    e_all = model.tail_energy(torch.cat([h, h + u, h - u]), check=False)
    e, e_plus, e_minus = e_all[:b], e_all[b : 2 * b], e_all[2 * b :]
    terms = (e_plus - e_minus).pow(2) / 8 + 2 * e - e_plus - e_minus
    return LossTerms(terms / sum_except_batch(v.pow(2)), e)


@_one_weight_per_loss()
def fdssm_loss(
    model: EBFlow,
    x: Tensor,
    eps: float,
    noise: Tensor | None = None,
    drop_out_of_domain: bool = False,
) -> LossTerms:
    r"""Finite-difference sliced score matching with step ``eps``:
    :math:`\frac{1}{\varepsilon^2}[\tfrac18(E(x+v)-E(x-v))^2 + 2E(x) - E(x+v) - E(x-v)]`,
    :math:`v` uniform on the sphere of radius :math:`\varepsilon` (an estimate of the
    per-dimension SSM objective). ``noise`` optionally gives Gaussian draws (shape of ``x``)
    that are scaled to that sphere. Three energy evaluations, one backward."""
    x = checked_batch(model, x)
    eps = check_number(eps, "FDSSM step eps", positive=True)
    _check_flag(drop_out_of_domain)
    raw = (
        torch.randn_like(x)
        if noise is None
        else checked_noise(noise, tuple(x.shape), "FDSSM noise", x, finite=model.validate)
    )
    v = on_sphere(raw, eps)
    if not drop_out_of_domain:
        return _fdssm_per_example(model, x, v)
    keep = in_domain_of_all(model, x, x + v, x - v)
    return loss_on_rows(
        model,
        keep,
        x.shape[0],
        x,
        lambda rows: (
            _fdssm_per_example(model, x, v)
            if rows.dim() == 0
            else _fdssm_per_example(model, x[rows], v[rows])
        ),
    )


#: Entries (examples x dimensions x basis vectors) per vectorised chunk of ESM's Hessian rows.
_ESM_CHUNK_ENTRIES = 1 << 24


@_one_weight_per_loss()
@torch.enable_grad()
def esm_loss(model: EBFlow, x: Tensor) -> LossTerms:
    r"""Exact score matching per dimension,
    :math:`\frac1D[-\operatorname{tr}\nabla^2 E + \tfrac12\|\nabla E\|^2]` (small ``D`` only).

    The Hessian trace is exact: ``torch.func`` gives the score and the vector-Jacobian products
    of the ``D`` basis directions at once (``vmap`` over ``vjp``, replacing a loop of ``D``
    Hessian-vector products; the values are identical and the result stays differentiable in
    the parameters). Cost: ``D`` Hessian-vector products on the batch, in chunks of about
    ``2**24`` entries. Every layer must run under ``torch.func`` (a custom
    ``torch.autograd.Function`` needs ``setup_context`` and a vmap rule, as ebflow's have)."""
    x = checked_batch(model, x).detach()
    b, d = x.shape[0], x[0].numel()

    def energy_sum(v: Tensor) -> tuple[Tensor, Tensor]:
        e = model.energy(v, check=False)
        return e.sum(), e

    def grad_and_energy(v: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.grad(energy_sum, has_aux=True)(v)

    g, vjp_fn, e = cast(_VjpWithAux, torch.func.vjp(grad_and_energy, x, has_aux=True))
    # basis direction j for every example at once: row j of each example's Hessian
    basis = torch.eye(d, dtype=x.dtype, device=x.device).view(d, 1, *x.shape[1:]).expand(d, *x.shape)
    chunk = max(1, _ESM_CHUNK_ENTRIES // max(1, b * d))
    (rows,) = torch.func.vmap(vjp_fn, chunk_size=chunk)(basis)
    trace = rows.reshape(d, b, d).diagonal(dim1=0, dim2=2).sum(dim=-1)
    return LossTerms((-trace + 0.5 * sum_except_batch(g.pow(2))) / d, e)
