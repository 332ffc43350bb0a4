"""Training runs: build the model, data pipeline, objective and optimiser from a config, train
with EMA, validation, atomic checkpoints and exact resume, then test the best checkpoint.

The loop is ready for data-parallel training: the batch sampler is injectable (e.g. a
``DistributedSampler``), every file write is gated by ``is_main_process``, and one optimisation
step lives in :func:`optimisation_step`, where a gradient all-reduce would go.
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
from .ema import EMA
from .errors import ConfigError, EBFlowError, InputError, SingularLayerError
from .flow import EBFlow
from .objectives import Objective, make_objective
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
    "evaluate_nll",
    "optimisation_step",
    "train",
]

EVAL_SEED_OFFSET = 9_999_991
FAULT_ENV = "EBFLOW_FAULT_KILL_AT_STEP"  # testing aid: SIGKILL the process after this step


class TrainingDivergedError(EBFlowError):
    """Too many consecutive non-finite steps; the last checkpoint holds the last finite state."""


# -- building blocks ----------------------------------------------------------------------------
def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or None) -> cuda when available, else cpu; checks that cuda exists if asked."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def build_preprocessing(config: Mapping[str, Any], num_bins: int | None) -> ImagePreprocessing | None:
    """The image preprocessing of an image config (None for point data)."""
    if num_bins is None:
        return None
    return ImagePreprocessing(config["logit_smoothness"], config["logit_shift"],
                              config["num_bins"] or num_bins)


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
                           init="identity" if for_loading else None)
    elif kind in ("conv", "glow"):
        if len(event_shape) != 3:
            raise ConfigError(f"model {kind!r} needs image data (C, H, W), got event shape {event_shape}")
        if kind == "conv":
            model = conv_flow(event_shape, blocks=config["blocks"],
                              convs_per_block=config["convs_per_block"],
                              kernel_size=config["kernel_size"], alpha=config["alpha"])
        else:
            model = glow_flow(event_shape, levels=config["levels"], steps=config["steps"],
                              hidden=config["hidden"])
    else:
        raise ConfigError(f"unknown model {kind!r}")
    if preprocessing is not None and not config["map"]:
        model = EBFlow([*preprocessing.as_layers(), *model.layers], event_shape)
    return model.to(getattr(torch, config["dtype"]))


def build_objective(config: Mapping[str, Any]) -> Objective:
    """The objective of a config with its options (σ, ε, slices, λ, ...)."""
    name = config["loss"]
    options: dict[str, Any] = {}
    if name == "dsm":
        options["sigma"] = config["sigma"]
    elif name == "fdssm":
        options["eps"] = config["eps"]
    elif name == "ssm":
        options.update(slices=config["slices"], projection=config["projection"])
    elif name == "sml" and config["sml_samples"]:
        options["num_samples"] = config["sml_samples"]
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


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation of ``range(n)`` per epoch, fixed by ``(seed, epoch)`` alone.

    Same interface as ``torch.utils.data.DistributedSampler`` (``set_epoch``), which can be
    injected in its place for data-parallel runs.
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
    """Batches of indices from a sampler, dropping the last partial batch; can skip ahead."""

    def __init__(self, sampler: Sampler[int], batch_size: int) -> None:
        self.sampler, self.batch_size, self.skip = sampler, batch_size, 0

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        count = 0
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                if count >= self.skip:
                    yield batch
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


def make_loader(data: Tensor, batch_size: int, sampler: Sampler[int]) -> DataLoader:
    """A loader of whole batches drawn from ``data`` in the order of ``sampler``."""
    if len(sampler) < batch_size:  # type: ignore[arg-type]
        raise ConfigError(
            f"config key 'batch_size' ({batch_size}) is larger than the {len(sampler)} training "
            "examples"  # type: ignore[arg-type]
        )
    # The loader gets its own generator: creating an iterator must not draw from the global
    # RNG, or a run resumed mid-epoch would see different noise than the uninterrupted run.
    return DataLoader(_TensorRows(data), sampler=_ResumableBatches(sampler, batch_size),
                      batch_size=None, generator=torch.Generator())


def model_input(
    x: Tensor, preprocessing: ImagePreprocessing | None, use_map: bool,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Raw data -> ``(model input, log|det| of the preprocessing or None)``.

    Images are dequantised; with MaP they are also preprocessed (the model sees ``y``).
    """
    if preprocessing is None:
        return x, None
    x_deq = preprocessing.dequantize(x, generator=generator)
    if not use_map:
        return x_deq, None
    return preprocessing.forward(x_deq)


