"""Builders: the model, preprocessing, objective, optimizer and LR schedule of a run config.

Each builder takes the section of the validated config it needs
(:mod:`ebflow.experiment.config.sections`): ``build_model(config.model, ...)``,
``build_objective(config.objective)``, ``build_optimizer(config.optim, ...)``.

Model families are data (:data:`MODEL_FAMILIES`): a family maps the model section and an event
shape to an :class:`~ebflow.EBFlow`. Adding a family is one entry; the config's ``model``
choices and the presets read this table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...architectures import conv_flow, coupling_flow, dense_flow, glow_flow
from ...errors import ConfigError
from ...flow import EBFlow
from ...objectives import OBJECTIVES, Objective, make_objective
from ...preprocessing import ImagePreprocessing
from ...prior import PRIORS
from .sections import ModelConfig, ObjectiveConfig, OptimConfig, PreprocessingConfig

__all__ = [
    "ModelFamily",
    "MODEL_FAMILIES",
    "OPTIMIZERS",
    "WEIGHT_INITS",
    "build_preprocessing",
    "build_model",
    "build_objective",
    "build_optimizer",
    "build_scheduler",
]


def build_preprocessing(config: PreprocessingConfig, num_bins: int | None) -> ImagePreprocessing | None:
    """The image preprocessing of image data with ``num_bins`` pixel levels (None for point
    data); the config's ``num_bins``, when set, wins."""
    if num_bins is None:
        return None
    return ImagePreprocessing(config.logit_smoothness, config.logit_shift, config.num_bins or num_bins)


_DENSE_INIT = {"default": None, "negative_identity": "negative_identity", "orthogonal": "orthogonal"}
_CONV_INIT = {"default": "identity", "negative_identity": "negative_identity"}
#: The config's ``weight_init`` values (conv models take the first two).
WEIGHT_INITS: tuple[str, ...] = tuple(_DENSE_INIT)


def _prior(c: ModelConfig) -> nn.Module:
    """The latent distribution named by the config's ``prior``."""
    return PRIORS[c.prior]()


@dataclass(frozen=True)
class ModelFamily:
    """A model family: ``build(model_config, event_shape, for_loading)`` and the event rank it
    needs (1: vectors, 3: images ``(C, H, W)``, None: any)."""

    build: Callable[[ModelConfig, tuple[int, ...], bool], EBFlow]
    event_rank: int | None
    help: str


def _coupling(c: ModelConfig, shape: tuple[int, ...], for_loading: bool) -> EBFlow:
    return coupling_flow(
        shape[0],
        blocks=c.blocks,
        hidden=c.hidden,
        depth=c.depth,
        conditioner=c.conditioner,
        shift_activation=c.shift_activation,
        weight_norm=c.weight_norm,
        actnorm_scale=c.actnorm_scale,
        prior=_prior(c),
    )


def _dense(c: ModelConfig, shape: tuple[int, ...], for_loading: bool) -> EBFlow:
    # for_loading: skip the orthogonal draw of weights that a checkpoint overwrites right after
    return dense_flow(
        shape,
        num_layers=c.num_layers,
        alpha=c.alpha,
        parameterization=c.parameterization,
        actnorm=c.actnorm,
        init="identity" if for_loading else _DENSE_INIT[c.weight_init],
        bias=c.bias,
        prior=_prior(c),
    )


def _conv(c: ModelConfig, shape: tuple[int, ...], for_loading: bool) -> EBFlow:
    if c.weight_init not in _CONV_INIT:
        raise ConfigError(
            f"weight_init {c.weight_init!r} is for dense layers; conv models take {' or '.join(_CONV_INIT)}"
        )
    return conv_flow(
        shape,
        blocks=c.blocks,
        convs_per_block=c.convs_per_block,
        kernel_size=c.kernel_size,
        alpha=c.alpha,
        init=_CONV_INIT[c.weight_init],
        spectral_norm=c.spectral_norm,
    )


