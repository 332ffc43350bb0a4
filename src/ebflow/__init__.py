"""ebflow: Energy-Based Normalizing Flows.

Flows built from arbitrary linear layers and element-wise non-linearities, trained with
score-matching objectives that never compute a linear layer's determinant, and still evaluated
with an exact likelihood and sampled exactly by inversion.

A run trained with ``ebflow train`` loads with :func:`ebflow.load_run` (the application's
``ebflow.experiment.rundir.load.load_run``, imported on first use)::

    import ebflow
    run = ebflow.load_run("runs/digits-fc-ssm-20250101-120000")  # best.pt, EMA weights, eval mode
    print(run.evaluate("test"))         # {'nll': ..., 'bpd': ..., 'n': ...}
    x = run.model.sample(16)            # exact samples in the model's input space
"""

import logging as _logging
from typing import Any as _Any

from . import layers
from .architectures import conv_flow, coupling_flow, dense_flow, glow_flow
from .compiled import compile_model
from .ema import EMA
from .errors import ConfigError, EBFlowError, InputError, MissingDependencyError, SingularLayerError
from .flow import EBFlow
from .image_flow import ImageFlow
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

# the library is silent unless its user (or the command line) installs a handler
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "EBFlow",
    "EMA",
    "ImageFlow",
    "ImagePreprocessing",
    "Laplace",
    "Objective",
    "StandardNormal",
    "layers",
    "make_objective",
    "ml_loss",
    "sml_loss",
    "ssm_loss",
    "dsm_loss",
    "fdssm_loss",
    "esm_loss",
    "coupling_flow",
    "dense_flow",
    "conv_flow",
    "glow_flow",
    "compile_model",
    "EBFlowError",
    "InputError",
    "SingularLayerError",
    "ConfigError",
    "MissingDependencyError",
    "load_run",
]


def __getattr__(name: str) -> _Any:  # module attribute hook (PEP 562)
    """``ebflow.load_run``: the application's loader of trained runs, imported on first use,
    so that ``import ebflow`` (the library) never imports the application."""
    if name == "load_run":
        from .experiment.rundir.load import load_run

        return load_run
    raise AttributeError(f"module 'ebflow' has no attribute {name!r}")
