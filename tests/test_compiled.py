"""The opt-in compiled path (``ebflow.compile_model``, config ``compile``): the same losses and
parameter gradients as the eager path for every objective and model family, one warning and
eager training when compilation fails, Inductor's on-disk cache across processes, and the
compile time in the run's training time and results.

Compilation is slow (seconds to a minute per kernel and model on a busy CPU): every model and
kernel set is module-scoped and shared, the shapes are tiny. By default Inductor compiles the
dense family only; the conv, coupling and Glow families' Inductor cases are marked ``slow`` and
left out of the default run (about 7 minutes more from a cold cache): ``pytest -m slow`` runs
them. The ``aot_eager`` matrix traces and differentiates every family's graphs without code
generation, in seconds, and runs by default.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import ebflow
import ebflow.layers.silu
from conftest import vector_model
from ebflow.architectures import conv_flow, coupling_flow, dense_flow, glow_flow
from ebflow.compiled import CompiledEnergy, compile_cache, compile_model
from ebflow.experiment.config.resolve import resolve_config
from ebflow.experiment.config.schema import DEFAULTS, RESUMABLE_KEYS
from ebflow.experiment.training.run import train

QUIET = dict(tensorboard=False, progress=False, num_threads=1, num_samples=4)
BATCH = 4
OBJECTIVES = ("ssm", "dsm", "fdssm", "ml", "sml")
#: FDSSM's loss and gradient are differences of energies (and of their gradients) 10-1000 times
#: larger than themselves, divided by eps^2: float32 rounding of the energies, which any other
#: order of a sum changes, is amplified past float32 tolerance (measured: 1e-3 relative on a
#: conv weight's gradient). It is compared in float64, where the same amplification leaves
#: 1e-11; its kernel (the energy) is compared in float32 by ML and SML.
FLOAT64 = {"fdssm"}
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-7, atol=1e-9)}


def _family(name: str) -> tuple[ebflow.EBFlow, tuple[int, ...]]:
    """The smallest model of each family: dense (smooth leaky ReLU, ActNorm), conv (few-channel
    convolutions: the eager path's custom convolution function, residual smooth leaky ReLU),
    coupling (MLP conditioners with SiLU, ActNorm), Glow (CNN conditioners with SiLU, ActNorm,
    1x1 convolutions, split prior)."""
    if name == "dense":
        return dense_flow((1, 4, 4), num_layers=2, actnorm=True), (1, 4, 4)
    if name == "conv":
        return conv_flow((1, 4, 4), blocks=2, kernel_size=3), (1, 4, 4)
    if name == "coupling":
        return coupling_flow(2, blocks=2, hidden=8), (2,)
    return glow_flow((2, 4, 4), levels=2, steps=1, hidden=8), (2, 4, 4)


FAMILIES = ("dense", "conv", "coupling", "glow")


@pytest.fixture(scope="module")
def models(one_thread):
    """One initialised, perturbed float32 model per family and its batch; SiLU takes its
    closed-form derivative path on every tensor (as on the large tensors of real models)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ebflow.layers.silu, "_CLOSED_FORM_MIN_ELEMENTS", 0)
        out = {}
        g = torch.Generator().manual_seed(0)
        for name in FAMILIES:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                model, shape = _family(name)
            x = torch.randn((BATCH, *shape), generator=g)
            model.initialize(x)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.03 * torch.randn(p.shape, generator=g))
            out[name, torch.float32] = (model, x)
            out[name, torch.float64] = (copy.deepcopy(model).double(), x.double())
        yield out


@pytest.fixture(scope="module")
def kernels():
    """One kernel set per family and backend (as compile_model gives each model its own)."""
    return {(f, b): CompiledEnergy(backend=b) for f in FAMILIES for b in ("aot_eager", "inductor")}


def _loss_and_grads(model, name, x, kernels):
    objective = ebflow.make_objective(name)
    g = torch.Generator().manual_seed(7)
    noise = objective.draw_noise(tuple(x.shape), dtype=x.dtype, device=x.device, generator=g)
    model.kernels = kernels
    try:
        loss = objective(model, x, noise=noise)
    finally:
        model.kernels = None
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


