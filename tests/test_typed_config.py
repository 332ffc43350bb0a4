"""The typed run configuration: RunConfig's sections cover the flat keys exactly, round-trip
through the flat form that config.yaml and checkpoints hold, are immutable, and are built only
by the validation (which still names the flat key of a bad value)."""

from __future__ import annotations

import ast
import copy
import dataclasses
import pickle
from pathlib import Path

import pytest
import yaml

from ebflow.errors import ConfigError
from ebflow.experiment.config.keys import FrozenMapping
from ebflow.experiment.config.resolve import dump_config, list_presets, resolve_config
from ebflow.experiment.config.schema import DATASETS, FIELDS, LOSSES, RunConfig, validate_config
from ebflow.experiment.config.sections import KEY_PATHS, SECTIONS
from ebflow.experiment.data import datasets as data_module

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ebflow"
PRESETS = sorted(list_presets())


def test_every_key_is_exactly_one_section_attribute():
    assert set(KEY_PATHS) == set(FIELDS)
    attributes = [(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    assert len(attributes) == len(set(attributes)) == len(FIELDS)
    assert sorted(KEY_PATHS.values()) == sorted(attributes)
    assert [f.name for f in dataclasses.fields(RunConfig)] == list(SECTIONS)
    config = resolve_config("mnist-fc")
    flat = config.to_dict()
    for key, (section, attr) in KEY_PATHS.items():
        assert isinstance(getattr(config, section), SECTIONS[section])
        assert getattr(getattr(config, section), attr) == flat[key], key
    # the two attributes that do not repeat their section's name
    assert KEY_PATHS["data"] == ("data", "dataset") and KEY_PATHS["model"] == ("model", "family")


@pytest.mark.parametrize("preset", PRESETS)
def test_flat_round_trip_of_every_preset_and_objective(preset):
    for loss in LOSSES:
        config = resolve_config(preset, {"loss": loss})
        flat = config.to_dict()
        assert list(flat) == list(FIELDS)  # schema order, as config.yaml and checkpoints hold it
        assert RunConfig.from_dict(flat) == config == validate_config(flat)
        assert validate_config(yaml.safe_load(dump_config(config))) == config  # config.yaml
        assert dump_config(config) == dump_config(flat)
        assert pickle.loads(pickle.dumps(config)) == config and copy.deepcopy(config) == config
        assert hash(config) == hash(RunConfig.from_dict(flat))
        assert all(type(v) is dict for v in flat.values() if isinstance(v, dict | FrozenMapping))


def test_an_old_flat_config_loads_with_defaults():
    old = {"name": "old", "loss": "ssm", "max_iters": 10, "parameterization": "lu", "grad_clip": 2}
    config = RunConfig.from_dict(old)
    assert config.model.parameterization == "lu" and config.runtime.name == "old"
    assert config.optim.grad_clip == 2.0 and config.model.blocks == FIELDS["blocks"].default
    with pytest.raises(ConfigError, match="unknown config key 'parameterisation'"):
        RunConfig.from_dict({**old, "parameterisation": "lu"})  # the unreleased spelling is gone


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_a_bad_value_names_its_flat_key(key):
    config = resolve_config("digits-fc")
    with pytest.raises(ConfigError, match=repr(key)):
        config.updated({key: [1, 2]})  # a list is no key's type
    with pytest.raises(ConfigError, match=repr(key)):
        RunConfig.from_dict({**config.to_dict(), key: [1, 2]})


def test_updated_validates_again_and_keeps_the_cross_key_rules():
    config = resolve_config("mnist-fc")
    assert config.updated(lr=3e-4).optim.lr == 3e-4 and config.optim.lr == 1e-4
    assert config.updated({"map": False}, loss="ml").preprocessing.map is False
    with pytest.raises(ConfigError, match="'lr'"):
        config.updated(lr=0)
    with pytest.raises(ConfigError, match="drop_out_of_domain"):
        config.updated(loss="dsm", map=False)
    with pytest.raises(ConfigError, match="max_iters"):
        config.updated(epochs=None)
    with pytest.raises(ConfigError, match="did you mean 'sigma'"):
        config.updated(sigmaa=1.0)


def test_the_config_is_immutable():
    config = resolve_config("mnist-fc", {"loss": "fdssm"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim = config.optim  # type: ignore[misc]
    for section in SECTIONS:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(config, section), dataclasses.fields(SECTIONS[section])[0].name, None)
    per_loss = config.objective.per_loss
    assert isinstance(per_loss, FrozenMapping) and isinstance(per_loss["fdssm"], FrozenMapping)
    with pytest.raises(TypeError):
        per_loss["ml"] = {}  # type: ignore[index]
    flat = config.to_dict()
    flat["lr"] = 1.0
    flat["per_loss"]["fdssm"]["grad_clip"] = 1.0
    assert config.optim.lr == 1e-4 and config.objective.per_loss["fdssm"]["grad_clip"] == 5.0


def test_a_misspelt_attribute_is_an_attribute_error():
    config = resolve_config("digits-fc")
    with pytest.raises(AttributeError):
        config.optim.learning_rate  # noqa: B018
    with pytest.raises(AttributeError):
        config.lr  # noqa: B018  -- the flat keys live in sections
    with pytest.raises(TypeError):
        config["lr"]  # type: ignore[index]


def test_only_the_validation_builds_a_run_config():
    config = resolve_config("digits-fc")
    sections = {name: getattr(config, name) for name in SECTIONS}
    with pytest.raises(TypeError, match="validate_config"):
        RunConfig(**sections)
    with pytest.raises(TypeError, match="validate_config"):
        dataclasses.replace(config, optim=config.optim)


def test_every_data_set_of_the_schema_has_a_loader():
    assert tuple(data_module.LOADERS) == DATASETS


def _flat_key_reads(path: Path) -> list[str]:
    """``config["lr"]`` / ``config.get("lr")`` reads of flat keys on a name holding 'config'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        target, key = None, None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            target, key = node.value, node.slice.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            target, key = node.func.value, node.args[0].value
        name = ast.unparse(target) if target is not None else ""
        if key in FIELDS and "config" in name.lower():
            found.append(f"{path.name}:{node.lineno}: {name}[{key!r}]")
    return found


def test_the_application_reads_the_typed_config_not_flat_keys():
    modules = [*(PACKAGE / "experiment").glob("*.py"), *(PACKAGE / "cli").glob("*.py")]
    assert not [hit for m in sorted(modules) for hit in _flat_key_reads(m)]
