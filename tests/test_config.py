"""Config presets, overrides and validation (unknown keys, out-of-range values)."""

from __future__ import annotations

import pytest

from ebflow.errors import ConfigError
from ebflow.experiment.config.resolve import list_presets, load_preset, parse_overrides, resolve_config
from ebflow.experiment.config.schema import FIELDS, validate_config

PRESETS = [
    "toy2d-sine",
    "toy2d-swirl",
    "toy2d-checkerboard",
    "mm10-full",
    "mm10-tril",
    "mm10-triu",
    "mm10-lu",
    "digits-fc",
    "mnist-fc",
    "mnist-cnn",
    "mnist-glow",
    "mnist-glow-small",
    "mnist-mosaic2-fc",
    "mnist-mosaic3-fc",
    "cifar-fc",
    "cifar-cnn",
]


def test_every_preset_of_the_issue_ships_with_a_description():
    presets = list_presets()
    assert sorted(presets) == sorted(PRESETS)
    assert all(desc for desc in presets.values())


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate_and_keep_their_name(name):
    config = resolve_config(name)
    assert config.runtime.name == name
    assert set(config.to_dict()) == set(FIELDS)


def test_recipes_follow_the_design():
    fc, cnn, cifar = resolve_config("mnist-fc"), resolve_config("mnist-cnn"), resolve_config("cifar-fc")
    assert (fc.optim.optimizer, fc.optim.lr, fc.training.batch_size, fc.optim.ema_decay) == (
        "rmsprop",
        1e-4,
        100,
        0.999,
    )
    assert fc.objective.sigma == fc.objective.eps == 1.0 and cnn.objective.sigma == cnn.objective.eps == 0.1
    assert fc.preprocessing.logit_smoothness == 0.5 and cnn.preprocessing.logit_smoothness == 0.75
    assert cifar.objective.energy_reg == 1.024 and fc.objective.energy_reg == 0.0
    assert fc.data.val_size == 10000 and fc.preprocessing.map is True
    assert resolve_config("mnist-fc", {"loss": "fdssm"}).optim.grad_clip == 5.0
    assert resolve_config("mnist-fc", {"loss": "ssm"}).optim.grad_clip is None
    assert resolve_config("toy2d-sine").model.dtype == "float64"
    assert resolve_config("digits-fc").preprocessing.num_bins == 17


def test_overrides_are_parsed_as_yaml_scalars():
    out = parse_overrides(["lr=3e-4", "map=false", "max_iters=10", "data_dir=2024", "val_size=null"])
    assert out == {"lr": 3e-4, "map": False, "max_iters": 10, "data_dir": "2024", "val_size": None}
    config = resolve_config("mnist-fc", out)
    assert config.optim.lr == 3e-4 and config.preprocessing.map is False


@pytest.mark.parametrize("item", ["learning_rate=1", "lrr=0.1"])
def test_unknown_override_key_is_named(item):
    with pytest.raises(ConfigError, match=repr(item.split("=")[0])):
        parse_overrides([item])


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'sigma'"):
        validate_config({**load_preset("mnist-fc"), "sigmaa": 1.0})


