"""Each config key is declared once (its section attribute), FIELDS is derived from the
declarations, every choice list is its registry, ``per_loss`` is the only per-objective
mechanism, the unreleased compatibility shims are gone, and the trainer's counters are one
:class:`TrainState` that checkpoints and results read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import get_args

import pytest

import ebflow.experiment.training.loop as trainer_module
from ebflow import architectures, prior, utils
from ebflow.errors import ConfigError
from ebflow.experiment.config import builders, schema, sections
from ebflow.experiment.config.keys import key
from ebflow.experiment.config.resolve import parse_overrides, resolve_config
from ebflow.experiment.config.schema import FIELDS, derive_fields, validate_config
from ebflow.experiment.config.sections import KEY_PATHS, SECTIONS
from ebflow.experiment.data import datasets
from ebflow.experiment.parallel import gradient_sync
from ebflow.experiment.rundir.checkpoint import load_checkpoint
from ebflow.experiment.training import step
from ebflow.experiment.training.run import TrainResult, train
from ebflow.experiment.training.state import TrainState
from ebflow.layers import CONDITIONER_ACTIVATIONS, ActNorm, Dense
from ebflow.layers.affine import ACTNORM_SCALES
from ebflow.layers.dense import PARAMETERIZATIONS, Parameterization
from ebflow.layers.shift_scale_coupling import SHIFT_ACTIVATIONS
from ebflow.objectives import OBJECTIVES
from ebflow.objectives.toolkit import PROJECTIONS, Projection

QUIET = dict(tensorboard=False, progress=False, num_threads=1, num_samples=4)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# -- one declaration per key -------------------------------------------------------------------
def test_every_section_attribute_is_a_key_and_every_key_a_section_attribute():
    attributes = {(s, f.name): f for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert sorted(KEY_PATHS.values()) == sorted(attributes) and len(FIELDS) == len(attributes)
    for flat, path in KEY_PATHS.items():
        meta = attributes[path].metadata
        f = FIELDS[flat]
        assert (f.default, f.help) == (meta["default"], meta["help"]) and f.help, flat
        assert f.default is None or f.nullable or isinstance(f.default, f.types), flat
    assert schema.DEFAULTS == {k: f.default for k, f in FIELDS.items()}


def test_a_key_is_added_by_its_declaration_alone(monkeypatch):
    """A planted attribute shows up in FIELDS with its default, types, nullability and check."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Extra:
        warmup_steps: int | None = key(None, "steps of LR warm-up", check=lambda v: v > 0, rule="> 0")
        schedule: str = key("cosine", "LR schedule", choices=("cosine", "linear"))

    monkeypatch.setitem(SECTIONS, "extra", Extra)
    derived = derive_fields()
    assert set(derived) == set(FIELDS) | {"warmup_steps", "schedule"}
    assert derived["warmup_steps"].types == (int,) and derived["warmup_steps"].nullable
    assert derived["warmup_steps"].check(3) and not derived["warmup_steps"].check(0)
    assert derived["schedule"].choices == ("cosine", "linear") and derived["schedule"].rule == "cosine|linear"
    assert sections._key_paths()["warmup_steps"] == ("extra", "warmup_steps")


def test_an_undeclared_section_attribute_stops_the_derivation(monkeypatch):
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Undeclared:
        temperature: float

    monkeypatch.setitem(SECTIONS, "undeclared", Undeclared)
    with pytest.raises(TypeError, match="temperature"):
        sections._key_paths()


def test_value_types_come_from_the_annotation():
    assert FIELDS["lr"].types == (int, float) and not FIELDS["lr"].nullable
    assert FIELDS["batch_size"].types == (int,) and FIELDS["map"].types == (bool,)
    assert FIELDS["epochs"].nullable and FIELDS["max_minutes"].types == (int, float)
    assert FIELDS["per_loss"].types == (dict,) and FIELDS["per_loss"].nullable
    assert FIELDS["grad_clip"].types == (int, float) and FIELDS["grad_clip"].nullable


# -- choice lists are their registries ---------------------------------------------------------
REGISTRIES = {
    "loss": lambda: OBJECTIVES,
    "data": lambda: datasets.LOADERS,
    "model": lambda: builders.MODEL_FAMILIES,
    "optimizer": lambda: builders.OPTIMIZERS,
    "weight_init": lambda: builders.WEIGHT_INITS,
    "prior": lambda: prior.PRIORS,
    "parameterization": lambda: architectures.DENSE_FLOW_PARAMETERIZATIONS,
    "conditioner": lambda: architectures.CONDITIONERS,
    "shift_activation": lambda: SHIFT_ACTIVATIONS,
    "actnorm_scale": lambda: ACTNORM_SCALES,
    "glow_activation": lambda: CONDITIONER_ACTIVATIONS,
    "glow_split_activation": lambda: CONDITIONER_ACTIVATIONS,
    "projection": lambda: PROJECTIONS,
    "grad_sync": lambda: gradient_sync.GRAD_SYNC_MODES,
}


