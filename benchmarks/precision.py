"""How far float32 training gradients are from float64 ones, for each score-matching objective.

``python -m benchmarks.precision RUN_DIR_OR_CHECKPOINT [--batch 100] [--draws 4]`` loads a
trained image run (EMA weights), takes ``--batch`` training images through the run's
preprocessing and prints, per objective (SSM, DSM, FDSSM with the run's σ and ε), the
relative error of the float32 loss and parameter gradient against the same computation in
float64, :math:`\\|g_{32} - g_{64}\\| / \\|g_{64}\\|` (mean over ``--draws`` draws of the
objective's noise), next to the spread of the float64 gradient over those draws,
:math:`\\|g_{64} - \\bar g_{64}\\| / \\|\\bar g_{64}\\|`: the noise a step has anyway.

FDSSM's bracket is a second difference of energies, so float32 rounding of each energy
(about ``6e-8 |E|``) is divided by ``ε²``; SSM and DSM differentiate the energy instead.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ebflow.flow import EBFlow
from ebflow.objectives import make_objective

from .tables import markdown_table

__all__ = ["PrecisionRow", "compare_precision", "main", "markdown"]


@dataclass(frozen=True)
class PrecisionRow:
    """One objective's float32-vs-float64 comparison (means over the noise draws)."""

    objective: str
    loss_rel_error: float
    grad_rel_error: float
    grad_spread_over_noise: float
    mean_abs_energy: float


def _flat_grad(model: EBFlow, objective: object, x: Tensor, noise: Tensor | None) -> tuple[float, Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = objective(model, x, noise=noise)  # type: ignore[operator]
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([g.detach().double().flatten() for g in grads])


def compare_precision(
    model: EBFlow, x: Tensor, objectives: dict[str, dict[str, float]], draws: int = 4, seed: int = 0
) -> list[PrecisionRow]:
    """Compare ``model`` (float32) with a float64 copy on the batch ``x`` for each objective
    ``name -> options`` (e.g. ``{"fdssm": {"eps": 0.1}}``), over ``draws`` noise draws."""
    if draws < 2:
        raise ValueError(f"draws must be at least 2 (the spread needs two), got {draws}")
    m32 = copy.deepcopy(model).float().train()  # the caller's model is left as it was
    m64 = copy.deepcopy(m32).double()
    x32, x64 = x.float(), x.double()
    with torch.no_grad():
        energy = float(m64.energy(x64, check=False).abs().mean())
    rows = []
    for name, options in objectives.items():
        objective = make_objective(name, **options)
        gen = torch.Generator().manual_seed(seed)
        loss_err, grad_err, g64s = [], [], []
        for _ in range(draws):
            noise = objective.draw_noise(tuple(x.shape), dtype=torch.float64, device=x.device, generator=gen)
            l32, g32 = _flat_grad(m32, objective, x32, None if noise is None else noise.float())
            l64, g64 = _flat_grad(m64, objective, x64, noise)
            loss_err.append(abs(l32 - l64) / abs(l64))
            grad_err.append(float((g32 - g64).norm() / g64.norm()))
            g64s.append(g64)
        mean = torch.stack(g64s).mean(0)
        spread = [float((g - mean).norm() / mean.norm()) for g in g64s]
        rows.append(
            PrecisionRow(
                name,
                sum(loss_err) / draws,
                sum(grad_err) / draws,
                sum(spread) / draws,
                energy,
            )
        )
    return rows


def markdown(rows: Sequence[PrecisionRow]) -> str:
    """The rows as a Markdown table."""
    header = (
        "objective",
        "loss: float32 vs float64",
        "gradient: float32 vs float64",
        "gradient spread over noise draws",
        "mean abs(E)",
    )
    body = [
        (
            r.objective,
            f"{r.loss_rel_error:.1e}",
            f"{r.grad_rel_error:.1e}",
            f"{r.grad_spread_over_noise:.2f}",
            f"{r.mean_abs_energy:.1f}",
        )
        for r in rows
    ]
    return markdown_table(header, body)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.precision", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run", help="a run directory or checkpoint of an image run (MaP)")
    parser.add_argument("--batch", type=int, default=100, help="training images in the batch (default 100)")
    parser.add_argument("--draws", type=int, default=4, help="noise draws per objective (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dequantisation and noise draws")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be positive, got {args.batch}")
    if args.draws < 2:
        parser.error(f"--draws must be at least 2, got {args.draws}")
    torch.set_num_threads(args.threads)

    from ebflow.experiment.data.batches import model_input
    from ebflow.experiment.rundir.load import load_run

    run = load_run(args.run)
    if run.preprocessing is None or not run.map:
        parser.error(
            "the run must be an image run trained with MaP (the objectives see its preprocessed input)"
        )
    x = run.data("train")[: args.batch]
    inp, _ = model_input(x, run.preprocessing, True, generator=torch.Generator().manual_seed(args.seed))
    obj = run.config.objective
    rows = compare_precision(
        run.model,
        inp,
        {"ssm": {}, "dsm": {"sigma": obj.sigma}, "fdssm": {"eps": obj.eps}},
        draws=args.draws,
        seed=args.seed,
    )
    print(
        f"{run.checkpoint} (step {run.step}), batch {args.batch}, {args.draws} draws, "
        f"sigma {obj.sigma}, eps {obj.eps}"
    )
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
