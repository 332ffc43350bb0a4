"""The experiment application on top of the ebflow library: validated run configurations and the
paper's presets, data sets, builders, batches, the training loop, checkpoints, data-parallel
training, finished runs, plots and the paper's tables (``ebflow reproduce``).

The library (``ebflow``, ``ebflow.layers``, ...) never imports this package.
"""

from .config.resolve import list_presets, resolve_config
from .config.schema import RunConfig, validate_config
from .rundir.load import LoadedRun, load_run
from .training.run import TrainResult, train
from .training.state import StopRequest, TrainingDivergedError, TrainingInterrupted, TrainState

__all__ = [
    "train",
    "load_run",
    "LoadedRun",
    "resolve_config",
    "validate_config",
    "RunConfig",
    "list_presets",
    "TrainResult",
    "TrainState",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "StopRequest",
]
