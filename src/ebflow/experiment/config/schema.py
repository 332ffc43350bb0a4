"""The schema of a run configuration: its keys (:data:`FIELDS`, derived from their one
declaration each, the attributes of :mod:`ebflow.experiment.config.sections`), and :class:`RunConfig`,
the typed, immutable configuration the application reads.

:func:`validate_config` is the one place where values are checked: every key's type and range
(a bad value names its flat key, e.g. ``config key 'lr' must be > 0``) and the rules that join
several keys. It is also the only way to build a :class:`RunConfig`
(:meth:`RunConfig.from_dict` and :meth:`RunConfig.updated` go through it), so a ``RunConfig``
holds checked values only and code behind it does not check them again. Reading presets, files
and ``--set`` overrides is :mod:`ebflow.experiment.config.resolve`.
"""

from __future__ import annotations

import difflib
import importlib
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from ...errors import ConfigError
from ...objectives import OBJECTIVES
from ..data.datasets import IMAGE_DATASETS
from ..data.toys import TOY2D_DATASETS
from .keys import Choices, freeze, thaw
from .sections import (
    KEY_PATHS,
    MAX_SEED,
    SECTIONS,
    BookkeepingConfig,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    PreprocessingConfig,
    RuntimeConfig,
    TrainingConfig,
)

__all__ = [
    "DATASETS",
    "DEFAULTS",
    "FIELDS",
    "IMAGE_DATASETS",
    "LOSSES",
    "MAX_SEED",
    "MODELS",
    "RESUMABLE_KEYS",
    "Field",
    "RunConfig",
    "coerce_value",
    "derive_fields",
    "registry_names",
    "unknown_key",
    "validate_config",
]


@dataclass(frozen=True)
class Field:
    """One configuration key as the validation reads it, derived from its declaration in its
    section (:func:`ebflow.experiment.config.keys.key`): default, accepted types, description,
    range check and its rule text, whether null is allowed, and its choices (if any)."""

    default: Any
    types: tuple[type, ...]
    help: str
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    nullable: bool = False
    choices: tuple[str, ...] | None = None


_INT, _FLOAT = (int,), (int, float)
#: Annotation of a section attribute -> the value types its key accepts (ints for floats too).
_TYPES: dict[Any, tuple[type, ...]] = {int: _INT, float: _FLOAT, str: (str,), bool: (bool,), Mapping: (dict,)}


def _lookup(ref: str) -> Any:
    """The object named by ``"module:NAME"``."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def registry_names(choices: Choices) -> tuple[str, ...]:
    """The names of a declared choice list: a registry's keys (``"module:NAME"`` is read now)."""
    return tuple(_lookup(choices) if isinstance(choices, str) else choices)


def _value_types(hint: Any) -> tuple[tuple[type, ...], bool]:
    """The accepted types of an attribute's annotation, and whether it is nullable
    (``int | None`` -> ``((int,), True)``)."""
    args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    (base,) = [a for a in args if a is not type(None)]
    return _TYPES[get_origin(base) or base], type(None) in args


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: v in choices


def _full_match(ref: str) -> Callable[[Any], bool]:
    regex = _lookup(ref)
    return lambda v: regex.fullmatch(v) is not None


def _field(hint: Any, meta: Mapping[str, Any]) -> Field:
    """The :class:`Field` of one declaration (its annotation and its :func:`key` metadata)."""
    value_types, nullable = _value_types(hint)
    check, rule, choices = meta["check"], meta["rule"], None
    if meta["choices"] is not None:
        choices = registry_names(meta["choices"])
        check, rule = _one_of(choices), rule or "|".join(choices)
    if meta["pattern"] is not None:
        check = _full_match(meta["pattern"])
    return Field(meta["default"], value_types, meta["help"], check, rule, nullable, choices)


