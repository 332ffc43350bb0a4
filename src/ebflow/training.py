"""Training runs: build the model, data pipeline, objective and optimiser from a config, train
with EMA, validation, atomic checkpoints and exact resume, then test the best checkpoint.

The same loop runs in one process or in ``N`` processes started by ``torchrun``
(:mod:`ebflow.distributed`). ``batch_size`` is the *global* batch: global batch ``k`` of an
epoch is rows ``[kG, (k+1)G)`` of the epoch's permutation (fixed by ``(seed, epoch)``), and
process ``r`` takes its rows ``[rB, (r+1)B)``, ``B = G / N``. The random numbers of a step
(dequantisation noise, DSM/FDSSM Gaussians, SSM projections) are drawn for the whole global
batch from a generator seeded by ``(seed, step)``, identically on every process, and each
process keeps its rows. A step on ``N`` processes is therefore the single-process step on the
global batch (up to summation order), and a resumed run continues exactly, on any number of
processes. Only rank 0 writes logs, images and checkpoints.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from .architectures import conv_flow, coupling_flow, dense_flow, glow_flow
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import RESUMABLE_KEYS, dump_config, grad_clip_for, validate_config
from .data import DataSplits, load_data
from .distributed import (
    SINGLE_PROCESS,
    Distributed,
    GradientSync,
    make_gradient_sync,
    poisoned_loss,
    resolve_device,
)
from .distributed import current as current_distributed
from .ema import EMA
from .errors import ConfigError, EBFlowError, InputError, SingularLayerError
from .flow import EBFlow
from .objectives import OBJECTIVES, Objective, make_objective
from .preprocessing import ImagePreprocessing

__all__ = [
    "TrainingDivergedError",
    "TrainResult",
    "EpochShuffleSampler",
    "resolve_device",
    "build_preprocessing",
    "build_model",
    "build_objective",
    "build_optimizer",
    "build_scheduler",
    "make_loader",
    "model_input",
    "augment_images",
    "step_seed",
    "evaluate_nll",
    "optimisation_step",
    "train",
]

EVAL_SEED_OFFSET = 9_999_991
SML_STREAM = 1  # step_seed stream of SML's model samples (plus the rank)
FAULT_ENV = "EBFLOW_FAULT_KILL_AT_STEP"  # testing aid: SIGKILL the process after this step


class TrainingDivergedError(EBFlowError):
    """Too many consecutive non-finite steps; the last checkpoint holds the last finite state."""


# -- building blocks ----------------------------------------------------------------------------
def build_preprocessing(config: Mapping[str, Any], num_bins: int | None) -> ImagePreprocessing | None:
    """The image preprocessing of an image config (None for point data)."""
    if num_bins is None:
        return None
    return ImagePreprocessing(config["logit_smoothness"], config["logit_shift"],
                              config["num_bins"] or num_bins)


_DENSE_INIT = {"default": None, "negative_identity": "negative_identity"}
_CONV_INIT = {"default": "identity", "negative_identity": "negative_identity"}


def build_model(
    config: Mapping[str, Any], event_shape: Sequence[int], preprocessing: ImagePreprocessing | None,
    *, for_loading: bool = False,
) -> EBFlow:
    """The EBFlow of a config. Without MaP the preprocessing becomes the model's first layers.

    ``for_loading=True`` skips costly random initialisations (orthogonal dense matrices) of
    parameters that a checkpoint overwrites right after.
    """
    event_shape = tuple(event_shape)
    kind = config["model"]
    if kind == "coupling":
        if len(event_shape) != 1:
            raise ConfigError(f"model 'coupling' needs vector data, got event shape {event_shape}")
        model = coupling_flow(event_shape[0], blocks=config["blocks"], hidden=config["hidden"],
                              depth=config["depth"])
    elif kind == "dense":
        model = dense_flow(event_shape, num_layers=config["num_layers"], alpha=config["alpha"],
                           parameterisation=config["parameterisation"], actnorm=config["actnorm"],
                           init="identity" if for_loading else _DENSE_INIT[config["weight_init"]])
    elif kind in ("conv", "glow"):
        if len(event_shape) != 3:
            raise ConfigError(f"model {kind!r} needs image data (C, H, W), got event shape {event_shape}")
        if kind == "conv":
            model = conv_flow(event_shape, blocks=config["blocks"],
                              convs_per_block=config["convs_per_block"],
                              kernel_size=config["kernel_size"], alpha=config["alpha"],
                              init=_CONV_INIT[config["weight_init"]])
        else:
            model = glow_flow(event_shape, levels=config["levels"], steps=config["steps"],
                              hidden=config["hidden"])
    else:
        raise ConfigError(f"unknown model {kind!r}")
    if preprocessing is not None and not config["map"]:
        model = EBFlow([*preprocessing.as_layers(), *model.layers], event_shape)
    return model.to(getattr(torch, config["dtype"]))


def build_objective(config: Mapping[str, Any]) -> Objective:
    """The objective of a config with its options (σ, ε, slices, λ, ...): every option of the
    objective's registry entry is read from the config key of the same name (``num_samples``
    from ``sml_samples``)."""
    name = config["loss"]
    keys = {"num_samples": "sml_samples"}
    options = {opt: config[keys.get(opt, opt)] for opt in OBJECTIVES[name].defaults
               if keys.get(opt, opt) in config}
    return make_objective(name, energy_reg=config["energy_reg"], **options)


def build_optimizer(config: Mapping[str, Any], params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    lr, wd = config["lr"], config["weight_decay"]
    if config["optimizer"] == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
    if config["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, weight_decay=wd)


def build_scheduler(config: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    r"""Per-epoch decay :math:`\eta_e = \eta_0 \gamma^{\min(e, N)}` (``lr_decay``, ``lr_decay_epochs``)."""
    gamma, n = config["lr_decay"], config["lr_decay_epochs"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: gamma ** min(e, n))


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed determined by ``(seed, step, stream)`` alone (NumPy's ``SeedSequence``
    mixing: nearby tuples give unrelated seeds)."""
    import numpy as np

    words = np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation of ``range(n)`` per epoch, fixed by ``(seed, epoch)`` alone.

    Any sampler with ``set_epoch`` can be injected in its place. It must yield the *global*
    order (the same on every process): in data-parallel runs the loader itself gives each
    process its rows of every global batch, so a ``DistributedSampler`` would shard twice.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
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
    data: Tensor, batch_size: int, sampler: Sampler[int], *, rank: int = 0, world_size: int = 1,
) -> DataLoader:
    """A loader of whole batches drawn from ``data`` in the order of ``sampler``: this process's
    ``batch_size / world_size`` rows of each global batch of ``batch_size``."""
    if len(sampler) < batch_size:  # type: ignore[arg-type]
        raise ConfigError(
            f"config key 'batch_size' ({batch_size}) is larger than the {len(sampler)} training "
            "examples"  # type: ignore[arg-type]
        )
    if batch_size % world_size:
        raise ConfigError(
            f"config key 'batch_size' ({batch_size}) is the global batch and must split evenly over "
            f"the {world_size} processes; use a multiple of {world_size}"
        )
    # The loader gets its own generator: creating an iterator must not draw from the global
    # RNG, or a run resumed mid-epoch would see different noise than the uninterrupted run.
    return DataLoader(_TensorRows(data),
                      sampler=_ResumableBatches(sampler, batch_size, rank, world_size),
                      batch_size=None, generator=torch.Generator())


