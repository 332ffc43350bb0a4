"""The benchmarked models and the training step timed for each method.

A *step* is what one training iteration costs: ``zero_grad``, the objective's forward pass,
the backward pass and an RMSprop update (the paper's optimiser). The ``plain`` step replaces the
objective by ``mean E(x)``: one energy forward and backward, a floor no objective can beat.

Two kinds of step are timed: the benchmark's *tuned* step (:func:`make_step`, gradients with
respect to the parameters only) and the *user loop* (:func:`make_user_step`), the four lines of
the README's quick tour with a plain ``loss.backward()``, so that both paths are watched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ebflow.architectures import conv_flow, coupling_flow, dense_flow, glow_flow
from ebflow.errors import ConfigError
from ebflow.flow import EBFlow
from ebflow.objectives import make_objective
from ebflow.preprocessing import ImagePreprocessing

__all__ = [
    "METHODS",
    "MODELS",
    "ModelSpec",
    "fc_spec",
    "get_spec",
    "make_inputs",
    "make_step",
    "make_user_step",
    "make_optimizer",
]

#: ``plain`` first: it is the denominator of every ratio.
METHODS: tuple[str, ...] = ("plain", "ml", "sml", "ssm", "dsm", "fdssm")
SCORE_MATCHING: tuple[str, ...] = ("ssm", "dsm", "fdssm")


@dataclass(frozen=True)
class ModelSpec:
    """How to build one benchmarked model and its inputs.

    ``smoothness`` is the MaP logit smoothness of image inputs (``None``: plain Gaussian
    inputs); ``options`` hold the objectives' hyper-parameters (DSM ``sigma``, FDSSM ``eps``).
    """

    name: str
    build: Callable[[], EBFlow]
    event_shape: tuple[int, ...]
    smoothness: float | None = None
    options: dict[str, dict] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)


def _noise(level: float) -> dict[str, dict]:
    return {"dsm": {"sigma": level}, "fdssm": {"eps": level}}


MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
# MaP logit smoothness and the DSM sigma / FDSSM eps of each model.
MODELS: dict[str, ModelSpec] = {
    # same values as the preset mnist-fc
    "mnist-fc": ModelSpec("mnist-fc", lambda: dense_flow(MNIST), MNIST, 0.5, _noise(1.0)),
    # same values as the preset cifar-fc
    "cifar-fc": ModelSpec("cifar-fc", lambda: dense_flow(CIFAR), CIFAR, 0.5, _noise(0.1)),
    # same values as the preset mnist-cnn
    "mnist-cnn": ModelSpec("mnist-cnn", lambda: conv_flow(MNIST), MNIST, 0.75, _noise(0.1)),
    # same values as the preset cifar-cnn
    "cifar-cnn": ModelSpec("cifar-cnn", lambda: conv_flow(CIFAR), CIFAR, 0.75, _noise(0.1)),
    # same model as the preset mnist-glow-small (levels 2, steps 16, hidden 64, SiLU), not the
    # paper's 512-wide Glow of the preset mnist-glow
    "mnist-glow": ModelSpec(
        "mnist-glow", lambda: glow_flow(MNIST, levels=2, steps=16, hidden=64), MNIST, 1.0, _noise(0.1)
    ),
    # mnist-glow with one step per level instead of 16: the compiled section's stand-in, as a
    # cold Inductor compile of the full model's graph (32 steps unrolled) takes far longer than
    # that section's budget (benchmarks.compiled)
    "mnist-glow-s1": ModelSpec(
        "mnist-glow-s1", lambda: glow_flow(MNIST, levels=2, steps=1, hidden=64), MNIST, 1.0, _noise(0.1)
    ),
    # same values as the presets toy2d-sine, toy2d-swirl and toy2d-checkerboard
    "toy2d": ModelSpec("toy2d", lambda: coupling_flow(2), (2,), None, _noise(0.1)),
}


def fc_spec(dim: int) -> ModelSpec:
    """The FC architecture (2 dense ``D x D`` layers, smooth leaky ReLU) on vectors of ``dim``."""
    if not isinstance(dim, int) or dim < 2:
        raise ConfigError(f"scaling dimensions must be integers >= 2, got {dim!r}")
    return ModelSpec(f"fc-{dim}", lambda: dense_flow((dim,)), (dim,), None, _noise(0.1))


def get_spec(name: str) -> ModelSpec:
    """The spec of a named model (``mnist-fc``, ``cifar-fc``, ``mnist-cnn``, ``cifar-cnn``,
    ``mnist-glow``, ``mnist-glow-s1``, ``toy2d``) or of ``fc-D`` (the FC architecture at dimension ``D``)."""
    if name in MODELS:
        return MODELS[name]
    if name.startswith("fc-") and name[3:].isdigit():
        return fc_spec(int(name[3:]))
    raise ConfigError(f"unknown benchmark model {name!r}; choose one of {', '.join(MODELS)} or fc-D")


def make_inputs(spec: ModelSpec, batch: int, *, device: torch.device, generator: torch.Generator) -> Tensor:
    """A float32 batch shaped like the model's data: MaP-preprocessed random 8-bit images for
    image models, standard normal vectors otherwise."""
    shape = (batch, *spec.event_shape)
    if spec.smoothness is None:
        x = torch.randn(shape, generator=generator)
    else:
        pre = ImagePreprocessing(smoothness=spec.smoothness)
        pixels = torch.randint(0, 256, shape, generator=generator).float()
        x, _ = pre.forward(pre.dequantize(pixels, generator=generator))
    return x.to(device=device, dtype=torch.float32)


def make_optimizer(model: EBFlow) -> torch.optim.Optimizer:
    """RMSprop with learning rate 1e-4: the paper's optimiser for the image models."""
    return torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def make_step(
    model: EBFlow,
    method: str,
    x: Tensor,
    optimizer: torch.optim.Optimizer,
    options: dict | None = None,
) -> Callable[[], None]:
    """One training iteration of ``method`` on the fixed batch ``x``.

    ``method`` is ``plain`` (``mean E(x)``) or an objective name. Gradients are taken with
    respect to the parameters only (``backward(inputs=...)``), never the data.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "plain":

        def loss_fn() -> Tensor:
            return model.energy(x).mean()
    elif method in METHODS:
        objective = make_objective(method, **(options or {}))

        def loss_fn() -> Tensor:
            return objective(model, x)
    else:
        raise ConfigError(f"unknown benchmark method {method!r}; choose from {', '.join(METHODS)}")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward(inputs=params)
        optimizer.step()

    return step


def make_user_step(
    model: EBFlow,
    method: str,
    x: Tensor,
    optimizer: torch.optim.Optimizer,
    options: dict | None = None,
) -> Callable[[], None]:
    """One iteration of ``method`` written as a library user writes it (the README's quick tour):
    ``loss = objective(model, x); optimizer.zero_grad(); loss.backward(); optimizer.step()``.

    A plain ``loss.backward()`` (every leaf that requires a gradient gets one) and nothing else:
    the benchmark calls no allocator setting for it, so it runs under whatever the process uses
    (:func:`ebflow.runtime.reuse_large_allocations` is process-wide; see the run's header).
    """
    if method not in METHODS or method == "plain":
        raise ConfigError(
            f"the user loop times an objective, one of {', '.join(METHODS[1:])}; got {method!r}"
        )
    objective = make_objective(method, **(options or {}))

    def step() -> None:
        loss = objective(model, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step
