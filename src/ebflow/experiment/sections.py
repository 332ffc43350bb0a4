"""The typed sections of a run configuration: frozen dataclasses, one attribute per config key.

A run configuration is read by the application as a :class:`~ebflow.experiment.schema.RunConfig`
made of these sections (``config.optim.lr``, ``config.model.blocks``, ...), built only by
:func:`~ebflow.experiment.schema.validate_config`, which checks every value once. Users still
write the flat keys (YAML files, ``--set key=value``); :data:`KEY_PATHS` says where each flat key
lives. The attribute is the key's own name, except ``data`` (``config.data.dataset``) and
``model`` (``config.model.family``), which would repeat their section's name.

This module holds types only: it imports nothing from the application, so that the builders can
take a section (:class:`ModelConfig`, :class:`ObjectiveConfig`, ...) without an import cycle.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["KEY_PATHS", "SECTIONS", "BookkeepingConfig", "DataConfig", "FrozenMapping",
           "ModelConfig", "ObjectiveConfig", "OptimConfig", "PreprocessingConfig", "RuntimeConfig",
           "TrainingConfig", "freeze", "thaw"]


class FrozenMapping(Mapping[str, Any]):
    """A read-only mapping (the values of ``grad_clip`` and ``per_loss``): equal to a dict with
    the same items, hashable and picklable."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        self._items = {k: freeze(v) for k, v in (items or {}).items()}

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMapping({self._items!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return FrozenMapping, (self._items,)


def freeze(value: Any) -> Any:
    """A mapping (nested ones too) as a :class:`FrozenMapping`; any other value as it is."""
    return value if isinstance(value, FrozenMapping) or not isinstance(value, Mapping) else FrozenMapping(value)


def thaw(value: Any) -> Any:
    """The plain-``dict`` form of :func:`freeze`'s result (for YAML and checkpoints)."""
    return {k: thaw(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _key(name: str) -> Any:
    """A section attribute whose flat config key is ``name``."""
    return field(metadata={"key": name})


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Identity and runtime: what the run is called, its seed, where and how it computes."""

    name: str
    description: str
    seed: int
    device: str
    num_threads: int | None


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The data set, where it comes from and how it is split."""

    dataset: str = _key("data")
    data_dir: str | None
    data_file: str | None
    download: bool
    val_size: int | None
    max_train: int | None
    max_eval: int | None
    toy_points: int
    toy_noise: float
    toy_train_size: int
    toy_eval_size: int
    data_seed: int


@dataclass(frozen=True, kw_only=True)
class PreprocessingConfig:
    """The image preprocessing (dequantisation, logit) and whether the loss sees its output."""

    map: bool
    logit_smoothness: float
    logit_shift: float
    num_bins: int | None


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model family, its sizes and its precision."""

    family: str = _key("model")
    dtype: str
    num_layers: int
    parameterization: str
    bias: bool
    prior: str
    weight_init: str
    actnorm: bool
    alpha: float
    blocks: int
    hidden: int
    depth: int
    conditioner: str
    shift_activation: str
    weight_norm: bool
    convs_per_block: int
    kernel_size: int
    spectral_norm: bool
    levels: int
    steps: int
    glow_activation: str
    glow_split_activation: str | None
    glow_output_scale: bool
    glow_alternate: bool
    glow_train_actnorm: bool


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """The training objective and its options (and the per-objective recipe table)."""

    loss: str
    sigma: float
    eps: float
    slices: int
    projection: str
    sml_samples: int | None
    energy_reg: float
    drop_out_of_domain: bool
    per_loss: Mapping[str, Mapping[str, Any]] | None


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimizer, its learning-rate schedule, gradient clipping and the EMA of the weights."""

    optimizer: str
    lr: float
    weight_decay: float
    lr_decay: float
    lr_decay_epochs: int
    grad_clip: float | Mapping[str, float] | None
    ema_decay: float
    ema_warmup: bool


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """The training loop: batches, when to stop, augmentation, failures, gradient averaging."""

    batch_size: int
    epochs: int | None
    max_iters: int | None
    max_minutes: float | None
    augment: bool
    max_nonfinite: int
    grad_sync: str


@dataclass(frozen=True, kw_only=True)
class BookkeepingConfig:
    """Evaluation, checkpoints, logs and the final samples."""

    eval_batch_size: int
    eval_every: int
    checkpoint_every: int
    log_every: int
    num_samples: int
    progress: bool
    tensorboard: bool


#: The sections of a run configuration: attribute of :class:`~ebflow.experiment.schema.RunConfig`
#: -> its type.
SECTIONS: dict[str, type] = {
    "runtime": RuntimeConfig, "data": DataConfig, "preprocessing": PreprocessingConfig,
    "model": ModelConfig, "objective": ObjectiveConfig, "optim": OptimConfig,
    "training": TrainingConfig, "bookkeeping": BookkeepingConfig,
}


def _key_paths() -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            key = f.metadata.get("key", f.name)
            if key in out:
                raise TypeError(f"config key {key!r} is in two sections: {out[key][0]} and {section}")
            out[key] = (section, f.name)
    return out


#: Flat config key -> (section, attribute): ``"lr"`` -> ``("optim", "lr")``.
KEY_PATHS: dict[str, tuple[str, str]] = _key_paths()
