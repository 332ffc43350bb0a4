"""The outcome of a training run: :class:`TrainResult` (its counters and throughput) and
:func:`finish_run`, which tests the best-validation checkpoint (EMA and raw weights; for toys,
KL and Fisher divergence) and writes ``results.json`` and the sample images."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import EBFlowError
from ..evaluation.nll import EVAL_SEED_OFFSET, evaluate_nll
from ..evaluation.toy_metrics import toy_metrics
from ..images.plots import save_density_plot, save_samples
from ..rundir.files import OutputError, write_text_atomic
from ..rundir.load import load_run_and_raw_weights, swap_weights
from ..rundir.metrics import MetricsLog
from .loop import Trainer
from .memory import peak_memory_bytes
from .state import TrainState

__all__ = ["TrainResult", "finish_run", "release_training_state"]


@dataclass(kw_only=True)
class TrainResult(TrainState):
    """What :func:`train` returns: the run's final counters (:class:`TrainState`), its shape
    (processes, global batch), the throughput derived from them, and its test metrics."""

    run_dir: Path
    world_size: int = 1
    global_batch: int = 0
    test: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, trainer: Trainer) -> TrainResult:
        """The result of a trainer as it stands (no test metrics yet)."""
        return cls(
            **asdict(trainer.counters),
            run_dir=trainer.run_dir,
            world_size=trainer.dist.world_size,
            global_batch=trainer.global_batch,
        )

    @property
    def dropped_fraction(self) -> float:
        """dropped / seen examples (0 when none were seen)."""
        return self.dropped_examples / self.seen_examples if self.seen_examples else 0.0

    @property
    def ms_per_iter(self) -> float:
        """Milliseconds of training time per step."""
        return 1000 * self.train_seconds / max(self.step, 1)

    @property
    def batch_per_process(self) -> int:
        return self.global_batch // self.world_size

    @property
    def examples_per_second(self) -> float:
        """Training throughput of the whole run: step x global batch / training seconds (NaN
        before any training time)."""
        return self.step * self.global_batch / self.train_seconds if self.train_seconds > 0 else math.nan

    def run_metrics(self) -> dict[str, Any]:
        """The counters and throughput as ``results.json`` names them."""
        throughput = self.examples_per_second
        return {
            "iterations": self.step,
            "epochs": self.epoch,
            "train_seconds": self.train_seconds,
            "compile_seconds": self.compile_seconds,
            "ms_per_iter": self.ms_per_iter,
            "processes": self.world_size,
            "global_batch": self.global_batch,
            "batch_per_process": self.batch_per_process,
            "examples_per_s": throughput if math.isfinite(throughput) else None,
            "skipped_steps": self.skipped_steps,
            "best_val_nll": self.best_val_nll,
            "dropped_examples": self.dropped_examples,
            "dropped_fraction": self.dropped_fraction,
        }


def release_training_state(trainer: Trainer) -> None:
    """Free what only training needs once it is over: the optimiser's state, the gradients and
    the EMA's averages (for two dense D×D layers with RMSprop, 6·D² numbers: 1.2 GB at
    D = 7,056), before the final test loads the best checkpoint. The model's weights stay; the
    trainer can no longer save a checkpoint (it would lack them)."""
    trainer.optimizer.state.clear()
    trainer.model.zero_grad(set_to_none=True)
    trainer.ema.shadow = {}
    trainer.released = True


def finish_run(trainer: Trainer, log: MetricsLog | None) -> dict[str, float]:
    """Test the best-validation checkpoint; write results.json, samples.png (density.png).

    In a data-parallel run rank 0 reads the checkpoint and shares its weights; the test NLL is
    computed on shards and reduced exactly; only rank 0 writes. The trainer's optimiser state,
    gradients and EMA averages are freed first (:func:`release_training_state`): the test needs
    only the checkpoint and the model's weights. The checkpoint is read once; its raw weights are
    swapped into the tested model for their NLL and swapped out again before the samples."""
    ctx = trainer.dist
    release_training_state(trainer)

    ckpt = trainer.run_dir / "checkpoints" / "best.pt"
    if not ckpt.exists():
        ckpt = trainer.run_dir / "checkpoints" / "last.pt"

    def load() -> Any:
        return load_run_and_raw_weights(ckpt, device=trainer.device, splits=trainer.splits)

    loaded: list[Any] = []

    def load_on_main() -> dict[str, Tensor] | None:
        loaded.append(load())
        if not ctx.is_distributed:
            return None
        return {k: v.cpu() for k, v in loaded[0][0].model.state_dict().items()}

    weights = ctx.from_main(load_on_main)  # a bad checkpoint stops every process
    run, raw_weights = loaded[0] if loaded else (None, None)
    model = run.model if run is not None else trainer.model
    if run is None:  # the other processes evaluate rank 0's weights
        assert weights is not None  # rank 0 sends them in a multi-process run
        model.load_state_dict(weights)
        model.eval()
    batch_size = trainer.config.bookkeeping.eval_batch_size
    seed = trainer.config.runtime.seed + EVAL_SEED_OFFSET
    test = evaluate_nll(
        model, trainer.splits.split("test"), trainer.pre, trainer.use_map, batch_size, seed=seed, dist=ctx
    )
    if not trainer.is_main or run is None:
        return test
    # the same checkpoint with the optimiser's own (not averaged) weights, for comparison: swapped
    # into the tested model and back, rather than read from the checkpoint a second time
    assert raw_weights is not None
    swap_weights(run.model, raw_weights)
    try:
        raw_test = evaluate_nll(
            run.model, trainer.splits.split("test"), trainer.pre, trainer.use_map, batch_size, seed=seed
        )
    finally:
        swap_weights(run.model, raw_weights)  # the EMA weights again, for the samples
    del raw_weights
    test.update(raw_nll=raw_test["nll"], raw_bpd=raw_test["bpd"])
    if trainer.splits.mixture is not None:
        test.update(toy_metrics(run.model, trainer.splits.mixture, trainer.splits.split("test"), batch_size))
    _write_results(trainer, run, test, log)
    return test


def _write_results(trainer: Trainer, run: Any, test: dict[str, float], log: MetricsLog | None) -> None:
    c = trainer.counters
    if log is not None:
        log.log(
            c.step,
            {
                "epoch": c.epoch,
                "train_s": round(c.train_seconds, 3),
                **{f"test_{k}": v for k, v in test.items() if k in ("nll", "bpd")},
                **{k: v for k, v in test.items() if k in ("kl", "fisher")},
            },
        )
    config = trainer.config
    results = {
        "config": config.runtime.name,
        "loss": config.objective.loss,
        "checkpoint": run.checkpoint.name,
        "checkpoint_step": run.step,
        **TrainResult.of(trainer).run_metrics(),
        "ema_decay": config.optim.ema_decay,
        "ema_warmup": config.optim.ema_warmup,
        "map": config.preprocessing.map,
        "threads": torch.get_num_threads(),
        "device": str(trainer.device),
        # of this process: when training stopped (steps, validations, checkpoints), and at the
        # end of its test (the trainer's model and the tested checkpoint's model at once)
        "train_peak_memory_bytes": trainer.train_peak_memory_bytes,
        "peak_memory_bytes": peak_memory_bytes(),
        **{f"test_{k}": v for k, v in test.items()},
    }
    write_text_atomic(trainer.run_dir / "results.json", json.dumps(results, indent=2), "results")
    try:
        save_samples(
            run, trainer.run_dir / "samples.png", config.bookkeeping.num_samples, seed=config.runtime.seed
        )
        if run.event_shape == (2,):
            save_density_plot(run, trainer.run_dir / "density.png")
    except OutputError:
        raise
    except EBFlowError as err:  # a model that cannot be inverted still has its metrics
        warnings.warn(f"could not draw samples: {err}", RuntimeWarning, stacklevel=2)
