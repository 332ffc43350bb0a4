"""Helpers shared by several test files (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ebflow import EBFlow
from ebflow.layers import GenericLinear

#: ``--set`` values of a tiny digits-fc run through the command line (4 steps, seconds).
TINY_CLI = [
    "max_iters=4",
    "epochs=null",
    "eval_every=100",
    "checkpoint_every=2",
    "log_every=1",
    "num_samples=4",
    "batch_size=20",
    "eval_batch_size=50",
    "max_train=60",
    "max_eval=20",
    "tensorboard=false",
    "progress=false",
    "num_threads=1",
]


def cli_sets(items: list[str]) -> list[str]:
    """``["k=v", ...]`` as command-line arguments ``["--set", "k=v", ...]``."""
    return [a for item in items for a in ("--set", item)]


def brute_force_log_prob(model: EBFlow, x: torch.Tensor) -> torch.Tensor:
    """log p_u(g(x)) + log|det dg/dx| with the full Jacobian from autograd and slogdet (float64)."""
    out = []
    for xi in x:

        def g(v: torch.Tensor) -> torch.Tensor:
            return model(v.reshape(1, *model.event_shape)).reshape(-1)

        jac = torch.autograd.functional.jacobian(g, xi.reshape(-1))
        z = g(xi.reshape(-1)).reshape(1, *model.latent_shape)
        out.append(model.prior.log_prob(z)[0] + torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


class RowMixing(GenericLinear):
    """The README's custom layer: one learnable W x W matrix mixing every image row, plus a bias."""

    def __init__(self, event_shape: tuple[int, int, int]) -> None:
        super().__init__(event_shape)
        width = event_shape[-1]
        self.weight = nn.Parameter(torch.eye(width) + 0.1 * torch.randn(width, width))
        self.bias = nn.Parameter(torch.zeros(event_shape))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


#: torch.linalg routines that compute a determinant, an inverse or a factorisation.
LINEAR_ROUTINES = (
    "slogdet",
    "det",
    "inv",
    "inv_ex",
    "lu_factor",
    "lu_factor_ex",
    "lu",
    "solve",
    "solve_ex",
    "lu_solve",
    "solve_triangular",
)


def spy_on_linear_algebra(monkeypatch, classes, methods) -> list[str]:
    """Make every torch determinant / inverse / factorisation routine, and each of ``methods``
    that one of ``classes`` defines itself, raise when called; return the list of the names
    called (filled as calls happen). Call it after building the models: their initialisation
    may factorise matrices."""
    calls: list[str] = []

    def spy(name):
        def boom(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return boom

    for routine in LINEAR_ROUTINES:
        monkeypatch.setattr(torch.linalg, routine, spy(f"torch.linalg.{routine}"))
    for routine in ("det", "logdet", "slogdet", "inverse"):
        monkeypatch.setattr(torch, routine, spy(f"torch.{routine}"))
    for cls in classes:
        for method in methods:
            if method in cls.__dict__:
                monkeypatch.setattr(cls, method, spy(f"{cls.__name__}.{method}"))
    return calls


def accumulated_leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor an AccumulateGrad node of ``loss``'s graph would write a gradient into."""
    seen, stack, leaves = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


#: The ways the host reads a tensor's value: each is a device synchronisation on a GPU.
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def count_host_reads(monkeypatch, when: Callable[[], bool] = lambda: True) -> list[int]:
    """Count (in the returned one-element list) every read of a tensor's value by the host
    (:data:`HOST_READS`) made while ``when()`` holds."""
    count = [0]
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            if when():
                count[0] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count