def derive_fields() -> dict[str, Field]:
    """Every config key's :class:`Field`, from the sections' declarations, in section order."""
    out: dict[str, Field] = {}
    for cls in SECTIONS.values():
        hints = get_type_hints(cls)
        for f in fields(cls):
            out[f.metadata["key"] or f.name] = _field(hints[f.name], f.metadata)
    return out


#: Every config key: derived from its one declaration, an attribute of its section.
FIELDS: dict[str, Field] = derive_fields()
LOSSES: tuple[str, ...] = FIELDS["loss"].choices or ()
DATASETS: tuple[str, ...] = FIELDS["data"].choices or ()
MODELS: tuple[str, ...] = FIELDS["model"].choices or ()

DEFAULTS: dict[str, Any] = {k: f.default for k, f in FIELDS.items()}

#: Keys that may change when a run is resumed (they do not change the model or the maths).
RESUMABLE_KEYS = frozenset(
    {
        "epochs",
        "max_iters",
        "max_minutes",
        "eval_every",
        "eval_every_seconds",
        "checkpoint_every",
        "log_every",
        "num_samples",
        "progress",
        "tensorboard",
        "device",
        "data_dir",
        "download",
        "max_nonfinite",
        "num_threads",
        "description",
        "grad_sync",
        "compile",
    }
)


def unknown_key(key: str) -> ConfigError:
    """The error for a key that is not in :data:`FIELDS` (with the closest one, if any)."""
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (see `ebflow configs --keys`)")


def coerce_value(key: str, value: Any) -> Any:
    """``value`` checked (type, range) and normalised for ``key``; a bad one raises a
    :class:`~ebflow.errors.ConfigError` that names the key."""
    f = FIELDS[key]
    if value is None:
        if f.nullable:
            return None
        raise ConfigError(f"config key {key!r} may not be null")
    if isinstance(value, Mapping) and dict not in f.types:
        raise ConfigError(
            f"config key {key!r} must be {_type_names(f)}, got a mapping {dict(value)!r}; "
            f"a value per objective goes in per_loss: {{loss: {{{key}: value}}}}"
        )
    if isinstance(value, bool) and bool not in f.types:
        raise ConfigError(f"config key {key!r} must be {_type_names(f)}, got a boolean {value!r}")
    if isinstance(value, str) and (f.types == _FLOAT or f.types == _INT or float in f.types):
        value = _number_from_text(value)  # YAML 1.1 reads "1e-4" as a string
    if f.types == _FLOAT and isinstance(value, int):
        value = float(value)
    if f.types == _INT and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, f.types):
        raise ConfigError(
            f"config key {key!r} must be {_type_names(f)}, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key!r} must be finite, got {value!r}")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ConfigError(f"config key {key!r} is out of range ({f.rule or 'a 64-bit integer'}), got {value}")
    if f.check is not None:
        try:
            ok = f.check(value)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"config key {key!r} must be {f.rule}, got {value!r}")
    return dict(value) if isinstance(value, Mapping) else value


