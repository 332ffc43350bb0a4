"""``ebflow eval`` and ``ebflow sample``: use a trained run."""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError
from ..experiment.config.resolve import parse_overrides
from ..experiment.images.plots import prepare_output, save_samples
from ..experiment.parallel.devices import resolve_device
from ..experiment.rundir.load import LoadedRun, load_run
from .common import format_metrics, seed_argument

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_eval(sub)
    _add_sample(sub)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="exact NLL (nats, bits/dim) with EMA weights; KL/Fisher for 2-D")
    p.add_argument(
        "path",
        metavar="RUN_DIR|CHECKPOINT",
        help="a run directory (its checkpoints/best.pt, else last.pt) or a .pt checkpoint",
    )
    p.add_argument("--split", choices=("val", "test"), default="test", help="data split to evaluate")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change data keys for evaluation (data_dir, download, eval_batch_size)",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=_eval)


def _load(args: argparse.Namespace) -> LoadedRun:
    run = load_run(args.path, device=resolve_device(args.device or "auto"))
    overrides = parse_overrides(getattr(args, "overrides", []))
    allowed = {"data_dir", "download", "eval_batch_size"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ConfigError(f"only {', '.join(sorted(allowed))} may be set here, not {', '.join(bad)}")
    run.config = run.config.updated(overrides)
    return run


def _eval(args: argparse.Namespace) -> int:
    run = _load(args)
    metrics = run.evaluate(args.split)
    if args.json:
        print(
            json.dumps({"checkpoint": str(run.checkpoint), "step": run.step, "split": args.split, **metrics})
        )
    else:
        print(f"{run.checkpoint} (step {run.step}, EMA weights)")
        print(format_metrics(args.split, metrics))
    return 0


# -- sample ---------------------------------------------------------------------------------------
def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="exact samples by inversion: image grid or 2-D scatter plot")
    p.add_argument(
        "path",
        metavar="RUN_DIR|CHECKPOINT",
        help="a run directory (its checkpoints/best.pt, else last.pt) or a .pt checkpoint",
    )
    p.add_argument("-n", type=int, default=64, help="number of samples")
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE.png",
        help="output PNG (default: RUN_DIR/sample.png; the run's own samples.png is kept)",
    )
    p.add_argument("--seed", type=seed_argument, default=0, help="random seed of the samples")
    p.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="K",
        help="refine the samples with K MCMC steps on the energy (ebflow.mcmc)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data keys for 2-D plots (data_dir, download)",
    )
    p.set_defaults(handler=_sample)


def _sample(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ConfigError(f"-n must be a positive number of samples, got {args.n}")
    if args.refine < 0:
        raise ConfigError(f"--refine must be >= 0, got {args.refine}")
    if args.out is not None:
        prepare_output(args.out)  # a bad --out fails before the model is loaded
    run = _load(args)
    out = save_samples(
        run, args.out or run.run_dir / "sample.png", args.n, seed=args.seed, refine=args.refine
    )
    print(f"wrote {args.n} samples to {out}")
    return 0
