"""The table of objectives (:data:`OBJECTIVES`): each entry's function, options with defaults
and checks, and kind of noise, from which :func:`make_objective`, :meth:`Objective.draw_noise`
and the application's choices are derived. Adding an objective is one entry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..flow import EBFlow
from ..validation import check_count, check_generator, check_number
from .losses import dsm_loss, esm_loss, fdssm_loss, ml_loss, sml_loss, ssm_loss
from .toolkit import PROJECTIONS, LossTerms, projections

__all__ = [
    "DEFAULTS",
    "NOISE_KINDS",
    "OBJECTIVES",
    "NoiseKind",
    "Objective",
    "ObjectiveSpec",
    "make_objective",
    "register_objective",
]


# -- option checks -------------------------------------------------------------------------------
def _positive(name: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        check_number(v, name, positive=True)

    return check


def _positive_int(name: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        check_count(v, name)

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


def _draw_projections(batch_shape: tuple[int, ...], options: dict, **kw: Any) -> Tensor:
    return projections(
        (options.get("slices", 1), *batch_shape), options.get("projection", "rademacher"), **kw
    )


def _draw_gaussian(batch_shape: tuple[int, ...], options: dict, **kw: Any) -> Tensor:
    return torch.randn(batch_shape, **kw)


def _draw_latent(batch_shape: tuple[int, ...], options: dict, **kw: Any) -> Tensor:
    n = options.get("num_samples") or batch_shape[0]
    return torch.randn((n, *batch_shape[1:]), **kw)


@dataclass(frozen=True)
class NoiseKind:
    """How an objective's random numbers are drawn for a batch of shape ``batch_shape``:
    ``draw(batch_shape, options, dtype=, device=, generator=)``, and ``batch_dim``, the
    dimension of the draw that indexes examples (to shard it like the batch)."""

    draw: Callable[..., Tensor]
    batch_dim: int


#: The kinds of objective noise, by the name an :class:`ObjectiveSpec` gives.
NOISE_KINDS: dict[str, NoiseKind] = {
    # SSM projections v, shape (slices, *batch_shape)
    "projections": NoiseKind(_draw_projections, batch_dim=1),
    # standard normal, shape of the batch (DSM's epsilon, FDSSM's directions before scaling)
    "gaussian": NoiseKind(_draw_gaussian, batch_dim=0),
    # SML's standard normal latent draws, shape (num_samples or batch, *batch_shape[1:])
    "latent": NoiseKind(_draw_latent, batch_dim=0),
}


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective: its function, its options (defaults and checks), the kind of random
    numbers it draws per batch (a key of :data:`NOISE_KINDS`, or None), whether it needs
    linear log-determinants, and whether it evaluates the energy away from the data
    (``perturbs_input``: such inputs can leave a model's domain, e.g. a logit without MaP)."""

    fn: Callable[..., LossTerms]
    defaults: dict[str, Any]
    checks: dict[str, Callable[[Any], None]]
    #: a key of :data:`NOISE_KINDS` (``"projections"``, ``"gaussian"``, ``"latent"``) or None
    noise: str | None = None
    needs_log_det: bool = False
    #: the objective draws model samples by inverting the flow (its noise: the latent draws)
    samples_model: bool = False
    #: the energy is evaluated at perturbed inputs (DSM's x + sigma eps, FDSSM's x +- v)
    perturbs_input: bool = False
    help: str = ""

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError(f"an objective's fn must be callable, got {type(self.fn).__name__}")
        if set(self.checks) != set(self.defaults):
            raise ConfigError(
                f"an objective needs one check per option: options {sorted(self.defaults)}, "
                f"checks {sorted(self.checks)}"
            )
        if self.noise is not None and self.noise not in NOISE_KINDS:
            raise ConfigError(f"unknown noise kind {self.noise!r}; choose one of {', '.join(NOISE_KINDS)}")


_DROP = {"drop_out_of_domain": _boolean("drop_out_of_domain")}