def _number_from_text(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _type_names(f: Field) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping"}
    out = " or ".join(dict.fromkeys(names[t] for t in f.types))
    return out + (" or null" if f.nullable else "")


_VALIDATION = object()  # the token that only validate_config hands to RunConfig


def validate_config(config: Mapping[str, Any]) -> RunConfig:
    """Check every key and value of a flat mapping of config keys (missing keys take their
    default) and the rules that join several keys; return the :class:`RunConfig`."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(config).__name__}")
    out = dict(DEFAULTS)
    for key, value in config.items():
        if key not in FIELDS:
            raise unknown_key(str(key))
        out[key] = coerce_value(key, value)
    if out["data"] == "points" and not out["data_file"]:
        raise ConfigError("config key 'data_file' must name a .npy file when data is 'points'")
    if out["per_loss"]:
        out["per_loss"] = {
            loss: {k: coerce_value(k, v) for k, v in inner.items()} for loss, inner in out["per_loss"].items()
        }
    if (
        not out["map"]
        and OBJECTIVES[out["loss"]].perturbs_input
        and not out["drop_out_of_domain"]
        and out["data"] in IMAGE_DATASETS
    ):
        raise ConfigError(
            f"{out['loss']} without MaP (map=false) perturbs pixels out of the logit's domain (0, 1); "
            "set drop_out_of_domain=true to drop those examples from the loss (the paper's ablation), "
            "or train with map=true"
        )
    if out["data"] in TOY2D_DATASETS and out["loss"] == "dsm" and out["sigma"] > out["toy_noise"]:
        raise ConfigError(
            f"dsm on 2-D toy data perturbs the clean training points by sigma ({out['sigma']:g}) "
            f"and adds the rest of the smoothing noise toy_noise ({out['toy_noise']:g}); sigma "
            "must not exceed toy_noise (sigma = toy_noise: the reference's exact DSM target)"
        )
    if out["epochs"] is None and out["max_iters"] is None and out["max_minutes"] is None:
        raise ConfigError("set at least one of the config keys 'epochs', 'max_iters', 'max_minutes'")
    sections = {
        name: cls(**{attr: freeze(out[key]) for key, (where, attr) in KEY_PATHS.items() if where == name})
        for name, cls in SECTIONS.items()
    }
    return RunConfig(**sections, _built_by=_VALIDATION)


@dataclass(frozen=True)
class RunConfig:
    """A validated run configuration in typed, immutable sections (:mod:`ebflow.experiment.config.sections`):
    ``config.optim.lr``, ``config.model.blocks``, ``config.objective.loss`` ...

    Built only by :func:`validate_config` (also :meth:`from_dict`, :meth:`updated` and
    :func:`~ebflow.experiment.config.resolve.resolve_config`); constructing one directly, or with
    :func:`dataclasses.replace`, raises ``TypeError``. :meth:`to_dict` gives the flat key/value
    form that ``config.yaml`` and checkpoints hold; ``from_dict(c.to_dict()) == c``.
    """

    runtime: RuntimeConfig
    data: DataConfig
    preprocessing: PreprocessingConfig
    model: ModelConfig
    objective: ObjectiveConfig
    optim: OptimConfig
    training: TrainingConfig
    bookkeeping: BookkeepingConfig
    _built_by: InitVar[object] = None

    def __post_init__(self, _built_by: object) -> None:
        if _built_by is not _VALIDATION:
            raise TypeError(
                "a RunConfig is built by validate_config (or RunConfig.from_dict, "
                "RunConfig.updated), which checks every value; not directly"
            )

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> RunConfig:
        """The validated config of a flat mapping of keys (a preset, ``config.yaml``, a
        checkpoint's ``config``); the same as :func:`validate_config`."""
        return validate_config(config)

    def to_dict(self) -> dict[str, Any]:
        """Every flat key and its value, in :data:`FIELDS` order (plain dicts for mappings)."""
        return {key: thaw(getattr(getattr(self, KEY_PATHS[key][0]), KEY_PATHS[key][1])) for key in FIELDS}

    def updated(self, changes: Mapping[str, Any] | None = None, /, **values: Any) -> RunConfig:
        """This config with some flat keys changed (``updated(map=False)``), validated again.
        The ``per_loss`` recipe is not applied again (:func:`~ebflow.experiment.config.resolve.resolve_config`
        applies it once, for the loss it resolves)."""
        return validate_config({**self.to_dict(), **(changes or {}), **values})


def _check_sections() -> None:
    """RunConfig holds the sections (checked once, at import; each section attribute is one key
    by construction: :data:`FIELDS` and :data:`KEY_PATHS` come from the same declarations)."""
    if tuple(f.name for f in fields(RunConfig)) != tuple(SECTIONS):
        raise TypeError("RunConfig's attributes must be the sections of ebflow.experiment.config.sections")


_check_sections()
