"""One contract every exported flow layer passes, on the instances its own ``examples()`` gives:
an exact log-determinant (against autograd's Jacobian), an exact inverse, linear layers' caches
that follow every write to their parameters, no determinant work in score matching, and the
float32/float64 dtypes (and CUDA when present). A new layer exported from ``ebflow.layers``
joins automatically; one without ``examples()`` fails here."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import ebflow.layers as layers
from ebflow import EBFlow, make_objective
from ebflow.layers import FlowLayer, LinearFlowLayer
from helpers import spy_on_linear_algebra

#: Exported abstract bases: they define the contract and have no instances of their own.
BASES = {"FlowLayer", "LinearFlowLayer", "GenericLinear"}
EXPORTED = sorted(
    name
    for name in layers.__all__
    if inspect.isclass(getattr(layers, name))
    and issubclass(getattr(layers, name), FlowLayer)
    and name not in BASES
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def examples_of(name: str) -> list[tuple[FlowLayer, torch.Tensor]]:
    cls = getattr(layers, name)
    found = cls.examples()
    assert found, f"{name}.examples() is empty"
    for layer, x in found:
        assert isinstance(layer, cls), f"{name}.examples() gave a {type(layer).__name__}"
        assert x.dtype == torch.float64 and x.dim() >= 2
    return found


def jacobian_log_abs_det(f, x: torch.Tensor) -> torch.Tensor:
    """log|det| of the Jacobian of ``f`` at each example of ``x``, by autograd and slogdet."""
    out = []
    for xi in x:

        def flat(v: torch.Tensor) -> torch.Tensor:
            return f(v.reshape(1, *x.shape[1:])).reshape(-1)

        out.append(torch.linalg.slogdet(torch.autograd.functional.jacobian(flat, xi.reshape(-1)))[1])
    return torch.stack(out)


def test_the_contract_covers_every_exported_layer():
    assert len(EXPORTED) >= 20
    missing = []
    for name in EXPORTED:
        try:
            getattr(layers, name).examples()
        except NotImplementedError:
            missing.append(name)
    assert not missing, f"give these layers an examples() classmethod: {', '.join(missing)}"


@pytest.mark.parametrize("name", EXPORTED)
def test_log_det_is_the_jacobians_and_inverse_undoes_forward(name):
    for layer, x in examples_of(name):
        y, logdet = layer(x)
        assert logdet.shape == (x.shape[0],) and y.shape[0] == x.shape[0]
        expected = jacobian_log_abs_det(lambda v, layer=layer: layer(v)[0], x)
        torch.testing.assert_close(logdet, expected, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(layer.inverse(y), x, atol=1e-8, rtol=1e-8)
        if isinstance(layer, LinearFlowLayer):  # transform is y alone; log|det A| is constant
            torch.testing.assert_close(layer.transform(x), y, atol=1e-12, rtol=0)
            with torch.no_grad():
                torch.testing.assert_close(
                    layer.log_abs_det(tuple(x.shape[1:])).double(), expected[0], atol=1e-9, rtol=1e-9
                )


def _writes(layer: FlowLayer):
    """In-place writes a training loop or a user may make to the parameters, each followed by a
    check: an optimiser-like step, and a swap of two entries of a parameter, which keeps its
    sum and norm (the cache's value fingerprint) so that only the version counter reveals it."""
    g = torch.Generator().manual_seed(1)
    params = [p for p in layer.parameters() if p.is_floating_point()]
    if not params:
        return
    with torch.no_grad():
        for p in params:
            p.add_(0.02 * torch.randn(p.shape, dtype=p.dtype, generator=g))
    yield "optimiser step"
    for p in params:
        flat = p.detach().reshape(-1)
        order = flat.abs().argsort()  # swap two small entries: the map stays invertible
        pair = next(
            (
                (int(order[i]), int(order[i + 1]))
                for i in range(flat.numel() - 1)
                if abs(float(flat[order[i]] - flat[order[i + 1]])) > 1e-3
            ),
            None,
        )
        if pair is None:
            continue
        i, j = pair
        with torch.no_grad():
            swapped = flat.clone()
            swapped[i], swapped[j] = flat[j], flat[i]
            p.copy_(swapped.view_as(p))
        yield f"swap of two entries of a {tuple(p.shape)} parameter"


@pytest.mark.parametrize("name", [n for n in EXPORTED if issubclass(getattr(layers, n), LinearFlowLayer)])
def test_linear_layer_caches_follow_every_write(name):
    """log|det| and the inverse, served from the cache without gradients, always describe the
    current parameters (fails for a cache key that drops the version counter)."""
    for layer, x in examples_of(name):
        shape = tuple(x.shape[1:])
        with torch.no_grad():  # fill the caches
            layer.log_abs_det(shape)
            layer.inverse(layer.transform(x))
        for what in _writes(layer):
            with torch.no_grad():
                cached = layer.log_abs_det(shape).double()
                y = layer.transform(x)
                back = layer.inverse(y)
            expected = jacobian_log_abs_det(layer.transform, x[:1])[0]
            torch.testing.assert_close(cached, expected, atol=1e-9, rtol=1e-9, msg=f"log|det| after {what}")
            torch.testing.assert_close(back, x, atol=1e-8, rtol=1e-8, msg=f"inverse after {what}")


@pytest.mark.parametrize("loss", ["ssm", "dsm", "fdssm"])
@pytest.mark.parametrize("name", EXPORTED)
def test_score_matching_does_no_determinant_work(name, loss, monkeypatch):
    """The score-matching losses and their gradients through a model made of the layer call no
    determinant, inverse or factorisation routine."""
    for layer, x in examples_of(name):
        model = EBFlow([layer], tuple(x.shape[1:])).double()
        objective = make_objective(loss, **{"dsm": {"sigma": 0.01}, "fdssm": {"eps": 0.01}}.get(loss, {}))
        calls = spy_on_linear_algebra(monkeypatch, (), ())
        value = objective(model, x)
        if any(p.requires_grad for p in model.parameters()):
            value.backward()
        monkeypatch.undo()
        assert not calls and torch.isfinite(value)


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("name", EXPORTED)
def test_dtypes_and_devices(name):
    """The layer computes in the dtype and on the device of its parameters and inputs."""
    for layer64, x64 in examples_of(name):
        y64, ld64 = layer64(x64)
        for device in _devices():
            for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-3)):
                layer = copy.deepcopy(layer64).to(device=device, dtype=dtype)
                x = x64.to(device=device, dtype=dtype)
                with torch.no_grad():
                    y, logdet = layer(x)
                    back = layer.inverse(y)
                assert y.dtype == dtype and y.device.type == device and logdet.device.type == device
                torch.testing.assert_close(y.double().cpu(), y64.detach(), atol=tol, rtol=tol)
                torch.testing.assert_close(logdet.double().cpu(), ld64.detach(), atol=tol * 10, rtol=tol)
                torch.testing.assert_close(back.double().cpu(), x64, atol=tol * 10, rtol=tol * 10)
