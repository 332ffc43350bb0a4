r"""Training objectives. Each takes ``(model, x)`` and returns a scalar to minimise.

With :math:`s(x) = -\nabla_x E(x)` the model score:

* ``ml``    -- :math:`\mathbb{E}[-\log p(x)]`; needs every linear log-determinant.
* ``sml``   -- surrogate with gradient :math:`\mathbb{E}_{data}\nabla E - \mathbb{E}_{model}\nabla E`,
  model samples drawn by exact inversion (no gradient through them).
* ``ssm``   -- sliced score matching, variance reduced:
  :math:`\mathbb{E}[v^\top \nabla_x s\, v + \tfrac12\|s\|^2]`.
* ``dsm``   -- denoising score matching: :math:`\mathbb{E}\,\tfrac12\|s(x+\sigma\epsilon) + \epsilon/\sigma\|^2`.
* ``fdssm`` -- finite-difference SSM from energies at :math:`x, x \pm v`, :math:`\|v\| = \varepsilon`.
* ``esm``   -- exact score matching :math:`\mathbb{E}[\operatorname{tr}\nabla_x s + \tfrac12\|s\|^2]`
  (``D`` Hessian-vector products: small ``D`` only).

The score-matching objectives (``ssm``, ``dsm``, ``fdssm``, ``esm``) only call
:meth:`EBFlow.energy` (or its split :meth:`EBFlow.linear_prefix` / :meth:`EBFlow.tail_energy`):
never a determinant, inverse or factorisation of a linear layer. Any of
them takes an energy regulariser ``energy_reg`` (:math:`\lambda\,\mathbb{E}[E(x)]`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .errors import ConfigError
from .flow import EBFlow

__all__ = [
    "Objective",
    "OBJECTIVES",
    "make_objective",
    "ml_loss",
    "sml_loss",
    "ssm_loss",
    "dsm_loss",
    "fdssm_loss",
    "esm_loss",
]

Projection = Literal["rademacher", "gaussian"]


def _flat_sq_norm(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).pow(2).sum(dim=1)


def _flat_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(dim=1)


def _energy_and_grad(model: EBFlow, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_with_grad, E(x), dE/dx)`` with the graph kept for a second differentiation.

    The score objectives differentiate with respect to ``x``, so they enable grad mode
    themselves: their value can also be computed inside ``torch.no_grad()`` (validation).
    """
    x = x.detach().requires_grad_(True)
    e = model.energy(x)
    (g,) = torch.autograd.grad(e.sum(), x, create_graph=True)
    return x, e, g