def _check_equal(models, kernels, family, name, backend):
    dtype = torch.float64 if name in FLOAT64 else torch.float32
    model, x = models[family, dtype]
    k = kernels[family, backend]
    eager = _loss_and_grads(model, name, x, None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled = _loss_and_grads(model, name, x, k)
    # no fallback, and no silent one either (fullgraph: no graph break; a kernel that recompiles
    # past Dynamo's limit raises, and so disables the kernels)
    assert k.enabled and not _ebflow_warnings(record) and k.signatures, k.failure
    torch.testing.assert_close(compiled[0], eager[0], **TOLERANCE[dtype])
    for c, e in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(c, e, **TOLERANCE[dtype])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", OBJECTIVES)
def test_traced_kernels_give_the_eager_losses_and_gradients(models, kernels, family, name):
    # aot_eager: Dynamo's graph and AOTAutograd's differentiation, eager kernels. Catches a
    # layer whose higher derivatives the trace drops (a custom autograd.Function) or breaks.
    _check_equal(models, kernels, family, name, "aot_eager")


@pytest.mark.parametrize(
    "family", [f if f == "dense" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
)
@pytest.mark.parametrize("name", OBJECTIVES)
def test_inductor_kernels_give_the_eager_losses_and_gradients(models, kernels, family, name):
    _check_equal(models, kernels, family, name, "inductor")


def test_the_kernels_stay_out_of_evaluation_and_torch_func_transforms(models, kernels):
    model, x = models["coupling", torch.float32]
    k = model.kernels = kernels["coupling", "aot_eager"]
    try:
        before = set(k.signatures)
        with torch.no_grad():
            model.log_prob(x)  # evaluation: eager, no compilation for its batch sizes
        ebflow.esm_loss(model, x)  # vmap over torch.func: eager inside the transform
        assert k.signatures == before and k.enabled
    finally:
        model.kernels = None


# -- fallback -----------------------------------------------------------------------------------
def _ebflow_warnings(record):
    return [w for w in record if "compil" in str(w.message)]


def test_without_torch_compile_the_model_stays_eager_with_one_warning(monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unavailable)
    model = dense_flow((3,))
    with pytest.warns(RuntimeWarning, match="Dynamo is not supported on this Python") as record:
        assert compile_model(model) is model
    assert len(_ebflow_warnings(record)) == 1 and model.kernels is None
    ebflow.make_objective("ssm")(model, torch.randn(4, 3)).backward()


def test_a_failing_compilation_warns_once_and_the_loss_is_the_eager_one():
    def broken(graph, example_inputs):
        raise RuntimeError("no C compiler found (simulated)")

    model = dense_flow((3,))
    x, objective = torch.randn(4, 3), ebflow.make_objective("dsm")
    noise = torch.randn(4, 3)
    eager = objective(model, x, noise=noise)
    compile_model(model, backend=broken)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        losses = [objective(model, x, noise=noise) for _ in range(3)]
    (w,) = _ebflow_warnings(record)
    assert "no C compiler found (simulated)" in str(w.message) and w.category is RuntimeWarning
    assert not model.kernels.enabled and "no C compiler" in model.kernels.failure
    assert all(torch.equal(loss, eager) for loss in losses)


def test_a_layer_that_breaks_the_graph_falls_back_with_one_warning():
    model = vector_model().float()  # its Logit checks its domain: a data-dependent branch
    x = 0.2 + 0.6 * torch.rand(8, 4)
    model.initialize(x)
    eager = ebflow.make_objective("ssm")(model, x, noise=torch.ones(1, 8, 4))
    compile_model(model, backend="aot_eager")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loss = ebflow.make_objective("ssm")(model, x, noise=torch.ones(1, 8, 4))
    (w,) = _ebflow_warnings(record)
    assert "data-dependent" in str(w.message) and not model.kernels.enabled
    torch.testing.assert_close(loss, eager)


def test_inductor_without_a_c_compiler_falls_back_with_the_compilers_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing cached to fall back on
    model = dense_flow((5,))  # a shape no other test compiles (no in-memory hit)
    compile_model(model)
    with (
        torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}),
        warnings.catch_warnings(record=True) as rec,
    ):
        warnings.simplefilter("always")
        ebflow.make_objective("fdssm")(model, torch.randn(3, 5)).backward()
    (w,) = _ebflow_warnings(rec)
    assert "/nonexistent/c++" in str(w.message) and not model.kernels.enabled