@torch.no_grad()
def evaluate_nll(
    model: EBFlow, data: Tensor, preprocessing: ImagePreprocessing | None, use_map: bool,
    batch_size: int = 500, seed: int = 0,
) -> dict[str, float]:
    r"""Exact NLL of ``data`` in data space: ``nll`` (nats per example) and
    ``bpd`` = nll / (D ln 2). Dequantisation noise is drawn from a generator seeded by ``seed``,
    so repeated evaluations are comparable."""
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for xb in data.split(batch_size):
        # dequantisation and preprocessing (and its log-determinant) in float64
        inp, logdet = model_input(xb.to("cpu", torch.float64), preprocessing, use_map, generator=g)
        inp = inp.to(model.device, model.dtype)
        log_p = model.log_prob(inp).double().cpu()
        if logdet is not None:
            log_p = log_p + logdet.double()
        total += float(-log_p.sum())
        n += xb.shape[0]
    nll = total / n
    d = math.prod(data.shape[1:])
    return {"nll": nll, "bpd": nll / (d * math.log(2)), "n": n}


@dataclass
class StepOutcome:
    loss: float
    grad_norm: float
    finite: bool
    error: str = ""


def optimisation_step(
    model: EBFlow, objective: Objective, optimizer: torch.optim.Optimizer, x: Tensor,
    grad_clip: float | None = None,
) -> StepOutcome:
    """One step: loss, backward, (gradient all-reduce goes here), norm / clip, update.

    A non-finite loss or gradient, or a singular layer, skips the update (``finite=False``).
    """
    optimizer.zero_grad(set_to_none=True)
    try:
        loss = objective(model, x)
    except (SingularLayerError, InputError) as err:
        return StepOutcome(float("nan"), float("nan"), False, str(err))
    value = float(loss.detach())
    if not math.isfinite(value):
        return StepOutcome(value, float("nan"), False, "non-finite loss")
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(value, norm, False, "non-finite gradient")
    if grad_clip is not None and norm > grad_clip:
        torch.nn.utils.clip_grads_with_norm_(grads, grad_clip, torch.tensor(norm))
    optimizer.step()
    return StepOutcome(value, norm, True)


# -- logging ------------------------------------------------------------------------------------
CSV_COLUMNS = ["step", "epoch", "train_s", "loss", "grad_norm", "ms_per_iter", "lr",
               "skipped_steps", "val_nll", "val_bpd", "test_nll", "test_bpd", "kl", "fisher"]


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

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

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

    @property
    def ms_per_iter(self) -> float:
        return 1000 * self.train_seconds / max(self.step, 1)


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