@pytest.mark.parametrize(
    "key, value",
    [
        ("sigma", -1.0),
        ("sigma", 0),
        ("lr", 0),
        ("lr", -1e-3),
        ("eps", -0.1),
        ("ema_decay", 1.0),
        ("batch_size", 0),
        ("loss", "mle"),
        ("data", "imagenet"),
        ("kernel_size", 4),
        ("logit_shift", 0.5),
        ("lr", float("nan")),
        ("grad_clip", {"fdsm": 5}),
        ("grad_clip", -1),
        ("lr", "fast"),
        ("batch_size", 1.5),
        ("map", 1),
        ("max_iters", True),
    ],
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
    assert config.model.family == "conv" and config.optim.lr == 0.0005 and config.runtime.name == "mine"


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


def _recipe(preset, loss, *keys):
    c = resolve_config(preset, {"loss": loss}).to_dict()  # the recipe tables name flat keys
    return tuple(c[k] for k in keys)


def test_recipes_per_objective_follow_design_4_2():
    """DESIGN §4.2: LR decay gamma / milestones (decay after each of the first milestones - 1
    epochs), weight decay, clipping and lambda per experiment *and* objective."""
    keys = ("lr_decay", "lr_decay_epochs", "weight_decay", "grad_clip", "energy_reg")
    for loss in ("ml", "sml", "ssm", "dsm"):
        assert _recipe("mnist-fc", loss, *keys) == (0.95, 49, 0.0, None, 0.0)
    assert _recipe("mnist-fc", "fdssm", *keys) == (0.95, 49, 0.0, 5.0, 0.0)
    assert _recipe("mnist-cnn", "ml", *keys) == (0.925, 49, 1e-5, None, 0.0)
    assert _recipe("mnist-cnn", "sml", *keys) == (0.925, 49, 1e-5, None, 0.0)
    assert _recipe("mnist-cnn", "ssm", *keys) == (0.95, 49, 0.0, None, 0.0)
    assert _recipe("mnist-cnn", "dsm", *keys) == (0.95, 49, 1e-5, None, 0.0)
    assert _recipe("mnist-cnn", "fdssm", *keys) == (0.95, 49, 0.0, 5.0, 0.0)
    assert _recipe("cifar-fc", "ml", *keys) == (0.7, 19, 0.0, None, 0.0)
    assert _recipe("cifar-fc", "ssm", *keys) == (0.85, 29, 0.0, None, 1.024)
    assert _recipe("cifar-fc", "dsm", *keys) == (0.85, 29, 0.0, None, 1.024)
    # the reference adds lambda*E before dividing FDSSM by eps^2: lambda * D / eps^2 here
    assert _recipe("cifar-fc", "fdssm", *keys) == (0.7, 19, 0.0, None, pytest.approx(0.001 * 3072 / 0.01))
    assert _recipe("cifar-cnn", "ml", *keys) == (0.8, 19, 0.0, None, 0.0)
    assert _recipe("cifar-cnn", "ssm", *keys) == (0.9, 19, 0.0, None, 1.024)
    assert _recipe("cifar-cnn", "fdssm", *keys)[:2] == (0.85, 49)
    for loss, sn in (("ml", True), ("sml", False), ("ssm", True), ("dsm", True), ("fdssm", False)):
        assert _recipe("cifar-cnn", loss, "spectral_norm") == (sn,)
    for preset in ("mnist-fc", "mnist-cnn", "cifar-fc", "cifar-cnn"):
        c = resolve_config(preset)
        assert (
            c.optim.optimizer,
            c.optim.lr,
            c.training.batch_size,
            c.optim.ema_decay,
            c.optim.ema_warmup,
            c.model.weight_init,
        ) == ("rmsprop", 1e-4, 100, 0.999, True, "negative_identity")
    cifar = resolve_config("cifar-fc")
    assert cifar.training.augment is True and cifar.data.val_size == 10000
    glow = resolve_config("mnist-glow", {"loss": "dsm"})
    assert (
        glow.optim.optimizer,
        glow.optim.lr,
        glow.optim.weight_decay,
        glow.optim.grad_clip,
        glow.objective.energy_reg,
        glow.preprocessing.logit_smoothness,
        glow.training.epochs,
        glow.optim.lr_decay,
        glow.objective.sigma,
    ) == ("adam", 1e-5, 0.0, 500.0, 78.4, 1.0, 80, 1.0, 0.1)
    assert _recipe("toy2d-sine", "ml", "lr", "batch_size", "max_iters") == (5e-4, 2048, 50001)
    assert _recipe("toy2d-sine", "dsm", "lr") == (1e-4,)
    assert _recipe("toy2d-swirl", "ml", "lr") == (5e-3,)
    assert _recipe("toy2d-checkerboard", "ssm", "lr", "batch_size", "max_iters") == (1e-4, 10000, 100001)
    assert _recipe("toy2d-sine", "fdssm", "eps", "toy_eval_size") == (0.1, 10000)
    assert _recipe("mm10-lu", "ml", "num_layers", "optimizer", "lr", "max_iters", "batch_size") == (
        11,
        "adam",
        1e-3,
        10001,
        2048,
    )


def test_explicit_override_beats_the_per_loss_recipe():
    assert resolve_config("mnist-cnn", {"loss": "ml"}).optim.weight_decay == 1e-5
    assert resolve_config("mnist-cnn", {"loss": "ml", "weight_decay": 0.0}).optim.weight_decay == 0.0
    with pytest.raises(ConfigError, match="per_loss"):
        resolve_config("mnist-fc", {"per_loss": {"ml": {"no_such_key": 1}}})
    with pytest.raises(ConfigError, match="per_loss"):
        resolve_config("mnist-fc", {"per_loss": {"nope": {"lr": 1}}})


def test_no_map_dsm_needs_the_drop_switch():
    with pytest.raises(ConfigError, match="drop_out_of_domain"):
        resolve_config("mnist-fc", {"loss": "dsm", "map": False})
    c = resolve_config("mnist-fc", {"loss": "fdssm", "map": False, "drop_out_of_domain": True})
    assert c.objective.drop_out_of_domain is True


@pytest.mark.parametrize(
    "key, bad",
    [
        ("num_layers", 100_000),
        ("blocks", 257),
        ("hidden", 16385),
        ("depth", 65),
        ("convs_per_block", 65),
        ("kernel_size", 65),
        ("levels", 9),
        ("steps", 257),
        ("slices", 4097),
    ],
)
def test_model_size_keys_are_bounded(key, bad):
    """A typo such as num_layers=100000 must not try to allocate tens of GB."""
    with pytest.raises(ConfigError, match=repr(key)):
        resolve_config("digits-fc", {key: bad})
