r"""How far a recipe's first optimiser step moves each square weight matrix, against its size.

A D×D matrix whose entries are at most :math:`m` in absolute value has operator norm at most
:math:`m\,D`, with equality when its entries are :math:`\pm m` in a rank-one sign pattern.
RMSprop (the MNIST recipes; torch's default smoothing α = 0.99) divides the first gradient by
:math:`\sqrt{(1-\alpha)\,g^2} = 0.1\,|g|`, so its first update moves every weight by
:math:`m = 10\,\eta`, whatever D; Adam's first update moves every weight by :math:`\eta`. This
script measures it: one training step of the preset's own recipe (optimiser, learning rate,
initialisation, first batch), then for every square weight :math:`\max|\Delta W|`,
:math:`\|\Delta W\|_2` (power iteration, float64), the bound :math:`D\max|\Delta W|` and
:math:`\|W_0\|_2`. The scaling study (``docs/scaling.md``) cites it::

    python -m benchmarks.first_update --preset mnist-fc mnist-mosaic2-fc --loss ml ssm \
        --data-dir PATH/TO/mnist --nll

Prints one Markdown row per (preset, objective, weight). ``--max-train`` (default 500) keeps the
data small: only the first batch is used. ``--nll`` adds a second table: the exact validation NLL
of the weights themselves (not their average) before and after that step, one row per (preset,
objective).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["UpdateSize", "FirstUpdate", "first_update", "operator_norm", "main"]


@dataclass(frozen=True)
class UpdateSize:
    """One square weight of a preset after its first step under one objective."""

    preset: str
    loss: str
    weight: str
    dimension: int
    lr: float
    max_abs_update: float
    update_norm: float  # ||W_1 - W_0||_2
    initial_norm: float  # ||W_0||_2

    @property
    def bound(self) -> float:
        """D·max|ΔW|: the largest operator norm of a D×D matrix with entries that large."""
        return self.max_abs_update * self.dimension


@dataclass(frozen=True)
class FirstUpdate:
    """The first step of one preset under one objective: each square weight's update, and with
    ``nll=True`` the validation NLL (``nll`` nats per example, ``bpd`` bits/dim) of the weights
    before and after it."""

    preset: str
    loss: str
    sizes: list[UpdateSize]
    val_nll_before: dict[str, float] | None = None
    val_nll_after: dict[str, float] | None = None


def operator_norm(m: Tensor, iters: int = 100, seed: int = 0) -> float:
    r""":math:`\|m\|_2`, the largest singular value, by power iteration on :math:`m^T m` (float64)."""
    m = m.detach().double()
    v = torch.randn(m.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    v /= v.norm()
    for _ in range(iters):
        v = m.T @ (m @ v)
        norm = v.norm()
        if norm == 0:
            return 0.0
        v /= norm
    return float((m @ v).norm())


def first_update(
    preset: str, loss: str, overrides: dict[str, Any] | None = None, *, nll: bool = False
) -> FirstUpdate:
    """One training step of ``preset`` with ``loss`` on one thread: the size of each square
    weight's update; with ``nll``, the exact validation NLL of the weights (not the EMA) before
    and after it. ``overrides`` are config keys (e.g. ``data_dir``, ``max_train``)."""
    from ebflow.experiment.config.resolve import resolve_config
    from ebflow.experiment.evaluation.nll import EVAL_SEED_OFFSET, evaluate_nll
    from ebflow.experiment.training.loop import Trainer

    quiet = {"tensorboard": False, "progress": False, "num_threads": 1}
    config = resolve_config(preset, {**quiet, **(overrides or {}), "loss": loss})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(config, Path(tmp) / "run", device=torch.device("cpu"))
            trainer.initialize()

            def val_nll() -> dict[str, float]:
                trainer.model.eval()
                out = evaluate_nll(
                    trainer.model,
                    trainer.splits.split("val"),
                    trainer.pre,
                    trainer.use_map,
                    config.bookkeeping.eval_batch_size,
                    seed=config.runtime.seed + EVAL_SEED_OFFSET,
                )
                trainer.model.train()
                return out

            before = val_nll() if nll else None
            initial = {
                n: p.detach().clone()
                for n, p in trainer.model.named_parameters()
                if p.ndim == 2 and p.shape[0] == p.shape[1]
            }
            trainer.model.train()
            trainer.train_step(next(iter(trainer.loader)))
            sizes = []
            for name, p in trainer.model.named_parameters():
                if name in initial:
                    delta = p.detach() - initial[name]
                    sizes.append(
                        UpdateSize(
                            preset,
                            loss,
                            name,
                            p.shape[0],
                            config.optim.lr,
                            float(delta.abs().max()),
                            operator_norm(delta),
                            operator_norm(initial[name]),
                        )
                    )
            return FirstUpdate(preset, loss, sizes, before, val_nll() if nll else None)
    finally:
        torch.set_num_threads(threads)


def format_sizes(rows: Sequence[UpdateSize]) -> str:
    """The Markdown table of the updates' sizes."""
    lines = [
        "| preset | objective | weight | D | lr | max abs update | ‖ΔW‖₂ | D·max abs update | ‖W₀‖₂ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.preset} | {r.loss} | {r.weight} | {r.dimension:,} | {r.lr:g} | {r.max_abs_update:.3g} "
            f"| {r.update_norm:.3f} | {r.bound:.3f} | {r.initial_norm:.3f} |"
        )
    return "\n".join(lines)


def format_nll(runs: Sequence[FirstUpdate]) -> str:
    """The Markdown table of the validation NLL of the weights before and after the first step."""
    lines = [
        "| preset | objective | val NLL before (nats) | bits/dim | after one step (nats) | bits/dim |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        b, a = r.val_nll_before, r.val_nll_after
        if b is not None and a is not None:
            lines.append(
                f"| {r.preset} | {r.loss} | {b['nll']:,.1f} | {b['bpd']:.2f} | {a['nll']:,.1f} | {a['bpd']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.first_update", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--preset", nargs="+", default=["digits-fc"], help="config presets (default digits-fc)"
    )
    parser.add_argument("--loss", nargs="+", default=["ml", "ssm"], help="objectives (default ml ssm)")
    parser.add_argument("--data-dir", help="folder of the MNIST IDX files (MNIST presets)")
    parser.add_argument("--max-train", type=int, default=500, help="training examples to load (default 500)")
    parser.add_argument(
        "--nll", action="store_true", help="also the validation NLL before and after the step"
    )
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"max_train": args.max_train}
    if args.data_dir:
        overrides.update(data_dir=args.data_dir, download=False)
    runs = [
        first_update(preset, loss, overrides, nll=args.nll) for preset in args.preset for loss in args.loss
    ]
    print(format_sizes([size for run in runs for size in run.sizes]))
    if args.nll:
        print()
        print(format_nll(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
