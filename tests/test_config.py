"""Config presets, overrides and validation (unknown keys, out-of-range values)."""

from __future__ import annotations

import pytest

from ebflow.config import (
    FIELDS,
    grad_clip_for,
    list_presets,
    load_preset,
    parse_overrides,
    resolve_config,
    validate_config,
)
from ebflow.errors import ConfigError

PRESETS = [
    "toy2d-sine", "toy2d-swirl", "toy2d-checkerboard", "mm10-full", "mm10-tril", "mm10-triu",
    "mm10-lu", "digits-fc", "mnist-fc", "mnist-cnn", "mnist-glow", "cifar-fc", "cifar-cnn",
]


def test_every_preset_of_the_issue_ships_with_a_description():
    presets = list_presets()
    assert sorted(presets) == sorted(PRESETS)
    assert all(desc for desc in presets.values())


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate_and_keep_their_name(name):
    config = resolve_config(name)
    assert config["name"] == name
    assert set(config) == set(FIELDS)


def test_recipes_follow_the_design():
    fc, cnn, cifar = resolve_config("mnist-fc"), resolve_config("mnist-cnn"), resolve_config("cifar-fc")
    assert (fc["optimizer"], fc["lr"], fc["batch_size"], fc["ema_decay"]) == ("rmsprop", 1e-4, 100, 0.999)
    assert fc["sigma"] == fc["eps"] == 1.0 and cnn["sigma"] == cnn["eps"] == 0.1
    assert fc["logit_smoothness"] == 0.5 and cnn["logit_smoothness"] == 0.75
    assert cifar["energy_reg"] == 0.001 and fc["energy_reg"] == 0.0
    assert fc["val_size"] == 10000 and fc["map"] is True
    assert grad_clip_for({**fc, "loss": "fdssm"}) == 5.0 and grad_clip_for({**fc, "loss": "ssm"}) is None
    assert resolve_config("toy2d-sine")["dtype"] == "float64"
    assert resolve_config("digits-fc")["num_bins"] == 17


def test_overrides_are_parsed_as_yaml_scalars():
    out = parse_overrides(["lr=3e-4", "map=false", "max_iters=10", "data_dir=2024", "val_size=null"])
    assert out == {"lr": 3e-4, "map": False, "max_iters": 10, "data_dir": "2024", "val_size": None}
    config = resolve_config("mnist-fc", out)
    assert config["lr"] == 3e-4 and config["map"] is False


@pytest.mark.parametrize("item", ["learning_rate=1", "lrr=0.1"])
def test_unknown_override_key_is_named(item):
    with pytest.raises(ConfigError, match=repr(item.split("=")[0])):
        parse_overrides([item])


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'sigma'"):
        validate_config({**load_preset("mnist-fc"), "sigmaa": 1.0})


@pytest.mark.parametrize(
    "key, value",
    [("sigma", -1.0), ("sigma", 0), ("lr", 0), ("lr", -1e-3), ("eps", -0.1), ("ema_decay", 1.0),
     ("batch_size", 0), ("loss", "mle"), ("data", "imagenet"), ("kernel_size", 4),
     ("logit_shift", 0.5), ("lr", float("nan")), ("grad_clip", {"fdsm": 5}), ("grad_clip", -1),
     ("lr", "fast"), ("batch_size", 1.5), ("map", 1), ("max_iters", True)],
)
def test_out_of_range_values_are_rejected_with_the_key(key, value):
    with pytest.raises(ConfigError, match=repr(key)):
        resolve_config("mnist-fc", {key: value})


def test_missing_stop_criterion_and_missing_points_file_are_rejected():
    with pytest.raises(ConfigError, match="max_iters"):
        resolve_config("mnist-fc", {"epochs": None})
    with pytest.raises(ConfigError, match="data_file"):
        resolve_config("mm10-full", {"data": "points"})


def test_malformed_override_and_unknown_preset():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])
    with pytest.raises(ConfigError, match="unknown preset 'mnist-fcc'"):
        resolve_config("mnist-fcc")


def test_yaml_file_may_extend_a_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: mnist-cnn\nlr: 0.0005\nname: mine\n")
    config = resolve_config(str(path))
    assert config["model"] == "conv" and config["lr"] == 0.0005 and config["name"] == "mine"


def test_yaml_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(str(bad))
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve_config(str(listed))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(str(tmp_path / "none.yaml"))


def test_yaml_is_read_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("lr: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(str(evil))
