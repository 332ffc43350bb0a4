"""Structured Dense layers at their own cost (issue 21): ``"lu"`` applies its triangular factors
to the batch and its permutation as an index, never forming ``W = P L U``; ``"tril"`` / ``"triu"``
use their masked triangle. Every value and gradient equals the computation through an explicit
``W`` built here from the raw parameters, and no ``D x D x D`` product runs in any of them."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ebflow import EBFlow, make_objective
from ebflow.layers import Dense, LinearFlowLayer, SmoothLeakyReLU
from ebflow.layers.base import checked_lu_factor, lu_solve, perturbed

D, B = 13, 4  # D appears in no batch size below, so a (D, D) x (D, D) product is W being formed
STRUCTURED = ("lu", "tril", "triu")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def with_permutation(layer: Dense, order: list[int] | torch.Tensor) -> Dense:
    """``layer`` with the permutation matrix ``eye[order]``, set the way a checkpoint sets it."""
    state = layer.state_dict()
    state["permutation"] = torch.eye(layer.features, dtype=layer.permutation.dtype)[torch.as_tensor(order)]
    layer.load_state_dict(state)
    return layer


def structured(parameterization: str, seed: int = 0) -> Dense:
    """A float64 Dense with parameters away from their initial values (and, for ``"lu"``, a
    permutation that moves every entry)."""
    torch.manual_seed(seed)
    layer = perturbed(Dense(D, parameterization=parameterization), 0.2, seed=seed)
    if parameterization == "lu":
        with_permutation(layer, torch.roll(torch.arange(D), seed + 3))
    return layer


def explicit_weight(layer: Dense) -> torch.Tensor:
    """``W`` from the raw parameters, differentiable in them (not through ``Dense.matrix``)."""
    if layer.parameterization == "tril":
        return torch.tril(layer.weight)
    if layer.parameterization == "triu":
        return torch.triu(layer.weight)
    eye = torch.eye(layer.features, dtype=layer.lower.dtype)
    return layer.permutation @ (torch.tril(layer.lower, -1) + eye) @ torch.triu(layer.upper)


class ExplicitDense(LinearFlowLayer):
    """The dense-W computation of a Dense (sharing its parameters): ``x W^T + b``, ``slogdet``
    and an LU solve -- the reference the structured layer must match."""

    def __init__(self, layer: Dense) -> None:
        super().__init__()
        self.layer = layer

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, explicit_weight(self.layer), self.layer.bias)

    def _log_abs_det(self, event_shape):
        return torch.linalg.slogdet(explicit_weight(self.layer))[1]

    def _factorize(self, event_shape):
        return checked_lu_factor(explicit_weight(self.layer).double(), "explicit")

    def _inverse_with(self, factors, y):
        rhs = y if self.layer.bias is None else y - self.layer.bias
        return lu_solve(*factors, rhs.double().T).T.to(y.dtype)


def model_pair(parameterization: str) -> tuple[EBFlow, EBFlow]:
    """The same flow twice, sharing parameters: structured Dense layers, and explicit-W ones."""
    first, second = structured(parameterization, 0), structured(parameterization, 1)
    model = EBFlow([first, SmoothLeakyReLU(0.3), second], (D,)).double()
    reference = EBFlow([ExplicitDense(first), SmoothLeakyReLU(0.3), ExplicitDense(second)], (D,)).double()
    return model, reference


def batch(n: int = B, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# -- (a) the same values and gradients as through the explicit W ------------------------------
@pytest.mark.parametrize("parameterization", STRUCTURED)
def test_values_equal_the_explicit_weight_computation(parameterization):
    layer = structured(parameterization)
    w = explicit_weight(layer).detach()
    torch.testing.assert_close(layer.matrix().detach(), w, atol=1e-14, rtol=0)
    x = batch()
    y = layer.transform(x)
    torch.testing.assert_close(y, x @ w.T + layer.bias, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.inverse(y), x, atol=1e-12, rtol=0)
    z = batch(seed=8)
    torch.testing.assert_close(
        layer.inverse(z), torch.linalg.solve(w, (z - layer.bias).T).T, atol=1e-12, rtol=0
    )
    expected = torch.linalg.slogdet(w)[1]
    torch.testing.assert_close(layer.log_abs_det((D,)), expected, atol=1e-12, rtol=0)
    with torch.no_grad():  # the cached, checked value too
        torch.testing.assert_close(layer.log_abs_det((D,)), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("parameterization", STRUCTURED)
def test_flow_values_equal_the_explicit_weight_flow(parameterization):
    model, reference = model_pair(parameterization)
    x = batch()
    torch.testing.assert_close(model.log_prob(x), reference.log_prob(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(model(x), reference(x), atol=1e-12, rtol=0)
    z = batch(seed=9)
    torch.testing.assert_close(model.inverse(z), reference.inverse(z), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        model.sample(5, generator=torch.Generator().manual_seed(3)),
        reference.sample(5, generator=torch.Generator().manual_seed(3)),
        atol=1e-12,
        rtol=0,
    )


OBJECTIVES = [
    ("ml", {}),
    ("sml", {}),
    ("ssm", {"slices": 2}),
    ("dsm", {"sigma": 0.1}),
    ("fdssm", {"eps": 0.1}),
    ("esm", {}),
]


@pytest.mark.parametrize("name, options", OBJECTIVES)
@pytest.mark.parametrize("parameterization", STRUCTURED)
def test_losses_and_gradients_equal_those_through_the_explicit_weight(parameterization, name, options):
    model, reference = model_pair(parameterization)
    params = list(model.parameters())
    assert {id(p) for p in params} == {id(p) for p in reference.parameters()}
    objective, x = make_objective(name, **options), batch()
    found = []
    for m in (model, reference):
        torch.manual_seed(11)  # the same noise for both
        loss = objective(m, x)
        found.append((loss, torch.autograd.grad(loss, params)))
    (loss, grads), (ref_loss, ref_grads) = found
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    for p, g, ref in zip(params, grads, ref_grads, strict=True):
        assert g.shape == p.shape
        torch.testing.assert_close(g, ref, atol=1e-11, rtol=1e-10)


# -- (b) no W, no D x D x D product --------------------------------------------------------
class RecordProducts(TorchDispatchMode):
    """Records every matrix product and solve (forward and backward): its op name and operand
    shapes."""

    KINDS = (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "matmul",
        "mv",
        "addmv",
        "linear",
        "dot",
        "triangular_solve",
        "linalg_solve_triangular",
        "linalg_solve",
        "linalg_lu_factor_ex",
        "linalg_lu",
        "linalg_inv_ex",
        "linalg_slogdet",
        "_linalg_slogdet",
        "lu_unpack",
        "linalg_lu_solve",
        "_linalg_det",
    )

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.KINDS:
            self.calls.append((name, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))

    def cubic(self) -> list[tuple[str, list[tuple[int, ...]]]]:
        """The calls with two ``D x D`` operands: an O(D^3) product, solve or factorisation
        (a single ``D x D`` operand of a factorisation counts too)."""
        square = (D, D)
        return [
            (n, s)
            for n, s in self.calls
            if s.count(square) >= 2
            or (
                square in s
                and n.startswith(
                    ("linalg_lu", "linalg_inv", "_linalg_slogdet", "linalg_slogdet", "_linalg_det")
                )
            )
        ]


def lu_model() -> EBFlow:
    return EBFlow([structured("lu", 0), SmoothLeakyReLU(0.3), structured("lu", 1)], (D,)).double()


def _forbid_matrix(monkeypatch) -> list[str]:
    """Make ``Dense.matrix`` raise for ``"lu"`` layers; returns the list of such calls."""
    calls: list[str] = []
    original = Dense.matrix

    def matrix(self):
        if self.parameterization == "lu":
            calls.append("matrix")
            raise AssertionError("Dense(lu).matrix() was called: W = P L U formed")
        return original(self)

    monkeypatch.setattr(Dense, "matrix", matrix)
    return calls


STEPS = {
    "transform": lambda m, x: m(x).sum().backward(),
    "ml step": lambda m, x: make_objective("ml")(m, x).backward(),
    "ssm step": lambda m, x: make_objective("ssm")(m, x).backward(),
    "dsm step": lambda m, x: make_objective("dsm", sigma=0.1)(m, x).backward(),
    "fdssm step": lambda m, x: make_objective("fdssm", eps=0.1)(m, x).backward(),
    "sml step": lambda m, x: make_objective("sml")(m, x).backward(),
    "inverse": lambda m, x: m.inverse(x),
    "sample": lambda m, x: m.sample(3),
    "log_prob": lambda m, x: m.log_prob(x),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_lu_flow_never_forms_its_weight(step, monkeypatch):
    """Every path of an "lu" flow (fails while ``transform`` forms ``W = PLU``: two D^3
    products per call, or while the inverse multiplies by a dense P)."""
    model, x = lu_model(), batch()
    calls = _forbid_matrix(monkeypatch)
    with RecordProducts() as record:
        STEPS[step](model, x)
    assert not calls
    assert not record.cubic(), record.cubic()
    products = [(n, s) for n, s in record.calls if n in ("mm", "addmm", "bmm", "baddbmm", "matmul", "mv")]
    if step in ("inverse", "sample"):  # two triangular solves per layer, nothing else
        assert not products, products
        solves = [n for n, _ in record.calls if "solve" in n]
        assert len(solves) == 4, record.calls
    if step == "transform":  # forward: (B, D) x (D, D) twice per layer
        forward = products[:4]
        assert all(s[-2:] == [(B, D), (D, D)] for _, s in forward), forward


def test_every_objective_of_an_lu_flow_runs_without_its_weight(monkeypatch):
    """ESM computes the Hessian's trace from D directions: (D, D) products of the directions are
    its own cost, but W is never formed."""
    model, x = lu_model(), batch()
    calls = _forbid_matrix(monkeypatch)
    for name, options in OBJECTIVES:
        make_objective(name, **options)(model, x).backward()
    assert not calls


@pytest.mark.parametrize("parameterization", ("tril", "triu"))
def test_triangular_flow_does_no_cubic_work(parameterization):
    model = EBFlow(
        [structured(parameterization, 0), SmoothLeakyReLU(0.3), structured(parameterization, 1)], (D,)
    ).double()
    x = batch()
    for step in ("transform", "ml step", "ssm step", "dsm step", "inverse", "sample"):
        with RecordProducts() as record:
            STEPS[step](model, x)
        assert not record.cubic(), (step, record.cubic())


# -- (c) checkpoints and conversions -------------------------------------------------------
@pytest.mark.parametrize("parameterization", ["lu", "tril", "triu"])
def test_structured_layers_hold_no_mask_matrices(parameterization):
    # the triangles are masked by tril/triu on the fly: D x D mask and identity buffers would
    # cost 0.6 GB per LU layer at D = 7,056 (three of them), and move with every .to()
    layer = structured(parameterization, 0)
    square = [name for name, b in layer.named_buffers() if b.dim() == 2 and b.shape[-1] == D]
    assert square == (["permutation"] if parameterization == "lu" else [])  # P: the checkpoint format


def test_state_dict_keys_are_unchanged_and_a_round_trip_keeps_results():
    source = structured("lu", 0)
    state = source.state_dict()
    assert set(state) == {"lower", "upper", "bias", "permutation"}  # checkpoints load as before
    assert state["permutation"].shape == (D, D)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    target = structured("lu", 5)  # another permutation
    assert not torch.equal(target.permutation, source.permutation)
    x = batch()
    with torch.no_grad():  # fill target's caches with its old factors
        target.inverse(target.transform(x))
        target.log_abs_det((D,))
    target.load_state_dict(torch.load(buffer))
    assert torch.equal(target.permutation_index, source.permutation_index)
    y = source.transform(x)
    torch.testing.assert_close(target.transform(x), y, atol=0, rtol=0)
    torch.testing.assert_close(target.inverse(y), x, atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(target.log_abs_det((D,)), source.log_abs_det((D,)))


def test_assign_load_and_a_bad_permutation():
    source, target = structured("lu", 0), structured("lu", 5)
    target.load_state_dict(copy.deepcopy(source.state_dict()), assign=True)
    x = batch()
    torch.testing.assert_close(target.transform(x), source.transform(x), atol=0, rtol=0)
    state = source.state_dict()
    state["permutation"] = state["permutation"] * 0.5
    with pytest.raises(RuntimeError, match="permutation matrix"):
        structured("lu", 0).load_state_dict(state)


def test_conversion_to_float64_and_copies_keep_results():
    torch.manual_seed(0)
    layer32 = with_permutation(Dense(D, parameterization="lu"), torch.roll(torch.arange(D), 2))
    layer64 = copy.deepcopy(layer32).to(torch.float64)
    assert layer64.permutation.dtype == torch.float64 and layer64.permutation_index.dtype == torch.int64
    x = batch()
    y64 = layer64.transform(x)
    torch.testing.assert_close(y64, x @ explicit_weight(layer64).T + layer64.bias, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer32.transform(x.float()).double(), y64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer64.inverse(y64), x, atol=1e-12, rtol=0)
    model = EBFlow([layer32], (D,)).to(torch.float64)
    torch.testing.assert_close(model(x), y64, atol=1e-12, rtol=0)
