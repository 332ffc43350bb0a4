"""A training run from config to results: check the run directory, train (or resume), then
test the best-validation checkpoint and write ``results.json`` and the sample images.

A new run takes a new or empty folder and writes ``run.json`` (its id), ``config.yaml`` and a
step-0 checkpoint before training; a resumed run continues only from checkpoints that belong
to it. A file that cannot be written stops the run with an :class:`OutputError` that says so,
and that the last checkpoint is intact and how to resume."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError
from ..config.resolve import dump_config
from ..config.schema import RESUMABLE_KEYS, RunConfig, validate_config
from ..data.splits import DataSplits
from ..parallel.devices import resolve_device
from ..parallel.process_group import Distributed
from ..parallel.process_group import current as current_distributed
from ..rundir.checkpoint import CheckpointError, load_checkpoint
from ..rundir.files import OutputError, os_reason, write_text_atomic
from ..rundir.lock import RunLock
from ..rundir.metrics import MetricsLog
from ..rundir.ownership import (
    check_new_run_dir,
    check_owner,
    claim_run_dir,
    remove_temp_files,
    resume_command,
)
from .loop import Trainer
from .results import TrainResult, finish_run
from .state import StopRequest

__all__ = ["TrainResult", "train", "finish_run"]


def _resume_config(saved: Mapping[str, Any], overrides: Mapping[str, Any]) -> RunConfig:
    changed = sorted(k for k, v in overrides.items() if k not in RESUMABLE_KEYS and saved.get(k) != v)
    if changed:
        raise ConfigError(
            f"cannot change {', '.join(repr(k) for k in changed)} when resuming (the checkpoint was "
            f"trained with other values); only {', '.join(sorted(RESUMABLE_KEYS))} may change"
        )
    return validate_config({**saved, **overrides})


def _resume_state(run_dir: Path) -> dict[str, Any]:
    """The state in ``run_dir/checkpoints/last.pt``, once it (and best.pt) belong to the run."""
    if not run_dir.is_dir():
        raise CheckpointError(f"{str(run_dir)!r} is not a run directory: it does not exist or is a file")
    last, best = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    state = load_checkpoint(last)
    check_owner(run_dir, last, state)
    if best.exists():  # the run's final test reads it: it must be this run's too
        check_owner(run_dir, best, load_checkpoint(best))
    return state


def _prepare_run_dir(trainer: Trainer, resume: bool, lock: RunLock) -> None:
    """A new run: claim the folder (and its lock), write config.yaml and a step-0 checkpoint
    (so a run directory always holds one to resume from). A resumed run: drop the temporary
    files of interrupted writes and the metrics.csv rows after the checkpoint, rewrite config.yaml."""
    run_dir = trainer.run_dir
    if resume:
        remove_temp_files(run_dir)
        _drop_metrics_after(run_dir / "metrics.csv", trainer.counters.step)
    else:
        trainer.counters.run_id = claim_run_dir(run_dir)
        lock.acquire()
    write_text_atomic(run_dir / "config.yaml", dump_config(trainer.config), "config")
    if not resume:
        trainer.save("last.pt")


def _drop_metrics_after(path: Path, step: int) -> None:
    """Rewrite ``metrics.csv`` atomically without the rows logged after ``step`` (the resumed
    checkpoint's), so that no step appears twice once the run continues."""
    if not path.is_file():
        return
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    keep = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(keep) == len(rows) - 1:
        return
    text = io.StringIO()
    csv.writer(text, lineterminator="\r\n").writerows([rows[0], *keep])
    write_text_atomic(path, text.getvalue(), "metrics")


def _write_failure(run_dir: Path, err: OSError | OutputError) -> OutputError:
    """One line: what could not be written and why, that the last checkpoint is intact, and
    how to resume."""
    text = (
        str(err)
        if isinstance(err, OutputError)
        else (f"{err.filename}: {os_reason(err)}" if err.filename else os_reason(err))
    )
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file():
        text += (
            f". The last good checkpoint {last} is intact; when the cause is fixed, continue "
            f"with: {resume_command(run_dir)}"
        )
    return OutputError(text)


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
    config: RunConfig | Mapping[str, Any] | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    splits: DataSplits | None = None,
    final_outputs: bool = True,
    distributed: Distributed | None = None,
    stop: StopRequest | None = None,
) -> TrainResult:
    """Train (or resume) a run in ``run_dir``; returns the final state and test metrics.

    ``config`` is a :class:`~ebflow.experiment.config.schema.RunConfig` (from
    :func:`~ebflow.experiment.config.resolve.resolve_config`) or a flat mapping of config keys, which is
    validated here; ``overrides`` (flat keys) are applied and validated too.

    With ``resume=True`` the config comes from ``run_dir/checkpoints/last.pt`` and ``overrides``
    may change only the keys in :data:`~ebflow.experiment.config.schema.RESUMABLE_KEYS`. After training, the
    best-validation checkpoint (EMA weights) is evaluated on the test split, and
    ``samples.png`` (plus ``density.png`` for 2-D data) and ``results.json`` are written.

    In a process group (``torchrun``; see :func:`ebflow.experiment.parallel.process_group.init_from_env`, or pass
    ``distributed``) every process calls this with the same arguments: rank 0 reads the
    checkpoint to resume from and shares it, each process trains on its rows of every global
    batch, and only rank 0 writes files.

    ``stop`` (set by a signal handler) stops training after the current step, with a checkpoint
    at that step, by raising :class:`~ebflow.experiment.training.state.TrainingInterrupted`.
    """
    lock = RunLock(run_dir)  # one training process per run directory (rank 0 holds it)
    try:
        return _locked_train(
            config, Path(run_dir), resume, overrides, device, splits, final_outputs, distributed, stop, lock
        )
    finally:
        lock.release()


