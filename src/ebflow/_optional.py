"""Optional dependencies, imported in one place: a missing one is a one-line
:class:`~ebflow.errors.MissingDependencyError` that names the ``ebflow[...]`` extra installing it.

The library needs torch and numpy only; the command line adds PyYAML, tqdm and Pillow (pictures).
The extras are ``plots`` (matplotlib: ``curves.png``, plots of point data, the reproduce report's
plot), ``tensorboard`` (TensorBoard events) and ``vision`` (torchvision: downloading MNIST /
Fashion-MNIST / CIFAR-10)."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

__all__ = ["OPTIONAL", "require"]

#: Import name -> (the package pip installs, the ebflow extra that installs it).
OPTIONAL: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "plots"),
    "torch.utils.tensorboard": ("tensorboard", "tensorboard"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "torchvision": ("torchvision", "vision"),
}


def _entry(module: str) -> tuple[str, str]:
    """The table entry of ``module`` or of its closest parent (``matplotlib.pyplot`` -> matplotlib)."""
    name = module
    while name not in OPTIONAL:
        if "." not in name:
            raise KeyError(f"{module!r} is not one of ebflow's optional dependencies: {sorted(OPTIONAL)}")
        name = name.rsplit(".", 1)[0]
    return OPTIONAL[name]


def require(module: str, *, purpose: str) -> ModuleType:
    """Import the optional ``module`` (e.g. ``"matplotlib.pyplot"``), or raise a one-line
    :class:`MissingDependencyError`: ``"{purpose} needs {package}: pip install 'ebflow[{extra}]'"``."""
    package, extra = _entry(module)
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{purpose} needs {package}: pip install 'ebflow[{extra}]'", name=package
        ) from err
