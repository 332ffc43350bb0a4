"""The ``ebflow`` command: ``train``, ``eval``, ``sample``, ``configs``, ``inpaint`` and
``reproduce``, one module per command (``python -m ebflow`` runs the same).

:func:`main` is the one error boundary: every :class:`~ebflow.errors.EBFlowError` (the
application turns a damaged input file into one that names the file) and every ``OSError``
becomes one ``error: ...`` line and exit status 2; ``--debug`` (or ``EBFLOW_DEBUG=1``) shows
the traceback instead."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import EBFlowError
from ..experiment.rundir.files import os_reason
from ..experiment.rundir.ownership import resume_command
from ..experiment.training.state import TrainingDivergedError, TrainingInterrupted
from . import configs, evaluate, inpaint, reproduce, train
from .common import HelpFormatter, Parser
from .console import setup_logging

__all__ = ["main", "build_parser", "EXIT_ERROR", "EXIT_DIVERGED"]

EXIT_ERROR = 2
EXIT_DIVERGED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(  # its sub-commands' parsers are Parsers too: "did you mean" on a bad choice
        prog="ebflow",
        formatter_class=HelpFormatter,
        description="Energy-Based Normalizing Flows: train with score matching, evaluate the exact "
        "likelihood, sample exactly.",
    )
    parser.add_argument("--version", action="version", version=f"ebflow {__version__}")
    debug_help = "show the Python traceback of an error (also: EBFLOW_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    quiet_help, verbose_help = "show only warnings and errors", "show debugging messages too"
    parser.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train.add_parser(sub)
    evaluate.add_parsers(sub)
    configs.add_parser(sub)
    p = sub.add_parser("inpaint", help="inpaint masked image regions by Langevin MCMC on the energy")
    inpaint.add_arguments(p)
    p.set_defaults(handler=inpaint.run)
    p = sub.add_parser(
        "reproduce",
        help="reproduce one of the paper's tables (train every cell, then report ours next to the paper's)",
    )
    reproduce.add_arguments(p)
    p.set_defaults(handler=reproduce.run)
    for command in sub.choices.values():  # `ebflow train --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        command.formatter_class = HelpFormatter  # --help shows the defaults
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=quiet_help)
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
        )
    return parser


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text.strip())


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, EBFlowError):
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{os_reason(err)}"
    return str(err)


def _interrupted(err: TrainingInterrupted) -> str:
    last = err.run_dir / "checkpoints" / "last.pt"
    if err.step is not None:
        text = f"{err}; checkpoint written: {last}"
    elif last.is_file():
        text = f"{err}; the last checkpoint {last} is intact"
    elif err.run_dir.exists():
        return f"{err} before the run's first checkpoint; delete {err.run_dir} and start again"
    else:
        return f"{err} before the run started; nothing was written"
    again = " (under torchrun: with the same torchrun options)" if _world_size() > 1 else ""
    return f"{text}. Continue with: {resume_command(err.run_dir)}{again}"


def _out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return (
        isinstance(err, MemoryError)
        or type(err).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in text
        or "CUDA out of memory" in text
    )


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 error, 3 training diverged,
    128 + N stopped by signal N: 130 SIGINT, 143 SIGTERM). A reader that closes the output
    early (``ebflow configs | head -1``) is no error: status 0, nothing on stderr."""
    try:
        return _main(argv)
    except BrokenPipeError:
        _drop_stdout()
        return 0


def _drop_stdout() -> None:
    """Send what is left of stdout to /dev/null, so that its flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout without a file descriptor (captured): nothing to flush at exit


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    debug = args.debug or os.environ.get("EBFLOW_DEBUG", "") not in ("", "0")
    restore_logging = setup_logging(quiet=args.quiet, verbose=args.verbose)
    try:
        return _run(args, debug)
    finally:
        restore_logging()


def _run(args: argparse.Namespace, debug: bool) -> int:
    # in a torchrun run every process reports; the others say which they are
    rank = os.environ.get("RANK", "0") if _world_size() > 1 else "0"
    who = "" if rank == "0" else f"[rank {rank}] "
    try:
        status = int(args.handler(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, inside main, not at exit
        return status
    except BrokenPipeError:
        raise
    except TrainingInterrupted as err:
        if debug:
            raise
        if rank == "0":
            print(_interrupted(err), file=sys.stderr)
        return 128 + err.signum
    except (EBFlowError, OSError) as err:
        if debug:
            raise
        print(f"{who}error: {_one_line(_describe(err))}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(err, TrainingDivergedError) else EXIT_ERROR
    except (MemoryError, RuntimeError) as err:  # out of memory can happen anywhere: say so
        if debug or not _out_of_memory(err):
            raise
        print(
            f"{who}error: out of memory ({_one_line(str(err))[-200:]}); use smaller sizes "
            "(batch_size, eval_batch_size, -n, the data or the model)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{who}interrupted", file=sys.stderr)
        return 130