def _locked_train(
    config: RunConfig | Mapping[str, Any] | None,
    run_dir: Path,
    resume: bool,
    overrides: Mapping[str, Any] | None,
    device: str | torch.device | None,
    splits: DataSplits | None,
    final_outputs: bool,
    distributed: Distributed | None,
    stop: StopRequest | None,
    lock: RunLock,
) -> TrainResult:
    ctx = distributed if distributed is not None else current_distributed()
    state = None
    if resume:
        if run_dir.is_dir():  # (a missing folder: _resume_state says so)
            ctx.from_main(lock.acquire)
        state = ctx.from_main(lambda: _resume_state(run_dir))
        config = ctx.everywhere(lambda: _resume_config(state["config"], overrides or {}))
    else:
        if config is None:
            raise ConfigError("a config is needed to start a new run")
        if not isinstance(config, RunConfig):
            config = validate_config({**config, **(overrides or {})})
        elif overrides:
            config = config.updated(overrides)
    runtime = config.runtime
    dev = ctx.everywhere(lambda: _run_device(str(device) if device is not None else runtime.device, ctx))
    threads = torch.get_num_threads()
    if runtime.num_threads is not None:
        torch.set_num_threads(runtime.num_threads)
    try:
        return _train(
            config, run_dir, resume, state, dev, splits, final_outputs, ctx, stop or StopRequest(), lock
        )
    finally:
        torch.set_num_threads(threads)


def _train(
    config: RunConfig,
    run_dir: Path,
    resume: bool,
    state: Mapping[str, Any] | None,
    dev: torch.device,
    splits: DataSplits | None,
    final_outputs: bool,
    ctx: Distributed,
    stop: StopRequest,
    lock: RunLock,
) -> TrainResult:
    if not resume:
        ctx.from_main(lambda: check_new_run_dir(run_dir))
    # Data and model first: a missing data set must not leave an empty run directory behind.
    try:
        trainer = Trainer(config, run_dir, device=dev, splits=splits, resume_state=state, dist=ctx)
    except CheckpointError as err:  # the resumed state does not fit its own model
        raise CheckpointError(f"checkpoint {str(run_dir / 'checkpoints' / 'last.pt')!r} {err}") from err
    trainer.stop = stop
    log = None
    try:
        ctx.from_main(lambda: _prepare_run_dir(trainer, resume, lock))
        if ctx.is_main:
            log = MetricsLog(
                run_dir, trainer.counters.step if resume else None, config.bookkeeping.tensorboard
            )
        trainer.run(log)
        result = TrainResult.of(trainer)
        if final_outputs and (ctx.is_main or ctx.is_distributed):
            result.test = finish_run(trainer, log)
    except (OSError, OutputError) as err:
        raise _write_failure(run_dir, err) from err
    finally:
        if ctx.is_main:
            trainer.report.flush()  # curves.png with the run's last validation (finished or stopped)
        if log is not None:
            log.close()
    return result