@pytest.mark.parametrize("name", sorted(REGISTRIES))
def test_each_choice_list_is_its_registry(name):
    assert FIELDS[name].choices == tuple(REGISTRIES[name]()), name
    assert FIELDS[name].rule == "|".join(FIELDS[name].choices)


def test_every_key_with_a_fixed_set_of_values_takes_it_from_a_registry():
    with_choices = {k for k, f in FIELDS.items() if f.choices is not None}
    assert with_choices == set(REGISTRIES) | {"dtype"}  # dtype: the two float types torch trains in


@pytest.mark.parametrize(
    "name, registry",
    [
        ("optimizer", builders.OPTIMIZERS),
        ("model", builders.MODEL_FAMILIES),
        ("data", datasets.LOADERS),
        ("loss", OBJECTIVES),
        ("prior", prior.PRIORS),
    ],
)
def test_a_new_registry_entry_is_a_new_choice(monkeypatch, name, registry):
    """A choice list typed again next to the registry would miss the planted entry."""
    monkeypatch.setitem(registry, "planted", next(iter(registry.values())))
    assert "planted" in derive_fields()[name].choices


def test_registries_named_by_reference_are_read_when_the_schema_is_derived(monkeypatch):
    monkeypatch.setattr(builders, "WEIGHT_INITS", (*builders.WEIGHT_INITS, "planted"))
    monkeypatch.setattr(gradient_sync, "GRAD_SYNC_MODES", (*gradient_sync.GRAD_SYNC_MODES, "planted"))
    derived = derive_fields()
    assert "planted" in derived["weight_init"].choices and "planted" in derived["grad_sync"].choices


def test_library_choice_lists_follow_their_types_and_builders():
    assert PROJECTIONS == get_args(Projection)
    assert PARAMETERIZATIONS == get_args(Parameterization)
    assert architectures.DENSE_FLOW_PARAMETERIZATIONS == (*PARAMETERIZATIONS, "triangular_pair")
    for p in FIELDS["parameterization"].choices:  # every choice builds
        assert architectures.dense_flow((3,), parameterization=p).event_shape == (3,)
    spec = OBJECTIVES["ssm"].checks["projection"]
    for p in FIELDS["projection"].choices:
        spec(p)
    with pytest.raises(ConfigError):
        spec("uniform")


def test_the_device_key_is_checked_by_the_device_pattern():
    for ok in ("auto", "cpu", "cuda", "cuda:3"):
        assert validate_config({"max_iters": 1, "device": ok}).runtime.device == ok
    with pytest.raises(ConfigError, match=r"'device' must be auto\|cpu\|cuda\|cuda:N"):
        validate_config({"max_iters": 1, "device": "gpu"})


# -- per_loss is the only per-objective mechanism -------------------------------------------------
def test_a_grad_clip_mapping_is_refused_with_a_pointer_to_per_loss():
    for bad in (
        {"max_iters": 1, "grad_clip": {"fdssm": 5}},
        {"max_iters": 1, "per_loss": {"fdssm": {"grad_clip": {"fdssm": 5}}}},
    ):
        with pytest.raises(ConfigError, match=r"'grad_clip'.*per_loss: \{loss: \{grad_clip: value\}\}"):
            validate_config(bad)
    with pytest.raises(ConfigError, match="per_loss"):
        parse_overrides(["grad_clip={fdssm: 5}"])
    with pytest.raises(ConfigError, match="per_loss"):
        resolve_config("digits-fc", {"grad_clip": {"fdssm": 5.0}})