def model_input(
    x: Tensor, preprocessing: ImagePreprocessing | None, use_map: bool,
    generator: torch.Generator | None = None, *, dequantization_noise: Tensor | None = None,
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
            raise InputError(f"dequantisation noise must have the shape of the batch {tuple(x.shape)}, "
                             f"got {tuple(dequantization_noise.shape)}")
        x_deq = x + dequantization_noise
    else:
        x_deq = preprocessing.dequantize(x, generator=generator)
    if not use_map:
        return x_deq, None
    return preprocessing.forward(x_deq, check=check)


@torch.no_grad()
def evaluate_nll(
    model: EBFlow, data: Tensor, preprocessing: ImagePreprocessing | None, use_map: bool,
    batch_size: int = 500, seed: int = 0, *, dist: Distributed | None = None,
) -> dict[str, float]:
    r"""Exact NLL of ``data`` in data space: ``nll`` (nats per example) and
    ``bpd`` = nll / (D ln 2). The dequantisation noise of batch ``k`` comes from a generator
    seeded by ``(seed, k)``, so repeated evaluations are comparable and the result does not
    depend on how the batches are spread over processes.

    With ``dist`` (a data-parallel run) process ``r`` of ``N`` evaluates batches
    ``k = r (mod N)``; the sums of log-likelihoods and the counts are then all-reduced, so
    :math:`\text{nll} = -\sum_i \log p(x_i) / n` exactly as in one process (not an average of
    per-process averages)."""
    ctx = dist if dist is not None else SINGLE_PROCESS
    total, n = 0.0, 0
    for k, xb in enumerate(data.split(batch_size)):
        if k % ctx.world_size != ctx.rank:
            continue
        g = torch.Generator().manual_seed(step_seed(seed, k))
        # dequantisation and preprocessing (and its log-determinant) in float64
        inp, logdet = model_input(xb.to("cpu", torch.float64), preprocessing, use_map, generator=g)
        inp = inp.to(model.device, model.dtype)
        log_p = model.log_prob(inp).double().cpu()
        if logdet is not None:
            log_p = log_p + logdet.double()
        total += float(-log_p.sum())
        n += xb.shape[0]
    total, count = ctx.all_reduce_sum([total, n])
    n = int(count)
    nll = total / n if n else math.nan
    d = math.prod(data.shape[1:])
    return {"nll": nll, "bpd": nll / (d * math.log(2)), "n": n}


def augment_images(x: Tensor, generator: torch.Generator, global_batch: int | None = None,
                   start: int = 0, max_shift: int = 2) -> Tensor:
    """Random horizontal flips (probability 1/2) and translations by up to ``max_shift`` pixels
    (edges replicated) of images ``(B, C, H, W)``, one draw per example. The draws are made for
    a global batch of ``global_batch`` rows (default ``B``) from ``generator``, and this batch is
    rows ``[start, start + B)`` of it, so every process of a data-parallel run agrees."""
    b, c, h, w = x.shape
    n = global_batch or b
    flip = torch.rand(n, generator=generator, device=generator.device)[start:start + b] < 0.5
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator,
                          device=generator.device)[start:start + b].to(x.device)
    x = torch.where(flip.to(x.device).view(b, 1, 1, 1), x.flip(-1), x)
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    rows = torch.arange(h, device=x.device) + max_shift + shift[:, :1]  # (B, H)
    cols = torch.arange(w, device=x.device) + max_shift + shift[:, 1:]  # (B, W)
    return padded[torch.arange(b, device=x.device).view(b, 1, 1, 1),
                  torch.arange(c, device=x.device).view(1, c, 1, 1),
                  rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


@dataclass
class StepOutcome:
    loss: float
    grad_norm: float
    finite: bool
    error: str = ""


def optimisation_step(
    model: nn.Module, objective: Any, optimizer: torch.optim.Optimizer, x: Tensor,
    grad_clip: float | None = None, *, sync: GradientSync | None = None,
) -> StepOutcome:
    """One step: ``loss = objective(model, x)``, backward, gradient averaging over processes
    (``sync``), norm / clip, update.

    A non-finite loss or gradient, or a singular layer, skips the update (``finite=False``).
    With ``sync`` (data-parallel runs) a process whose loss failed still runs the backward pass
    and the averaging, with NaN gradients: every process then sees the same non-finite norm and
    all skip the step together.
    """
    optimizer.zero_grad(set_to_none=True)
    error = ""
    try:
        loss: Tensor | None = objective(model, x)
    except (SingularLayerError, InputError) as err:
        if sync is None:
            return StepOutcome(float("nan"), float("nan"), False, str(err))
        loss, error = None, str(err)
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
    # Differentiate with respect to the parameters only: the score objectives' graphs also
    # reach their (detached) input copies, whose gradients nobody needs.
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


# -- logging ------------------------------------------------------------------------------------
CSV_COLUMNS = ["step", "epoch", "train_s", "loss", "grad_norm", "ms_per_iter", "examples_per_s", "lr",
               "skipped_steps", "dropped_examples", "val_nll", "val_bpd", "test_nll", "test_bpd", "kl", "fisher"]


class MetricsLog:
    """``metrics.csv`` plus TensorBoard events; on resume, rows after the resumed step go."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.csv"
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()
                        and int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, values: Mapping[str, float | int | str]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore").writerow({"step": step, **values})
        if self.writer is not None:
            for k, v in values.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# -- the run ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    train_seconds: float
    skipped_steps: int
    best_val_nll: float
    test: dict[str, float] = field(default_factory=dict)
    world_size: int = 1
    global_batch: int = 0

    @property
    def ms_per_iter(self) -> float:
        return 1000 * self.train_seconds / max(self.step, 1)

    @property
    def batch_per_process(self) -> int:
        return self.global_batch // self.world_size

    @property
    def examples_per_second(self) -> float:
        """Training throughput of the whole run: global examples per second of training."""
        return self.step * self.global_batch / self.train_seconds if self.train_seconds > 0 else math.nan


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _resume_config(saved: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    changed = sorted(k for k, v in overrides.items() if k not in RESUMABLE_KEYS and saved.get(k) != v)
    if changed:
        raise ConfigError(
            f"cannot change {', '.join(repr(k) for k in changed)} when resuming (the checkpoint was "
            f"trained with other values); only {', '.join(sorted(RESUMABLE_KEYS))} may change"
        )
    return validate_config({**saved, **overrides})


def _check_pixels(data: Tensor, num_bins: int, what: str) -> None:
    """Pixel levels must lie in ``[0, num_bins - 1]`` (checked once, not per batch)."""
    lo, hi = float(data.min()), float(data.max())
    if lo < 0 or hi > num_bins - 1:
        raise InputError(f"{what} pixel values must lie in [0, {num_bins - 1}], got range [{lo}, {hi}]; "
                         "check the config key 'num_bins'")


class Trainer:
    """Holds the state of one training run (see :func:`train`)."""

    def __init__(
        self, config: Mapping[str, Any], run_dir: Path, *, device: torch.device,
        splits: DataSplits | None = None, sampler: Sampler[int] | None = None,
        is_main_process: bool = True, resume_state: Mapping[str, Any] | None = None,
        dist: Distributed = SINGLE_PROCESS,
    ) -> None:
        self.config = dict(config)
        self.run_dir = run_dir
        self.device = device
        self.dist = dist
        self.is_main = is_main_process and dist.is_main
        torch.manual_seed(config["seed"])
        if splits is None:
            # one download per machine; an error anywhere stops every process
            splits = dist.local_main_first(lambda: load_data(config))
        self.splits = splits
        self.pre = build_preprocessing(config, self.splits.num_bins)
        self.use_map = bool(config["map"]) and self.pre is not None
        self.model = build_model(config, self.splits.event_shape, self.pre).to(device)
        self.dtype = self.model.dtype
        self.objective = build_objective(config)
        self.grad_clip = grad_clip_for(config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config, self.params)
        self.scheduler = build_scheduler(config, self.optimizer)
        self.ema = EMA(self.model, config["ema_decay"], warmup=config["ema_warmup"])
        if self.pre is not None:
            _check_pixels(self.splits.train, self.pre.num_bins, "training")
        self.train_data = self.splits.train.to(device)
        self.global_batch = int(config["batch_size"])
        self.local_batch = self.global_batch // dist.world_size
        self.sampler = sampler if sampler is not None else EpochShuffleSampler(
            self.train_data.shape[0], config["seed"])
        self.loader = make_loader(self.train_data, self.global_batch, self.sampler,
                                  rank=dist.rank, world_size=dist.world_size)
        self.batches_per_epoch = len(self.loader)
        self.noise_generator = torch.Generator(device=device)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.train_seconds = 0.0
        self.skipped = self.consecutive_bad = 0
        self.best_val = math.inf
        if resume_state is not None:
            self._load_state(resume_state)
        else:
            self._initialise()
        # after the (identical) initialisation: DDP broadcasts rank 0's parameters once
        self.sync = make_gradient_sync(dist, self.model, self.objective, config["grad_sync"])
        self.train_module: nn.Module = self.sync.train_module if self.sync is not None else self.model

    # -- state --------------------------------------------------------------------------
    def _initialise(self) -> None:
        """Data-dependent initialisation (ActNorm) from a first batch, without touching the RNG.
        The batch depends on the seed alone, so every process initialises identically."""
        g = torch.Generator().manual_seed(self.config["seed"] + 1)
        idx = torch.randperm(self.train_data.shape[0], generator=g)[: max(2, min(500, self.train_data.shape[0]))]
        x = self.train_data[idx.to(self.train_data.device)].to(self.dtype).cpu()
        inp, _ = model_input(x, self.pre, self.use_map, generator=g)
        with torch.no_grad():
            self.model.energy(inp.to(self.device, self.dtype))

    def state(self) -> dict[str, Any]:
        return {
            "config": self.config, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(self.device), "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch, "train_seconds": self.train_seconds,
            "skipped_steps": self.skipped, "consecutive_nonfinite": self.consecutive_bad,
            "dropped_examples": self.objective.dropped_examples,
            "seen_examples": self.objective.seen_examples,
            "best_val_nll": self.best_val,
            "event_shape": list(self.splits.event_shape),
            "num_bins": self.pre.num_bins if self.pre is not None else None,
            "world_size": self.dist.world_size,
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        where = "the checkpoint"
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"], self.device)
            self.step, self.epoch = int(state["step"]), int(state["epoch"])
            self.batch_in_epoch = int(state["batch_in_epoch"])
            self.train_seconds = float(state["train_seconds"])
            self.skipped = int(state["skipped_steps"])
            self.consecutive_bad = int(state["consecutive_nonfinite"])
            self.objective.dropped_examples = int(state.get("dropped_examples", 0))
            self.objective.seen_examples = int(state.get("seen_examples", 0))
            self.best_val = float(state["best_val_nll"])
        except (KeyError, RuntimeError, ValueError, TypeError, ConfigError) as err:
            raise CheckpointError(f"{where} does not match the model of its own config: {err}") from err

    def save(self, name: str) -> None:
        if self.is_main:
            save_checkpoint(self.run_dir / "checkpoints" / name, self.state())

    # -- one step's inputs ----------------------------------------------------------------
    def _step_inputs(self, xb: Tensor) -> tuple[Tensor, Tensor | None]:
        """This process's model input and objective noise for the current step.

        The dequantisation noise and the objective's noise are drawn for the whole global
        batch from a generator seeded by ``(seed, step)`` -- the same numbers on every process
        and in a resumed run -- and each process keeps the rows of its examples.
        """
        g = self.noise_generator.manual_seed(step_seed(self.config["seed"], self.step))
        shape = (self.global_batch, *xb.shape[1:])
        start, rows = self.dist.rank * self.local_batch, self.local_batch
        x = xb.to(self.dtype)
        if self.config["augment"] and x.dim() == 4:
            x = augment_images(x, g, self.global_batch, start)
        if self.pre is not None:
            u = torch.rand(shape, dtype=self.dtype, device=self.device, generator=g)
            inp, _ = model_input(x, self.pre, self.use_map, dequantization_noise=u.narrow(0, start, rows),
                                 check=False)
        else:
            inp = x
        noise = self.objective.draw_noise(shape, dtype=self.dtype, device=self.device, generator=g)
        if noise is not None:
            noise = noise.narrow(self.objective.noise_batch_dim, start, rows)  # type: ignore[arg-type]
        if self.objective.name == "sml":
            # SML's model samples: each process draws its own (seeded by step and rank)
            torch.manual_seed(step_seed(self.config["seed"], self.step, SML_STREAM + self.dist.rank))
        return inp, noise

    def _step_objective(self, noise: Tensor | None) -> Any:
        """The loss of this step as ``f(module, x)`` (the form :func:`optimisation_step` takes)."""
        if self.sync is not None:
            sync = self.sync
            return lambda module, x: sync.loss(module, x, noise)
        objective = self.objective
        return lambda model, x: objective(model, x, noise=noise)

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        """NLL of a split with EMA weights, sharded over the processes and reduced exactly."""
        data = self.splits.split(split)
        with self.ema.average_parameters():
            self.model.eval()
            out = evaluate_nll(self.model, data, self.pre, self.use_map,
                               self.config["eval_batch_size"],
                               seed=self.config["seed"] + EVAL_SEED_OFFSET, dist=self.dist)
            self.model.train()
        return out

    # -- loop ---------------------------------------------------------------------------
    def _done(self) -> bool:
        c = self.config
        return ((c["max_iters"] is not None and self.step >= c["max_iters"])
                or (c["epochs"] is not None and self.epoch >= c["epochs"])
                or (c["max_minutes"] is not None and self.train_seconds >= 60 * c["max_minutes"]))

    def _total_iters(self) -> int | None:
        c = self.config
        totals = [c["max_iters"]] if c["max_iters"] is not None else []
        if c["epochs"] is not None:
            totals.append(c["epochs"] * self.batches_per_epoch)
        return min(totals) if totals else None

    def run(self, log: MetricsLog | None) -> None:
        c = self.config
        fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
        # the time budget must stop every process at the same step: they share rank 0's clock
        shared_clock = self.dist.is_distributed and c["max_minutes"] is not None
        sync_kwargs = {"sync": self.sync} if self.sync is not None else {}
        bar = None
        if self.is_main and c["progress"]:
            from tqdm.auto import tqdm

            bar = tqdm(total=self._total_iters(), initial=self.step, unit="it",
                       desc=f"{c['name']} {c['loss']}", dynamic_ncols=True, mininterval=0.5)
        window_loss, window_n, window_time, window_norm = 0.0, 0, 0.0, 0.0
        self.model.train()
        try:
            while not self._done():
                if self.batch_in_epoch >= self.batches_per_epoch:  # nothing left in this epoch
                    self._next_epoch()
                self.sampler.set_epoch(self.epoch)  # type: ignore[attr-defined]
                self.loader.sampler.skip = self.batch_in_epoch  # type: ignore[attr-defined]
                t0 = time.perf_counter()
                for xb in self.loader:
                    inp, noise = self._step_inputs(xb)
                    out = optimisation_step(self.train_module, self._step_objective(noise),
                                            self.optimizer, inp, self.grad_clip, **sync_kwargs)
                    self.step += 1
                    self.batch_in_epoch += 1
                    if out.finite:
                        self.ema.update()
                        self.consecutive_bad = 0
                        window_loss += out.loss
                        window_norm += out.grad_norm
                        window_n += 1
                    else:
                        self.skipped += 1
                        self.consecutive_bad += 1
                    if self.device.type == "cuda" and self.step % c["log_every"] == 0:
                        torch.cuda.synchronize(self.device)
                    t1 = time.perf_counter()
                    self.train_seconds += t1 - t0
                    window_time += t1 - t0
                    if shared_clock:
                        self.train_seconds = self.dist.broadcast_float(self.train_seconds)
                    if bar is not None:
                        bar.update(1)
                        if window_n and self.step % 10 == 0:
                            bar.set_postfix(loss=f"{window_loss / window_n:.4g}", refresh=False)
                    end_of_epoch = self.batch_in_epoch >= self.batches_per_epoch
                    if end_of_epoch:
                        self._next_epoch()
                    if self.consecutive_bad >= c["max_nonfinite"]:
                        self._diverged(out)
                    if self.step % c["log_every"] == 0:
                        # the loss of the global batch: the mean of the processes' losses
                        loss = self.dist.mean(window_loss / window_n) if window_n else float("nan")
                        if log is not None:
                            log.log(self.step, {
                                "epoch": self.epoch, "train_s": round(self.train_seconds, 3),
                                "loss": loss,
                                "grad_norm": window_norm / window_n if window_n else float("nan"),
                                "ms_per_iter": 1000 * window_time / c["log_every"],
                                "examples_per_s": self.global_batch * c["log_every"] / window_time
                                if window_time > 0 else float("nan"),
                                "lr": self.optimizer.param_groups[0]["lr"],
                                "skipped_steps": self.skipped,
                                "dropped_examples": self.objective.dropped_examples,
                            })
                        window_loss, window_n, window_time, window_norm = 0.0, 0, 0.0, 0.0
                    done = self._done()
                    if self.step % c["eval_every"] == 0 or done:
                        self._validate(log)
                    if self.step % c["checkpoint_every"] == 0 or done:
                        self.save("last.pt")
                    if fault_step and self.step == fault_step:
                        os.kill(os.getpid(), signal.SIGKILL)
                    if done or end_of_epoch:
                        break
                    t0 = time.perf_counter()
        finally:
            if bar is not None:
                bar.close()

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self.scheduler.step()

    def _validate(self, log: MetricsLog | None) -> None:
        val = self.evaluate("val")
        if log is not None:
            log.log(self.step, {"epoch": self.epoch, "train_s": round(self.train_seconds, 3),
                                "val_nll": val["nll"], "val_bpd": val["bpd"]})
        if math.isfinite(val["nll"]) and val["nll"] < self.best_val:
            self.best_val = val["nll"]
            self.save("best.pt")

    def _diverged(self, out: StepOutcome) -> None:
        self.save("last.pt")
        raise TrainingDivergedError(
            f"training stopped at step {self.step}: {self.consecutive_bad} consecutive steps were "
            f"skipped ({out.error or 'non-finite loss'}; {self.skipped} skipped in all). "
            f"The parameters of the last finite step are in {self.run_dir / 'checkpoints' / 'last.pt'}; "
            "lower the learning rate (--set lr=...), enable gradient clipping (--set grad_clip=5) or "
            "change sigma/eps, then train again or --resume with a larger max_nonfinite."
        )


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    held = [n for n in ("last.pt", "best.pt") if (run_dir / "checkpoints" / n).exists()]
    if not resume and held:
        raise ConfigError(
            f"{str(run_dir)!r} already holds a run (checkpoints/{held[0]}); use --resume {run_dir} "
            "to continue it, or choose another --out"
        )


def _run_device(requested: str | None, ctx: Distributed) -> torch.device:
    """The device of this process: the process group's in a data-parallel run (which must
    agree with the requested one), else the requested one."""
    if not ctx.is_distributed or ctx.device is None:
        return resolve_device(requested)
    if requested not in (None, "auto") and torch.device(requested).type != ctx.device.type:
        raise ConfigError(
            f"device {requested!r} was requested, but the process group was set up for "
            f"{ctx.device.type} ({ctx.backend}); pass the same --device to every process"
        )
    return ctx.device


def train(
    config: Mapping[str, Any] | None, run_dir: str | Path, *, resume: bool = False,
    overrides: Mapping[str, Any] | None = None, device: str | torch.device | None = None,
    sampler: Sampler[int] | None = None, is_main_process: bool = True,
    splits: DataSplits | None = None, final_outputs: bool = True,
    distributed: Distributed | None = None,
) -> TrainResult:
    """Train (or resume) a run in ``run_dir``; returns the final state and test metrics.

    With ``resume=True`` the config comes from ``run_dir/checkpoints/last.pt`` and ``overrides``
    may change only the keys in :data:`~ebflow.config.RESUMABLE_KEYS`. After training, the
    best-validation checkpoint (EMA weights) is evaluated on the test split, and
    ``samples.png`` (plus ``density.png`` for 2-D data) and ``results.json`` are written.

    In a process group (``torchrun``; see :func:`ebflow.distributed.init_from_env`, or pass
    ``distributed``) every process calls this with the same arguments: rank 0 reads the
    checkpoint to resume from and shares it, each process trains on its rows of every global
    batch, and only rank 0 writes files.
    """
    ctx = distributed if distributed is not None else current_distributed()
    run_dir = Path(run_dir)
    state = None
    if resume:
        state = ctx.from_main(lambda: load_checkpoint(run_dir / "checkpoints" / "last.pt"))
        config = ctx.everywhere(lambda: _resume_config(state["config"], overrides or {}))
    else:
        if config is None:
            raise ConfigError("a config is needed to start a new run")
        config = validate_config({**config, **(overrides or {})})
    dev = ctx.everywhere(lambda: _run_device(str(device) if device is not None else config["device"], ctx))
    threads = torch.get_num_threads()
    if config["num_threads"] is not None:
        torch.set_num_threads(config["num_threads"])
    try:
        return _train(config, run_dir, resume, state, dev, sampler, is_main_process, splits,
                      final_outputs, ctx)
    finally:
        torch.set_num_threads(threads)


def _train(
    config: dict[str, Any], run_dir: Path, resume: bool, state: Mapping[str, Any] | None,
    dev: torch.device, sampler: Sampler[int] | None, is_main_process: bool,
    splits: DataSplits | None, final_outputs: bool, ctx: Distributed = SINGLE_PROCESS,
) -> TrainResult:
    is_main = is_main_process and ctx.is_main
    if is_main_process:
        ctx.from_main(lambda: _check_run_dir(run_dir, resume))
    # Data and model first: a missing data set must not leave an empty run directory behind.
    trainer = Trainer(config, run_dir, device=dev, splits=splits, sampler=sampler,
                      is_main_process=is_main_process, resume_state=state, dist=ctx)
    if is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    log = MetricsLog(run_dir, trainer.step if resume else None, config["tensorboard"]) if is_main else None
    try:
        trainer.run(log)
        result = TrainResult(run_dir, trainer.step, trainer.epoch, trainer.train_seconds,
                             trainer.skipped, trainer.best_val, world_size=ctx.world_size,
                             global_batch=trainer.global_batch)
        if final_outputs and (is_main or ctx.is_distributed):
            result.test = finish_run(trainer, log)
    finally:
        if log is not None:
            log.close()
    return result


def finish_run(trainer: Trainer, log: MetricsLog | None) -> dict[str, float]:
    """Test the best-validation checkpoint; write results.json, samples.png (density.png).

    In a data-parallel run rank 0 reads the checkpoint and shares its weights; the test NLL is
    computed on shards and reduced exactly; only rank 0 writes."""
    from .runs import load_run

    ctx = trainer.dist

    ckpt = trainer.run_dir / "checkpoints" / "best.pt"
    if not ckpt.exists():
        ckpt = trainer.run_dir / "checkpoints" / "last.pt"

    def load() -> Any:
        return load_run(ckpt, device=trainer.device, splits=trainer.splits)

    loaded: list[Any] = []

    def load_on_main() -> dict[str, Tensor] | None:
        loaded.append(load())
        if not ctx.is_distributed:
            return None
        return {k: v.cpu() for k, v in loaded[0].model.state_dict().items()}

    weights = ctx.from_main(load_on_main)  # a bad checkpoint stops every process
    run = loaded[0] if loaded else None
    model = run.model if run is not None else trainer.model
    if run is None:  # the other processes evaluate rank 0's weights
        model.load_state_dict(weights)
        model.eval()
    test = evaluate_nll(model, trainer.splits.split("test"), trainer.pre, trainer.use_map,
                        trainer.config["eval_batch_size"],
                        seed=trainer.config["seed"] + EVAL_SEED_OFFSET, dist=ctx)
    if not trainer.is_main or run is None:
        return test
    # the same checkpoint with the optimiser's own (not averaged) weights, for comparison
    raw = load_run(ckpt, device=trainer.device, splits=trainer.splits, weights="raw")
    raw_test = evaluate_nll(raw.model, trainer.splits.split("test"), trainer.pre, trainer.use_map,
                            trainer.config["eval_batch_size"], seed=trainer.config["seed"] + EVAL_SEED_OFFSET)
    test.update(raw_nll=raw_test["nll"], raw_bpd=raw_test["bpd"])
    if trainer.splits.mixture is not None:
        from .toy_metrics import toy_metrics

        test.update(toy_metrics(run.model, trainer.splits.mixture, trainer.splits.split("test"),
                                trainer.config["eval_batch_size"]))
    _write_results(trainer, run, test, log)
    return test


def _write_results(trainer: Trainer, run: Any, test: dict[str, float], log: MetricsLog | None) -> None:
    from .runs import save_density_plot, save_samples

    if log is not None:
        log.log(trainer.step, {"epoch": trainer.epoch, "train_s": round(trainer.train_seconds, 3),
                               **{f"test_{k}": v for k, v in test.items() if k in ("nll", "bpd")},
                               **{k: v for k, v in test.items() if k in ("kl", "fisher")}})
    world = trainer.dist.world_size
    results = {
        "config": trainer.config["name"], "loss": trainer.config["loss"],
        "checkpoint": run.checkpoint.name, "checkpoint_step": run.step, "iterations": trainer.step,
        "epochs": trainer.epoch, "train_seconds": trainer.train_seconds,
        "ms_per_iter": 1000 * trainer.train_seconds / max(trainer.step, 1),
        "processes": world, "global_batch": trainer.global_batch,
        "batch_per_process": trainer.global_batch // world,
        "examples_per_s": trainer.step * trainer.global_batch / trainer.train_seconds
        if trainer.train_seconds > 0 else None,
        "skipped_steps": trainer.skipped, "best_val_nll": trainer.best_val,
        "dropped_examples": trainer.objective.dropped_examples,
        "dropped_fraction": (trainer.objective.dropped_examples / trainer.objective.seen_examples
                             if trainer.objective.seen_examples else 0.0),
        "ema_decay": trainer.config["ema_decay"], "ema_warmup": trainer.config["ema_warmup"],
        "map": trainer.config["map"], "threads": torch.get_num_threads(),
        "device": str(trainer.device),
        **{f"test_{k}": v for k, v in test.items()},
    }
    (trainer.run_dir / "results.json").write_text(json.dumps(results, indent=2))
    try:
        save_samples(run, trainer.run_dir / "samples.png", trainer.config["num_samples"],
                     seed=trainer.config["seed"])
        if run.event_shape == (2,):
            save_density_plot(run, trainer.run_dir / "density.png")
    except EBFlowError as err:  # a model that cannot be inverted still has its metrics
        print(f"warning: could not draw samples: {err}")
