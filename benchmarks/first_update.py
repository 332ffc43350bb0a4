r"""How far a recipe's first optimiser step moves each square weight matrix, against its size.

A D×D matrix whose entries are at most :math:`m` in absolute value has operator norm at most
:math:`m\,D`, with equality when its entries are :math:`\pm m` in a rank-one sign pattern.
RMSprop (the MNIST recipes; torch's default smoothing α = 0.99) divides the first gradient by
:math:`\sqrt{(1-\alpha)\,g^2} = 0.1\,|g|`, so its first update moves every weight by
:math:`m = 10\,\eta`, whatever D; Adam's first update moves every weight by :math:`\eta`. This
script measures it: one training step of the preset's own recipe (optimiser, learning rate,
initialisation, first batch), then for every square weight :math:`\max|\Delta W|`,
:math:`\|\Delta W\|_2` (power iteration, float64), the bound :math:`D\max|\Delta W|` and
:math:`\|W_0\|_2`. The scaling study (``docs/scaling.md``) cites it for D = 784 and 3,136::

    python -m benchmarks.first_update --preset mnist-fc mnist-mosaic2-fc --loss ml ssm \
        --data-dir PATH/TO/mnist

Prints one Markdown row per (preset, objective, weight). ``--max-train`` (default 500) keeps the
data small: only the first batch is used.
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

__all__ = ["UpdateSize", "first_update_sizes", "operator_norm", "main"]


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


def operator_norm(m: Tensor, iters: int = 100, seed: int = 0) -> float:
    """:math:`\\|m\\|_2`, the largest singular value, by power iteration on :math:`m^T m` (float64)."""
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


def first_update_sizes(preset: str, loss: str, overrides: dict[str, Any] | None = None) -> list[UpdateSize]:
    """One training step of ``preset`` with ``loss`` on one thread; the size of each square
    weight's update. ``overrides`` are config keys (e.g. ``data_dir``, ``max_train``)."""
    from ebflow.experiment.config.resolve import resolve_config
    from ebflow.experiment.training.loop import Trainer

    quiet = {"tensorboard": False, "progress": False, "num_threads": 1}
    config = resolve_config(preset, {**quiet, **(overrides or {}), "loss": loss})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(config, Path(tmp) / "run", device=torch.device("cpu"))
            trainer.initialize()
            square = {
                n: p.detach().clone()
                for n, p in trainer.model.named_parameters()
                if p.ndim == 2 and p.shape[0] == p.shape[1]
            }
            trainer.model.train()
            trainer.train_step(next(iter(trainer.loader)))
            rows = []
            for name, p in trainer.model.named_parameters():
                if name in square:
                    delta = p.detach() - square[name]
                    rows.append(
                        UpdateSize(
                            preset,
                            loss,
                            name,
                            p.shape[0],
                            config.optim.lr,
                            float(delta.abs().max()),
                            operator_norm(delta),
                            operator_norm(square[name]),
                        )
                    )
            return rows
    finally:
        torch.set_num_threads(threads)


def format_rows(rows: Sequence[UpdateSize]) -> str:
    """The Markdown table the script prints."""
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
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"max_train": args.max_train, "max_eval": 100}
    if args.data_dir:
        overrides.update(data_dir=args.data_dir, download=False)
    rows = [
        r for preset in args.preset for loss in args.loss for r in first_update_sizes(preset, loss, overrides)
    ]
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
