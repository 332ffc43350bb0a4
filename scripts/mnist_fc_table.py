#!/usr/bin/env python
"""Train MNIST-FC with ML, SML, SSM, DSM and FDSSM for the same training-time budget each,
test the best-validation EMA checkpoint of each, and print a Markdown table.

    python scripts/mnist_fc_table.py --minutes 5 --data-dir ../shared/data/mnist

Each objective runs as its own `ebflow train --config mnist-fc --loss L --set max_minutes=M`
process, one after the other (run it on an otherwise quiet machine). The budget counts
optimisation steps only; validation, checkpoints and the final test are outside it. Runs that
already hold a results.json are reused unless --force is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

LOSSES = ("ml", "sml", "ssm", "dsm", "fdssm")
LABELS = {"ml": "ML", "sml": "SML", "ssm": "SSM", "dsm": "DSM (σ=1)", "fdssm": "FDSSM (ε=1)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="training budget per objective")
    p.add_argument("--data-dir", default="../shared/data/mnist", help="folder with the MNIST IDX files")
    p.add_argument("--out-dir", default="runs/mnist-fc-table", help="parent folder of the runs")
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the table to FILE")
    p.add_argument("--force", action="store_true", help="retrain runs that already finished")
    return p.parse_args(argv)


def run_one(loss: str, args: argparse.Namespace) -> dict:
    run_dir = Path(args.out_dir) / loss
    results = run_dir / "results.json"
    if results.exists() and not args.force:
        print(f"[{loss}] reusing {results}", flush=True)
        return json.loads(results.read_text())
    if run_dir.exists() and args.force:
        import shutil

        shutil.rmtree(run_dir)
    sets = [f"max_minutes={args.minutes}", f"data_dir={args.data_dir}", "download=false",
            *args.overrides]
    cmd = [sys.executable, "-m", "ebflow", "train", "--config", "mnist-fc", "--loss", loss,
           "--out", str(run_dir), "--device", args.device, "--seed", str(args.seed)]
    cmd += [a for s in sets for a in ("--set", s)]
    print(f"[{loss}] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=os.environ.copy())
    if proc.returncode != 0 or not results.exists():
        return {"loss": loss, "failed": f"exit status {proc.returncode}"}
    return json.loads(results.read_text())


def table(rows: list[dict], minutes: float) -> str:
    lines = [
        f"| objective | iterations in {minutes:g} min | ms / iteration | test NLL (nats) | bits/dim |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        name = LABELS.get(r["loss"], r["loss"])
        if "failed" in r:
            lines.append(f"| {name} | failed ({r['failed']}) | | | |")
            continue
        lines.append(f"| {name} | {r['iterations']:,} | {r['ms_per_iter']:.1f} | "
                     f"{r['test_nll']:.1f} | {r['test_bpd']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [run_one(loss, args) for loss in args.losses]
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
               f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    text = (f"MNIST-FC, {args.minutes:g} minutes of training per objective "
            f"(optimisation steps only), EMA weights of the best-validation checkpoint on the "
            f"10k test set; {machine}\n\n{table(rows, args.minutes)}\n")
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0 if all("failed" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
