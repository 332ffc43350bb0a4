"""One optimisation step: loss, backward, gradient averaging over processes, clipping, update."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import InputError, SingularLayerError
from ..parallel.gradient_sync import GradientSync, poisoned_loss

__all__ = ["StepOutcome", "StepWindow", "optimization_step"]


@dataclass
class StepOutcome:
    loss: float
    grad_norm: float
    finite: bool
    error: str = ""


@dataclass
class StepWindow:
    """Training statistics since the last log line."""

    loss: float = 0.0
    grad_norm: float = 0.0
    finite_steps: int = 0
    seconds: float = 0.0

    def add(self, out: StepOutcome) -> None:
        if out.finite:
            self.loss += out.loss
            self.grad_norm += out.grad_norm
            self.finite_steps += 1


def optimization_step(
    model: nn.Module,
    objective: Any,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    grad_clip: float | None = None,
    *,
    sync: GradientSync | None = None,
) -> StepOutcome:
    """One step: ``loss = objective(model, x)``, backward, gradient averaging over processes
    (``sync``), norm / clip, update.

    A non-finite loss or gradient, or a singular layer, skips the update (``finite=False``).
    With ``sync`` (data-parallel runs) a process whose loss failed still runs the backward pass
    and the averaging, with NaN gradients: every process then sees the same non-finite norm and
    all skip the step together. In one process the step reads the device once (the loss and
    the gradient norm together, :func:`_local_update`).
    """
    optimizer.zero_grad(set_to_none=True)
    error = ""
    try:
        loss: Tensor | None = objective(model, x)
    except (SingularLayerError, InputError) as err:
        if sync is None:
            return StepOutcome(float("nan"), float("nan"), False, str(err))
        loss, error = None, str(err)
    if sync is None:
        assert loss is not None
        return _local_update(model, loss, optimizer, grad_clip)
    if sync is not None:
        error = error or sync.forward_error()
    value = float(loss.detach()) if loss is not None else float("nan")
    params = [p for p in model.parameters() if p.requires_grad]
    if not math.isfinite(value):
        if sync is None:
            return StepOutcome(value, float("nan"), False, "non-finite loss")
        error = error or "non-finite loss"
        loss = poisoned_loss(params) if loss is None else loss * math.nan
    assert loss is not None
    # The parameters are the only leaves of the objectives' graphs; naming them keeps a
    # distributed run's poisoned loss (see above) from reaching anything else.
    loss.backward(inputs=params)
    if sync is not None:
        sync.after_backward(params)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(value, norm, False, error or "non-finite gradient")
    if grad_clip is not None and norm > grad_clip:
        # rescales every parameter's .grad in place by grad_clip / norm
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, torch.tensor(norm))
    optimizer.step()
    return StepOutcome(value, norm, True)


def _local_update(
    model: nn.Module, loss: Tensor, optimizer: torch.optim.Optimizer, grad_clip: float | None
) -> StepOutcome:
    """Backward, norm, clip and update of a single process with one host read: the loss and the
    gradient norm are read together, after the backward pass (a non-finite loss gives non-finite
    gradients, so the rare failed step costs a backward pass; every other step saves a sync)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss.backward(inputs=params)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
    value, norm_value = torch.stack([loss.detach().double(), norm.detach().double()]).tolist()
    if not math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(value, float("nan"), False, "non-finite loss")
    if not math.isfinite(norm_value):
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(value, norm_value, False, "non-finite gradient")
    if grad_clip is not None and norm_value > grad_clip:
        # rescales every parameter's .grad in place by grad_clip / norm
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    optimizer.step()
    return StepOutcome(value, norm_value, True)
