"""Batches of a run: the epoch order, the loader of global batches sharded over processes, the
per-step seeds, data augmentation, and the model input (dequantisation, MaP preprocessing).

``batch_size`` is the *global* batch: global batch ``k`` of an epoch is rows ``[kG, (k+1)G)`` of
the epoch's permutation (fixed by ``(seed, epoch)``), and process ``r`` takes its rows
``[rB, (r+1)B)``, ``B = G / N``. The random numbers of a step are drawn for the whole global
batch from a generator seeded by ``(seed, step)``, identically on every process.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from ...errors import ConfigError, InputError
from ...preprocessing import ImagePreprocessing

__all__ = [
    "EpochShuffleSampler",
    "make_loader",
    "model_input",
    "augment_images",
]


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation of ``range(n)`` per epoch, fixed by ``(seed, epoch)`` alone;
    ``shuffle=False``: ``0, 1, ..., n - 1`` every epoch (the reference code's MNIST order).

    Any sampler with ``set_epoch`` can be injected in its place. It must yield the *global*
    order (the same on every process): in data-parallel runs the loader itself gives each
    process its rows of every global batch, so a ``DistributedSampler`` would shard twice.
    """

    def __init__(self, n: int, seed: int = 0, *, shuffle: bool = True) -> None:
        self.n, self.seed, self.epoch, self.shuffle = n, seed, 0, shuffle

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class _ResumableBatches(Sampler[list[int]]):
    """Global batches of ``batch_size`` indices from a sampler (the last partial batch is
    dropped), of which this process (``rank`` of ``world_size``) yields its rows
    ``[rank * B, (rank + 1) * B)``, ``B = batch_size / world_size``; can skip ahead."""

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.sampler, self.batch_size, self.skip = sampler, batch_size, 0
        local = batch_size // world_size
        self.rows = slice(rank * local, (rank + 1) * local)

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        count = 0
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                if count >= self.skip:
                    yield batch[self.rows]
                count += 1
                batch = []

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size  # type: ignore[arg-type]


class _TensorRows(torch.utils.data.Dataset):
    """A tensor indexed by lists of rows (one fetch per batch)."""

    def __init__(self, data: Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, rows: list[int]) -> Tensor:
        return self.data[rows]


def make_loader(
    data: Tensor,
    batch_size: int,
    sampler: Sampler[int],
    *,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A loader of whole batches drawn from ``data`` in the order of ``sampler``: this process's
    ``batch_size / world_size`` rows of each global batch of ``batch_size``."""
    size = len(sampler)  # type: ignore[arg-type]  # Sampler declares no __len__; ours are sized
    if size < batch_size:
        raise ConfigError(
            f"config key 'batch_size' ({batch_size}) is larger than the {size} training examples"
        )
    if batch_size % world_size:
        raise ConfigError(
            f"config key 'batch_size' ({batch_size}) is the global batch and must split evenly over "
            f"the {world_size} processes; use a multiple of {world_size}"
        )
    # The loader gets its own generator: creating an iterator must not draw from the global
    # RNG, or a run resumed mid-epoch would see different noise than the uninterrupted run.
    return DataLoader(
        _TensorRows(data),
        sampler=_ResumableBatches(sampler, batch_size, rank, world_size),
        batch_size=None,
        generator=torch.Generator(),
    )


def model_input(
    x: Tensor,
    preprocessing: ImagePreprocessing | None,
    use_map: bool,
    generator: torch.Generator | None = None,
    *,
    dequantization_noise: Tensor | None = None,
    check: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Raw data -> ``(model input, log|det| of the preprocessing or None)``.

    Images are dequantised (``x + u``, ``u ~ U[0, 1)`` drawn from ``generator``, or the given
    ``dequantization_noise``); with MaP they are also preprocessed (the model sees ``y``).
    ``check=False`` skips the pixel-range check (training data are checked once, at start-up).
    """
    if preprocessing is None:
        return x, None
    if dequantization_noise is not None:
        if dequantization_noise.shape != x.shape:
            raise InputError(
                f"dequantisation noise must have the shape of the batch {tuple(x.shape)}, "
                f"got {tuple(dequantization_noise.shape)}"
            )
        x_deq = x + dequantization_noise
    else:
        x_deq = preprocessing.dequantize(x, generator=generator)
    if not use_map:
        return x_deq, None
    return preprocessing.forward(x_deq, check=check)


def augment_images(
    x: Tensor, generator: torch.Generator, global_batch: int | None = None, start: int = 0, max_shift: int = 2
) -> Tensor:
    """Random horizontal flips (probability 1/2) and translations by up to ``max_shift`` pixels
    (edges replicated) of images ``(B, C, H, W)``, one draw per example. The draws are made for
    a global batch of ``global_batch`` rows (default ``B``) from ``generator``, and this batch is
    rows ``[start, start + B)`` of it, so every process of a data-parallel run agrees."""
    b, c, h, w = x.shape
    n = global_batch or b
    flip = torch.rand(n, generator=generator, device=generator.device)[start : start + b] < 0.5
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator, device=generator.device)[
        start : start + b
    ].to(x.device)
    x = torch.where(flip.to(x.device).view(b, 1, 1, 1), x.flip(-1), x)
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    rows = torch.arange(h, device=x.device) + max_shift + shift[:, :1]  # (B, H)
    cols = torch.arange(w, device=x.device) + max_shift + shift[:, 1:]  # (B, W)
    return padded[
        torch.arange(b, device=x.device).view(b, 1, 1, 1),
        torch.arange(c, device=x.device).view(1, c, 1, 1),
        rows.view(b, 1, h, 1),
        cols.view(b, 1, 1, w),
    ]
