"""The training loop of one run: EMA, validation, atomic checkpoints and exact resume.

The same loop runs in one process or in ``N`` processes started by ``torchrun``
(:mod:`ebflow.experiment.parallel`); :mod:`ebflow.experiment.data.batches` explains how a global
batch and its random numbers are shared. A step on ``N`` processes is therefore the
single-process step on the global batch (up to summation order), and a resumed run continues
exactly, on any number of processes. Only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...ema import EMA
from ...errors import ConfigError
from ..config.builders import (
    build_model,
    build_objective,
    build_optimizer,
    build_preprocessing,
    build_scheduler,
)
from ..config.schema import RunConfig
from ..data.batches import EpochShuffleSampler, make_loader, model_input
from ..data.datasets import load_data
from ..data.splits import DataSplits, check_pixel_range
from ..evaluation.nll import EVAL_SEED_OFFSET, evaluate_nll
from ..parallel.gradient_sync import make_gradient_sync
from ..parallel.process_group import SINGLE_PROCESS, Distributed
from ..rundir.checkpoint import CheckpointError, save_checkpoint
from ..rundir.files import first_line
from ..rundir.metrics import MetricsLog
from .compiling import CompileClock
from .inputs import StepInputs
from .memory import peak_memory_bytes
from .progress import ProgressBar, ValidationReport
from .state import StopRequest, TrainingDivergedError, TrainingInterrupted, TrainState
from .step import StepOutcome, StepWindow, optimization_step

__all__ = ["Trainer"]


class Trainer:
    """Holds the state of one training run (see :func:`ebflow.experiment.training.run.train`)."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        *,
        device: torch.device,
        splits: DataSplits | None = None,
        resume_state: Mapping[str, Any] | None = None,
        dist: Distributed = SINGLE_PROCESS,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.device = device
        self.dist = dist
        self.is_main = dist.is_main
        if splits is None:
            # one download per machine; an error anywhere stops every process
            splits = dist.local_main_first(
                lambda: load_data(config.data, num_bins=config.preprocessing.num_bins)
            )
        self.splits = splits
        self.pre = build_preprocessing(config.preprocessing, self.splits.num_bins)
        self.use_map = config.preprocessing.map and self.pre is not None
        # the seed fixes the initial weights (drawn on the CPU) without changing the caller's
        # random state: only the CPU generator is seeded, inside a fork that restores it
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(config.runtime.seed)
            self.model = build_model(
                config.model, self.splits.event_shape, self.pre, use_map=config.preprocessing.map
            ).to(device)
        # the batches are checked once, at load time: per-step input checks would read the
        # device at every step (a NaN that arises anyway makes a non-finite step, skipped)
        self.model.validate = False
        self.dtype = self.model.dtype
        self.objective = build_objective(config.objective)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config.optim, self.params)
        self.scheduler = build_scheduler(config.optim, self.optimizer)
        self.ema = EMA(self.model, config.optim.ema_decay, warmup=config.optim.ema_warmup)
        if self.pre is not None:
            check_pixel_range(self.splits.train, self.pre.num_bins, "training")
        self.train_data = self.splits.train.to(device)
        self.global_batch = config.training.batch_size
        self.sampler = EpochShuffleSampler(
            self.train_data.shape[0], config.runtime.seed, shuffle=config.training.shuffle
        )
        self.loader = make_loader(
            self.train_data, self.global_batch, self.sampler, rank=dist.rank, world_size=dist.world_size
        )
        self.batches_per_epoch = len(self.loader)
        self.inputs = StepInputs(
            config,
            objective=self.objective,
            pre=self.pre,
            use_map=self.use_map,
            train_noise=self.splits.train_noise or 0.0,
            dtype=self.dtype,
            device=device,
            dist=dist,
        )
        self.counters = TrainState(device_type=device.type)  # every counter: checkpoints and results read it
        self.stop = StopRequest()
        self.log: MetricsLog | None = None
        self.bar: ProgressBar | None = None
        self.report = ValidationReport(run_dir, f"{config.runtime.name} ({config.objective.loss})")
        self.window = StepWindow()
        #: this process's peak resident memory when training stopped, before the final test
        #: (``train_peak_memory_bytes`` in ``results.json``; None until :meth:`run` returns)
        self.train_peak_memory_bytes: int | None = None
        self.released = False  # results.release_training_state ran: no more checkpoints
        if resume_state is not None:
            self._load_state(resume_state)
        else:
            self.initialize()
        # the last eval_every_seconds period validated (a resumed run goes on from its clock)
        self._eval_slot = int(
            self.counters.train_seconds // (config.bookkeeping.eval_every_seconds or math.inf)
        )
        self.compile_clock = CompileClock(self.model, config.runtime.compile, self.counters, log=self.is_main)
        # after the (identical) initialisation: DDP broadcasts rank 0's parameters once
        self.sync = make_gradient_sync(dist, self.model, self.objective, config.training.grad_sync)
        self.train_module: nn.Module = self.sync.train_module if self.sync is not None else self.model

    # -- state --------------------------------------------------------------------------
    def initialize(self) -> None:
        """Data-dependent initialisation (ActNorm) from up to 500 clean training examples drawn
        by the seed alone, so every process and every objective starts from the same model."""
        g = torch.Generator().manual_seed(self.config.runtime.seed + 1)
        n = self.train_data.shape[0]
        idx = torch.randperm(n, generator=g)[: max(2, min(500, n))]
        x = self.train_data[idx.to(self.train_data.device)].to(self.dtype).cpu()
        if self.splits.train_noise:  # 2-D toys: ActNorm sees smoothed points, as in training
            x = x + self.splits.train_noise * torch.randn(x.shape, dtype=x.dtype, generator=g)
        inp, _ = model_input(x, self.pre, self.use_map, generator=g)
        self.model.initialize(inp.to(self.device, self.dtype))

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds: the config, the weights, EMA, optimizer and schedule, the
        counters (:class:`TrainState`) and what the data looked like."""
        return {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **self.counters.to_checkpoint(),
            "event_shape": list(self.splits.event_shape),
            "world_size": self.dist.world_size,
            "num_bins": self.pre.num_bins if self.pre is not None else None,
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.counters = TrainState.from_checkpoint(state)
            self.counters.resume_on(self.device.type, warn=self.is_main)
            # the objective counts its examples; it goes on from the checkpoint's counts
            self.objective.dropped_examples = self.counters.dropped_examples
            self.objective.seen_examples = self.counters.seen_examples
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, ConfigError) as err:
            raise CheckpointError(
                f"does not match the model of its own config: its tensors do not fit ({first_line(err)})"
            ) from err

    def save(self, name: str) -> None:
        if self.released:  # a checkpoint without optimiser state or averages would lose work
            raise RuntimeError("internal error: a trainer whose training state was released cannot save")
        if self.is_main:
            save_checkpoint(self.run_dir / "checkpoints" / name, self.state())

    # -- one step -------------------------------------------------------------------------
    def smoothing_std(self) -> float:
        """Std of the fresh smoothing noise of each training batch (:meth:`StepInputs.smoothing_std`)."""
        return self.inputs.smoothing_std()

    def _step_inputs(self, xb: Tensor) -> tuple[Tensor, Tensor | None]:
        """This process's model input and objective noise for the current step (:class:`StepInputs`)."""
        return self.inputs(xb, self.counters.step)

    def _loss_fn(self, noise: Tensor | None) -> Any:
        """The loss of this step as ``f(module, x)`` (the form :func:`optimization_step` takes)."""
        if self.sync is not None:
            sync = self.sync
            return lambda module, x: sync.loss(module, x, noise)
        objective = self.objective
        return lambda model, x: objective(model, x, noise=noise)

    def train_step(self, xb: Tensor) -> StepOutcome:
        """One optimisation step on a batch, then the EMA update and the step counters."""
        inp, noise = self._step_inputs(xb)
        extra = {"sync": self.sync} if self.sync is not None else {}
        out = optimization_step(
            self.train_module, self._loss_fn(noise), self.optimizer, inp, self.config.optim.grad_clip, **extra
        )
        c = self.counters
        c.step += 1
        c.batch_in_epoch += 1
        c.seen_examples, c.dropped_examples = self.objective.seen_examples, self.objective.dropped_examples
        self.window.add(out)
        if out.finite:
            self.ema.update()
            self.counters.consecutive_nonfinite = 0
        else:
            self.counters.skipped_steps += 1
            self.counters.consecutive_nonfinite += 1
        return out

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        """NLL of a split with EMA weights, sharded over the processes and reduced exactly."""
        with self.ema.average_parameters():
            self.model.eval()
            out = evaluate_nll(
                self.model,
                self.splits.split(split),
                self.pre,
                self.use_map,
                self.config.bookkeeping.eval_batch_size,
                seed=self.config.runtime.seed + EVAL_SEED_OFFSET,
                dist=self.dist,
            )
            self.model.train()
        return out

    # -- the loop -------------------------------------------------------------------------
    def run(self, log: MetricsLog | None) -> None:
        """Train until :meth:`done`: steps, and after each, :meth:`after_step` (epoch rollover,
        divergence check, log, validation, checkpoint). ``curves.png`` may lag the last
        validation by up to ``CURVES_EVERY_SECONDS``: ``report.flush()`` draws it (``train`` does
        when the run ends)."""
        self.log = log
        self.model.train()
        with self._progress() as bar:
            while not self.done():
                if self.counters.batch_in_epoch >= self.batches_per_epoch:  # nothing left in this epoch
                    self._next_epoch()
                self.sampler.set_epoch(self.counters.epoch)
                self.loader.sampler.skip = self.counters.batch_in_epoch  # type: ignore[attr-defined]
                t0 = time.perf_counter()
                for xb in self.loader:
                    out = self.train_step(xb)
                    self._wait_for_device()
                    seconds = time.perf_counter() - t0
                    self._add_time(seconds)
                    if bar is not None:
                        bar.advance(seconds)
                    self.after_step(out)
                    if self.done() or self.counters.batch_in_epoch == 0:  # budget spent, or epoch over
                        break
                    t0 = time.perf_counter()
        self.train_peak_memory_bytes = peak_memory_bytes()

    def after_step(self, out: StepOutcome) -> None:
        """Bookkeeping after a step (not counted as training time); on a stop request, a
        checkpoint at this step, then :class:`TrainingInterrupted`."""
        if self.counters.batch_in_epoch >= self.batches_per_epoch:
            self._next_epoch()
        every = self.config.bookkeeping
        if self.counters.consecutive_nonfinite >= self.config.training.max_nonfinite:
            self._diverged(out)
        stop = int(self.dist.broadcast_float(self.stop.signum))  # rank 0's: all stop at this step
        done = self.done()
        if self.counters.step % every.log_every == 0:
            self._log_window()
        if self.counters.step % every.eval_every == 0 or self._eval_time_due() or (done and not stop):
            self._validate()
        if self.counters.step % every.checkpoint_every == 0 or done or stop:
            self.save("last.pt")
        if stop:
            raise TrainingInterrupted(stop, self.run_dir, self.counters.step)

    def _eval_time_due(self) -> bool:
        """``eval_every_seconds`` = T: validate at the first step past each multiple of T seconds of
        training time, so curves of runs at different speeds share their time axis."""
        period = self.config.bookkeeping.eval_every_seconds
        if period is None:
            return False
        slot = int(self.counters.train_seconds // period)
        if slot <= self._eval_slot:
            return False
        self._eval_slot = slot
        return True

    def done(self) -> bool:
        c = self.config.training
        return (
            (c.max_iters is not None and self.counters.step >= c.max_iters)
            or (c.epochs is not None and self.counters.epoch >= c.epochs)
            or (c.max_minutes is not None and self.counters.train_seconds >= 60 * c.max_minutes)
        )

    def _wait_for_device(self) -> None:
        """On a GPU, let the queued work finish every ``log_every`` steps, before the clock is
        read: the training time then includes the optimiser and EMA kernels (summed over the
        window), at one sync per window."""
        if self.device.type == "cuda" and self.counters.step % self.config.bookkeeping.log_every == 0:
            torch.cuda.synchronize(self.device)

    def _add_time(self, seconds: float) -> None:
        self.counters.train_seconds += seconds
        self.window.seconds += seconds
        self.compile_clock.after_step(self.counters)
        timed = self.config.training.max_minutes is not None or self.config.bookkeeping.eval_every_seconds
        if self.dist.is_distributed and timed:
            # a time budget or timed validation must act on every process at the same step: rank 0's clock
            self.counters.train_seconds = self.dist.broadcast_float(self.counters.train_seconds)

    @contextmanager
    def _progress(self) -> Iterator[Any]:
        """The loop's progress bar (None when off); stop requests are polled meanwhile."""
        bar = (
            ProgressBar(self.config, self.batches_per_epoch, self.counters.step, self.counters.train_seconds)
            if self.is_main and self.config.bookkeeping.progress
            else None
        )
        self.bar = bar
        self.stop.polling = True
        try:
            yield bar
        finally:
            self.stop.polling = False
            self.bar = None
            if bar is not None:
                bar.close()

    def _next_epoch(self) -> None:
        self.counters.epoch += 1
        self.counters.batch_in_epoch = 0
        self.scheduler.step()

    def _log_window(self) -> None:
        w, every = self.window, self.config.bookkeeping.log_every
        # the loss of the global batch: the mean of the processes' losses
        loss = self.dist.mean(w.loss / w.finite_steps) if w.finite_steps else float("nan")
        if self.log is not None:
            self.log.log(
                self.counters.step,
                {
                    "epoch": self.counters.epoch,
                    "train_s": round(self.counters.train_seconds, 3),
                    "loss": loss,
                    "grad_norm": w.grad_norm / w.finite_steps if w.finite_steps else float("nan"),
                    "ms_per_iter": 1000 * w.seconds / every,
                    "examples_per_s": self.global_batch * every / w.seconds
                    if w.seconds > 0
                    else float("nan"),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "skipped_steps": self.counters.skipped_steps,
                    "dropped_examples": self.counters.dropped_examples,
                },
            )
        if self.bar is not None:
            self.bar.set(loss=f"{loss:.4g}")
        self.window = StepWindow()

    def _validate(self) -> None:
        val, c = self.evaluate("val"), self.counters
        if self.log is not None:
            self.log.log(
                c.step,
                {
                    "epoch": c.epoch,
                    "train_s": round(c.train_seconds, 3),
                    "val_nll": val["nll"],
                    "val_bpd": val["bpd"],
                },
            )
        if self.is_main:
            self.report(self, val, self.bar)  # log line, bar, divergence warning, curves.png
        if math.isfinite(val["nll"]) and val["nll"] < c.best_val_nll:
            c.best_val_nll = val["nll"]
            self.save("best.pt")

    def _diverged(self, out: StepOutcome) -> None:
        self.save("last.pt")
        c = self.counters
        raise TrainingDivergedError(
            f"training stopped at step {c.step}: {c.consecutive_nonfinite} consecutive steps were "
            f"skipped ({out.error or 'non-finite loss'}; {c.skipped_steps} skipped in all). "
            f"The parameters of the last finite step are in {self.run_dir / 'checkpoints' / 'last.pt'}; "
            "lower the learning rate (--set lr=...), enable gradient clipping (--set grad_clip=5) or "
            "change sigma/eps, then train again or --resume with a larger max_nonfinite."
        )
