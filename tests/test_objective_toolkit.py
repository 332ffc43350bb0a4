"""Extending the objectives: an objective written outside the package with public API only
(``examples/custom_objective.py``), the registry's rules, and the wiring of every built-in
objective's options to config keys."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from ebflow.errors import ConfigError
from ebflow.experiment.config.builders import build_objective, option_key
from ebflow.experiment.config.resolve import resolve_config
from ebflow.experiment.config.schema import FIELDS
from ebflow.objectives import DEFAULTS, OBJECTIVES, ObjectiveSpec, make_objective, register_objective

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_objective.py"
LIBRARY = Path(__file__).resolve().parents[1] / "src" / "ebflow" / "objectives" / "losses.py"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def _registry_restored():
    """The example registers an objective: the other test modules see the built-in table."""
    saved, saved_defaults = dict(OBJECTIVES), dict(DEFAULTS)
    yield
    OBJECTIVES.clear(), OBJECTIVES.update(saved)
    DEFAULTS.clear(), DEFAULTS.update(saved_defaults)


def _load_example():
    spec = importlib.util.spec_from_file_location("custom_objective_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _private_uses(path: Path) -> list[str]:
    """Every ``obj._name`` attribute access and every import of a private ebflow name or module."""
    tree = ast.parse(path.read_text())
    found = [
        f"line {n.lineno}: .{n.attr}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
    ]
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith(("ebflow", ".")):
            names = [a.name for a in n.names] + n.module.split(".")
            found += [f"line {n.lineno}: import {name}" for name in names if name.startswith("_")]
    return found


def test_the_example_objective_uses_public_api_only_and_trains():
    assert _private_uses(EXAMPLE) == []
    module = _load_example()
    result = module.main(steps=150)
    assert result["nll_after"] < result["nll_before"] - 1.0


def test_built_in_objectives_use_no_private_model_method():
    """The toolkit is what the built-in objectives use: no ``model._...`` call is left."""
    uses = [u for u in _private_uses(LIBRARY) if "one_weight_per_loss" not in u]
    assert uses == []


def test_the_example_objective_is_its_formula():
    module = _load_example()
    from ebflow import EBFlow
    from ebflow.layers import Dense, SmoothLeakyReLU

    torch.manual_seed(0)
    model = EBFlow([Dense(3), SmoothLeakyReLU(0.3), Dense(3)], (3,)).double()
    x, eps = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    got = make_objective("multiscale_dsm", sigma_min=0.1, sigma_max=0.8)(model, x, noise=eps)
    sigma = module.noise_ladder(6, 0.1, 0.8, x).view(-1, 1)
    xt = (x + sigma * eps).requires_grad_(True)
    (grad,) = torch.autograd.grad(model.energy(xt).sum(), xt)
    expected = (0.5 * (sigma * grad - eps).pow(2).sum(1) / 3).mean()
    torch.testing.assert_close(got.detach(), expected)
    assert sigma[0].item() == pytest.approx(0.1) and sigma[5].item() == pytest.approx(0.8)


def test_register_objective_refuses_bad_specs_and_taken_names():
    spec = OBJECTIVES["dsm"]
    with pytest.raises(ConfigError, match="exists"):
        register_objective("dsm", spec)
    with pytest.raises(ConfigError, match="identifier"):
        register_objective("my objective", spec)
    with pytest.raises(ConfigError, match="one check per option"):
        ObjectiveSpec(spec.fn, {"sigma": 0.1}, {})
    with pytest.raises(ConfigError, match="noise kind"):
        ObjectiveSpec(spec.fn, {}, {}, noise="uniform")


def test_every_option_of_every_built_in_objective_is_a_config_key():
    for name, spec in OBJECTIVES.items():
        for option in spec.defaults:
            assert option_key(option) in FIELDS, f"{name}: option {option!r} has no config key"


def test_an_option_without_a_config_key_fails_loudly(monkeypatch):
    """build_objective must not fall back to an option's default when its key is missing."""
    spec = OBJECTIVES["dsm"]
    monkeypatch.setitem(
        OBJECTIVES,
        "dsm",
        ObjectiveSpec(
            spec.fn,
            {**spec.defaults, "temperature": 1.0},
            {**spec.checks, "temperature": lambda v: None},
            noise=spec.noise,
            perturbs_input=True,
        ),
    )
    with pytest.raises(ConfigError, match="temperature"):
        build_objective(resolve_config("digits-fc", {"loss": "dsm"}).objective)


def test_config_options_reach_the_objective():
    objective = build_objective(resolve_config("digits-fc", {"loss": "dsm", "sigma": 0.37}).objective)
    assert objective.options["sigma"] == 0.37
    objective = build_objective(resolve_config("digits-fc", {"loss": "sml", "sml_samples": 7}).objective)
    assert objective.options["num_samples"] == 7


def test_perturbs_input_drives_the_no_map_rule():
    assert {n for n, s in OBJECTIVES.items() if s.perturbs_input} >= {"dsm", "fdssm"}
    with pytest.raises(ConfigError, match="drop_out_of_domain"):
        resolve_config("mnist-fc", {"loss": "fdssm", "map": False})
    resolve_config("mnist-fc", {"loss": "ssm", "map": False})  # SSM evaluates the data only
