"""The typed sections of a run configuration: frozen dataclasses, one attribute per config key.

A run configuration is read by the application as a :class:`~ebflow.experiment.config.schema.RunConfig`
made of these sections (``config.optim.lr``, ``config.model.blocks``, ...), built only by
:func:`~ebflow.experiment.config.schema.validate_config`, which checks every value once. Users still
write the flat keys (YAML files, ``--set key=value``); :data:`KEY_PATHS` says where each flat key
lives. The attribute is the key's own name, except ``data`` (``config.data.dataset``) and
``model`` (``config.model.family``), which would repeat their section's name.

Each key is declared once, as its attribute here (:func:`~ebflow.experiment.config.keys.key`:
default, help, range check or choices; the types come from the annotation);
:data:`~ebflow.experiment.config.schema.FIELDS` is derived from these declarations. A choice list
is its registry: the library's are imported (``OBJECTIVES``, ``PRIORS``, ...); the application's
(model families, data loaders, optimizers) are named as ``"module:NAME"`` and read when the schema
is derived, because this module imports nothing from the application, so that the builders can
take a section (:class:`ModelConfig`, :class:`ObjectiveConfig`, ...) without an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ...architectures import CONDITIONERS, DENSE_FLOW_PARAMETERIZATIONS
from ...layers import CONDITIONER_ACTIVATIONS
from ...layers.affine import ACTNORM_SCALES
from ...layers.shift_scale_coupling import SHIFT_ACTIVATIONS
from ...objectives import OBJECTIVES
from ...objectives.toolkit import PROJECTIONS
from ...prior import PRIORS
from .keys import in_range, key

__all__ = [
    "KEY_PATHS",
    "MAX_SEED",
    "SECTIONS",
    "BookkeepingConfig",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "PreprocessingConfig",
    "RuntimeConfig",
    "TrainingConfig",
]


# -- one declaration per key ---------------------------------------------------------------------
#: The largest ``seed``: the epoch shuffle seeds torch with ``seed * 1_000_003 + epoch < 2**64``.
MAX_SEED = 2**44 - 1
#: The largest generated toy/mm10 split: 10 dims x float64 = 800 MB.
MAX_TOY_SIZE = 10_000_000

_POS: dict[str, Any] = {"check": lambda v: v > 0, "rule": "> 0"}
_NONNEG: dict[str, Any] = {"check": lambda v: v >= 0, "rule": ">= 0"}
_TOY_SIZE: dict[str, Any] = {
    "check": lambda v: 0 < v <= MAX_TOY_SIZE,
    "rule": f"in [1, {MAX_TOY_SIZE}] (generated in memory)",
}


def _per_loss_ok(v: Any) -> bool:
    """``{loss: {config key: value}}``: known objectives, known keys, neither ``loss`` nor
    ``per_loss`` itself (each value is checked as its own key by the validation)."""
    return isinstance(v, Mapping) and all(
        loss in OBJECTIVES
        and isinstance(inner, Mapping)
        and all(k in KEY_PATHS and k not in ("per_loss", "loss") for k in inner)
        for loss, inner in v.items()
    )


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Identity and runtime: what the run is called, its seed, where and how it computes."""

    name: str = key("custom", "name of the preset / experiment")
    description: str = key("", "one line shown by `ebflow configs`")
    seed: int = key(
        0,
        "seed of every random number generator",
        check=lambda v: 0 <= v <= MAX_SEED,
        rule=f"in [0, {MAX_SEED}]",
    )
    device: str = key(
        "auto",
        "cpu, cuda, cuda:N or auto (cuda when available)",
        pattern="ebflow.experiment.parallel.devices:DEVICE_NAME",
        rule="auto|cpu|cuda|cuda:N",
    )
    num_threads: int | None = key(None, "CPU threads for torch (null = torch's default)", **in_range(1, 1024))
    compile: bool = key(
        False,
        "compile the score-matching kernels with torch.compile (ebflow.compile_model, docs/compiled.md): "
        "the first step compiles (counted in the training time; Inductor's disk cache serves later "
        "runs); eager with one warning if compilation fails",
    )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The data set, where it comes from and how it is split."""

    dataset: str = key("digits", "data set", choices="ebflow.experiment.data.datasets:LOADERS", name="data")
    data_dir: str | None = key(
        None,
        "folder with local data files (MNIST IDX / CIFAR-10 batches); it "
        "must exist (a mistyped path is refused, never created); unset: "
        "$EBFLOW_DATA_DIR or ~/.cache/ebflow/data, created for a download",
    )
    data_file: str | None = key(None, "a .npy file of points (N, D) for data=points")
    download: bool = key(True, "download MNIST / CIFAR-10 through torchvision when missing")
    val_size: int | None = key(
        None, "examples held out of the training set for validation (MNIST: 10000)", **_POS
    )
    max_train: int | None = key(None, "use at most this many training examples (quick runs)", **_POS)
    max_eval: int | None = key(None, "use at most this many validation/test examples (quick runs)", **_POS)
    toy_points: int = key(
        2000,
        "toy2d: clean base points of the evaluation mixture (the density "
        "that KL and Fisher divergence compare with)",
        **_POS,
    )
    toy_noise: float = key(
        0.375,
        "toy2d: std of the Gaussian smoothing; training batches get fresh smoothing noise every step",
        **_POS,
    )
    toy_train_size: int = key(50000, "toy2d: clean training base points; mm10: training samples", **_TOY_SIZE)
    toy_eval_size: int = key(5000, "toy/mm10 data: validation and test samples each", **_TOY_SIZE)
    data_seed: int = key(
        1234,
        "seed of generated data and of data splits",
        check=lambda v: 0 <= v < 2**63,
        rule="in [0, 2**63 - 1]",
    )


@dataclass(frozen=True, kw_only=True)
class PreprocessingConfig:
    """The image preprocessing (dequantisation, logit) and whether the loss sees its output."""

    map: bool = key(True, "match after preprocessing: the loss sees logit-space images")
    logit_smoothness: float = key(0.5, "smoothness factor of the logit (0.5 FC, 0.75 CNN)", **_POS)
    logit_shift: float = key(
        1e-6, "shift away from 0 and 1 before the logit", **in_range(0, 0.5, open_hi=True)
    )
    num_bins: int | None = key(
        None,
        "pixel levels (256 for 8-bit; digits: 17); null = from the data",
        check=lambda v: v >= 2,
        rule=">= 2",
    )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model family, its sizes and its precision."""

    family: str = key(
        "dense", "architecture", choices="ebflow.experiment.config.builders:MODEL_FAMILIES", name="model"
    )
    dtype: str = key("float32", "model and data precision", choices=("float32", "float64"))
    num_layers: int = key(2, "dense: number of dense layers", **in_range(1, 256))
    parameterization: str = key(
        "full",
        "dense: weight parameterization (triangular_pair: a lower- then "
        "an upper-triangular layer, the reference's 'trilu')",
        choices=DENSE_FLOW_PARAMETERIZATIONS,
    )
    bias: bool = key(True, "dense: dense layers with a bias")
    prior: str = key(
        "normal",
        "latent distribution of dense/coupling models (laplace: the reference's ML prior)",
        choices=PRIORS,
    )
    weight_init: str = key(
        "default",
        "dense/conv: initial weights (default: orthogonal dense, "
        "identity kernel + noise; negative_identity: exactly -I, the reference's recipe: "
        "dense bias = 1, conv bias ~ N(0, (0.01 / (k sqrt C))^2); orthogonal: dense only, also "
        "for triangular weights, the triangle of an orthogonal matrix)",
        choices="ebflow.experiment.config.builders:WEIGHT_INITS",
    )
    actnorm: bool = key(False, "dense: ActNorm after each non-linearity")
    alpha: float = key(
        0.3, "slope parameter of the smooth leaky ReLU", **in_range(0, 1, open_lo=True, open_hi=True)
    )
    blocks: int = key(10, "coupling: blocks; conv: blocks of convolutions", **in_range(1, 256))
    hidden: int = key(64, "coupling/glow: width of the conditioner", **in_range(1, 16384))
    depth: int = key(2, "coupling: hidden layers of the conditioner MLP", **in_range(1, 64))
    conditioner: str = key(
        "joint",
        "coupling: one MLP for log-scale and shift (joint) or the "
        "reference's separate scale and shift networks (separate)",
        choices=CONDITIONERS,
    )
    shift_activation: str = key(
        "swish",
        "coupling, separate conditioner: activation of the shift network (learnable-beta Swish or ELU)",
        choices=SHIFT_ACTIVATIONS,
    )
    weight_norm: bool = key(
        False, "coupling: weight normalisation W = g V / |V| (per row) of the dense layers"
    )
    actnorm_scale: str = key(
        "log",
        "coupling: ActNorm learns its log-scale (log) or its scale (linear: the reference's toy model; "
        "same maps, other optimiser steps)",
        choices=ACTNORM_SCALES,
    )
    convs_per_block: int = key(2, "conv: convolutions per block", **in_range(1, 64))
    kernel_size: int = key(
        7, "conv: kernel size (odd)", check=lambda v: 0 < v <= 63 and v % 2 == 1, rule="odd, in [1, 63]"
    )
    spectral_norm: bool = key(
        False,
        "conv: spectral normalisation of the convolution weights "
        "(the paper's CIFAR-CNN recipe for ML, SSM, DSM)",
    )
    levels: int = key(2, "glow: levels", **in_range(1, 8))
    steps: int = key(16, "glow: steps per level", **in_range(1, 256))
    glow_activation: str = key(
        "silu",
        "glow: activation of the coupling conditioners (leaky_relu: LeakyReLU(0.1), the reference's)",
        choices=CONDITIONER_ACTIVATIONS,
    )
    glow_split_activation: str | None = key(
        None,
        "glow: activation of the split priors' conditioners (null: glow_activation; the reference's: relu)",
        choices=CONDITIONER_ACTIVATIONS,
    )
    glow_output_scale: bool = key(
        False,
        "glow: learnable per-channel scale exp(3 s), s = 0 at "
        "init, after each conditioner's zero-initialised last convolution "
        "(Glow's Conv2dZeros, the reference's)",
    )
    glow_alternate: bool = key(
        True,
        "glow: swap the conditioning half of the channels at every "
        "other step (false: always the first half, the reference's)",
    )
    glow_train_actnorm: bool = key(
        True,
        "glow: train ActNorm after its data-dependent "
        "initialisation (false: fixed after it, as in the reference)",
    )


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """The training objective and its options (and the per-objective recipe table)."""

    loss: str = key("ssm", "training objective", choices=OBJECTIVES)
    sigma: float = key(0.1, "DSM noise level", **_POS)
    eps: float = key(0.1, "FDSSM step size", **_POS)
    slices: int = key(1, "SSM projections per example", **in_range(1, 4096))
    projection: str = key("rademacher", "SSM projection distribution", choices=PROJECTIONS)
    sml_samples: int | None = key(None, "SML model samples per step (null = batch size)", **_POS)
    energy_reg: float = key(0.0, "lambda of the energy regulariser lambda*E[E(x)]/D", **_NONNEG)
    drop_out_of_domain: bool = key(
        False,
        "DSM/FDSSM without MaP: examples whose perturbed "
        "input leaves the logit's domain contribute 0 to the loss (the "
        "paper's ablation) instead of failing the step",
    )
    per_loss: Mapping[str, Mapping[str, Any]] | None = key(
        None,
        "recipe values per objective: {loss: {key: value}}, applied when that loss trains "
        "(explicit --set values win)",
        check=_per_loss_ok,
        rule="{loss: {config key: value}}",
    )


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimizer, its learning-rate schedule, gradient clipping and the EMA of the weights."""

    optimizer: str = key("rmsprop", "optimizer", choices="ebflow.experiment.config.builders:OPTIMIZERS")
    lr: float = key(1e-4, "learning rate", **_POS)
    weight_decay: float = key(0.0, "weight decay", **_NONNEG)
    lr_decay: float = key(
        1.0, "learning rate factor gamma applied after each epoch", **in_range(0, 1, open_lo=True)
    )
    lr_decay_epochs: int = key(0, "apply lr_decay for the first N epochs only", **_NONNEG)
    grad_clip: float | None = key(
        None,
        "gradient-norm clipping: the largest norm of the gradient (null: none; per objective: per_loss)",
        **_POS,
    )
    ema_decay: float = key(
        0.999,
        "EMA decay of the parameters (0: no averaging, the ablation's 'no EMA')",
        **in_range(0, 1, open_hi=True),
    )
    ema_warmup: bool = key(True, "EMA decay min(ema_decay, (1+t)/(10+t)) at update t")


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """The training loop: batches, when to stop, augmentation, failures, gradient averaging."""

    batch_size: int = key(
        100,
        "training batch size: the global batch, split evenly over the processes of a torchrun run",
        **_POS,
    )
    epochs: int | None = key(None, "stop after this many epochs", **_POS)
    max_iters: int | None = key(None, "stop after this many iterations", **_POS)
    max_minutes: float | None = key(
        None,
        "stop after this many minutes of training time (evaluation excluded), then test the best checkpoint",
        **_POS,
    )
    augment: bool = key(
        False,
        "images: random horizontal flips and translations by up to "
        "2 pixels of the training batches (the CIFAR-10 recipe)",
    )
    shuffle: bool = key(
        True,
        "reshuffle the training set every epoch (false: the same batches in the same order every "
        "epoch, as the reference code's MNIST loader)",
    )
    max_nonfinite: int = key(20, "stop after this many consecutive non-finite steps", **_POS)
    grad_sync: str = key(
        "auto",
        "torchrun runs: how gradients are averaged over processes "
        "(auto = ddp: DistributedDataParallel; allreduce: one flat all-reduce)",
        choices="ebflow.experiment.parallel.gradient_sync:GRAD_SYNC_MODES",
    )


@dataclass(frozen=True, kw_only=True)
class BookkeepingConfig:
    """Evaluation, checkpoints, logs and the final samples."""

    eval_batch_size: int = key(500, "evaluation batch size", **_POS)
    eval_every: int = key(500, "validate (EMA weights) every N iterations", **_POS)
    eval_every_seconds: float | None = key(
        None,
        "also validate at the first iteration past every T seconds of training time "
        "(curves of objectives at different speeds on one time axis; null: off)",
        **_POS,
    )
    checkpoint_every: int = key(500, "write checkpoints/last.pt every N iterations", **_POS)
    log_every: int = key(50, "log training metrics every N iterations", **_POS)
    num_samples: int = key(64, "samples drawn for samples.png at the end", **_POS)
    progress: bool = key(True, "show a tqdm progress bar")
    tensorboard: bool = key(True, "write TensorBoard events")


#: The sections of a run configuration: attribute of :class:`~ebflow.experiment.config.schema.RunConfig`
#: -> its type.
SECTIONS: dict[str, type] = {
    "runtime": RuntimeConfig,
    "data": DataConfig,
    "preprocessing": PreprocessingConfig,
    "model": ModelConfig,
    "objective": ObjectiveConfig,
    "optim": OptimConfig,
    "training": TrainingConfig,
    "bookkeeping": BookkeepingConfig,
}


def _key_paths() -> dict[str, tuple[str, str]]:
    """Every section attribute is a config key (declared by :func:`key`), and no key is two."""
    out: dict[str, tuple[str, str]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if "help" not in f.metadata:
                raise TypeError(f"{cls.__name__}.{f.name} is not declared with key(...)")
            flat = f.metadata["key"] or f.name
            if flat in out:
                raise TypeError(f"config key {flat!r} is in two sections: {out[flat][0]} and {section}")
            out[flat] = (section, f.name)
    return out


#: Flat config key -> (section, attribute): ``"lr"`` -> ``("optim", "lr")``.
KEY_PATHS: dict[str, tuple[str, str]] = _key_paths()
