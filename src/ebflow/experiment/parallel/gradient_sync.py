r"""Gradient averaging in data-parallel training across processes (``torch.distributed``,
launched by ``torchrun``; the process group: :mod:`ebflow.experiment.parallel.process_group`).

Every process holds a full copy of the model and works on its own rows of each *global* batch
(``batch_size`` in the config is the global batch; each of the :math:`N` processes takes
``batch_size / N`` rows). Gradients are averaged across processes,

.. math:: \bar g = \frac1N \sum_{r=1}^{N} \nabla_\theta L_r,

so that, with the per-example noise drawn identically on every process (see
:mod:`ebflow.experiment.data.batches`), a step equals the single-process step on the whole
global batch up to floating-point summation order.

Two ways to average the gradients, chosen by the config key ``grad_sync``:

* ``ddp`` (``auto`` picks it): :class:`torch.nn.parallel.DistributedDataParallel` around a
  module whose ``forward(x, noise)`` returns the objective's loss. The score-matching
  objectives differentiate the energy with respect to ``x`` inside that forward
  (``autograd.grad(..., create_graph=True)``); those input gradients never reach the
  parameters' ``.grad``, so DDP's reduction fires only in the final ``loss.backward()``, once per
  parameter, and overlaps with it. Measured here for every objective (ml, sml, ssm, dsm, fdssm,
  esm) on every shipped architecture (dense, dense with LU + ActNorm, coupling, conv, glow):
  the DDP gradient is bit-for-bit the mean of the per-process gradients, and every parameter
  receives a gradient (DDP's ``find_unused_parameters=False`` holds).
* ``allreduce``: a plain ``loss.backward()`` per process, then one all-reduce of all gradients
  flattened into a single buffer. A fallback for models or objectives that leave a parameter
  without a gradient (DDP would stop with "Expected to have finished reduction").

A process whose loss is non-finite (or whose forward pass raised a
:class:`~ebflow.errors.SingularLayerError` / :class:`~ebflow.errors.InputError`) still takes
part in the reduction, with a NaN gradient: the NaN reaches every process through the average,
so all processes skip the step together and never diverge.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...errors import ConfigError, InputError, SingularLayerError
from .process_group import Distributed, clear_layer_caches

__all__ = ["GRAD_SYNC_MODES", "ObjectiveModule", "GradientSync", "make_gradient_sync", "poisoned_loss"]

GRAD_SYNC_MODES = ("auto", "ddp", "allreduce")


def poisoned_loss(params: Sequence[Tensor]) -> Tensor:
    r""":math:`\text{NaN}\cdot\sum\theta`: a loss whose gradient is NaN for every parameter, so a
    failed step on one process makes every process skip it once gradients are averaged."""
    return (
        sum((p.sum() for p in params), torch.zeros((), device=params[0].device, dtype=params[0].dtype))
        * math.nan
    )


class ObjectiveModule(nn.Module):
    """``forward(x, noise) = objective(model, x, noise=noise)``: the training loss as a module,
    so that :class:`~torch.nn.parallel.DistributedDataParallel` can wrap it.

    A :class:`~ebflow.errors.SingularLayerError` or :class:`~ebflow.errors.InputError` in the
    forward pass returns :func:`poisoned_loss` instead (the error text is kept in
    :attr:`error`), so this process still joins the gradient reduction of the step.
    """

    def __init__(self, model: nn.Module, objective: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.error = ""

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        try:
            return self.objective(self.model, x, noise=noise)
        except (SingularLayerError, InputError) as err:
            self.error = str(err)
            return poisoned_loss([p for p in self.model.parameters() if p.requires_grad])


class GradientSync:
    """Averages gradients over the processes of a run (see the module docstring).

    ``train_module`` is what the training step calls: the DDP-wrapped :class:`ObjectiveModule`
    (``ddp``) or the model itself (``allreduce``). :meth:`loss` computes this process's loss;
    :meth:`after_backward` averages the gradients (a no-op under DDP, which did it during the
    backward pass).
    """

    def __init__(
        self, ctx: Distributed, model: nn.Module, objective: Callable[..., Tensor], mode: str
    ) -> None:
        if mode not in GRAD_SYNC_MODES:
            raise ConfigError(f"grad_sync must be one of {', '.join(GRAD_SYNC_MODES)}, got {mode!r}")
        self.ctx = ctx
        self.mode = "ddp" if mode == "auto" else mode
        self.model = model
        self.objective = objective
        if self.mode == "ddp":
            self.module = ObjectiveModule(model, objective)
            device_ids = [ctx.device] if ctx.device is not None and ctx.device.type == "cuda" else None
            # Buffers (ActNorm's "initialized" flag, masks) are identical by construction, so
            # they are not re-broadcast at every forward pass.
            self.train_module: nn.Module = nn.parallel.DistributedDataParallel(
                self.module, device_ids=device_ids, **_no_buffer_sync()
            )
            clear_layer_caches(model)  # DDP broadcast rank 0's parameters in place
        else:
            ctx.broadcast_module(model)
            self.train_module = model

    def loss(self, module: nn.Module, x: Tensor, noise: Tensor | None) -> Tensor:
        """This process's loss on its rows ``x`` (``module`` is :attr:`train_module`)."""
        if self.mode == "ddp":
            return module(x, noise)
        return self.objective(module, x, noise=noise)

    def forward_error(self) -> str:
        """The error caught in the last DDP forward pass ('' if none), then forgets it."""
        if self.mode != "ddp":
            return ""
        err, self.module.error = self.module.error, ""
        return err

    @torch.no_grad()
    def after_backward(self, params: Sequence[Tensor]) -> None:
        """``allreduce``: replace every gradient by its mean over the processes, in one
        all-reduce of a flat buffer (a missing gradient counts as zero)."""
        if self.mode == "ddp" or not self.ctx.is_distributed:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.ctx.world_size
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n


def _no_buffer_sync() -> dict[str, Any]:
    """DDP's switch that stops buffer broadcasts at every forward (renamed in newer PyTorch)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    )


def make_gradient_sync(
    ctx: Distributed, model: nn.Module, objective: Callable[..., Tensor], mode: str = "auto"
) -> GradientSync | None:
    """The :class:`GradientSync` of a data-parallel run (None for a single process)."""
    if not ctx.is_distributed:
        return None
    return GradientSync(ctx, model, objective, mode)
