"""The schema of a run configuration: its keys (:data:`FIELDS`), their checks, and
:class:`RunConfig`, the typed, immutable configuration the application reads.

:func:`validate_config` is the one place where values are checked: every key's type and range
(a bad value names its flat key, e.g. ``config key 'lr' must be > 0``) and the rules that join
several keys. It is also the only way to build a :class:`RunConfig`
(:meth:`RunConfig.from_dict` and :meth:`RunConfig.updated` go through it), so a ``RunConfig``
holds checked values only and code behind it does not check them again. Reading presets, files
and ``--set`` overrides is :mod:`ebflow.experiment.config`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import InitVar, dataclass, fields
from typing import Any

from ..errors import ConfigError
from ..layers import CONDITIONER_ACTIVATIONS
from ..objectives import OBJECTIVES
from .builders import MODEL_FAMILIES, OPTIMIZERS
from .distributed import DEVICE_NAME
from .sections import (
    KEY_PATHS,
    SECTIONS,
    BookkeepingConfig,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    PreprocessingConfig,
    RuntimeConfig,
    TrainingConfig,
    freeze,
    thaw,
)

__all__ = ["DATASETS", "DEFAULTS", "FIELDS", "IMAGE_DATASETS", "LOSSES", "MAX_SEED", "MODELS",
           "RENAMED_KEYS", "RESUMABLE_KEYS", "Field", "RunConfig", "coerce_value", "grad_clip_for",
           "unknown_key", "validate_config"]

LOSSES = tuple(OBJECTIVES)
TOY_DATASETS = ("toy2d-sine", "toy2d-swirl", "toy2d-checkerboard")
IMAGE_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "synthetic-mnist", "synthetic-cifar10")
DATASETS = (*TOY_DATASETS, "mm10", "points", *IMAGE_DATASETS)
MODELS = tuple(MODEL_FAMILIES)
GLOW_ACTIVATIONS = tuple(CONDITIONER_ACTIVATIONS)
MAX_SEED = 2**44 - 1  # the epoch shuffle seeds torch with seed * 1_000_003 + epoch < 2**64
MAX_TOY_SIZE = 10_000_000  # generated samples per split: 10 dims x float64 = 800 MB


@dataclass(frozen=True)
class Field:
    """One configuration key: its default, accepted types, a range check and a description."""

    default: Any
    types: tuple[type, ...]
    help: str
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    nullable: bool = False


_POS = (lambda v: v > 0, "> 0")
_NONNEG = (lambda v: v >= 0, ">= 0")
_TOY_SIZE = (lambda v: 0 < v <= MAX_TOY_SIZE, f"in [1, {MAX_TOY_SIZE}] (generated in memory)")


def _choice(options: Iterable[str]) -> Callable[[Any], bool]:
    allowed = tuple(options)
    return lambda v: v in allowed


def _grad_clip_ok(v: Any) -> bool:
    if isinstance(v, Mapping):
        return all(k in LOSSES and isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                   for k, x in v.items())
    return v > 0


def _per_loss_ok(v: Any) -> bool:
    return isinstance(v, Mapping) and all(k in LOSSES and isinstance(inner, Mapping) and all(
        key in FIELDS and key not in ("per_loss", "loss") for key in inner) for k, inner in v.items())


_INT, _FLOAT, _STR, _BOOL = (int,), (int, float), (str,), (bool,)

FIELDS: dict[str, Field] = {
    # -- identity --------------------------------------------------------------------------
    "name": Field("custom", _STR, "name of the preset / experiment"),
    "description": Field("", _STR, "one line shown by `ebflow configs`"),
    "seed": Field(0, _INT, "seed of every random number generator", lambda v: 0 <= v <= MAX_SEED,
                  f"in [0, {MAX_SEED}]"),
    "device": Field("auto", _STR, "cpu, cuda, cuda:N or auto (cuda when available)",
                    lambda v: DEVICE_NAME.fullmatch(v) is not None, "auto|cpu|cuda|cuda:N"),
    "num_threads": Field(None, _INT, "CPU threads for torch (null = torch's default)",
                         lambda v: 0 < v <= 1024, "in [1, 1024]", nullable=True),
    "dtype": Field("float32", _STR, "model and data precision", _choice(("float32", "float64")),
                   "float32|float64"),
    # -- data ------------------------------------------------------------------------------
    "data": Field("digits", _STR, "data set", _choice(DATASETS), "|".join(DATASETS)),
    "data_dir": Field(None, _STR, "folder with local data files (MNIST IDX / CIFAR-10 batches)", nullable=True),
    "data_file": Field(None, _STR, "a .npy file of points (N, D) for data=points", nullable=True),
    "download": Field(True, _BOOL, "download MNIST / CIFAR-10 through torchvision when missing"),
    "val_size": Field(None, _INT, "examples held out of the training set for validation "
                      "(MNIST: 10000)", *_POS, nullable=True),
    "max_train": Field(None, _INT, "use at most this many training examples (quick runs)", *_POS, nullable=True),
    "max_eval": Field(None, _INT, "use at most this many validation/test examples (quick runs)", *_POS,
                      nullable=True),
    "toy_points": Field(2000, _INT, "toy2d: clean base points of the evaluation mixture (the density "
                        "that KL and Fisher divergence compare with)", *_POS),
    "toy_noise": Field(0.375, _FLOAT, "toy2d: std of the Gaussian smoothing; training batches get "
                       "fresh smoothing noise every step", *_POS),
    "toy_train_size": Field(50000, _INT, "toy2d: clean training base points; mm10: training samples",
                            *_TOY_SIZE),
    "toy_eval_size": Field(5000, _INT, "toy/mm10 data: validation and test samples each", *_TOY_SIZE),
    "data_seed": Field(1234, _INT, "seed of generated data and of data splits",
                       lambda v: 0 <= v < 2**63, "in [0, 2**63 - 1]"),
    # -- preprocessing -----------------------------------------------------------------------
    "map": Field(True, _BOOL, "match after preprocessing: the loss sees logit-space images"),
    "logit_smoothness": Field(0.5, _FLOAT, "smoothness factor of the logit (0.5 FC, 0.75 CNN)", *_POS),
    "logit_shift": Field(1e-6, _FLOAT, "shift away from 0 and 1 before the logit",
                         lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "num_bins": Field(None, _INT, "pixel levels (256 for 8-bit; digits: 17); null = from the data",
                      lambda v: v >= 2, ">= 2", nullable=True),
    # -- model -------------------------------------------------------------------------------
    "model": Field("dense", _STR, "architecture", _choice(MODELS), "|".join(MODELS)),
    "num_layers": Field(2, _INT, "dense: number of dense layers", lambda v: 0 < v <= 256, "in [1, 256]"),
    "parameterization": Field("full", _STR, "dense: weight parameterization (triangular_pair: a "
                              "lower- then an upper-triangular layer, the reference's 'trilu')",
                              _choice(("full", "tril", "triu", "lu", "triangular_pair")),
                              "full|tril|triu|lu|triangular_pair"),
    "bias": Field(True, _BOOL, "dense: dense layers with a bias"),
    "prior": Field("normal", _STR, "latent distribution of dense/coupling models (laplace: the "
                   "reference's ML prior)", _choice(("normal", "laplace")), "normal|laplace"),
    "weight_init": Field("default", _STR, "dense/conv: initial weights (default: orthogonal dense, "
                         "identity kernel + noise; negative_identity: exactly -I, the reference's recipe: "
                         "dense bias = 1, conv bias ~ N(0, (0.01 / (k sqrt C))^2); orthogonal: dense only, also for "
                         "triangular weights, the triangle of an orthogonal matrix)",
                         _choice(("default", "negative_identity", "orthogonal")),
                         "default|negative_identity|orthogonal"),
    "actnorm": Field(False, _BOOL, "dense: ActNorm after each non-linearity"),
    "alpha": Field(0.3, _FLOAT, "slope parameter of the smooth leaky ReLU", lambda v: 0 < v < 1, "in (0, 1)"),
    "blocks": Field(10, _INT, "coupling: blocks; conv: blocks of convolutions", lambda v: 0 < v <= 256, "in [1, 256]"),
    "hidden": Field(64, _INT, "coupling/glow: width of the conditioner", lambda v: 0 < v <= 16384, "in [1, 16384]"),
    "depth": Field(2, _INT, "coupling: hidden layers of the conditioner MLP", lambda v: 0 < v <= 64, "in [1, 64]"),
    "conditioner": Field("joint", _STR, "coupling: one MLP for log-scale and shift (joint) or the "
                         "reference's separate scale and shift networks (separate)",
                         _choice(("joint", "separate")), "joint|separate"),
    "shift_activation": Field("swish", _STR, "coupling, separate conditioner: activation of the "
                              "shift network (learnable-beta Swish or ELU)",
                              _choice(("swish", "elu")), "swish|elu"),
    "weight_norm": Field(False, _BOOL, "coupling: weight normalisation W = g V / |V| (per row) of "
                         "the dense layers"),
    "convs_per_block": Field(2, _INT, "conv: convolutions per block", lambda v: 0 < v <= 64, "in [1, 64]"),
    "kernel_size": Field(7, _INT, "conv: kernel size (odd)", lambda v: 0 < v <= 63 and v % 2 == 1,
                         "odd, in [1, 63]"),
    "spectral_norm": Field(False, _BOOL, "conv: spectral normalisation of the convolution weights "
                           "(the paper's CIFAR-CNN recipe for ML, SSM, DSM)"),
    "levels": Field(2, _INT, "glow: levels", lambda v: 0 < v <= 8, "in [1, 8]"),
    "steps": Field(16, _INT, "glow: steps per level", lambda v: 0 < v <= 256, "in [1, 256]"),
    "glow_activation": Field("silu", _STR, "glow: activation of the coupling conditioners "
                             "(leaky_relu: LeakyReLU(0.1), the reference's)",
                             _choice(GLOW_ACTIVATIONS), "|".join(GLOW_ACTIVATIONS)),
    "glow_split_activation": Field(None, _STR, "glow: activation of the split priors' conditioners "
                                   "(null: glow_activation; the reference's: relu)",
                                   _choice(GLOW_ACTIVATIONS), "|".join(GLOW_ACTIVATIONS), nullable=True),
    "glow_output_scale": Field(False, _BOOL, "glow: learnable per-channel scale exp(3 s), s = 0 at "
                               "init, after each conditioner's zero-initialised last convolution "
                               "(Glow's Conv2dZeros, the reference's)"),
    "glow_alternate": Field(True, _BOOL, "glow: swap the conditioning half of the channels at every "
                            "other step (false: always the first half, the reference's)"),
    "glow_train_actnorm": Field(True, _BOOL, "glow: train ActNorm after its data-dependent "
                                "initialisation (false: fixed after it, as in the reference)"),
    # -- objective ---------------------------------------------------------------------------
    "loss": Field("ssm", _STR, "training objective", _choice(LOSSES), "|".join(LOSSES)),
    "sigma": Field(0.1, _FLOAT, "DSM noise level", *_POS),
    "eps": Field(0.1, _FLOAT, "FDSSM step size", *_POS),
    "slices": Field(1, _INT, "SSM projections per example", lambda v: 0 < v <= 4096, "in [1, 4096]"),
    "projection": Field("rademacher", _STR, "SSM projection distribution",
                        _choice(("rademacher", "gaussian")), "rademacher|gaussian"),
    "sml_samples": Field(None, _INT, "SML model samples per step (null = batch size)", *_POS, nullable=True),
    "energy_reg": Field(0.0, _FLOAT, "lambda of the energy regulariser lambda*E[E(x)]/D", *_NONNEG),
    "drop_out_of_domain": Field(False, _BOOL, "DSM/FDSSM without MaP: examples whose perturbed "
                                "input leaves the logit's domain contribute 0 to the loss (the "
                                "paper's ablation) instead of failing the step"),
    # -- optimisation ------------------------------------------------------------------------
    "optimizer": Field("rmsprop", _STR, "optimizer", _choice(OPTIMIZERS), "|".join(OPTIMIZERS)),
    "lr": Field(1e-4, _FLOAT, "learning rate", *_POS),
    "weight_decay": Field(0.0, _FLOAT, "weight decay", *_NONNEG),
    "lr_decay": Field(1.0, _FLOAT, "learning rate factor gamma applied after each epoch",
                      lambda v: 0 < v <= 1, "in (0, 1]"),
    "lr_decay_epochs": Field(0, _INT, "apply lr_decay for the first N epochs only", *_NONNEG),
    "batch_size": Field(100, _INT, "training batch size: the global batch, split evenly over "
                        "the processes of a torchrun run", *_POS),
    "eval_batch_size": Field(500, _INT, "evaluation batch size", *_POS),
    "epochs": Field(None, _INT, "stop after this many epochs", *_POS, nullable=True),
    "max_iters": Field(None, _INT, "stop after this many iterations", *_POS, nullable=True),
    "max_minutes": Field(None, _FLOAT, "stop after this many minutes of training time "
                         "(evaluation excluded), then test the best checkpoint", *_POS,
                         nullable=True),
    "ema_decay": Field(0.999, _FLOAT, "EMA decay of the parameters (0: no averaging, the "
                       "ablation's 'no EMA')", lambda v: 0 <= v < 1, "in [0, 1)"),
    "ema_warmup": Field(True, _BOOL, "EMA decay min(ema_decay, (1+t)/(10+t)) at update t"),
    "grad_clip": Field(None, (int, float, dict), "gradient-norm clipping: a number, or a mapping "
                       "loss -> number", _grad_clip_ok, "> 0 (or {loss: value > 0})",
                       nullable=True),
    "per_loss": Field(None, (dict,), "recipe values per objective: {loss: {key: value}}, applied "
                      "when that loss trains (explicit --set values win)", _per_loss_ok,
                      "{loss: {config key: value}}", nullable=True),
    "augment": Field(False, _BOOL, "images: random horizontal flips and translations by up to "
                     "2 pixels of the training batches (the CIFAR-10 recipe)"),
    "max_nonfinite": Field(20, _INT, "stop after this many consecutive non-finite steps", *_POS),
    "grad_sync": Field("auto", _STR, "torchrun runs: how gradients are averaged over processes "
                       "(auto = ddp: DistributedDataParallel; allreduce: one flat all-reduce)",
                       _choice(("auto", "ddp", "allreduce")), "auto|ddp|allreduce"),
    # -- bookkeeping -------------------------------------------------------------------------
    "eval_every": Field(500, _INT, "validate (EMA weights) every N iterations", *_POS),
    "checkpoint_every": Field(500, _INT, "write checkpoints/last.pt every N iterations", *_POS),
    "log_every": Field(50, _INT, "log training metrics every N iterations", *_POS),
    "num_samples": Field(64, _INT, "samples drawn for samples.png at the end", *_POS),
    "progress": Field(True, _BOOL, "show a tqdm progress bar"),
    "tensorboard": Field(True, _BOOL, "write TensorBoard events"),
}

DEFAULTS: dict[str, Any] = {k: f.default for k, f in FIELDS.items()}

#: Keys that may change when a run is resumed (they do not change the model or the maths).
RESUMABLE_KEYS = frozenset({
    "epochs", "max_iters", "max_minutes", "eval_every", "checkpoint_every", "log_every", "num_samples",
    "progress", "tensorboard", "device", "data_dir", "download", "max_nonfinite", "num_threads",
    "description", "grad_sync"})


#: Old key names still read (one release) and what they are now.
RENAMED_KEYS = {"parameterisation": "parameterization"}


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
    if isinstance(value, int) and not -2**63 <= value < 2**63:
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
    config = {RENAMED_KEYS.get(str(k), k): v for k, v in config.items()}
    for key, value in config.items():
        if key not in FIELDS:
            raise unknown_key(str(key))
        out[key] = coerce_value(key, value)
    if out["data"] == "points" and not out["data_file"]:
        raise ConfigError("config key 'data_file' must name a .npy file when data is 'points'")
    if out["per_loss"]:
        out["per_loss"] = {loss: {k: coerce_value(k, v) for k, v in inner.items()}
                           for loss, inner in out["per_loss"].items()}
    if (not out["map"] and OBJECTIVES[out["loss"]].perturbs_input and not out["drop_out_of_domain"]
            and out["data"] in IMAGE_DATASETS):
        raise ConfigError(
            f"{out['loss']} without MaP (map=false) perturbs pixels out of the logit's domain (0, 1); "
            "set drop_out_of_domain=true to drop those examples from the loss (the paper's ablation), "
            "or train with map=true"
        )
    if out["data"] in TOY_DATASETS and out["loss"] == "dsm" and out["sigma"] > out["toy_noise"]:
        raise ConfigError(
            f"dsm on 2-D toy data perturbs the clean training points by sigma ({out['sigma']:g}) "
            f"and adds the rest of the smoothing noise toy_noise ({out['toy_noise']:g}); sigma "
            "must not exceed toy_noise (sigma = toy_noise: the reference's exact DSM target)")
    if out["epochs"] is None and out["max_iters"] is None and out["max_minutes"] is None:
        raise ConfigError("set at least one of the config keys 'epochs', 'max_iters', 'max_minutes'")
    sections = {name: cls(**{attr: freeze(out[key]) for key, (where, attr) in KEY_PATHS.items()
                             if where == name})
                for name, cls in SECTIONS.items()}
    return RunConfig(**sections, _built_by=_VALIDATION)


@dataclass(frozen=True)
class RunConfig:
    """A validated run configuration in typed, immutable sections (:mod:`ebflow.experiment.sections`):
    ``config.optim.lr``, ``config.model.blocks``, ``config.objective.loss`` ...

    Built only by :func:`validate_config` (also :meth:`from_dict`, :meth:`updated` and
    :func:`~ebflow.experiment.config.resolve_config`); constructing one directly, or with
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
            raise TypeError("a RunConfig is built by validate_config (or RunConfig.from_dict, "
                            "RunConfig.updated), which checks every value; not directly")

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
        The ``per_loss`` recipe is not applied again (:func:`~ebflow.experiment.config.resolve_config`
        applies it once, for the loss it resolves)."""
        return validate_config({**self.to_dict(), **(changes or {}), **values})


def grad_clip_for(config: RunConfig) -> float | None:
    """The gradient-clipping threshold that applies to this config's loss (None: no clipping)."""
    clip = config.optim.grad_clip
    if isinstance(clip, Mapping):
        clip = clip.get(config.objective.loss)
    return None if clip is None else float(clip)


def _check_sections() -> None:
    """Every key of FIELDS is exactly one section attribute (checked once, at import)."""
    missing, extra = set(FIELDS) - set(KEY_PATHS), set(KEY_PATHS) - set(FIELDS)
    if missing or extra:
        raise TypeError(f"config keys without a section attribute: {sorted(missing)}; section "
                        f"attributes without a config key: {sorted(extra)}")
    if tuple(f.name for f in fields(RunConfig)) != tuple(SECTIONS):
        raise TypeError("RunConfig's attributes must be the sections of ebflow.experiment.sections")


_check_sections()