OBJECTIVES: dict[str, ObjectiveSpec] = {
    "ml": ObjectiveSpec(ml_loss, {}, {}, needs_log_det=True, help="maximum likelihood"),
    "sml": ObjectiveSpec(
        sml_loss,
        {"num_samples": None},
        {"num_samples": _optional_positive_int("num_samples")},
        noise="latent",
        samples_model=True,
        help="sampling-based maximum likelihood",
    ),
    "ssm": ObjectiveSpec(
        ssm_loss,
        {"slices": 1, "projection": "rademacher"},
        {"slices": _positive_int("slices"), "projection": _one_of("SSM projection", PROJECTIONS)},
        noise="projections",
        help="sliced score matching",
    ),
    "dsm": ObjectiveSpec(
        dsm_loss,
        {"sigma": 0.1, "drop_out_of_domain": False},
        {"sigma": _positive("sigma"), **_DROP},
        noise="gaussian",
        perturbs_input=True,
        help="denoising score matching",
    ),
    "fdssm": ObjectiveSpec(
        fdssm_loss,
        {"eps": 0.1, "drop_out_of_domain": False},
        {"eps": _positive("eps"), **_DROP},
        noise="gaussian",
        perturbs_input=True,
        help="finite-difference sliced score matching",
    ),
    "esm": ObjectiveSpec(esm_loss, {}, {}, help="exact score matching (small D only)"),
}
#: Default options of each objective (derived from :data:`OBJECTIVES`).
DEFAULTS: dict[str, dict] = {name: dict(spec.defaults) for name, spec in OBJECTIVES.items()}


def register_objective(name: str, spec: ObjectiveSpec, *, replace: bool = False) -> None:
    """Add an objective to :data:`OBJECTIVES` under ``name`` so that :func:`make_objective`
    builds it (and :meth:`Objective.draw_noise` draws its noise). The library's command line
    only offers the objectives whose options are config keys. A taken name raises
    :class:`~ebflow.errors.ConfigError` unless ``replace``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"an objective's name must be an identifier, got {name!r}")
    if not isinstance(spec, ObjectiveSpec):
        raise ConfigError(f"register_objective takes an ObjectiveSpec, got {type(spec).__name__}")
    if name in OBJECTIVES and not replace:
        raise ConfigError(f"an objective named {name!r} exists; pass replace=True to replace it")
    OBJECTIVES[name] = spec
    DEFAULTS[name] = dict(spec.defaults)


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
        """This objective's entry of :data:`OBJECTIVES`."""
        return OBJECTIVES[self.name]

    @property
    def noise_batch_dim(self) -> int | None:
        """Dimension of :meth:`draw_noise`'s output that indexes examples (None: no noise)."""
        kind = self.spec.noise
        return None if kind is None else NOISE_KINDS[kind].batch_dim

    def draw_noise(
        self,
        batch_shape: tuple[int, ...],
        *,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        """Draw the random numbers the objective needs for a batch of shape ``batch_shape``
        (``None`` for ``ml`` and ``esm``; for ``sml`` the latent draws of its model samples,
        ``(num_samples or batch, *batch_shape[1:])``). Passing them back as ``noise=`` makes
        the loss a deterministic function of the batch: e.g. to give every example of a global
        batch the same noise whichever process or shard it lands in."""
        kind = self.spec.noise
        if kind is None:
            return None
        if isinstance(batch_shape, (str, bytes)) or not isinstance(batch_shape, Sequence) or not batch_shape:
            raise ConfigError(f"batch_shape must be a non-empty sequence of sizes, got {batch_shape!r}")
        shape = tuple(check_count(s, "every size of batch_shape") for s in batch_shape)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"noise dtype must be a floating torch.dtype, got {dtype!r}")
        check_generator(generator, device=device, owner="noise's device")
        return NOISE_KINDS[kind].draw(shape, self.options, dtype=dtype, device=device, generator=generator)

    @torch.nn.utils.parametrize.cached()
    def __call__(self, model: EBFlow, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """The batch mean of the loss (a scalar). ``model`` must be an :class:`EBFlow` and ``x``
        a batch for it; both are checked by the objective function (:class:`ConfigError` /
        :class:`~ebflow.errors.InputError` naming the problem)."""
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
    :class:`~ebflow.errors.ConfigError`.

    Example:
        >>> import torch, ebflow
        >>> model = ebflow.dense_flow((4,))
        >>> objective = ebflow.make_objective("dsm", sigma=0.5)
        >>> objective.options
        {'sigma': 0.5, 'drop_out_of_domain': False}
        >>> loss = objective(model, torch.randn(16, 4))  # the batch mean: a scalar
        >>> loss.shape, loss.requires_grad
        (torch.Size([]), True)
        >>> loss.backward()  # parameter gradients; no determinant was computed
    """
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    spec = OBJECTIVES[name]
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        raise ConfigError(
            f"objective {name!r} takes no option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(spec.defaults) or 'none'}"
        )
    energy_reg = check_number(energy_reg, "energy_reg", non_negative=True)
    merged = {**spec.defaults, **options}
    for key, value in merged.items():
        spec.checks[key](value)
    return Objective(name=name, fn=spec.fn, options=merged, energy_reg=float(energy_reg))
