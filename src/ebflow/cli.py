"""The ``ebflow`` command: ``train``, ``eval``, ``sample``, ``configs`` (and ``bench``,
``inpaint`` when those modules are installed)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from .config import FIELDS, LOSSES, list_presets, parse_overrides, resolve_config

__all__ = ["main", "build_parser"]

EXIT_ERROR = 2
EXIT_DIVERGED = 3
DEFAULT_PRESET = "digits-fc"


# -- train ----------------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (no arguments: the embedded digits-fc default, ~1 min on CPU)",
        description="Train an EBFlow. With no arguments: the 'digits-fc' preset (scikit-learn 8x8 "
                    "digits, FC EBFlow, sliced score matching). On several GPUs or machines, "
                    "start the same command with torchrun, e.g. `torchrun --nproc_per_node=4 -m "
                    "ebflow train ...`: batch_size is then the global batch, split over the "
                    "processes.",
    )
    p.add_argument("--config", default=None, metavar="NAME|FILE",
                   help=f"preset name (see `ebflow configs`) or YAML file (default: {DEFAULT_PRESET})")
    p.add_argument("--loss", choices=LOSSES, default=None, help="training objective")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set lr=3e-4 --set max_iters=500")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run directory (default: runs/<preset>-<loss>-<time>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from checkpoints/last.pt")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: config 'device', auto)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from .distributed import init_from_env, shutdown
    from .training import train

    _speed_up_cpu_allocations()
    overrides = parse_overrides(args.overrides)
    if args.loss is not None:
        overrides["loss"] = args.loss
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.device is not None:
        overrides["device"] = args.device
    if args.resume:
        if args.config or args.out:
            raise_usage("--resume continues a run with its own config and directory; "
                        "do not combine it with --config or --out")
        config = None
        device = args.device or "auto"
    else:
        config = resolve_config(args.config or DEFAULT_PRESET, overrides)
        device = config["device"]
    # Under torchrun: join the process group (NCCL on CUDA, Gloo on CPU); else one process.
    ctx = init_from_env(device)
    say = print if ctx.is_main else (lambda *a, **k: None)
    try:
        if config is None:
            run_dir = Path(args.resume)
            say(f"resuming {run_dir}" + (f" on {ctx.world_size} processes ({ctx.backend})"
                                         if ctx.is_distributed else ""))
            result = train(None, run_dir, resume=True, overrides=overrides, distributed=ctx)
        else:
            run_dir = Path(args.out) if args.out else (
                Path("runs") / f"{config['name']}-{config['loss']}-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir = ctx.broadcast_object(run_dir)  # rank 0's clock names the run
            say(f"training {config['name']} with {config['loss']} in {run_dir}")
            if ctx.is_distributed:
                say(_batch_line(ctx.world_size, config["batch_size"], config["lr"]))
            result = train(config, run_dir, distributed=ctx)
        # Rank 0 alone tests the best checkpoint and writes the final files: the others wait
        # for it, so that no process tears the group down while another still uses it.
        ctx.barrier()
    finally:
        shutdown(ctx)
    test = result.test
    if ctx.is_distributed:
        say(_batch_line(result.world_size, result.global_batch, None))
    say(f"finished: {result.step} iterations, {result.epoch} epochs, "
        f"{result.train_seconds:.1f} s of training ({result.ms_per_iter:.1f} ms/iteration, "
        f"{result.examples_per_second:.0f} examples/s), {result.skipped_steps} skipped steps")
    if test:
        say(_format_metrics("test", test))
    say(f"run directory: {run_dir}")
    return 0


def _batch_line(world_size: int, global_batch: int, lr: float | None) -> str:
    text = (f"{world_size} processes: global batch {global_batch} = {world_size} x "
            f"{global_batch // world_size} per process")
    if lr is not None:
        text += f"; lr {lr:g} is the rate for the global batch"
    return text


def _speed_up_cpu_allocations() -> None:
    """Keep large freed blocks on the malloc heap (ebflow.runtime, when present): this process
    only trains, and big dense gradients then stop paying page faults on every step."""
    try:
        from .runtime import reuse_large_allocations
    except ImportError:
        return
    reuse_large_allocations()


def raise_usage(message: str) -> None:
    from .errors import ConfigError

    raise ConfigError(message)


def _format_metrics(split: str, m: dict) -> str:
    text = f"{split} NLL: {m['nll']:.3f} nats per example, {m['bpd']:.4f} bits/dim (n={m['n']})"
    if "kl" in m:
        text += f"; KL(data||model) {m['kl']:.4f}, Fisher divergence {m['fisher']:.4f}"
    return text


# -- eval -----------------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="exact NLL (nats, bits/dim) with EMA weights; KL/Fisher for 2-D")
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--device", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change data keys for evaluation (data_dir, download, eval_batch_size)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=_eval)


def _load(args: argparse.Namespace):
    from .config import validate_config
    from .errors import ConfigError
    from .runs import load_run
    from .training import resolve_device

    run = load_run(args.path, device=resolve_device(args.device or "auto"))
    overrides = parse_overrides(getattr(args, "overrides", []))
    allowed = {"data_dir", "download", "eval_batch_size"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ConfigError(f"only {', '.join(sorted(allowed))} may be set here, not {', '.join(bad)}")
    run.config = validate_config({**run.config, **overrides})
    return run


def _eval(args: argparse.Namespace) -> int:
    run = _load(args)
    metrics = run.evaluate(args.split)
    if args.json:
        print(json.dumps({"checkpoint": str(run.checkpoint), "step": run.step,
                          "split": args.split, **metrics}))
    else:
        print(f"{run.checkpoint} (step {run.step}, EMA weights)")
        print(_format_metrics(args.split, metrics))
    return 0


# -- sample ---------------------------------------------------------------------------------------
def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="exact samples by inversion: image grid or 2-D scatter plot")
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("-n", type=int, default=64, help="number of samples")
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine", type=int, default=0, metavar="K",
                   help="refine the samples with K MCMC steps on the energy (ebflow.mcmc)")
    p.add_argument("--device", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="data keys for 2-D plots (data_dir, download)")
    p.set_defaults(handler=_sample)


def _sample(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .runs import save_samples

    if args.n < 1:
        raise ConfigError(f"-n must be a positive number of samples, got {args.n}")
    if args.refine < 0:
        raise ConfigError(f"--refine must be >= 0, got {args.refine}")
    run = _load(args)
    out = save_samples(run, args.out, args.n, seed=args.seed, refine=args.refine)
    print(f"wrote {args.n} samples to {out}")
    return 0


# -- configs --------------------------------------------------------------------------------------
def _add_configs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="list the presets (one line each)")
    p.add_argument("--keys", action="store_true", help="list every config key with its meaning")
    p.add_argument("--show", metavar="NAME", default=None, help="print a resolved preset as YAML")
    p.set_defaults(handler=_configs)


def _configs(args: argparse.Namespace) -> int:
    if args.show:
        from .config import dump_config

        print(dump_config(resolve_config(args.show)), end="")
        return 0
    if args.keys:
        for key, f in FIELDS.items():
            rule = f" ({f.rule})" if f.rule else ""
            print(f"{key:18s} default {f.default!r:14s} {f.help}{rule}")
        return 0
    presets = list_presets()
    width = max(map(len, presets))
    for name, desc in presets.items():
        print(f"{name:{width}s}  {desc}")
    return 0


# -- reproduce ---------------------------------------------------------------------------------------
def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    from . import reproduce

    p = sub.add_parser("reproduce", help="reproduce one of the paper's tables (train every cell, "
                                         "then report ours next to the paper's)")
    reproduce.add_arguments(p)
    p.set_defaults(handler=reproduce.run)


# -- optional subcommands ----------------------------------------------------------------------------
def _optional_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"ebflow.{name}")
    except ImportError:
        return None


def _add_optional(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    module = _optional_module(name)
    if module is None or not hasattr(module, "add_arguments") or not hasattr(module, "run"):
        p = sub.add_parser(name, help=f"{help_text} (unavailable: ebflow.{name} is not installed)")
        p.set_defaults(handler=lambda args, n=name: _unavailable(n))
        return
    p = sub.add_parser(name, help=help_text)
    module.add_arguments(p)
    p.set_defaults(handler=module.run)


def _unavailable(name: str) -> int:
    print(f"error: `ebflow {name}` needs the module ebflow.{name}, which is not available in this "
          "installation", file=sys.stderr)
    return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebflow",
        description="Energy-Based Normalizing Flows: train with score matching, evaluate the exact "
                    "likelihood, sample exactly.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ebflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_sample(sub)
    _add_configs(sub)
    _add_reproduce(sub)
    _add_optional(sub, "bench", "benchmark training steps and evaluation")
    _add_optional(sub, "inpaint", "inpaint masked image regions by Langevin MCMC on the energy")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 error, 3 training diverged)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    from .errors import EBFlowError
    from .training import TrainingDivergedError

    # in a torchrun run every process reports; the others say which they are
    rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else "0"
    who = "" if rank == "0" else f"[rank {rank}] "
    try:
        return int(args.handler(args) or 0)
    except TrainingDivergedError as err:
        print(f"{who}error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except EBFlowError as err:
        print(f"{who}error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; continue with `ebflow train --resume RUN_DIR` (from the last checkpoint)",
              file=sys.stderr)
        return 130