class Trainer:
    """Holds the state of one training run (see :func:`train`)."""

    def __init__(
        self, config: Mapping[str, Any], run_dir: Path, *, device: torch.device,
        splits: DataSplits | None = None, sampler: Sampler[int] | None = None,
        is_main_process: bool = True, resume_state: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = dict(config)
        self.run_dir = run_dir
        self.device = device
        self.is_main = is_main_process
        torch.manual_seed(config["seed"])
        self.splits = splits if splits is not None else load_data(config)
        self.pre = build_preprocessing(config, self.splits.num_bins)
        self.use_map = bool(config["map"]) and self.pre is not None
        self.model = build_model(config, self.splits.event_shape, self.pre).to(device)
        self.dtype = self.model.dtype
        self.objective = build_objective(config)
        self.grad_clip = grad_clip_for(config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config, self.params)
        self.scheduler = build_scheduler(config, self.optimizer)
        self.ema = EMA(self.model, config["ema_decay"])
        self.train_data = self.splits.train.to(device)
        self.sampler = sampler if sampler is not None else EpochShuffleSampler(
            self.train_data.shape[0], config["seed"])
        self.loader = make_loader(self.train_data, config["batch_size"], self.sampler)
        self.batches_per_epoch = len(self.loader)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.train_seconds = 0.0
        self.skipped = self.consecutive_bad = 0
        self.best_val = math.inf
        if resume_state is not None:
            self._load_state(resume_state)
        else:
            self._initialise()

    # -- state --------------------------------------------------------------------------
    def _initialise(self) -> None:
        """Data-dependent initialisation (ActNorm) from a first batch, without touching the RNG."""
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
            "best_val_nll": self.best_val,
            "event_shape": list(self.splits.event_shape),
            "num_bins": self.pre.num_bins if self.pre is not None else None,
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
            self.best_val = float(state["best_val_nll"])
        except (KeyError, RuntimeError, ValueError, TypeError, ConfigError) as err:
            raise CheckpointError(f"{where} does not match the model of its own config: {err}") from err

    def save(self, name: str) -> None:
        if self.is_main:
            save_checkpoint(self.run_dir / "checkpoints" / name, self.state())

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        data = self.splits.split(split)
        with self.ema.average_parameters():
            self.model.eval()
            out = evaluate_nll(self.model, data, self.pre, self.use_map,
                               self.config["eval_batch_size"],
                               seed=self.config["seed"] + EVAL_SEED_OFFSET)
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
                    x = xb.to(self.dtype)
                    inp, _ = model_input(x, self.pre, self.use_map)
                    out = optimisation_step(self.model, self.objective, self.optimizer, inp,
                                            self.grad_clip)
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
                    if bar is not None:
                        bar.update(1)
                        if window_n and self.step % 10 == 0:
                            bar.set_postfix(loss=f"{window_loss / window_n:.4g}", refresh=False)
                    end_of_epoch = self.batch_in_epoch >= self.batches_per_epoch
                    if end_of_epoch:
                        self._next_epoch()
                    if self.consecutive_bad >= c["max_nonfinite"]:
                        self._diverged(out)
                    if self.step % c["log_every"] == 0 and log is not None:
                        log.log(self.step, {
                            "epoch": self.epoch, "train_s": round(self.train_seconds, 3),
                            "loss": window_loss / window_n if window_n else float("nan"),
                            "grad_norm": window_norm / window_n if window_n else float("nan"),
                            "ms_per_iter": 1000 * window_time / c["log_every"],
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "skipped_steps": self.skipped,
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
    if not resume and (run_dir / "checkpoints" / "last.pt").exists():
        raise ConfigError(
            f"{str(run_dir)!r} already holds a run (checkpoints/last.pt); use --resume {run_dir} "
            "to continue it, or choose another --out"
        )


def train(
    config: Mapping[str, Any] | None, run_dir: str | Path, *, resume: bool = False,
    overrides: Mapping[str, Any] | None = None, device: str | torch.device | None = None,
    sampler: Sampler[int] | None = None, is_main_process: bool = True,
    splits: DataSplits | None = None, final_outputs: bool = True,
) -> TrainResult:
    """Train (or resume) a run in ``run_dir``; returns the final state and test metrics.

    With ``resume=True`` the config comes from ``run_dir/checkpoints/last.pt`` and ``overrides``
    may change only the keys in :data:`~ebflow.config.RESUMABLE_KEYS`. After training, the
    best-validation checkpoint (EMA weights) is evaluated on the test split, and
    ``samples.png`` (plus ``density.png`` for 2-D data) and ``results.json`` are written.
    """
    run_dir = Path(run_dir)
    state = None
    if resume:
        state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        config = _resume_config(state["config"], overrides or {})
    else:
        if config is None:
            raise ConfigError("a config is needed to start a new run")
        config = validate_config({**config, **(overrides or {})})
    dev = resolve_device(str(device) if device is not None else config["device"])
    threads = torch.get_num_threads()
    if config["num_threads"] is not None:
        torch.set_num_threads(config["num_threads"])
    try:
        return _train(config, run_dir, resume, state, dev, sampler, is_main_process, splits,
                      final_outputs)
    finally:
        torch.set_num_threads(threads)


def _train(
    config: dict[str, Any], run_dir: Path, resume: bool, state: Mapping[str, Any] | None,
    dev: torch.device, sampler: Sampler[int] | None, is_main_process: bool,
    splits: DataSplits | None, final_outputs: bool,
) -> TrainResult:
    if is_main_process:
        _check_run_dir(run_dir, resume)
    # Data and model first: a missing data set must not leave an empty run directory behind.
    trainer = Trainer(config, run_dir, device=dev, splits=splits, sampler=sampler,
                      is_main_process=is_main_process, resume_state=state)
    if is_main_process:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    log = MetricsLog(run_dir, trainer.step if resume else None, config["tensorboard"]) if is_main_process else None
    try:
        trainer.run(log)
        result = TrainResult(run_dir, trainer.step, trainer.epoch, trainer.train_seconds,
                             trainer.skipped, trainer.best_val)
        if is_main_process and final_outputs:
            result.test = finish_run(trainer, log)
    finally:
        if log is not None:
            log.close()
    return result


def finish_run(trainer: Trainer, log: MetricsLog | None) -> dict[str, float]:
    """Test the best-validation checkpoint; write results.json, samples.png (density.png)."""
    from .runs import load_run, save_density_plot, save_samples

    ckpt = trainer.run_dir / "checkpoints" / "best.pt"
    if not ckpt.exists():
        ckpt = trainer.run_dir / "checkpoints" / "last.pt"
    run = load_run(ckpt, device=trainer.device, splits=trainer.splits)
    test = run.evaluate("test")
    if log is not None:
        log.log(trainer.step, {"epoch": trainer.epoch, "train_s": round(trainer.train_seconds, 3),
                               **{f"test_{k}": v for k, v in test.items() if k in ("nll", "bpd")},
                               **{k: v for k, v in test.items() if k in ("kl", "fisher")}})
    results = {
        "config": trainer.config["name"], "loss": trainer.config["loss"],
        "checkpoint": ckpt.name, "checkpoint_step": run.step, "iterations": trainer.step,
        "epochs": trainer.epoch, "train_seconds": trainer.train_seconds,
        "ms_per_iter": 1000 * trainer.train_seconds / max(trainer.step, 1),
        "skipped_steps": trainer.skipped, "best_val_nll": trainer.best_val,
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
    return test
