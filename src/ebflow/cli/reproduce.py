"""``ebflow reproduce TABLE``: train every cell of one of the paper's tables, or of the scaling
study (resumable), then write report.md, results.json and a plot of validation NLL against
training time."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

import torch

from ..errors import ConfigError
from ..experiment.config.sections import MAX_SEED
from ..experiment.parallel.devices import resolve_device
from ..experiment.reproduce.cells import cell_budget, cell_done, device_slots, train_cell
from ..experiment.reproduce.progress import TableProgress
from ..experiment.reproduce.report import write_report
from ..experiment.reproduce.scaling_report import write_scaling_report
from ..experiment.reproduce.seeds import with_seeds
from ..experiment.reproduce.tables import SM_LOSSES, TABLES, Cell, cells_of

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Reproduce one of the paper's tables: train every cell (resumable: a rerun "
        "continues unfinished cells), then write report.md (the paper's value, ours, "
        "the difference, iterations and time per cell), results.json and a plot of "
        "validation NLL against training time into OUT/TABLE. The table 'scaling' "
        "is the scaling study instead (docs/scaling.md): every objective at D = 784, "
        "3,136 and 7,056 (MNIST and MNIST mosaics), and the training time each needs to "
        "reach maximum likelihood's NLL."
    )
    p.add_argument("table", choices=list(TABLES), help="which table")
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        metavar="M",
        help="training minutes per cell (optimisation steps only), for every cell; default: "
        "the table's own per-cell budgets (scaling: 30 at D = 784 and 3,136, 60 at 7,056), "
        "else the presets' own stopping rule (the paper's epochs)",
    )
    p.add_argument(
        "--objectives",
        nargs="+",
        default=None,
        metavar="LOSS",
        help=f"only these objectives ({', '.join(SM_LOSSES)})",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="only the cells whose name matches a glob pattern (e.g. 'fc-*')",
    )
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="cells trained at once")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="T",
        help="CPU threads per cell (default: torch's default; with --parallel N on C cores, C / N)",
    )
    p.add_argument("--data-dir", default=None, help="folder with the data files (MNIST IDX, CIFAR-10)")
    p.add_argument("--out", default="runs/reproduce", help="parent folder of the tables' runs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the presets' auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed of every cell")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="S",
        help="repeat every cell once per seed (run directories CELL-seedS); the report adds "
        "mean ± std (min–max) over the seeds (e.g. --seeds 0 1 2)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every new cell; the stopping and bookkeeping "
        "keys (epochs, max_iters, eval_every, ...) also apply to resumed cells, "
        "e.g. --set epochs=200 continues finished cells to 200 epochs",
    )
    p.add_argument("--report-only", action="store_true", help="do not train; rebuild the report")
    p.add_argument(
        "--progress-every",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds between looks at the running cells' metrics.csv (their latest "
        "validation, and the table's progress and ETA) (default: 60)",
    )


def run(args: argparse.Namespace) -> int:
    if not args.progress_every > 0:
        raise ConfigError(f"--progress-every must be > 0, got {args.progress_every}")
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    if args.budget_minutes is not None and not args.budget_minutes > 0:
        raise ConfigError(f"--budget-minutes must be > 0, got {args.budget_minutes}")
    for flag, seed in [("--seed", args.seed), *(("--seeds", s) for s in args.seeds or [])]:
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"{flag} must be in [0, {MAX_SEED}], got {seed}")
    if args.seeds and args.seed != 0:
        raise ConfigError("give either --seed or --seeds, not both")
    if args.seeds and args.table == "scaling":
        raise ConfigError("the scaling table runs one seed per cell (--seed), not --seeds")
    if args.device is not None:
        resolve_device(args.device)  # the cells' runs would all fail on a device this machine lacks
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise ConfigError(f"--threads must be in [1, 1024], got {args.threads}")
    if args.threads is None and args.parallel > 1:
        args.threads = max(1, (os.cpu_count() or 1) // args.parallel)
    cells = with_seeds(cells_of(args.table, args.objectives, args.only), args.seeds)
    out_dir = Path(args.out)
    failed = []
    if not args.report_only:
        todo = [
            c
            for c in cells
            if not cell_done(
                out_dir / args.table / c.name, cell_budget(c, args.budget_minutes), args.overrides
            )
        ]
        for c in cells:
            if c not in todo:
                logger.info("[%s] finished at this budget; skipped", c.name)
        progress = TableProgress(
            out_dir / args.table,
            [c.name for c in todo],
            len(cells) - len(todo),
            args.budget_minutes,
            args.parallel,
            budgets={c.name: cell_budget(c, args.budget_minutes) for c in cells},
        )
        free: Queue[str | None] = Queue()  # one device per concurrent cell (GPUs spread)
        for slot in device_slots(args.device, args.parallel, torch.cuda.device_count()):
            free.put(slot)

        def run_cell(cell: Cell) -> int:
            device = free.get()
            progress.started(cell.name)
            code = 1
            try:
                code = train_cell(cell, out_dir / args.table / cell.name, args, device)
                return code
            finally:
                progress.finished(cell.name, code)
                free.put(device)

        with progress.watching(args.progress_every), ThreadPoolExecutor(max_workers=args.parallel) as pool:
            codes = list(pool.map(run_cell, todo))
        failed = [c.name for c, code in zip(todo, codes, strict=True) if code != 0]
    report = write_scaling_report if args.table == "scaling" else write_report
    report(args.table, cells, out_dir)
    if failed:
        print(
            f"error: {len(failed)} cell(s) failed: {', '.join(failed)} (see their .log files)",
            file=sys.stderr,
        )
        return 2
    return 0
