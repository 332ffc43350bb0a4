"""The process group of a data-parallel run (launched by ``torchrun``): this process's rank, world
size and device (:class:`Distributed`), joining and leaving the group, and the collectives the
training loop needs (broadcasts, reductions). How gradients are averaged:
:mod:`ebflow.experiment.parallel.gradient_sync`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ...errors import ConfigError, EBFlowError
from ...layers.base import LinearFlowLayer
from .devices import local_rank_from_env, process_device

__all__ = [
    "Distributed",
    "SINGLE_PROCESS",
    "launched_by_torchrun",
    "backend_for",
    "init_from_env",
    "current",
    "shutdown",
    "clear_layer_caches",
]

T = TypeVar("T")
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
        clear_layer_caches(module)


SINGLE_PROCESS = Distributed()


def clear_layer_caches(module: nn.Module) -> None:
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
        raise ConfigError(
            f"distributed launch without {', '.join(missing)} in the environment; start the run with torchrun"
        )
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
