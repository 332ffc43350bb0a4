"""Exceptions raised by ebflow, so that callers can catch the library's own errors."""

from __future__ import annotations

__all__ = ["EBFlowError", "InputError", "SingularLayerError", "ConfigError"]


class EBFlowError(Exception):
    """Base class of every error raised on purpose by ebflow."""


class InputError(EBFlowError, ValueError):
    """A tensor given to a model or layer has the wrong shape, dtype, device or values."""


class SingularLayerError(EBFlowError, ValueError):
    """A linear layer cannot be inverted because its matrix is (numerically) singular."""


class ConfigError(EBFlowError, ValueError):
    """A layer, model or objective was configured with an invalid option."""
