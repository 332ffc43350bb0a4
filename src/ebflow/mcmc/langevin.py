"""Langevin dynamics (ULA) and MALA on an energy; see :mod:`ebflow.mcmc`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from ..flow import EBFlow
from ..utils import sum_except_batch
from ..validation import check_batch, check_count, check_generator, check_number
from .chain import Chain, potential_and_grad
from .energy import (
    EnergyModel,
    PreprocessedSpaceEnergy,
    check_energy_model,
    check_preprocessing,
    smoothness_energy,
)
from .schedules import Schedule, step_sizes

__all__ = ["LangevinResult", "default_step_size", "langevin", "mala", "refine_samples", "ula"]

#: Unadjusted Langevin reads the device (for divergence) once per this many iterations.
_DIVERGENCE_CHECK_EVERY = 10


@dataclass
class LangevinResult:
    """Outcome of a chain run.

    Attributes:
        samples: final states, shape ``(chains, *event_shape)``.
        acceptance_rate: mean MALA acceptance over chains and steps (``None`` for ULA).
        acceptance_per_chain: per-chain mean acceptance, shape ``(chains,)`` (``None`` for ULA).
        step_size: per-chain step size of the last iteration, shape ``(chains,)``.
        energy: potential :math:`U` of the final states, shape ``(chains,)``.
    """

    samples: Tensor
    acceptance_rate: float | None
    acceptance_per_chain: Tensor | None
    step_size: Tensor
    energy: Tensor


def _check_mask(mask: Tensor | None, x: Tensor) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise InputError(f"mask must be a boolean torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.dtype in (torch.uint8, torch.int64, torch.int32):
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise InputError("mask must hold only 0/1 (or booleans)")
            mask = mask.bool()
        else:
            raise InputError(f"mask must be boolean, got dtype {mask.dtype}")
    event_ndim = x.dim() - 1
    ok = mask.dim() in (event_ndim, event_ndim + 1)
    if ok:
        try:
            ok = torch.broadcast_shapes(mask.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
    if not ok:
        raise InputError(
            f"mask of shape {tuple(mask.shape)} does not match the data: expected the event shape "
            f"{tuple(x.shape[1:])} or (batch, *event_shape) = {tuple(x.shape)} (or a shape that "
            "broadcasts to it, e.g. one channel for all)"
        )
    mask = mask.to(x.device).expand(x.shape)
    if not bool(mask.any()):
        raise InputError("mask selects no coordinate to sample (it is all False)")
    return mask


def _check_states(model: EnergyModel, x: object, what: str) -> Tensor:
    """Chain states for ``model``: :func:`~ebflow.validation.check_batch` with the model's event
    shape, and its dtype and device when it has them (an :class:`~ebflow.EBFlow` does)."""
    dtype = getattr(model, "dtype", None)
    device = getattr(model, "device", None)
    return check_batch(
        x,
        model.event_shape,
        what=what,
        dtype=dtype if isinstance(dtype, torch.dtype) else None,
        device=device if isinstance(device, torch.device) else None,
    )


def default_step_size(model: EnergyModel, x: Tensor, mask: Tensor | None = None) -> float:
    r"""A starting step size from the score alone.

    For a Gaussian with precision :math:`p` the squared score has mean :math:`D p`; MALA's
    proposal scale :math:`2\eta \approx 1.65^2 / (p\, D^{1/3})` then gives
    :math:`\eta_0 = 1.36\, D^{2/3} / \|\nabla E\|^2` (median over chains). Use with
    ``target_acceptance`` for targets that are not isotropic.
    """
    model = check_energy_model(model)
    _check_states(model, x, "chain states x")
    m = _check_mask(mask, x)
    _, g = potential_and_grad(model.energy, x)
    if m is not None:
        g = torch.where(m, g, torch.zeros_like(g))
        d = sum_except_batch(m).to(x.dtype)
    else:
        d = torch.full((x.shape[0],), float(x[0].numel()), dtype=x.dtype, device=x.device)
    sq = sum_except_batch(g.pow(2)).clamp_min(torch.finfo(x.dtype).tiny)
    eta = float((1.36 * d.pow(2.0 / 3.0) / sq).median())
    return eta if math.isfinite(eta) and eta > 0 else 1e-3


def langevin(
    model: EnergyModel,
    x0: Tensor,
    steps: int,
    step_size: float,
    *,
    metropolis: bool = False,
    mask: Tensor | None = None,
    schedule: Schedule = "constant",
    final_step_size: float | None = None,
    target_acceptance: float | None = None,
    adaptation_rate: float = 0.05,
    smoothness: float = 0.0,
    blur_sigma: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> LangevinResult:
    r"""Run ``steps`` Langevin iterations from ``x0`` (one chain per example).

    Args:
        model: an :class:`~ebflow.EBFlow` (or anything with ``energy`` and ``event_shape``);
            only its energy and its gradient are used, never ``log Z``.
        x0: initial states ``(chains, *event_shape)`` in the model's dtype and device.
        steps: number of iterations (``0`` returns ``x0``).
        step_size: :math:`\eta > 0` (the first step's size under a decaying schedule).
        metropolis: MALA (accept/reject) instead of unadjusted Langevin.
        mask: boolean, ``True`` where coordinates move; others stay bit for bit unchanged.
        schedule: step-size schedule: ``constant``, ``linear``, ``geometric``, ``cosine`` or a
            callable ``(i, steps) -> factor`` (see :mod:`ebflow.mcmc`).
        final_step_size: the last step size of a decaying schedule.
        target_acceptance: MALA only; adapt each chain's step towards this acceptance rate.
        adaptation_rate: gain of that adaptation on :math:`\log\eta`.
        smoothness: weight :math:`\lambda \ge 0` of the pull toward the blurred image.
        blur_sigma: standard deviation (pixels) of the Gaussian blur.
        generator: random generator (on the model's device) for reproducible chains.
        progress: show a tqdm progress bar.
        callback: called after every iteration as ``callback(i, x, grad_u)`` with the current
            states and :math:`\nabla U` there (e.g. to average states, or to log them).
    """
    model = check_energy_model(model)
    event_shape = tuple(model.event_shape)
    x0 = _check_states(model, x0, "initial chain states x0")
    steps = check_count(steps, "steps", minimum=0)
    step_size = check_number(step_size, "step size", positive=True)
    if not isinstance(metropolis, bool):
        raise ConfigError(f"metropolis must be True or False, got {metropolis!r}")
    if final_step_size is not None:
        final_step_size = check_number(final_step_size, "final step size", positive=True)
    if target_acceptance is not None:
        if not metropolis:
            raise ConfigError("target_acceptance needs metropolis=True (MALA)")
        target_acceptance = check_number(target_acceptance, "target_acceptance", positive=True, below=1)
    adaptation_rate = check_number(adaptation_rate, "adaptation_rate", non_negative=True)
    smoothness = check_number(smoothness, "smoothness", non_negative=True)
    blur_sigma = check_number(blur_sigma, "blur_sigma", positive=True)
    check_generator(generator, device=x0.device, owner="chain states x0")
    if callback is not None and not callable(callback):
        raise ConfigError(f"callback must be callable, got {type(callback).__name__}")
    if smoothness > 0 and len(event_shape) not in (2, 3):
        raise ConfigError(
            f"the smoothness pull needs image events (C, H, W) or (H, W); the model's event "
            f"shape is {event_shape}"
        )
    mask = _check_mask(mask, x0)
    sizes = step_sizes(float(step_size), final_step_size, schedule, steps)

    # An EBFlow's input check reads the device every call; the states are checked once above
    # and MALA never evaluates a non-finite proposal (ULA stops at its first one).
    energy = partial(model.energy, check=False) if isinstance(model, EBFlow) else model.energy

    def potential(x: Tensor) -> Tensor:
        u = energy(x)
        if smoothness > 0:
            u = u + smoothness_energy(x, event_shape, smoothness, blur_sigma)
        return u

    chain = Chain(potential, x0.detach().clone(), mask, generator)
    iterator: Iterable[int] = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="MALA" if metropolis else "Langevin", leave=False)
    eta = chain.scale * (sizes[0] if sizes else step_size)
    for i in iterator:
        eta = chain.scale * sizes[i]
        proposal, finite = chain.propose(eta, allow_nonfinite=metropolis, iteration=i)
        if metropolis:
            alpha = chain.metropolis_step(proposal, finite, eta)
            if target_acceptance is not None:
                chain.scale = chain.scale * torch.exp(adaptation_rate * (alpha - target_acceptance))
        else:
            chain.accept_all(proposal, iteration=i)
            if (i + 1) % _DIVERGENCE_CHECK_EVERY == 0 or i + 1 == steps:
                chain.raise_if_diverged()
        if callback is not None:
            callback(i, chain.x, chain.g)
    if metropolis and steps > 0:
        per_chain = (chain.accepted / steps).to(chain.x.dtype)
        rate: float | None = float(per_chain.mean())
    else:
        per_chain, rate = None, None
    return LangevinResult(
        samples=chain.x,
        acceptance_rate=rate,
        acceptance_per_chain=per_chain,
        step_size=eta.detach(),
        energy=chain.u,
    )


def ula(model: EnergyModel, x0: Tensor, steps: int, step_size: float, **options) -> LangevinResult:
    """Unadjusted Langevin algorithm: :func:`langevin` with ``metropolis=False``."""
    return langevin(model, x0, steps, step_size, metropolis=False, **options)


def mala(model: EnergyModel, x0: Tensor, steps: int, step_size: float, **options) -> LangevinResult:
    """Metropolis-adjusted Langevin algorithm: :func:`langevin` with ``metropolis=True``."""
    return langevin(model, x0, steps, step_size, metropolis=True, **options)


def refine_samples(
    model: EnergyModel,
    x: Tensor,
    steps: int,
    step_size: float | None = None,
    *,
    metropolis: bool | None = None,
    target_acceptance: float = 0.574,
    preprocessing=None,
    generator: torch.Generator | None = None,
    **options,
) -> Tensor:
    r"""Apply ``steps`` Langevin steps to samples ``x`` (e.g. drawn by inversion), in the
    model's own space (the preprocessed space for MaP image models).

    With ``step_size=None`` the step starts at :func:`default_step_size` and MALA adapts it
    towards ``target_acceptance``; with a given step size the chain is unadjusted Langevin
    unless ``metropolis=True``. Returns the refined samples (same shape as ``x``).

    For an image model whose input is dequantised pixels (preprocessing inside the model, no
    MaP) pass its ``preprocessing``: the chain then runs on the logit-space tensor
    (:class:`PreprocessedSpaceEnergy`) and the result is mapped back to pixels.
    """
    model = check_energy_model(model)
    steps = check_count(steps, "refine steps", minimum=0)
    if step_size is not None:
        step_size = check_number(step_size, "step size", positive=True)
    if metropolis is not None and not isinstance(metropolis, bool):
        raise ConfigError(f"metropolis must be True, False or None, got {metropolis!r}")
    if preprocessing is not None:
        check_preprocessing(preprocessing)
        check_batch(x, model.event_shape, what="samples x (pixels)")
    else:
        _check_states(model, x, "samples x")
    if steps == 0:
        return x
    if preprocessing is not None:
        target = PreprocessedSpaceEnergy(model, preprocessing)
        y = refine_samples(
            target,
            target.to_logit_space(x),
            steps,
            step_size,
            metropolis=metropolis,
            target_acceptance=target_acceptance,
            generator=generator,
            **options,
        )
        return preprocessing.inverse(y)
    if step_size is None:
        step_size = default_step_size(model, x, options.get("mask"))
        if metropolis is None:
            metropolis = True
        adapt = target_acceptance if metropolis else None
    else:
        adapt = None
        if metropolis is None:
            metropolis = False
    result = langevin(
        model,
        x,
        steps,
        step_size,
        metropolis=metropolis,
        target_acceptance=adapt,
        generator=generator,
        **options,
    )
    return result.samples
