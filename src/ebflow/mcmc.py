r"""Markov chain Monte Carlo driven by the energy: Langevin dynamics and MALA.

An EBFlow's energy :math:`E` gives the score :math:`-\nabla E` without the partition
function, so it can drive Langevin dynamics. With step size :math:`\eta`,

.. math:: x' = x - \eta\,\nabla U(x) + \sqrt{2\eta}\,\xi, \qquad \xi \sim \mathcal N(0, I),

where the potential :math:`U = E` (plus an optional smoothness term, below). The unadjusted
chain (ULA) has an :math:`O(\eta)` bias; MALA removes it by accepting :math:`x'` with probability

.. math:: \min\Big(1,\ \exp\big(U(x) - U(x') + \log q(x \mid x') - \log q(x' \mid x)\big)\Big),
    \qquad q(x' \mid x) = \mathcal N\big(x';\ x - \eta\nabla U(x),\ 2\eta I\big),

so that its stationary law is exactly :math:`\propto e^{-U}`. Neither needs :math:`\log Z`.

Options:

* ``mask`` -- boolean, ``True`` where a coordinate may move. The others are carried over
  bit for bit (``torch.where``), so the chain samples the conditional law of the masked
  coordinates given the rest (inpainting).
* ``schedule`` -- step size per iteration: ``constant``, or a ``linear``, ``geometric`` or
  ``cosine`` decay from ``step_size`` to ``final_step_size``; or any callable
  ``(iteration, steps) -> factor`` multiplying ``step_size``.
* ``target_acceptance`` (MALA) -- adapt each chain's step size towards this acceptance rate
  (Robbins-Monro on :math:`\log\eta`); the chain is then exact only once adaptation stops.
* ``smoothness`` :math:`\lambda` (image events ``(C, H, W)`` or ``(H, W)``) -- adds the
  Gaussian smoothness prior :math:`\tfrac{\lambda}{2}\|x - Bx\|^2` to :math:`U`, with
  :math:`B` a Gaussian blur: a pull of every pixel toward the blurred image. It is part of the
  target (MALA samples :math:`\propto e^{-E(x) - \frac\lambda2\|x - Bx\|^2}`).

For image models trained with MaP, chains run on the preprocessed tensor; see
:mod:`ebflow.inpaint` for the map back to pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, EBFlowError, InputError
from .validation import check_batch

__all__ = [
    "EnergyModel",
    "LangevinResult",
    "SCHEDULES",
    "gaussian_blur",
    "langevin",
    "mala",
    "ula",
    "refine_samples",
    "default_step_size",
    "check_energy_model",
    "PreprocessedSpaceEnergy",
]


@runtime_checkable
class EnergyModel(Protocol):
    """Anything with an ``energy(x) -> (batch,)`` method and an ``event_shape`` (e.g. EBFlow)."""

    event_shape: tuple[int, ...]

    def energy(self, x: Tensor) -> Tensor: ...


def check_energy_model(model: object) -> EnergyModel:
    """Return ``model`` if it has a callable ``energy`` and an ``event_shape``, else raise."""
    energy = getattr(model, "energy", None)
    if not callable(energy) or getattr(model, "event_shape", None) is None:
        raise ConfigError(
            f"MCMC needs a model with an energy (an ebflow.EBFlow or an object with "
            f"energy(x) and event_shape); got {type(model).__name__}"
        )
    return model  # type: ignore[return-value]


class PreprocessedSpaceEnergy:
    r"""Energy of :math:`y = P(\tilde x)` for a model whose input is dequantised pixels
    :math:`\tilde x` (image preprocessing :math:`P` inside the model, no MaP):
    :math:`E_y(y) = E(P^{-1} y) - \log|\det \partial P^{-1}/\partial y|`, with the log-determinant
    from :meth:`ImagePreprocessing.inverse_and_log_det`.

    Chains on :math:`y` cannot leave the model's pixel range, which chains on :math:`\tilde x` can.
    """

    def __init__(self, model: EnergyModel, preprocessing) -> None:
        self.model = check_energy_model(model)
        self.preprocessing = preprocessing
        self.event_shape = tuple(model.event_shape)

    def to_logit_space(self, x: Tensor) -> Tensor:
        r""":math:`y = P(\tilde x)` (no range check beyond the model's own: its support is
        slightly wider than :math:`[0, n]`)."""
        return self.preprocessing.forward(x, check=False)[0]

    def energy(self, y: Tensor) -> Tensor:
        x, log_det = self.preprocessing.inverse_and_log_det(y)
        return self.model.energy(x) - log_det


# -- step-size schedules --------------------------------------------------------------------
def _linear(t: float) -> float:
    return 1.0 - t


def _cosine(t: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * t))


SCHEDULES: tuple[str, ...] = ("constant", "linear", "geometric", "cosine")
Schedule = str | Callable[[int, int], float]


def _step_sizes(step_size: float, final_step_size: float | None, schedule: Schedule, steps: int) -> list[float]:
    r"""Step size of each iteration. Decays interpolate :math:`\eta_0 \to \eta_1` over the run."""
    if callable(schedule):
        sizes = [step_size * float(schedule(i, steps)) for i in range(steps)]
    else:
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown step-size schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if schedule != "constant" and final_step_size is None:
            raise ConfigError(f"schedule {schedule!r} needs final_step_size")
        if final_step_size is not None and not final_step_size > 0:
            raise ConfigError(f"final step size must be > 0, got {final_step_size}")
        t = [i / max(steps - 1, 1) for i in range(steps)]
        if schedule == "constant":
            sizes = [step_size] * steps
        elif schedule == "geometric":
            sizes = [step_size * (final_step_size / step_size) ** ti for ti in t]
        else:
            shape = _linear if schedule == "linear" else _cosine
            sizes = [final_step_size + (step_size - final_step_size) * shape(ti) for ti in t]
    bad = [s for s in sizes if not (s > 0 and math.isfinite(s))]
    if bad:
        raise ConfigError(f"step sizes must be finite and > 0; the schedule gave {bad[0]}")
    return sizes


# -- smoothness prior ------------------------------------------------------------------------
def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = max(1, math.ceil(2 * sigma))
    r = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: Tensor, sigma: float = 1.0) -> Tensor:
    r"""Separable Gaussian blur :math:`Bx` of images ``(batch, C, H, W)`` (per channel,
    replicate padding). A fixed linear map of ``x``."""
    if x.dim() != 4:
        raise InputError(f"gaussian_blur expects (batch, C, H, W), got {tuple(x.shape)}")
    if not sigma > 0:
        raise ConfigError(f"blur sigma must be > 0, got {sigma}")
    c = x.shape[1]
    k = _gaussian_kernel(sigma, x.dtype, x.device)
    r = (k.numel() - 1) // 2
    h = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(h, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _smoothness_energy(x: Tensor, event_shape: tuple[int, ...], weight: float, sigma: float) -> Tensor:
    r""":math:`\tfrac{\lambda}{2}\|x - Bx\|^2` per example."""
    img = x if len(event_shape) == 3 else x.unsqueeze(1)
    diff = img - gaussian_blur(img, sigma)
    return 0.5 * weight * diff.reshape(x.shape[0], -1).pow(2).sum(dim=1)


# -- the sampler -----------------------------------------------------------------------------
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


def _potential_and_grad(potential: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        u = potential(xg)
        (g,) = torch.autograd.grad(u.sum(), xg)
    return u.detach(), g.detach()


def _per_chain(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def _sq_norm(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).pow(2).sum(dim=1)


def default_step_size(model: EnergyModel, x: Tensor, mask: Tensor | None = None) -> float:
    r"""A starting step size from the score alone.

    For a Gaussian with precision :math:`p` the squared score has mean :math:`D p`; MALA's
    proposal scale :math:`2\eta \approx 1.65^2 / (p\, D^{1/3})` then gives
    :math:`\eta_0 = 1.36\, D^{2/3} / \|\nabla E\|^2` (median over chains). Use with
    ``target_acceptance`` for targets that are not isotropic.
    """
    model = check_energy_model(model)
    check_batch(x, model.event_shape, what="chain states x")
    m = _check_mask(mask, x)
    _, g = _potential_and_grad(model.energy, x)
    if m is not None:
        g = torch.where(m, g, torch.zeros_like(g))
        d = m.reshape(m.shape[0], -1).sum(dim=1).to(x.dtype)
    else:
        d = torch.full((x.shape[0],), float(x[0].numel()), dtype=x.dtype, device=x.device)
    sq = _sq_norm(g).clamp_min(torch.finfo(x.dtype).tiny)
    eta = (1.36 * d.pow(2.0 / 3.0) / sq).median()
    eta = float(eta)
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
        schedule, final_step_size: step-size schedule (see module docstring).
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
    x0 = check_batch(x0, event_shape, what="initial chain states x0")
    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps must be a non-negative integer, got {steps!r}")
    try:
        step_ok = float(step_size) > 0 and math.isfinite(float(step_size))
    except (TypeError, ValueError):
        step_ok = False
    if isinstance(step_size, bool) or not step_ok:
        raise ConfigError(f"step size must be a finite number > 0, got {step_size!r}")
    if target_acceptance is not None:
        if not metropolis:
            raise ConfigError("target_acceptance needs metropolis=True (MALA)")
        if not 0 < target_acceptance < 1:
            raise ConfigError(f"target_acceptance must be in (0, 1), got {target_acceptance}")
    if not smoothness >= 0:
        raise ConfigError(f"smoothness must be >= 0, got {smoothness}")
    if smoothness > 0 and len(event_shape) not in (2, 3):
        raise ConfigError(
            f"the smoothness pull needs image events (C, H, W) or (H, W); the model's event "
            f"shape is {event_shape}"
        )
    mask = _check_mask(mask, x0)
    sizes = _step_sizes(float(step_size), final_step_size, schedule, steps)

    def potential(x: Tensor) -> Tensor:
        u = model.energy(x)
        if smoothness > 0:
            u = u + _smoothness_energy(x, event_shape, smoothness, blur_sigma)
        return u

    def movable(t: Tensor) -> Tensor:
        return t if mask is None else torch.where(mask, t, torch.zeros_like(t))

    chains = x0.shape[0]
    x = x0.detach().clone()
    scale = torch.ones(chains, dtype=x.dtype, device=x.device)  # adaptive factor per chain
    accepted = torch.zeros(chains, dtype=torch.float64, device=x.device)
    u, g = _potential_and_grad(potential, x)
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="MALA" if metropolis else "Langevin", leave=False)
    eta = scale * (sizes[0] if sizes else step_size)
    for i in iterator:
        eta = scale * sizes[i]
        eta_b = _per_chain(eta, x)
        noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        step = movable(-eta_b * g + torch.sqrt(2 * eta_b) * noise)
        proposal = x + step if mask is None else torch.where(mask, x + step, x)
        finite = torch.isfinite(proposal.reshape(chains, -1)).all(dim=1)
        if not bool(finite.all()):
            if not metropolis:
                raise EBFlowError(
                    f"unadjusted Langevin diverged at iteration {i} (non-finite states in "
                    f"{int((~finite).sum())} chain(s)); use a smaller step size or MALA"
                )
            proposal = torch.where(_per_chain(finite, x), proposal, x)  # rejected below
        u_new, g_new = _potential_and_grad(potential, proposal)
        if not metropolis:
            if not bool(torch.isfinite(u_new).all()):
                raise EBFlowError(
                    f"unadjusted Langevin diverged at iteration {i} (non-finite energy); use a "
                    "smaller step size or MALA"
                )
            x, u, g = proposal, u_new, g_new
            if callback is not None:
                callback(i, x, g)
            continue
        # log q(x | x') - log q(x' | x), restricted to the moving coordinates.
        forward_res = movable(proposal - x + eta_b * g)
        backward_res = movable(x - proposal + eta_b * g_new)
        log_q_ratio = (_sq_norm(forward_res) - _sq_norm(backward_res)) / (4 * eta)
        log_alpha = u - u_new + log_q_ratio
        ok = finite & torch.isfinite(log_alpha)
        log_alpha = torch.where(ok, log_alpha, torch.full_like(log_alpha, -math.inf))
        alpha = torch.exp(log_alpha.clamp(max=0.0))
        uniform = torch.rand(chains, dtype=x.dtype, device=x.device, generator=generator)
        accept = uniform < alpha
        accepted += accept.to(torch.float64)
        a = _per_chain(accept, x)
        x = torch.where(a, proposal, x)
        u = torch.where(accept, u_new, u)
        g = torch.where(a, g_new, g)
        if target_acceptance is not None:
            scale = scale * torch.exp(adaptation_rate * (alpha - target_acceptance))
        if callback is not None:
            callback(i, x, g)
    if metropolis and steps > 0:
        per_chain = (accepted / steps).to(x.dtype)
        rate: float | None = float(per_chain.mean())
    else:
        per_chain, rate = None, None
    return LangevinResult(samples=x, acceptance_rate=rate, acceptance_per_chain=per_chain,
                          step_size=eta.detach(), energy=u)


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
    if not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"refine steps must be a non-negative integer, got {steps!r}")
    if step_size is not None:
        try:
            ok = float(step_size) > 0 and math.isfinite(float(step_size))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"step size must be a finite number > 0, got {step_size!r}")
    if steps == 0:
        return x
    if preprocessing is not None:
        target = PreprocessedSpaceEnergy(model, preprocessing)
        y = refine_samples(target, target.to_logit_space(x), steps, step_size,
                           metropolis=metropolis, target_acceptance=target_acceptance,
                           generator=generator, **options)
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
    result = langevin(model, x, steps, step_size, metropolis=metropolis, target_acceptance=adapt,
                      generator=generator, **options)
    return result.samples
