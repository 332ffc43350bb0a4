"""A new training objective written outside the package, with public API only.

Multi-scale denoising score matching: example ``i`` of a batch is perturbed at the noise level
:math:`\\sigma_i` of a geometric ladder between ``sigma_min`` and ``sigma_max``, and its DSM
term is weighted by :math:`\\sigma_i^2` (so every level contributes on the same scale):

.. math:: \\ell_i = \\frac{\\sigma_i^2}{2D}\\,\\|\\nabla E(x_i + \\sigma_i\\epsilon_i) - \\epsilon_i/\\sigma_i\\|^2 .

The objective is registered by name, then trained like a built-in one; the model's exact
likelihood is reported at the end. Run: ``python examples/custom_objective.py``.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor

from ebflow import EBFlow
from ebflow.errors import ConfigError
from ebflow.layers import Dense, SmoothLeakyReLU
from ebflow.objectives import ObjectiveSpec, make_objective, register_objective
from ebflow.objectives.toolkit import LossTerms, checked_batch, checked_noise, sum_except_batch


def noise_ladder(batch: int, sigma_min: float, sigma_max: float, like: Tensor) -> Tensor:
    """Per-example noise levels, cycling through ``min(batch, 8)`` geometric steps."""
    levels = min(batch, 8)
    ratio = 0.0 if levels == 1 else math.log(sigma_max / sigma_min) / (levels - 1)
    steps = torch.arange(batch, device=like.device) % levels
    return sigma_min * torch.exp(ratio * steps.to(like.dtype))


def multiscale_dsm_loss(
    model: EBFlow, x: Tensor, sigma_min: float = 0.05, sigma_max: float = 1.0, noise: Tensor | None = None
) -> LossTerms:
    x = checked_batch(model, x)  # the one input check; then check=False below
    eps = torch.randn_like(x) if noise is None else checked_noise(noise, tuple(x.shape), "noise", x)
    sigma = noise_ladder(x.shape[0], sigma_min, sigma_max, x).view(-1, *([1] * (x.dim() - 1)))
    with torch.enable_grad():
        energy, grad = model.energy_and_grad(x + sigma * eps, check=False)
    per_example = 0.5 * sum_except_batch((sigma * grad - eps).pow(2)) / x[0].numel()
    return LossTerms(per_example, energy)


def _positive(name: str):
    def check(value: object) -> None:
        if not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")

    return check


register_objective(
    "multiscale_dsm",
    ObjectiveSpec(
        multiscale_dsm_loss,
        defaults={"sigma_min": 0.05, "sigma_max": 1.0},
        checks={"sigma_min": _positive("sigma_min"), "sigma_max": _positive("sigma_max")},
        noise="gaussian",
        perturbs_input=True,
        help="multi-scale denoising score matching",
    ),
    replace=True,
)


def two_moons_like(n: int, generator: torch.Generator) -> Tensor:
    """A 2-D data set: two noisy arcs."""
    t = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    x[~upper] = torch.stack([1 - torch.cos(t[~upper]), 0.5 - torch.sin(t[~upper])], dim=1)
    return x + 0.08 * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def main(steps: int = 1500, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, test = two_moons_like(4000, g), two_moons_like(1000, g)
    layers = []
    for _ in range(4):
        layers += [Dense(2), SmoothLeakyReLU(0.3)]
    model = EBFlow([*layers, Dense(2)], (2,)).double()
    objective = make_objective("multiscale_dsm", sigma_min=0.05, sigma_max=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = -model.log_prob(test).mean().item()
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (256,), generator=g)]
        loss = objective(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = -model.log_prob(test).mean().item()
    print(f"exact test NLL: {before:.3f} nats before training, {after:.3f} after {steps} steps")
    return {"nll_before": before, "nll_after": after}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    main(parser.parse_args().steps)
