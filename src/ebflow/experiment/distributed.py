r"""Data-parallel training across processes with ``torch.distributed`` (launched by ``torchrun``).

Every process holds a full copy of the model and works on its own rows of each *global* batch
(``batch_size`` in the config is the global batch; each of the :math:`N` processes takes
``batch_size / N`` rows). Gradients are averaged across processes,

.. math:: \bar g = \frac1N \sum_{r=1}^{N} \nabla_\theta L_r,

so that, with the per-example noise drawn identically on every process (see
:mod:`ebflow.training`), a step equals the single-process step on the whole global batch up
to floating-point summation order.

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
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError, EBFlowError, InputError, SingularLayerError
from ..layers.base import LinearFlowLayer
from .devices import local_rank_from_env, process_device

__all__ = ["Distributed", "SINGLE_PROCESS", "GRAD_SYNC_MODES", "launched_by_torchrun", "backend_for",
           "init_from_env", "current", "shutdown", "ObjectiveModule", "GradientSync", "make_gradient_sync",
           "poisoned_loss"]

T = TypeVar("T")
GRAD_SYNC_MODES = ("auto", "ddp", "allreduce")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run (a single process: rank 0 of 1).

    ``device`` is the device the process group communicates on (``cuda:LOCAL_RANK`` with NCCL,
    ``cpu`` with Gloo); None for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, images and checkpoints."""
        return self.rank == 0

    # -- collectives (no-ops for a single process) -----------------------------------------
    def _comm_device(self) -> torch.device:
        return self.device if self.device is not None else torch.device("cpu")

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Sums of ``values`` over all processes, in float64 (identical on every process)."""
        if not self.is_distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def mean(self, value: float) -> float:
        """Mean of ``value`` over all processes."""
        return self.all_reduce_sum([value])[0] / self.world_size

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every process (picklable; tensors should be on the CPU)."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def broadcast_float(self, value: float) -> float:
        """Rank 0's ``value`` on every process."""
        if not self.is_distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        dist.broadcast(t, src=0)
        return float(t.item())

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and hand its result to every process. An
        :class:`~ebflow.errors.EBFlowError` raised there is raised on every process (same
        message), so no process is left waiting for the others."""
        result: Any = None
        error: EBFlowError | None = None
        if self.is_main:
            try:
                result = fn()
            except EBFlowError as err:
                if not self.is_distributed:
                    raise
                error = err
        if self.is_distributed:
            result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error
        return result

    def everywhere(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every process; if it raised an :class:`~ebflow.errors.EBFlowError` on
        any of them, every process raises the first such error."""
        try:
            result, error = fn(), None
        except EBFlowError as err:
            if not self.is_distributed:
                raise
            result, error = None, err
        if self.is_distributed:
            errors: list[Any] = [None] * self.world_size
            dist.all_gather_object(errors, error)
            first = next((e for e in errors if e is not None), None)
            if first is not None:
                raise first
        return result  # type: ignore[return-value]

    def local_main_first(self, fn: Callable[[], T]) -> T:
        """``fn`` on the first process of each machine (``LOCAL_RANK`` 0), then on the others:
        e.g. one download per machine instead of several writing the same files."""
        first = self.everywhere(lambda: fn() if self.local_rank == 0 else None)
        rest = self.everywhere(lambda: fn() if self.local_rank != 0 else None)
        return first if self.local_rank == 0 else rest  # type: ignore[return-value]

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into ``module`` on every process."""
        if not self.is_distributed:
            return
        for t in [*module.parameters(), *module.buffers()]:
            if t.dtype == torch.bool:
                tmp = t.to(torch.uint8)
                dist.broadcast(tmp, src=0)
                t.copy_(tmp.bool())
            else:
                dist.broadcast(t.data, src=0)
        _clear_layer_caches(module)


SINGLE_PROCESS = Distributed()


def _clear_layer_caches(module: nn.Module) -> None:
    """Forget cached log-determinants / factorisations after in-place collectives (the cache
    key's value fingerprint would notice too; clearing is explicit and costs nothing)."""
    for m in module.modules():
        if isinstance(m, LinearFlowLayer):
            m.clear_cache()


# -- process group ------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """True when this process was started by ``torchrun`` (or another launcher that sets
    ``RANK`` and ``WORLD_SIZE``) with more than one process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, Gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(
    device: str | torch.device | None = "auto", *, timeout: timedelta | None = None
) -> Distributed:
    """Join the process group described by torchrun's environment variables (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and return this process's
    :class:`Distributed`. Without them (or with one process) returns :data:`SINGLE_PROCESS`.

    The device follows ``device`` (``auto``: CUDA when available); a CUDA process uses
    ``cuda:LOCAL_RANK`` and NCCL, a CPU process uses Gloo. Idempotent.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched_by_torchrun():
        return SINGLE_PROCESS
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; train with one process")
    missing = [v for v in TORCHRUN_VARS if v not in os.environ and v != "LOCAL_RANK"]
    if missing:
        raise ConfigError(f"distributed launch without {', '.join(missing)} in the environment; "
                          "start the run with torchrun")
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = local_rank_from_env(int(os.environ["RANK"]), world_size)
    dev = process_device(device, local_rank, world_size)
    backend = backend_for(dev)
    kwargs: dict[str, Any] = {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = dev  # binds NCCL to this GPU up front
    dist.init_process_group(backend=backend, **kwargs)
    return current()


def current() -> Distributed:
    """The :class:`Distributed` of an initialised process group (else :data:`SINGLE_PROCESS`)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE_PROCESS
    backend = str(dist.get_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = local_rank_from_env(rank, world)
    if "nccl" in backend and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Distributed(rank, world, local_rank, device, backend)


def shutdown(ctx: Distributed) -> None:
    """Leave the process group (if this process is in one)."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


# -- gradient averaging ---------------------------------------------------------------------------
def poisoned_loss(params: Sequence[Tensor]) -> Tensor:
    r""":math:`\text{NaN}\cdot\sum\theta`: a loss whose gradient is NaN for every parameter, so a
    failed step on one process makes every process skip it once gradients are averaged."""
    return sum((p.sum() for p in params), torch.zeros((), device=params[0].device,
                                                      dtype=params[0].dtype)) * math.nan


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

    def __init__(self, ctx: Distributed, model: nn.Module, objective: Callable[..., Tensor], mode: str) -> None:
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
                self.module, device_ids=device_ids, **_no_buffer_sync())
            _clear_layer_caches(model)  # DDP broadcast rank 0's parameters in place
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
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p)
            offset += n


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's switch that stops buffer broadcasts at every forward (renamed in newer PyTorch)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def make_gradient_sync(
    ctx: Distributed, model: nn.Module, objective: Callable[..., Tensor], mode: str = "auto"
) -> GradientSync | None:
    """The :class:`GradientSync` of a data-parallel run (None for a single process)."""
    if not ctx.is_distributed:
        return None
    return GradientSync(ctx, model, objective, mode)
