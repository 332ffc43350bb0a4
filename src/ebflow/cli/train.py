"""``ebflow train``: train (or resume) a run from a preset or YAML file, in one process or under
torchrun."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError
from ..experiment.config.resolve import parse_overrides, resolve_config
from ..experiment.config.schema import LOSSES
from ..experiment.parallel.process_group import init_from_env, shutdown
from ..experiment.rundir.ownership import check_new_run_dir
from ..experiment.training.run import TrainResult, train
from ..experiment.training.state import StopRequest, TrainingInterrupted
from ..runtime import reuse_large_allocations
from .common import format_metrics

__all__ = ["add_parser", "DEFAULT_PRESET"]

DEFAULT_PRESET = "digits-fc"

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (no arguments: the embedded digits-fc default, 2-3 min on 2 cores)",
        description="Train an EBFlow. With no arguments: the 'digits-fc' preset (the 8x8 digits "
        "shipped with ebflow, FC EBFlow, sliced score matching). On several GPUs or "
        "machines, start the same command with torchrun, e.g. `torchrun --nproc_per_node=4 -m "
        "ebflow train ...`: batch_size is then the global batch, split over the "
        "processes.",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="NAME|FILE",
        help=f"preset name (see `ebflow configs`) or YAML file (default: {DEFAULT_PRESET})",
    )
    p.add_argument("--loss", choices=LOSSES, default=None, help="training objective")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set lr=3e-4 --set max_iters=500",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="run directory (default: runs/<preset>-<loss>-<time>)"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from checkpoints/last.pt",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: config 'device', auto)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    # this process only trains: keep large freed blocks on the heap (an explicit opt-in)
    reuse_large_allocations()
    overrides = parse_overrides(args.overrides)
    if args.loss is not None:
        overrides["loss"] = args.loss
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.device is not None:
        overrides["device"] = args.device
    if args.resume:
        if args.config or args.out:
            raise ConfigError(
                "--resume continues a run with its own config and directory; "
                "do not combine it with --config or --out"
            )
        config = None
        device = args.device or "auto"
    else:
        config = resolve_config(args.config or DEFAULT_PRESET, overrides)
        device = config.runtime.device
    # Under torchrun: join the process group (NCCL on CUDA, Gloo on CPU); else one process.
    ctx = init_from_env(device)
    say = logger.info if ctx.is_main else (lambda *a, **k: None)
    stop = StopRequest()
    try:
        if config is None:
            run_dir = Path(args.resume)
            say(
                f"resuming {run_dir}"
                + (f" on {ctx.world_size} processes ({ctx.backend})" if ctx.is_distributed else "")
            )
            with _stop_on_signals(stop, run_dir):
                result = train(None, run_dir, resume=True, overrides=overrides, distributed=ctx, stop=stop)
        else:
            name, loss = config.runtime.name, config.objective.loss
            run_dir = (
                Path(args.out)
                if args.out
                else (Path("runs") / f"{name}-{loss}-{time.strftime('%Y%m%d-%H%M%S')}")
            )
            run_dir = ctx.broadcast_object(run_dir)  # rank 0's clock names the run
            ctx.from_main(lambda: check_new_run_dir(run_dir))  # refuse a taken --out before anything
            say(f"training {name} with {loss} in {run_dir}")
            if ctx.is_distributed:
                say(_batch_line(ctx.world_size, config.training.batch_size, config.optim.lr))
            with _stop_on_signals(stop, run_dir):
                result = train(config, run_dir, distributed=ctx, stop=stop)
        # Rank 0 alone tests the best checkpoint and writes the final files: the others wait
        # for it, so that no process tears the group down while another still uses it.
        ctx.barrier()
    finally:
        shutdown(ctx)
    test = result.test
    if ctx.is_distributed:
        say(_batch_line(result.world_size, result.global_batch, None))
    say(
        f"finished: {result.step} iterations, {result.epoch} epochs, "
        f"{result.train_seconds:.1f} s of training ({result.ms_per_iter:.1f} ms/iteration, "
        f"{result.examples_per_second:.0f} examples/s), {result.skipped_steps} skipped steps"
    )
    if result.dropped_examples:
        say(_dropped_line(result))
        if result.dropped_fraction >= 1 and ctx.is_main:
            warnings.warn(
                "every training example was dropped, so the objective never gave a gradient: "
                "the parameters changed only through weight decay, if any. Use MaP "
                "preprocessing (map=true) or a smaller sigma / eps",
                RuntimeWarning,
                stacklevel=1,
            )
    if test:
        say(format_metrics("test", test))
    say(f"run directory: {run_dir}")
    return 0


@contextmanager
def _stop_on_signals(stop: StopRequest, run_dir: Path) -> Iterator[None]:
    """SIGINT and SIGTERM ask the training loop to stop after its current step, with a
    checkpoint at that step (:class:`StopRequest`); outside the loop, or at a second signal,
    they stop at once (:class:`TrainingInterrupted`). The previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed by the main thread
        return

    def handler(signum: int, frame: object) -> None:
        if stop.polling and not stop.signum:
            stop.signum = signum
        else:
            raise TrainingInterrupted(signum, run_dir)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _dropped_line(result: TrainResult) -> str:
    return (
        f"{result.dropped_examples} of {result.seen_examples} training examples "
        f"({100 * result.dropped_fraction:.1f} %) were outside the model's domain and dropped "
        f"from the loss (drop_out_of_domain)"
    )


def _batch_line(world_size: int, global_batch: int, lr: float | None) -> str:
    text = (
        f"{world_size} processes: global batch {global_batch} = {world_size} x "
        f"{global_batch // world_size} per process"
    )
    if lr is not None:
        text += f"; lr {lr:g} is the rate for the global batch"
    return text