@pytest.mark.parametrize(
    "preset, clips",
    [
        ("digits-fc", {"fdssm": 5.0}),
        ("toy2d-sine", {"ml": 1.0, "ssm": 0.5, "dsm": 0.5, "fdssm": 0.5}),
        ("toy2d-swirl", {"ml": 1.0, "sml": 10.0, "ssm": 5.0, "dsm": 5.0, "fdssm": 1.25}),
        ("toy2d-checkerboard", {"ml": 10.0, "sml": 10.0, "ssm": 5.0, "dsm": 5.0, "fdssm": 5.0}),
    ],
)
def test_per_loss_grad_clip_applies_to_its_objective_only(preset, clips):
    """The presets that had a grad_clip mapping give every objective the same clip as before."""
    for loss in OBJECTIVES:
        config = resolve_config(preset, {"loss": loss})
        assert config.optim.grad_clip == clips.get(loss), (preset, loss)
    assert resolve_config(preset, {"loss": "fdssm", "grad_clip": 2}).optim.grad_clip == 2.0  # --set wins


@pytest.mark.parametrize("loss, clip", [("fdssm", 5.0), ("ssm", None)])
def test_a_preset_with_a_per_loss_clip_clips_the_training_steps_of_that_loss_only(
    tmp_path, monkeypatch, loss, clip
):
    seen: list[float | None] = []
    real = trainer_module.optimization_step

    def spy(model, objective, optimizer, x, grad_clip=None, **kw):
        seen.append(grad_clip)
        return real(model, objective, optimizer, x, grad_clip, **kw)

    monkeypatch.setattr(trainer_module, "optimization_step", spy)
    config = resolve_config(
        "digits-fc",
        {**QUIET, "loss": loss, "max_iters": 2, "epochs": None, "eval_every": 2, "checkpoint_every": 2},
    )
    train(config, tmp_path / "r", final_outputs=False)
    assert seen == [clip, clip]


# -- the unreleased shims are gone ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "owner, name",
    [
        (utils, "renamed_keyword"),
        (Dense, "parameterisation"),
        (ActNorm, "initialize_from"),
        (step, "optimisation_step"),
        (schema, "RENAMED_KEYS"),
        (schema, "grad_clip_for"),
        (architectures, "PARAMETERISATIONS"),
    ],
)
def test_the_unreleased_compatibility_shims_are_gone(owner, name):
    assert not hasattr(owner, name)
    with pytest.raises(TypeError):
        Dense(3, parameterisation="lu")  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="unknown config key"):
        parse_overrides(["parameterisation=lu"])


# -- one TrainState ----------------------------------------------------------------------------------
CHECKPOINT_COUNTERS = {
    "step",
    "epoch",
    "batch_in_epoch",
    "train_seconds",
    "compile_seconds",
    "skipped_steps",
    "consecutive_nonfinite",
    "dropped_examples",
    "seen_examples",
    "best_val_nll",
    "run_id",
    "device_type",
}


def test_checkpoints_keep_their_keys_and_read_back_into_a_train_state(tmp_path):
    config = resolve_config(
        "digits-fc", {**QUIET, "max_iters": 3, "epochs": None, "eval_every": 3, "checkpoint_every": 3}
    )
    result = train(config, tmp_path / "r")
    state = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert {f.name for f in dataclasses.fields(TrainState)} == CHECKPOINT_COUNTERS <= set(state)
    counters = TrainState.from_checkpoint(state)
    assert counters == TrainState(**{k: getattr(result, k) for k in CHECKPOINT_COUNTERS})
    assert counters.step == 3 and counters.seen_examples == 300 and counters.run_id
    # results.json's counters and throughput are the TrainResult's, computed once
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert {k: results[k] for k in result.run_metrics()} == result.run_metrics()


def test_an_older_checkpoint_without_the_later_counters_loads_and_a_missing_counter_fails():
    old = {
        "step": 7,
        "epoch": 1,
        "batch_in_epoch": 2,
        "train_seconds": 1.5,
        "skipped_steps": 0,
        "consecutive_nonfinite": 0,
        "best_val_nll": 3.25,
    }
    state = TrainState.from_checkpoint(old)
    assert (state.step, state.seen_examples, state.dropped_examples, state.run_id) == (7, 0, 0, None)
    assert isinstance(state.train_seconds, float) and isinstance(state.step, int)
    del old["batch_in_epoch"]
    with pytest.raises(KeyError, match="batch_in_epoch"):
        TrainState.from_checkpoint(old)


def test_train_result_derives_its_metrics_from_the_counters():
    r = TrainResult(
        step=10,
        train_seconds=2.0,
        seen_examples=40,
        dropped_examples=10,
        run_dir=Path("r"),
        world_size=2,
        global_batch=8,
    )
    assert (r.ms_per_iter, r.examples_per_second, r.batch_per_process, r.dropped_fraction) == (
        200.0,
        40.0,
        4,
        0.25,
    )
    assert TrainResult(run_dir=r.run_dir).run_metrics()["examples_per_s"] is None
