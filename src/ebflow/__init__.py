"""ebflow: Energy-Based Normalizing Flows.

Flows built from arbitrary linear layers and element-wise non-linearities, trained with
score-matching objectives that never compute a linear layer's determinant, and still evaluated
with an exact likelihood and sampled exactly by inversion.
"""

from . import layers
from .architectures import conv_flow, coupling_flow, dense_flow, glow_flow
from .ema import EMA
from .errors import ConfigError, EBFlowError, InputError, SingularLayerError
from .flow import EBFlow
from .objectives import (
    Objective,
    dsm_loss,
    esm_loss,
    fdssm_loss,
    make_objective,
    ml_loss,
    sml_loss,
    ssm_loss,
)
from .preprocessing import ImagePreprocessing
from .prior import Laplace, StandardNormal

__version__ = "0.1.0"

__all__ = [
    "EBFlow", "EMA", "ImagePreprocessing", "Laplace", "Objective", "StandardNormal", "layers",
    "make_objective", "ml_loss", "sml_loss", "ssm_loss", "dsm_loss", "fdssm_loss", "esm_loss",
    "coupling_flow", "dense_flow", "conv_flow", "glow_flow",
    "EBFlowError", "InputError", "SingularLayerError", "ConfigError",
]