def _glow(c: ModelConfig, shape: tuple[int, ...], for_loading: bool) -> EBFlow:
    return glow_flow(
        shape,
        levels=c.levels,
        steps=c.steps,
        hidden=c.hidden,
        activation=c.glow_activation,
        split_activation=c.glow_split_activation,
        output_scale=c.glow_output_scale,
        alternate=c.glow_alternate,
        train_actnorm=c.glow_train_actnorm,
    )


#: Model families by config name (``model``).
MODEL_FAMILIES: dict[str, ModelFamily] = {
    "coupling": ModelFamily(_coupling, 1, "blocks of [dense, affine coupling (MLP), ActNorm] (toy2d)"),
    "dense": ModelFamily(_dense, None, "dense layers + smooth leaky ReLU (the FC models, mm10)"),
    "conv": ModelFamily(_conv, 3, "blocks of 2-D convolutions, squeeze between (the CNN models)"),
    "glow": ModelFamily(_glow, 3, "Glow: ActNorm, 1x1 conv, affine coupling, split prior"),
}


def build_model(
    config: ModelConfig,
    event_shape: Sequence[int],
    preprocessing: ImagePreprocessing | None,
    *,
    use_map: bool,
    for_loading: bool = False,
) -> EBFlow:
    """The EBFlow of a model section (its :data:`MODEL_FAMILIES` entry), in its ``dtype``.
    Without MaP (``use_map=False``, the config's ``map``) the preprocessing becomes the model's
    first layers. ``for_loading=True`` skips costly random initialisations of parameters that a
    checkpoint overwrites right after."""
    event_shape = tuple(event_shape)
    family = MODEL_FAMILIES[config.family]
    if family.event_rank is not None and len(event_shape) != family.event_rank:
        need = "vector data" if family.event_rank == 1 else "image data (C, H, W)"
        raise ConfigError(f"model {config.family!r} needs {need}, got event shape {event_shape}")
    if config.prior != "normal" and config.family not in ("dense", "coupling"):
        raise ConfigError(
            f"prior {config.prior!r} is available for the dense and coupling models, not {config.family!r}"
        )
    model = family.build(config, event_shape, for_loading)
    if preprocessing is not None and not use_map:
        model = EBFlow([*preprocessing.as_layers(), *model.layers], event_shape, model.prior)
    return model.to(getattr(torch, config.dtype))


#: Config keys of objective options whose name differs from the option's.
OPTION_KEYS: dict[str, str] = {"num_samples": "sml_samples"}


def option_key(option: str) -> str:
    """The config key (an :class:`ObjectiveConfig` attribute) that sets an objective option."""
    return OPTION_KEYS.get(option, option)


def build_objective(config: ObjectiveConfig) -> Objective:
    """The objective of an objective section with its options (σ, ε, slices, λ, ...): every
    option of the objective's registry entry is read from its config key (:func:`option_key`);
    an option without one is a :class:`~ebflow.errors.ConfigError` (never a silent default)."""
    options = {}
    for opt in OBJECTIVES[config.loss].defaults:
        if not hasattr(config, option_key(opt)):
            raise ConfigError(
                f"objective {config.loss!r} has an option {opt!r} that no config key sets; "
                f"add the key {option_key(opt)!r} to the config schema"
            )
        options[opt] = getattr(config, option_key(opt))
    return make_objective(config.loss, energy_reg=config.energy_reg, **options)


#: Optimizers by config name (``optimizer``); each takes ``lr`` and ``weight_decay``.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
}


def build_optimizer(config: OptimConfig, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    return OPTIMIZERS[config.optimizer](params, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(
    config: OptimConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    r"""Per-epoch decay :math:`\eta_e = \eta_0 \gamma^{\min(e, N)}` (``lr_decay``, ``lr_decay_epochs``)."""
    gamma, n = config.lr_decay, config.lr_decay_epochs
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: gamma ** min(e, n))