def test_a_copy_of_a_compiled_model_shares_the_kernels_and_computes_its_own_values():
    import pickle

    model = compile_model(dense_flow((3,)), backend="aot_eager")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.layers[0].weight.mul_(2)  # a different model: its own graph, its own parameters
    x, kernels = torch.randn(4, 3), model.kernels
    assert twin.kernels is kernels
    for m in (model, twin):
        expected = ebflow.ml_loss(m, x).loss
        m.kernels, eager = None, ebflow.ml_loss(m, x).loss
        m.kernels = kernels
        torch.testing.assert_close(expected, eager)
    assert len(kernels.signatures) == 2  # one graph per model
    assert isinstance(pickle.loads(pickle.dumps(model)).kernels, CompiledEnergy)


# -- Inductor's on-disk cache across processes ---------------------------------------------------
_COMPILE_ONCE = textwrap.dedent(
    """
    import json, torch, ebflow
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = ebflow.compile_model(ebflow.dense_flow((2,)))
    ebflow.make_objective("fdssm")(model, torch.randn(3, 2)).backward()
    print(json.dumps({**counters["inductor"], **counters["aot_autograd"],
                      "seconds": model.kernels.compile_seconds, "on": ebflow.compiled.compile_cache().enabled}))
    """
)


def test_a_second_process_loads_the_compiled_graphs_from_the_disk_cache(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", _COMPILE_ONCE], env=env, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["on"] and first["fxgraph_cache_miss"] >= 2 and first.get("fxgraph_cache_hit", 0) == 0
    # the second process compiles nothing: every graph (forward and backward) comes from disk
    assert second.get("fxgraph_cache_miss", 0) == 0 and second.get("autograd_cache_miss", 0) == 0
    assert second["autograd_cache_hit"] >= 1
    print(f"compile: {first['seconds']:.1f} s, from the cache: {second['seconds']:.1f} s")


def test_compile_cache_reports_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    cache = compile_cache()
    assert cache.enabled and cache.directory == str(tmp_path)


# -- the config key and the trainer --------------------------------------------------------------
def test_compile_is_a_resumable_config_key_off_by_default(capsys):
    from ebflow.cli import main

    assert DEFAULTS["compile"] is False and "compile" in RESUMABLE_KEYS
    assert main(["configs", "--keys"]) == 0 and "compile" in capsys.readouterr().out


def _fast_compile(monkeypatch, backend):
    """The trainer's torch.compile with another backend (aot_eager: quick; or a broken one)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": backend}))


def _config(tmp_path, **extra):
    return resolve_config(
        "digits-fc",
        {**QUIET, "max_iters": 3, "epochs": None, "eval_every": 3, "checkpoint_every": 3, **extra},
    )


def test_a_compiled_run_reports_its_compile_time_inside_its_training_time(tmp_path, monkeypatch, caplog):
    _fast_compile(monkeypatch, "aot_eager")
    with caplog.at_level("INFO", logger="ebflow"), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = train(_config(tmp_path, compile=True), tmp_path / "r")
    assert not _ebflow_warnings(record)
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert 0 < results["compile_seconds"] == result.compile_seconds <= results["train_seconds"]
    assert "compile:" in caplog.text and "in the first step" in caplog.text
    # a resumed run compiles again (here: from scratch; Inductor's cache serves it across
    # processes, see above) and adds that time to the run's
    more = train(None, tmp_path / "r", resume=True, overrides={"max_iters": 4})
    assert result.compile_seconds < more.compile_seconds <= more.train_seconds
    eager = train(_config(tmp_path), tmp_path / "e")
    assert eager.compile_seconds == 0
    assert abs(results["test_nll"] - eager.test["nll"]) < 1e-3  # the same training, to rounding


def test_a_run_whose_compilation_fails_trains_eagerly_with_one_warning(tmp_path, monkeypatch):
    def broken(graph, example_inputs):
        raise RuntimeError("no C compiler found (simulated)")

    _fast_compile(monkeypatch, broken)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = train(_config(tmp_path, compile=True), tmp_path / "r")
    (w,) = _ebflow_warnings(record)
    assert "no C compiler found (simulated)" in str(w.message)
    assert result.step == 3 and result.compile_seconds == 0