def ml_loss(model: EBFlow, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Maximum likelihood: :math:`\mathbb{E}[E(x)] + \log Z`. Returns ``(loss, E(x))``."""
    e = model.energy(x)
    return e.mean() + model.log_partition().to(e.dtype), e


def sml_loss(model: EBFlow, x: Tensor, num_samples: int | None = None) -> tuple[Tensor, Tensor]:
    r"""Sampling-based ML: :math:`\mathbb{E}_{data}[E] - \mathbb{E}_{model}[E]` with model samples
    drawn by exact inversion and detached. Its gradient equals the ML gradient in expectation;
    its value is not a likelihood. Returns ``(loss, E(x))``."""
    n = x.shape[0] if num_samples is None else num_samples
    e = model.energy(x)  # first: a pending data-dependent initialisation sees the data
    with torch.no_grad():
        samples = model.sample(n)
    return e.mean() - model.energy(samples).mean(), e


def _projections(
    shape: tuple[int, ...], projection: Projection, *, dtype: torch.dtype, device: torch.device,
    generator: torch.Generator | None = None,
) -> Tensor:
    if projection == "rademacher":
        signs = torch.randint(0, 2, shape, device=device, generator=generator)
        return signs.to(dtype) * 2 - 1
    if projection == "gaussian":
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)
    raise ConfigError(f"unknown SSM projection {projection!r}; choose 'rademacher' or 'gaussian'")


def _check_noise(noise: Tensor, shape: tuple[int, ...], what: str, like: Tensor) -> Tensor:
    if tuple(noise.shape) != tuple(shape):
        raise ConfigError(f"{what} must have shape {tuple(shape)}, got {tuple(noise.shape)}")
    if noise.dtype != like.dtype or noise.device != like.device:
        raise ConfigError(f"{what} must have the batch's dtype and device ({like.dtype}, {like.device}), "
                          f"got ({noise.dtype}, {noise.device})")
    return noise


@torch.enable_grad()
def ssm_loss(
    model: EBFlow, x: Tensor, slices: int = 1, projection: Projection = "rademacher",
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Sliced score matching (variance reduced), ``slices`` projections per example:
    :math:`\mathbb{E}[-v^\top \nabla^2 E\, v + \tfrac12\|\nabla E\|^2]`. ``noise`` optionally
    gives the projections ``v``, shape ``(slices, *x.shape)``. Returns ``(loss, E(x))``."""
    if slices < 1:
        raise ConfigError(f"SSM needs at least one slice, got slices={slices}")
    shape = (slices, *x.shape)
    if noise is None:
        v = _projections(shape, projection, dtype=x.dtype, device=x.device)
    else:
        v = _check_noise(noise, shape, "SSM projections", x)
    xr = x.repeat(slices, *([1] * (x.dim() - 1))).detach().requires_grad_(True)
    # Leading linear layers h = A x + c: v^T (d2E/dx2) v = u^T (d2E/dh2) u with u = A v, so the
    # Hessian-vector product stops at h (dE/dx = A^T dE/dh is still needed for the norm term).
    h, u = model.linear_prefix(xr, v.reshape(xr.shape))
    e = model.tail_energy(h)
    (g_h,) = torch.autograd.grad(e.sum(), h, create_graph=True)
    g = g_h if h is xr else torch.autograd.grad(h, xr, g_h, create_graph=True)[0]
    (hu,) = torch.autograd.grad(_flat_dot(g_h, u).sum(), h, create_graph=True)
    loss = -_flat_dot(hu, u) + 0.5 * _flat_sq_norm(g)
    return loss.mean(), e[: x.shape[0]]


@torch.enable_grad()
def dsm_loss(
    model: EBFlow, x: Tensor, sigma: float, noise: Tensor | None = None
) -> tuple[Tensor, None]:
    r"""Denoising score matching at noise level ``sigma``:
    :math:`\mathbb{E}\,\tfrac12\|\nabla E(\tilde x) - \epsilon/\sigma\|^2`,
    :math:`\tilde x = x + \sigma\epsilon`; ``noise`` optionally gives :math:`\epsilon`
    (shape of ``x``). Returns ``(loss, None)`` (no energy at ``x``)."""
    if not sigma > 0:
        raise ConfigError(f"DSM needs a noise level sigma > 0, got sigma={sigma}")
    eps = torch.randn_like(x) if noise is None else _check_noise(noise, tuple(x.shape), "DSM noise", x)
    _, _, g = _energy_and_grad(model, x + sigma * eps)
    return 0.5 * _flat_sq_norm(g - eps / sigma).mean(), None


def _fdssm_per_example(model: EBFlow, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    r"""FDSSM terms for given directions ``v`` (``\|v\| = \varepsilon`` per example), scaled by
    :math:`D/\varepsilon^2` so that they estimate the SSM objective. Returns ``(terms, E(x))``."""
    b = x.shape[0]
    # E(x +- v) = tail(h +- A v) after the leading linear layers h = A x + c: those layers run
    # on x and v (2 batches) instead of x, x + v, x - v (3 batches).
    h, u = model.linear_prefix(x, v)
    e_all = model.tail_energy(torch.cat([h, h + u, h - u]))
    e, e_plus, e_minus = e_all[:b], e_all[b : 2 * b], e_all[2 * b :]
    eps_sq = _flat_sq_norm(v)
    d = x[0].numel()
    terms = (e_plus - e_minus).pow(2) / 8 + 2 * e - e_plus - e_minus
    return terms * d / eps_sq, e


def _sphere(v: Tensor, radius: float) -> Tensor:
    """Scale each example of ``v`` to norm ``radius`` (Gaussian ``v``: uniform on the sphere)."""
    norm = v.reshape(v.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    return v * (radius / norm).view(-1, *([1] * (v.dim() - 1)))


def fdssm_loss(
    model: EBFlow, x: Tensor, eps: float, noise: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Finite-difference sliced score matching with step ``eps``:
    :math:`\frac{D}{\varepsilon^2}\mathbb{E}[\tfrac18(E(x+v)-E(x-v))^2 + 2E(x) - E(x+v) - E(x-v)]`,
    :math:`v` uniform on the sphere of radius :math:`\varepsilon`. ``noise`` optionally gives
    Gaussian draws (shape of ``x``) that are scaled to that sphere. Three energy evaluations,
    one backward. Returns ``(loss, E(x))``."""
    if not eps > 0:
        raise ConfigError(f"FDSSM needs a step eps > 0, got eps={eps}")
    raw = torch.randn_like(x) if noise is None else _check_noise(noise, tuple(x.shape), "FDSSM noise", x)
    terms, e = _fdssm_per_example(model, x, _sphere(raw, eps))
    return terms.mean(), e


@torch.enable_grad()
def esm_loss(model: EBFlow, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Exact score matching :math:`\mathbb{E}[-\operatorname{tr}\nabla^2 E + \tfrac12\|\nabla E\|^2]`
    with the Hessian trace from ``D`` Hessian-vector products. Returns ``(loss, E(x))``."""
    xr, e, g = _energy_and_grad(model, x)
    g_flat = g.reshape(g.shape[0], -1)
    d = g_flat.shape[1]
    trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(d):
        (row,) = torch.autograd.grad(g_flat[:, i].sum(), xr, create_graph=True)
        trace = trace + row.reshape(row.shape[0], -1)[:, i]
    return (-trace + 0.5 * _flat_sq_norm(g)).mean(), e


@dataclass
class Objective:
    """A configured objective: ``loss = objective(model, x)``.

    ``energy_reg`` adds :math:`\\lambda\\,\\mathbb{E}[E(x)]` (reusing ``E(x)`` when the objective
    already computed it). ``options`` are passed to the loss function (``sigma``, ``eps``,
    ``slices``, ``projection``, ``num_samples``).
    """

    name: str
    fn: Callable[..., tuple[Tensor, Tensor | None]]
    options: dict = field(default_factory=dict)
    energy_reg: float = 0.0

    @property
    def uses_log_det(self) -> bool:
        """True when the objective needs linear-layer determinants (``ml``)."""
        return self.name == "ml"

    @property
    def noise_batch_dim(self) -> int | None:
        """Dimension of :meth:`draw_noise`'s output that indexes examples (None: no noise)."""
        return {"ssm": 1, "dsm": 0, "fdssm": 0}.get(self.name)

    def draw_noise(
        self, batch_shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        """Draw the random numbers the objective needs for a batch of shape ``batch_shape``
        (``None`` for ``ml``, ``sml``, ``esm``). Passing them back as ``noise=`` makes the loss
        a deterministic function of the batch: e.g. to give every example of a global batch the
        same noise whichever process or shard it lands in."""
        if self.name == "ssm":
            shape = (self.options.get("slices", 1), *batch_shape)
            return _projections(shape, self.options.get("projection", "rademacher"),
                                dtype=dtype, device=device, generator=generator)
        if self.name in ("dsm", "fdssm"):
            return torch.randn(batch_shape, dtype=dtype, device=device, generator=generator)
        return None

    def __call__(self, model: EBFlow, x: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is not None:
            if self.noise_batch_dim is None:
                raise ConfigError(f"objective {self.name!r} takes no noise")
            loss, e = self.fn(model, x, noise=noise, **self.options)
        else:
            loss, e = self.fn(model, x, **self.options)
        if self.energy_reg:
            if e is None:
                e = model.energy(x)
            loss = loss + self.energy_reg * e.mean()
        return loss


OBJECTIVES: dict[str, tuple[Callable[..., tuple[Tensor, Tensor | None]], tuple[str, ...]]] = {
    "ml": (ml_loss, ()),
    "sml": (sml_loss, ("num_samples",)),
    "ssm": (ssm_loss, ("slices", "projection")),
    "dsm": (dsm_loss, ("sigma",)),
    "fdssm": (fdssm_loss, ("eps",)),
    "esm": (esm_loss, ()),
}
DEFAULTS: dict[str, dict] = {"dsm": {"sigma": 0.1}, "fdssm": {"eps": 0.1}}


def make_objective(name: str, *, energy_reg: float = 0.0, **options) -> Objective:
    """Build an objective by name (``ml``, ``sml``, ``ssm``, ``dsm``, ``fdssm``, ``esm``).

    Unknown names or options raise :class:`~ebflow.errors.ConfigError`.
    """
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    fn, allowed = OBJECTIVES[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"objective {name!r} takes no option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(allowed) or 'none'}"
        )
    if not energy_reg >= 0:
        raise ConfigError(f"energy_reg must be >= 0, got {energy_reg}")
    merged = {**DEFAULTS.get(name, {}), **options}
    if "sigma" in merged and not merged["sigma"] > 0:
        raise ConfigError(f"sigma must be > 0, got {merged['sigma']}")
    if "eps" in merged and not merged["eps"] > 0:
        raise ConfigError(f"eps must be > 0, got {merged['eps']}")
    if "slices" in merged and not (isinstance(merged["slices"], int) and merged["slices"] >= 1):
        raise ConfigError(f"slices must be a positive integer, got {merged['slices']!r}")
    if "projection" in merged and merged["projection"] not in ("rademacher", "gaussian"):
        raise ConfigError(f"unknown SSM projection {merged['projection']!r}; choose 'rademacher' or 'gaussian'")
    return Objective(name=name, fn=fn, options=merged, energy_reg=float(energy_reg))
