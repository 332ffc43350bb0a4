"""Which device a process computes on: ``--device`` names (:func:`resolve_device`), and in a
multi-process run the GPU of each process from its launcher's environment (torchrun's
``LOCAL_RANK``, SLURM's ``SLURM_LOCALID``, MPI's; :func:`process_device`)."""

from __future__ import annotations

import os
import re

import torch

from ...errors import ConfigError

__all__ = [
    "DEVICE_NAME",
    "LOCAL_RANK_VARS",
    "gpu_for_local_rank",
    "local_rank_from_env",
    "process_device",
    "resolve_device",
]

DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]+)?", re.ASCII)  # what --device accepts


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device meant by ``name`` on this machine: ``auto`` (or None) -> cuda when available,
    else cpu; ``cpu``; ``cuda`` or ``cuda:N``. Anything else, or a GPU this machine lacks, is a
    :class:`~ebflow.errors.ConfigError` (the one device check of every command)."""
    text = "auto" if name is None else str(name).strip()
    if DEVICE_NAME.fullmatch(text) is None:
        raise ConfigError(f"device {text!r} is not one of auto, cpu, cuda, cuda:N (N = 0, 1, ...)")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {text!r} requested but CUDA is not available; use --device cpu")
    index = int(text[5:]) if ":" in text else None
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {text!r} requested but this machine has {torch.cuda.device_count()} "
            f"GPU(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return torch.device("cuda") if index is None else torch.device("cuda", index)


#: Environment variables that give a process's rank on its node, by launcher, in the order read.
LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def local_rank_from_env(rank: int, world_size: int) -> int:
    """This process's rank on its node: torchrun's ``LOCAL_RANK``, else SLURM's ``SLURM_LOCALID``,
    else Open MPI's / MPICH's; a single process is 0. A multi-process run without any of them
    is a :class:`ConfigError` (every process would take the node's first GPU)."""
    for var in LOCAL_RANK_VARS:
        text = os.environ.get(var)
        if text is not None and text.strip() != "":
            try:
                value = int(text)
            except ValueError:
                raise ConfigError(f"{var}={text!r} is not an integer") from None
            if value < 0:
                raise ConfigError(f"{var}={value} must be >= 0")
            return value
    if world_size <= 1:
        return 0
    raise ConfigError(
        f"process {rank} of {world_size} does not know its rank on its node: none of "
        f"{', '.join(LOCAL_RANK_VARS)} is set; launch with torchrun (it sets LOCAL_RANK), or "
        "set LOCAL_RANK yourself"
    )


def gpu_for_local_rank(local_rank: int, visible_gpus: int) -> int:
    """The CUDA index of the process with ``local_rank``: ``local_rank`` itself when the node's
    GPUs are all visible, or 0 when the launcher shows each process its own GPU only (one
    visible GPU, e.g. SLURM's ``--gpus-per-task=1``)."""
    if visible_gpus == 1:
        return 0
    if local_rank >= visible_gpus:
        raise ConfigError(
            f"local rank {local_rank} has no GPU: {visible_gpus} are visible to this process; "
            "start at most that many processes per node (--nproc_per_node), or give each process "
            "one GPU of its own (CUDA_VISIBLE_DEVICES)"
        )
    return local_rank


def process_device(requested: str | torch.device | None, local_rank: int, world_size: int) -> torch.device:
    """The GPU (or CPU) of the process with ``local_rank`` in a run of ``world_size`` processes."""
    name = "auto" if requested is None else str(requested)
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    index = gpu_for_local_rank(local_rank, torch.cuda.device_count())
    if device.index is not None and world_size > 1 and device.index != index:
        raise ConfigError(
            f"device {name!r} was requested, but in a multi-process run every process uses the GPU "
            f"of its local rank (cuda:{index} here); pass --device cuda (or auto)"
        )
    return torch.device("cuda", index)
