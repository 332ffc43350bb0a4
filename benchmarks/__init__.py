"""The ebflow benchmark: how fast score matching trains compared with maximum likelihood.

Run from the repository root with ``python -m benchmarks [options]`` (this package is not part
of the installed ``ebflow``; it uses its library layer, and the ``small`` section alone imports
the training loop, inside the section). Measures, in one process (see
:mod:`benchmarks.sections`): the time of one training iteration per model and objective (and of
the loop a library user writes), its scaling with the dimension ``D``, the cost of an exact
test-set NLL pass, the peak memory of one step, the same small flow in nflows and zuko
(:mod:`benchmarks.peers`) and the training loop's overhead on a small model
(:mod:`benchmarks.small`); on request (``--sections ...,compiled``), the compiled step and its
compile time, in fresh processes (:mod:`benchmarks.compiled`). Prints Markdown tables with the
targets, and writes ``bench.csv``, ``bench.md`` and ``bench.png`` to ``--out``.

Programmatic use (from the repository root)::

    from benchmarks import BenchConfig, run_benchmark
    result = run_benchmark(BenchConfig(models=["toy2d"], sections=["iteration"]))
    print(result.markdown)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ebflow.errors import ConfigError
from ebflow.runtime import large_allocation_reuse_active, reuse_large_allocations

from .compiled import compiled_section
from .machine import OtherProcessLoad, load_average
from .peers import peers_section
from .report import (
    REFERENCE_MS,
    REFERENCE_SOURCE,
    Target,
    check_targets,
    format_markdown,
    write_csv,
    write_plot,
)
from .sections import (
    DEFAULT_SECTIONS,
    SECTIONS,
    BenchConfig,
    Row,
    evaluation_section,
    iteration_section,
    memory_section,
    scaling_section,
)
from .small import small_section
from .workloads import METHODS, MODELS, get_spec

__all__ = [
    "BenchConfig",
    "BenchResult",
    "Row",
    "Target",
    "REFERENCE_MS",
    "REFERENCE_SOURCE",
    "run_benchmark",
    "add_arguments",
    "run",
    "QUICK",
]

#: Above this share of the CPUs used by other processes, the report says the run was disturbed.
BUSY_SHARE = 0.05

#: A tiny configuration (seconds, not minutes): for smoke tests and a first look.
#: The sections of issue 21 at tiny sizes too: peers at D = 32 and 64, the digits job in blocks of
#: 48 steps (its bookkeeping periods scaled down alike) and, when asked for (``--sections``), a
#: 16-D dense flow compiled: still minutes, as Inductor compiles even a tiny graph slowly.
QUICK: dict[str, Any] = dict(
    models=("toy2d", "mnist-fc"),
    dims=(64, 128, 256),
    fit_range=(64, 256),
    warmup=1,
    repeats=3,
    eval_model="mnist-cnn",
    eval_images=500,
    eval_batch=250,
    memory_model="mnist-fc",
    compiled_models=("fc-16",),
    peer_dims=(32, 64),
    small_block=48,
)


@dataclass
class BenchResult:
    """Everything one run measured: rows, targets, and the Markdown report."""

    config: BenchConfig
    rows: list[Row]
    targets: list[Target]
    header: str

    @property
    def markdown(self) -> str:
        return format_markdown(self.rows, self.targets, self.header)


def _known_model(name: str) -> bool:
    """A model of :data:`MODELS` or ``fc-D`` (the FC architecture at dimension ``D``)."""
    try:
        get_spec(name)
    except ConfigError:
        return False
    return True


def _check_config(config: BenchConfig) -> torch.device:
    try:
        device = torch.device(config.device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {config.device!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {config.device} was asked for, but this machine has "
            f"{torch.cuda.device_count()} GPU(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"the benchmark runs on cpu or cuda, not {device}")
    bad = [s for s in config.sections if s not in SECTIONS]
    if bad:
        raise ConfigError(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    bad = [m for m in config.methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    names = [*config.models, config.eval_model, config.memory_model, *config.compiled_models]
    bad = [m for m in names if not _known_model(m)]
    if bad:
        raise ConfigError(f"unknown model(s) {', '.join(bad)}; choose from {', '.join(MODELS)} or fc-D")
    if get_spec(config.eval_model).smoothness is None:
        raise ConfigError(f"the evaluation model must be an image model, not {config.eval_model}")
    for name in ("batch", "repeats", "eval_images", "eval_batch"):
        if int(getattr(config, name)) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {getattr(config, name)}")
    if config.warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {config.warmup}")
    if any(int(d) < 2 for d in config.dims):
        raise ConfigError(f"scaling dimensions must be >= 2, got {list(config.dims)}")
    if any(int(d) < 2 for d in config.peer_dims):
        raise ConfigError(f"peer dimensions must be >= 2, got {list(config.peer_dims)}")
    if config.small_block is not None and config.small_block < 1:
        raise ConfigError(f"small_block must be a positive number of steps, got {config.small_block}")
    lo, hi = config.fit_range
    if not 0 < lo < hi:
        raise ConfigError(f"fit range must be two increasing positive sizes, got {lo}-{hi}")
    return device


def _header(config: BenchConfig, device: torch.device) -> str:
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine())
    )
    return (
        f"**ebflow benchmarks** — {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"device {device} ({where}), torch {torch.__version__}, {torch.get_num_threads()} CPU "
        f"threads, batch {config.batch}, float32, medians of {config.repeats} interleaved "
        f"rounds after {config.warmup} warm-up step(s), large-block reuse "
        f"{'on' if large_allocation_reuse_active() else 'off'}"
    )


def run_benchmark(config: BenchConfig | None = None) -> BenchResult:
    """Run the selected sections and check the targets.

    Raises :class:`~ebflow.errors.ConfigError` on bad options."""
    config = config or BenchConfig()
    device = _check_config(config)
    if config.reuse_allocations:
        reuse_large_allocations()
    header = _header(config, device)
    rows: list[Row] = []
    runners = {
        "iteration": iteration_section,
        "scaling": scaling_section,
        "evaluation": evaluation_section,
        "memory": memory_section,
        "compiled": compiled_section,
        "peers": peers_section,
        "small": small_section,
    }
    load_before = load_average()
    others = OtherProcessLoad().start()
    for section in SECTIONS:
        if section in config.sections:
            rows += runners[section](config, device)
    share = others.share
    header += f". Load average before: {load_before}"
    if share is not None:
        header += f"; other processes used {100 * share:.0f}% of the CPUs during the run"
    header += "."
    if share is not None and share > BUSY_SHARE:
        header += (
            " **The machine was shared: absolute times are inflated and noisy (ratios "
            "between the methods of one model much less so); re-run on a quiet machine "
            "for final figures.**"
        )
    return BenchResult(config, rows, check_targets(rows, device.type), header)


# -- command line ---------------------------------------------------------------------------------
def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in _names(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options (``python -m benchmarks --help``) to ``parser``."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"cpu or cuda (default: {default_device})")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="folder for bench.csv, bench.md and bench.png (default: bench-results)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (toy2d and mnist-fc, D up to 256, 500 images, peers at "
        "D=32,64; compiled: a 16-D flow): seconds; a few minutes more with "
        "--sections ...,compiled",
    )
    parser.add_argument(
        "--sections",
        type=_names,
        default=None,
        help=f"comma-separated subset of {','.join(SECTIONS)}, or all "
        f"(default: {','.join(DEFAULT_SECTIONS)})",
    )
    parser.add_argument(
        "--models",
        type=_names,
        default=None,
        help=f"comma-separated subset of {','.join(MODELS)} (default: all but "
        "mnist-glow-s1); also the models of the compiled section (default: "
        "mnist-cnn,mnist-glow-s1; fc-D allowed there)",
    )
    parser.add_argument(
        "--methods",
        type=_names,
        default=None,
        help=f"comma-separated subset of {','.join(METHODS)} (default: all)",
    )
    parser.add_argument(
        "--dims",
        type=_ints,
        default=None,
        help="scaling sweep dimensions (default: 256,512,1024,2048,3072,4096); "
        "also the peers section's (default: 784,3072)",
    )
    parser.add_argument(
        "--fit-range",
        type=_ints,
        default=None,
        metavar="LO,HI",
        help="dimensions over which the exponent is fitted (default: 1024,4096)",
    )
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 100)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 2)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds; each figure is their median (default: 7)"
    )
    parser.add_argument("--eval-model", default=None, help="model of the NLL pass (default: cifar-cnn)")
    parser.add_argument(
        "--eval-images", type=int, default=None, help="images in the NLL pass (default: 10000)"
    )
    parser.add_argument("--eval-batch", type=int, default=None, help="NLL batch size (default: 500)")
    parser.add_argument(
        "--memory-model", default=None, help="model of the memory section (default: cifar-fc)"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    parser.add_argument(
        "--no-reuse-allocations",
        dest="reuse_allocations",
        action="store_false",
        help="leave glibc malloc's defaults (see ebflow.runtime): for comparison",
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if a target is missed")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` that the parsed options describe (``--quick`` first, then the
    explicit options on top)."""
    config = BenchConfig(device=args.device, reuse_allocations=args.reuse_allocations)
    if args.quick:
        config = replace(config, **QUICK)
    sections = SECTIONS if args.sections == ("all",) else args.sections
    overrides: dict[str, Any] = {
        "sections": sections,
        "models": args.models,
        "methods": args.methods,
        "dims": args.dims,
        "batch": args.batch,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "compiled_models": args.models,
        "peer_dims": args.dims,
        "eval_model": args.eval_model,
        "eval_images": args.eval_images,
        "eval_batch": args.eval_batch,
        "memory_model": args.memory_model,
        "seed": args.seed,
    }
    if args.fit_range is not None:
        if len(args.fit_range) != 2:
            raise ConfigError(f"--fit-range takes two sizes LO,HI, got {args.fit_range}")
        overrides["fit_range"] = tuple(args.fit_range)
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run, print the Markdown report, write CSV, MD and PNG; the exit status (1: a target missed
    under ``--strict``)."""
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = replace(config_from_args(args), log=_log)
    result = run_benchmark(config)
    text = result.markdown
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(result.rows, out / "bench.csv")
    (out / "bench.md").write_text(text)
    write_plot(result.rows, out / "bench.png", title=result.header.replace("**", ""))
    _log(f"wrote {out / 'bench.csv'}, {out / 'bench.md'} and {out / 'bench.png'}")
    if args.strict and any(t.status == "MISSED" for t in result.targets):
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks`` (from the repository root)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
