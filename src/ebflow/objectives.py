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
never a determinant, inverse or factorisation of a linear layer.

**Loss scale.** ``ml`` and ``sml`` are in nats per example. The score-matching objectives are
*per dimension*: the per-example sums above divided by ``D`` (FDSSM: the finite-difference sum
divided by :math:`\varepsilon^2`, which estimates the same quantity). This is the scale of the
paper's reference recipes, so a gradient-clipping threshold taken from them means the same here,
and loss curves compare across data sizes. The energy regulariser ``energy_reg`` adds
:math:`\lambda\,\mathbb{E}[E(x)]/D` (the reference adds :math:`\lambda E` before its
division by ``D``; for FDSSM it divides by :math:`\varepsilon^2` instead, so a reference FDSSM
:math:`\lambda` corresponds to :math:`\lambda D/\varepsilon^2` here).

**Inputs outside the model's domain.** A model trained without MaP holds a logit, defined on
``(0, 1)`` only; DSM's and FDSSM's perturbed inputs can leave it. With
``drop_out_of_domain=True`` those examples contribute 0 to the batch mean (the reference
replaces their NaN loss by 0) and are counted in :attr:`Objective.dropped_examples`; by default
they raise :class:`~ebflow.errors.InputError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from .errors import ConfigError
from .flow import EBFlow

__all__ = [
    "LossTerms",
    "ObjectiveSpec",
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


class LossTerms(NamedTuple):
    """What an objective function returns: the per-example ``loss`` (shape ``(batch,)``, 0 for
    dropped examples), the energy ``E(x)`` per example when it was computed on the way (else
    ``None``), the number of ``dropped`` examples (outside the model's domain) and the mask
    of the ``kept`` ones (``None``: all)."""

    loss: Tensor
    energy: Tensor | None
    dropped: int = 0
    kept: Tensor | None = None


def _energy_and_grad(model: EBFlow, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_with_grad, E(x), dE/dx)`` with the graph kept for a second differentiation.

    The score objectives differentiate with respect to ``x``, so they enable grad mode
    themselves: their value can also be computed inside ``torch.no_grad()`` (validation).
    """
    x = x.detach().requires_grad_(True)
    e = model.energy(x)
    (g,) = torch.autograd.grad(e.sum(), x, create_graph=True)
    return x, e, g


def _zero_loss(model: EBFlow, batch: int, like: Tensor) -> Tensor:
    """Per-example zeros that are still connected to the parameters (a batch whose every
    example was dropped gives a zero gradient, not a backward error)."""
    anchor = sum((p.sum() * 0 for p in model.parameters() if p.requires_grad), like.new_zeros(()))
    return like.new_zeros(batch) + anchor


def _on_rows(
    model: EBFlow, keep: Tensor, batch: int, like: Tensor, compute: Callable[[Tensor], LossTerms],
) -> LossTerms:
    """Evaluate ``compute`` on the kept rows; dropped rows get loss (and energy) 0."""
    dropped = int(batch - int(keep.sum()))
    if dropped == 0:
        return compute(keep.new_ones(()))  # a 0-d mask: every row
    if dropped == batch:
        return LossTerms(_zero_loss(model, batch, like), like.new_zeros(batch), dropped, keep)
    part = compute(keep)
    loss = _zero_loss(model, batch, like).index_put((keep,), part.loss)
    energy = None if part.energy is None else like.new_zeros(batch).index_put((keep,), part.energy)
    return LossTerms(loss, energy, dropped, keep)


def ml_loss(model: EBFlow, x: Tensor) -> LossTerms:
    r"""Maximum likelihood: :math:`E(x) + \log Z = -\log p(x)` per example (nats)."""
    e = model.energy(x)
    return LossTerms(e + model.log_partition().to(e.dtype), e)


def sml_loss(model: EBFlow, x: Tensor, num_samples: int | None = None) -> LossTerms:
    r"""Sampling-based ML: :math:`E(x_i) - \mathbb{E}_{model}[E]` with model samples drawn by
    exact inversion and detached. Its gradient equals the ML gradient in expectation; its value
    is not a likelihood."""
    n = x.shape[0] if num_samples is None else num_samples
    e = model.energy(x)
    with torch.no_grad():
        samples = model.sample(n)
    return LossTerms(e - model.energy(samples).mean(), e)


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
) -> LossTerms:
    r"""Sliced score matching (variance reduced), per dimension:
    :math:`\frac1D[-v^\top \nabla^2 E\, v + \tfrac12\|\nabla E\|^2]`, averaged over ``slices``
    projections. ``noise`` optionally gives the projections ``v``, shape ``(slices, *x.shape)``."""
    if slices < 1:
        raise ConfigError(f"SSM needs at least one slice, got slices={slices}")
    shape = (slices, *x.shape)
    if noise is None:
        v = _projections(shape, projection, dtype=x.dtype, device=x.device)
    else:
        v = _check_noise(noise, shape, "SSM projections", x)
    b = x.shape[0]
    xr = x.repeat(slices, *([1] * (x.dim() - 1))).detach().requires_grad_(True)
    # Leading linear layers h = A x + c: v^T (d2E/dx2) v = u^T (d2E/dh2) u with u = A v, so the
    # Hessian-vector product stops at h (dE/dx = A^T dE/dh is still needed for the norm term).
    h, u = model.linear_prefix(xr, v.reshape(xr.shape))
    e = model.tail_energy(h)
    (g_h,) = torch.autograd.grad(e.sum(), h, create_graph=True)
    g = g_h if h is xr else torch.autograd.grad(h, xr, g_h, create_graph=True)[0]
    (hu,) = torch.autograd.grad(_flat_dot(g_h, u).sum(), h, create_graph=True)
    per_slice = (-_flat_dot(hu, u) + 0.5 * _flat_sq_norm(g)) / x[0].numel()
    return LossTerms(per_slice.view(slices, b).mean(0), e[:b])


def _in_domain(model: EBFlow, *inputs: Tensor) -> Tensor:
    keep = model.in_domain(inputs[0])
    for t in inputs[1:]:
        keep = keep & model.in_domain(t)
    return keep


@torch.enable_grad()
def dsm_loss(
    model: EBFlow, x: Tensor, sigma: float, noise: Tensor | None = None,
    drop_out_of_domain: bool = False,
) -> LossTerms:
    r"""Denoising score matching at noise level ``sigma``, per dimension:
    :math:`\frac1{2D}\|\nabla E(\tilde x) - \epsilon/\sigma\|^2`,
    :math:`\tilde x = x + \sigma\epsilon`; ``noise`` optionally gives :math:`\epsilon`
    (shape of ``x``). No energy at ``x`` is computed."""
    if not sigma > 0:
        raise ConfigError(f"DSM needs a noise level sigma > 0, got sigma={sigma}")
    eps = torch.randn_like(x) if noise is None else _check_noise(noise, tuple(x.shape), "DSM noise", x)
    d = x[0].numel()

    def compute(rows: Tensor) -> LossTerms:
        xs, es = (x, eps) if rows.dim() == 0 else (x[rows], eps[rows])
        _, _, g = _energy_and_grad(model, xs + sigma * es)
        return LossTerms(0.5 * _flat_sq_norm(g - es / sigma) / d, None)

    if not drop_out_of_domain:
        return compute(x.new_ones((), dtype=torch.bool))
    return _on_rows(model, _in_domain(model, x + sigma * eps), x.shape[0], x, compute)


def _fdssm_per_example(model: EBFlow, x: Tensor, v: Tensor) -> LossTerms:
    r"""FDSSM terms for given directions ``v`` (``\|v\| = \varepsilon`` per example), divided by
    :math:`\varepsilon^2`: an estimate of the per-dimension SSM objective."""
    b = x.shape[0]
    # E(x +- v) = tail(h +- A v) after the leading linear layers h = A x + c: those layers run
    # on x and v (2 batches) instead of x, x + v, x - v (3 batches).
    h, u = model.linear_prefix(x, v)
    e_all = model.tail_energy(torch.cat([h, h + u, h - u]))
    e, e_plus, e_minus = e_all[:b], e_all[b : 2 * b], e_all[2 * b :]
    terms = (e_plus - e_minus).pow(2) / 8 + 2 * e - e_plus - e_minus
    return LossTerms(terms / _flat_sq_norm(v), e)


def _sphere(v: Tensor, radius: float) -> Tensor:
    """Scale each example of ``v`` to norm ``radius`` (Gaussian ``v``: uniform on the sphere)."""
    norm = v.reshape(v.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    return v * (radius / norm).view(-1, *([1] * (v.dim() - 1)))


def fdssm_loss(
    model: EBFlow, x: Tensor, eps: float, noise: Tensor | None = None,
    drop_out_of_domain: bool = False,
) -> LossTerms:
    r"""Finite-difference sliced score matching with step ``eps``:
    :math:`\frac{1}{\varepsilon^2}[\tfrac18(E(x+v)-E(x-v))^2 + 2E(x) - E(x+v) - E(x-v)]`,
    :math:`v` uniform on the sphere of radius :math:`\varepsilon` (an estimate of the
    per-dimension SSM objective). ``noise`` optionally gives Gaussian draws (shape of ``x``)
    that are scaled to that sphere. Three energy evaluations, one backward."""
    if not eps > 0:
        raise ConfigError(f"FDSSM needs a step eps > 0, got eps={eps}")
    raw = torch.randn_like(x) if noise is None else _check_noise(noise, tuple(x.shape), "FDSSM noise", x)
    v = _sphere(raw, eps)
    if not drop_out_of_domain:
        return _fdssm_per_example(model, x, v)
    keep = _in_domain(model, x, x + v, x - v)
    return _on_rows(model, keep, x.shape[0], x,
                    lambda rows: _fdssm_per_example(model, x, v) if rows.dim() == 0
                    else _fdssm_per_example(model, x[rows], v[rows]))


@torch.enable_grad()
def esm_loss(model: EBFlow, x: Tensor) -> LossTerms:
    r"""Exact score matching per dimension,
    :math:`\frac1D[-\operatorname{tr}\nabla^2 E + \tfrac12\|\nabla E\|^2]`, with the Hessian
    trace from ``D`` Hessian-vector products (small ``D`` only)."""
    xr, e, g = _energy_and_grad(model, x)
    g_flat = g.reshape(g.shape[0], -1)
    d = g_flat.shape[1]
    trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(d):
        (row,) = torch.autograd.grad(g_flat[:, i].sum(), xr, create_graph=True)
        trace = trace + row.reshape(row.shape[0], -1)[:, i]
    return LossTerms((-trace + 0.5 * _flat_sq_norm(g)) / d, e)


# -- the registry ---------------------------------------------------------------------------------
def _positive(name: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"{name} must be > 0, got {v!r}")
    return check


def _positive_int(name: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    return check


def _optional_positive_int(name: str) -> Callable[[Any], None]:
    inner = _positive_int(name)
    return lambda v: None if v is None else inner(v)


def _one_of(name: str, allowed: tuple[str, ...]) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if v not in allowed:
            raise ConfigError(f"unknown {name} {v!r}; choose {' or '.join(map(repr, allowed))}")
    return check


def _boolean(name: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not isinstance(v, bool):
            raise ConfigError(f"{name} must be true or false, got {v!r}")
    return check


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective: its function, its options (defaults and checks), the shape of the
    random numbers it draws per batch, and whether it needs linear log-determinants."""

    fn: Callable[..., LossTerms]
    defaults: dict[str, Any]
    checks: dict[str, Callable[[Any], None]]
    #: ``"projections"`` (shape ``(slices, *batch)``), ``"gaussian"`` (shape of the batch) or None
    noise: str | None = None
    needs_log_det: bool = False
    #: the objective draws model samples (its random numbers come from the global RNG)
    samples_model: bool = False
    help: str = ""


_DROP = {"drop_out_of_domain": _boolean("drop_out_of_domain")}

OBJECTIVES: dict[str, ObjectiveSpec] = {
    "ml": ObjectiveSpec(ml_loss, {}, {}, needs_log_det=True, help="maximum likelihood"),
    "sml": ObjectiveSpec(sml_loss, {"num_samples": None},
                         {"num_samples": _optional_positive_int("num_samples")},
                         samples_model=True, help="sampling-based maximum likelihood"),
    "ssm": ObjectiveSpec(ssm_loss, {"slices": 1, "projection": "rademacher"},
                         {"slices": _positive_int("slices"),
                          "projection": _one_of("SSM projection", ("rademacher", "gaussian"))},
                         noise="projections", help="sliced score matching"),
    "dsm": ObjectiveSpec(dsm_loss, {"sigma": 0.1, "drop_out_of_domain": False},
                         {"sigma": _positive("sigma"), **_DROP}, noise="gaussian",
                         help="denoising score matching"),
    "fdssm": ObjectiveSpec(fdssm_loss, {"eps": 0.1, "drop_out_of_domain": False},
                           {"eps": _positive("eps"), **_DROP}, noise="gaussian",
                           help="finite-difference sliced score matching"),
    "esm": ObjectiveSpec(esm_loss, {}, {}, help="exact score matching (small D only)"),
}
#: Default options of each objective (derived from :data:`OBJECTIVES`).
DEFAULTS: dict[str, dict] = {name: dict(spec.defaults) for name, spec in OBJECTIVES.items()}


@dataclass
class Objective:
    r"""A configured objective: ``loss = objective(model, x)``, the mean over the batch of the
    per-example losses, plus :math:`\lambda\,\mathbb{E}[E(x)]/D` when ``energy_reg`` is set
    (reusing ``E(x)`` when the objective already computed it). ``options`` are passed to the
    loss function (``sigma``, ``eps``, ``slices``, ``projection``, ``num_samples``,
    ``drop_out_of_domain``). ``dropped_examples`` / ``seen_examples`` count, since creation,
    the examples dropped for leaving the model's domain and all examples seen.
    """

    name: str
    fn: Callable[..., LossTerms]
    options: dict = field(default_factory=dict)
    energy_reg: float = 0.0
    dropped_examples: int = 0
    seen_examples: int = 0

    @property
    def spec(self) -> ObjectiveSpec:
        return OBJECTIVES[self.name]

    @property
    def noise_batch_dim(self) -> int | None:
        """Dimension of :meth:`draw_noise`'s output that indexes examples (None: no noise)."""
        return {"projections": 1, "gaussian": 0}.get(self.spec.noise or "")

    def draw_noise(
        self, batch_shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        """Draw the random numbers the objective needs for a batch of shape ``batch_shape``
        (``None`` for ``ml``, ``sml``, ``esm``). Passing them back as ``noise=`` makes the loss
        a deterministic function of the batch: e.g. to give every example of a global batch the
        same noise whichever process or shard it lands in."""
        kind = self.spec.noise
        if kind == "projections":
            shape = (self.options.get("slices", 1), *batch_shape)
            return _projections(shape, self.options.get("projection", "rademacher"),
                                dtype=dtype, device=device, generator=generator)
        if kind == "gaussian":
            return torch.randn(batch_shape, dtype=dtype, device=device, generator=generator)
        return None

    def __call__(self, model: EBFlow, x: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is not None:
            if self.spec.noise is None:
                raise ConfigError(f"objective {self.name!r} takes no noise")
            terms = self.fn(model, x, noise=noise, **self.options)
        else:
            terms = self.fn(model, x, **self.options)
        loss = terms.loss
        if self.energy_reg:
            e = terms.energy
            if e is None:
                e = model.energy(x)
            if terms.kept is not None:
                e = torch.where(terms.kept, e, torch.zeros_like(e))
            loss = loss + self.energy_reg * e / x[0].numel()
        self.dropped_examples += terms.dropped
        self.seen_examples += x.shape[0]
        return loss.mean()


def make_objective(name: str, *, energy_reg: float = 0.0, **options: Any) -> Objective:
    """Build an objective by name (a key of :data:`OBJECTIVES`: ``ml``, ``sml``, ``ssm``,
    ``dsm``, ``fdssm``, ``esm``). Unknown names or options, and bad option values, raise
    :class:`~ebflow.errors.ConfigError`."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    spec = OBJECTIVES[name]
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        raise ConfigError(
            f"objective {name!r} takes no option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(spec.defaults) or 'none'}"
        )
    if isinstance(energy_reg, bool) or not isinstance(energy_reg, (int, float)) or not energy_reg >= 0:
        raise ConfigError(f"energy_reg must be >= 0, got {energy_reg!r}")
    merged = {**spec.defaults, **options}
    for key, value in merged.items():
        spec.checks[key](value)
    if name == "sml" and merged["num_samples"] is None:
        del merged["num_samples"]
    return Objective(name=name, fn=spec.fn, options=merged, energy_reg=float(energy_reg))
