"""The random inputs of one training step: smoothing, augmentation, dequantisation, the
objective's noise -- all drawn for the global batch from a generator seeded by ``(seed, step)``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...utils import step_seed
from ..config.schema import RunConfig
from ..data.batches import augment_images, model_input
from ..parallel.process_group import Distributed

__all__ = ["StepInputs"]


class StepInputs:
    r"""This process's model input and objective noise at step :math:`t`.

    Every random number of a step comes from one generator seeded by ``(seed, t)`` and is drawn
    for the whole global batch; each process keeps the rows of its examples. The numbers are
    therefore the same on every process, in a resumed run and for any number of processes.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        objective: Any,
        pre: Any,
        use_map: bool,
        train_noise: float,
        dtype: torch.dtype,
        device: torch.device,
        dist: Distributed,
    ) -> None:
        self.config, self.objective, self.pre, self.use_map = config, objective, pre, use_map
        self.train_noise, self.dtype, self.device, self.dist = train_noise, dtype, device, dist
        self.global_batch = config.training.batch_size
        self.local_batch = self.global_batch // dist.world_size
        self.generator = torch.Generator(device=device)

    def smoothing_std(self) -> float:
        r"""Std of the fresh smoothing noise added to each training batch (0: none). 2-D toys
        hold clean base points smoothed by :math:`s` = ``toy_noise``; DSM's own perturbation
        :math:`\sigma \le s` is part of it, so DSM adds :math:`\sqrt{s^2 - \sigma^2}`
        (:math:`\sigma = s`: the clean points, and DSM's target is the exact smoothed score)."""
        s = self.train_noise
        if s and self.config.objective.loss == "dsm":
            return math.sqrt(max(s * s - self.config.objective.sigma**2, 0.0))
        return s

    def __call__(self, xb: Tensor, step: int) -> tuple[Tensor, Tensor | None]:
        """``(model input, objective noise)`` of this process's rows ``xb`` at step ``step``."""
        g = self.generator.manual_seed(step_seed(self.config.runtime.seed, step))
        shape = (self.global_batch, *xb.shape[1:])
        start, rows = self.dist.rank * self.local_batch, self.local_batch
        x = xb.to(self.dtype)
        std = self.smoothing_std()
        if std:
            smooth = torch.randn(shape, dtype=self.dtype, device=self.device, generator=g)
            x = x + std * smooth.narrow(0, start, rows)
        if self.config.training.augment and x.dim() == 4:
            x = augment_images(x, g, self.global_batch, start)
        if self.pre is not None:
            u = torch.rand(shape, dtype=self.dtype, device=self.device, generator=g)
            inp, _ = model_input(
                x, self.pre, self.use_map, dequantization_noise=u.narrow(0, start, rows), check=False
            )
        else:
            inp = x
        noise = self.objective.draw_noise(shape, dtype=self.dtype, device=self.device, generator=g)
        if noise is not None:
            dim = self.objective.noise_batch_dim or 0
            share = noise.shape[dim] // self.dist.world_size  # SML may draw another number of rows
            noise = noise.narrow(dim, self.dist.rank * share, share)
        return inp, noise
