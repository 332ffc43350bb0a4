"""Exceptions raised by ebflow, so that callers can catch the library's own errors."""

from __future__ import annotations

__all__ = ["EBFlowError", "InputError", "SingularLayerError", "ConfigError", "MissingDependencyError"]


class EBFlowError(Exception):
    """Base class of every error raised on purpose by ebflow."""


class InputError(EBFlowError, ValueError):
    """A tensor given to a model or layer has the wrong shape, dtype, device or values."""


class SingularLayerError(EBFlowError, ValueError):
    """A linear layer cannot be inverted because its matrix is (numerically) singular."""


class ConfigError(EBFlowError, ValueError):
    """A layer, model or objective was configured with an invalid option."""


class MissingDependencyError(EBFlowError, ImportError):
    """An optional package is not installed; the message names it and the ``ebflow[...]`` extra
    that installs it (one line, e.g. ``curves.png needs matplotlib: pip install 'ebflow[plots]'``)."""
