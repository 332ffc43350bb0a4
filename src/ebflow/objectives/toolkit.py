r"""Building blocks for objectives: what every built-in objective uses, public so that an
objective written outside the package is as fast and as careful as the built-in ones.

An objective is a function ``fn(model, x, **options) -> LossTerms``. The pattern:

1. ``x = checked_batch(model, x)`` -- the one input check (model type, dtype, shape, device,
   NaN/Inf), then every call on the model with ``check=False``;
2. the energy through the model's public methods: :meth:`~ebflow.EBFlow.energy`,
   :meth:`~ebflow.EBFlow.energy_and_grad` (the score, differentiable in the parameters, with a
   graph that reaches the parameters only), or :meth:`~ebflow.EBFlow.linear_prefix` and
   :meth:`~ebflow.EBFlow.tail_energy` (directional objectives: the leading linear layers run on
   ``x`` and a direction instead of on every perturbed copy of ``x``);
3. return :class:`LossTerms` (per-example losses; :func:`loss_on_rows` evaluates on the
   examples inside the model's domain only).

Register it with :func:`ebflow.objectives.register_objective` to use it by name
(:func:`~ebflow.objectives.make_objective`, the noise draws of :meth:`Objective.draw_noise`).
``examples/custom_objective.py`` is a complete example that uses nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from ..flow import EBFlow
from ..utils import grad_ready, sum_except_batch
from ..validation import check_batch

__all__ = [
    "LossTerms",
    "PROJECTIONS",
    "Projection",
    "checked_batch",
    "checked_noise",
    "checked_noise_tensor",
    "grad_ready",
    "in_domain_of_all",
    "loss_on_rows",
    "on_sphere",
    "projections",
    "sum_except_batch",
    "zero_loss",
]

Projection = Literal["rademacher", "gaussian"]
#: The projection distributions of :func:`projections` (SSM's ``projection`` option).
PROJECTIONS: tuple[str, ...] = get_args(Projection)


class LossTerms(NamedTuple):
    """What an objective function returns: the per-example ``loss`` (shape ``(batch,)``, 0 for
    dropped examples), the energy per example that the energy regulariser uses when it was
    computed on the way (``E(x)``; DSM: ``E(x + sigma eps)``, the reference's choice; else
    ``None``: the regulariser then computes ``E(x)``), the number of ``dropped`` examples
    (outside the model's domain) and the mask of the ``kept`` ones (``None``: all)."""

    loss: Tensor
    energy: Tensor | None
    dropped: int = 0
    kept: Tensor | None = None


def checked_batch(model: EBFlow, x: Tensor, what: str = "batch x") -> Tensor:
    """Every objective's input check: ``model`` is an :class:`~ebflow.EBFlow` (else
    :class:`~ebflow.errors.ConfigError`) and ``x`` a batch for it
    (:meth:`~ebflow.EBFlow.check_input`: :class:`~ebflow.errors.InputError` naming the problem).
    Returns ``x``."""
    if not isinstance(model, EBFlow):
        raise ConfigError(f"objectives take an ebflow.EBFlow as model, got {type(model).__name__}")
    return model.check_input(x, what)


def checked_noise_tensor(noise: object, what: str, *, finite: bool = True) -> Tensor:
    """Type, floating dtype and (with ``finite``) finiteness of an objective's noise
    (:func:`~ebflow.validation.check_batch`); a bad one is a :class:`ConfigError` (the noise is
    normally drawn by :meth:`~ebflow.objectives.Objective.draw_noise`). The finiteness check
    reads the tensor (a device sync): objectives skip it for a model built with
    ``validate=False``, as they skip the batch's."""
    try:
        return check_batch(noise, None, what=what, finite=finite)
    except InputError as err:
        raise ConfigError(str(err)) from None


def checked_noise(
    noise: Tensor, shape: tuple[int, ...], what: str, like: Tensor, *, finite: bool = True
) -> Tensor:
    """:func:`checked_noise_tensor`, plus ``noise`` has ``shape`` and ``like``'s dtype and device."""
    checked_noise_tensor(noise, what, finite=finite)
    if tuple(noise.shape) != tuple(shape):
        raise ConfigError(f"{what} must have shape {tuple(shape)}, got {tuple(noise.shape)}")
    if noise.dtype != like.dtype or noise.device != like.device:
        raise ConfigError(
            f"{what} must have the batch's dtype and device ({like.dtype}, {like.device}), "
            f"got ({noise.dtype}, {noise.device})"
        )
    return noise


def projections(
    shape: tuple[int, ...],
    projection: Projection,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Random projection directions ``v`` of ``shape``: Rademacher (:math:`\pm 1`) or standard
    normal, both with :math:`\mathbb{E}[v v^\top] = I`."""
    if projection == "rademacher":
        signs = torch.randint(0, 2, shape, device=device, generator=generator)
        return signs.to(dtype) * 2 - 1
    if projection == "gaussian":
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)
    raise ConfigError(f"unknown SSM projection {projection!r}; choose {' or '.join(map(repr, PROJECTIONS))}")


def on_sphere(v: Tensor, radius: float) -> Tensor:
    """Scale each example of ``v`` to norm ``radius`` (Gaussian ``v``: uniform on the sphere)."""
    norm = v.reshape(v.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    return v * (radius / norm).view(-1, *([1] * (v.dim() - 1)))


def in_domain_of_all(model: EBFlow, *inputs: Tensor) -> Tensor:
    """Per-example mask: every one of ``inputs`` (batches of the same size) lies in the model's
    domain (:meth:`~ebflow.EBFlow.in_domain`)."""
    keep = model.in_domain(inputs[0])
    for t in inputs[1:]:
        keep = keep & model.in_domain(t)
    return keep


def zero_loss(model: EBFlow, batch: int, like: Tensor) -> Tensor:
    """Per-example zeros that are still connected to the parameters (a batch whose every
    example was dropped gives a zero gradient, not a backward error)."""
    anchor = sum((p.sum() * 0 for p in model.parameters() if p.requires_grad), like.new_zeros(()))
    return like.new_zeros(batch) + anchor


def loss_on_rows(
    model: EBFlow,
    keep: Tensor,
    batch: int,
    like: Tensor,
    compute: Callable[[Tensor], LossTerms],
) -> LossTerms:
    """Evaluate ``compute(rows)`` on the kept rows only (``rows``: the boolean mask, or a 0-d
    mask meaning every row); dropped rows get loss (and energy) 0 and are counted."""
    dropped = int(batch - int(keep.sum()))
    if dropped == 0:
        return compute(keep.new_ones(()))  # a 0-d mask: every row
    if dropped == batch:
        return LossTerms(zero_loss(model, batch, like), like.new_zeros(batch), dropped, keep)
    part = compute(keep)
    loss = zero_loss(model, batch, like).index_put((keep,), part.loss)
    energy = None if part.energy is None else like.new_zeros(batch).index_put((keep,), part.energy)
    return LossTerms(loss, energy, dropped, keep)
