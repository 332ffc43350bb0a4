"""Input checks shared by every public entry point of the library: type, dtype, shape, device and
finiteness of tensors (:func:`check_batch`), and the plain numbers and generators that go with
them. Each raises :class:`~ebflow.errors.InputError` (a bad tensor) or
:class:`~ebflow.errors.ConfigError` (a bad option) naming the problem and, where there is one,
the fix -- never a raw ``RuntimeError``/``AttributeError``/``TypeError`` from deeper down."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError, EBFlowError, InputError

__all__ = [
    "common_dtype",
    "check_sample_shape",
    "check_batch",
    "check_count",
    "check_finite",
    "check_generator",
    "check_number",
    "same_device",
]


def check_finite(x: Tensor, what: str = "input") -> None:
    """Raise :class:`InputError` if ``x`` holds NaN or infinite values."""
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise InputError(f"{what} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")


def _canonical(device: torch.device | str) -> torch.device:
    """``device`` with the index it denotes: ``cuda`` (no index) is the current CUDA device."""
    device = torch.device(device)
    if device.index is None and device.type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if device.index is None and device.type != "cpu":
        return torch.device(device.type, 0)
    return device


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """True when ``a`` and ``b`` are the same device (type *and* index: ``cuda:0`` is not
    ``cuda:1``; ``cuda`` is the current CUDA device)."""
    return _canonical(a) == _canonical(b)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_batch(
    x: object,
    event_shape: Sequence[int] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    what: str = "input",
    finite: bool = True,
    integer_ok: bool = False,
    owner: str = "model",
) -> Tensor:
    """Check that ``x`` is a floating tensor of shape ``(batch, *event_shape)``.

    * not a tensor (a list, a NumPy array, ...): :class:`InputError` naming the type and the
      conversion;
    * an integer, boolean or complex dtype: :class:`InputError` asking for a floating tensor
      (of ``dtype`` when given); ``integer_ok`` accepts integer dtypes (pixels);
    * ``dtype``/``device`` given: they must match (the model's);
    * ``event_shape`` given: ``x`` must be ``(batch, *event_shape)``; ``None``: any shape with
      a batch dimension. An empty batch is refused;
    * ``finite``: no NaN or Inf (one reduction over ``x``).

    ``owner`` names the object in the suggested fix (``x.to(model.dtype)``). Returns ``x``
    unchanged.
    """
    target = f"dtype={owner}.dtype" if dtype is not None else "dtype=torch.float32"
    if not isinstance(x, Tensor):
        hint = f"; convert with torch.as_tensor(x, {target})" if not isinstance(x, (str, bytes)) else ""
        raise InputError(f"{what} must be a torch.Tensor, got {type(x).__name__}{hint}")
    if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or integer_ok):
        wanted = f"of dtype {_dtype_name(dtype)}" if dtype is not None else "(float32 or float64)"
        fix = f"x.to({owner}.dtype)" if dtype is not None else "x.float()"
        raise InputError(
            f"{what}: expected a floating tensor {wanted}, got {_dtype_name(x.dtype)}; convert with {fix}"
        )
    if dtype is not None and x.dtype != dtype:
        raise InputError(
            f"{what} has dtype {x.dtype} but the {owner} has dtype {dtype}; "
            f"convert one of them (e.g. x.to({dtype}) or {owner}.to({x.dtype}))"
        )
    if device is not None and not same_device(x.device, device):
        raise InputError(
            f"{what} is on device {x.device} but the {owner} is on {device}; move it with x.to({owner}.device)"
        )
    if event_shape is not None:
        event_shape = tuple(event_shape)
        if x.dim() != len(event_shape) + 1 or tuple(x.shape[1:]) != event_shape:
            raise InputError(
                f"{what} must have shape (batch, {', '.join(map(str, event_shape))}), got {tuple(x.shape)}"
            )
    elif x.dim() == 0:
        raise InputError(f"{what} must have a batch dimension, got a 0-d tensor")
    if x.shape[0] == 0:
        raise InputError(f"{what} is an empty batch")
    if finite:
        check_finite(x, what)
    return x


def check_count(
    value: object,
    what: str,
    *,
    minimum: int = 1,
    error: type[EBFlowError] = ConfigError,
) -> int:
    """``value`` as an ``int >= minimum`` (a Python or NumPy integer, never a bool), else
    ``error`` (:class:`ConfigError`, or :class:`InputError` for a call's argument)."""
    kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(value, bool) or not hasattr(value, "__index__") or isinstance(value, Tensor):
        raise error(f"{what} must be {kind}, got {value!r} ({type(value).__name__})")
    value = int(value.__index__())
    if value < minimum:
        raise error(f"{what} must be {kind}, got {value}")
    return value


def check_number(
    value: object,
    what: str,
    *,
    positive: bool = False,
    non_negative: bool = False,
    below: float | None = None,
) -> float:
    """``value`` as a finite ``float`` (a Python or NumPy real, never a bool), optionally
    ``> 0``, ``>= 0`` or ``< below``; else :class:`ConfigError`."""
    ok = not isinstance(value, (bool, str, bytes, Tensor))
    if ok:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            ok = False
    if not ok or not math.isfinite(number):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    if positive and not number > 0:
        raise ConfigError(f"{what} must be > 0, got {value!r}")
    if non_negative and not number >= 0:
        raise ConfigError(f"{what} must be >= 0, got {value!r}")
    if below is not None and not number < below:
        raise ConfigError(f"{what} must be < {below}, got {value!r}")
    return number


def check_generator(
    generator: object,
    what: str = "generator",
    *,
    device: torch.device | str | None = None,
    owner: str = "model",
) -> torch.Generator | None:
    """``generator`` if it is ``None`` or a :class:`torch.Generator` (else :class:`ConfigError`)
    on ``device`` when given (else :class:`InputError`: torch draws only from a generator of the
    tensor's device type, and ebflow draws on the model's device)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"{what} must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and device is not None and not same_device(generator.device, device):
        raise InputError(
            f"{what} is on device {generator.device} but the {owner} is on {torch.device(device)}; "
            f"create it there: torch.Generator(device={str(torch.device(device))!r}).manual_seed(...)"
        )
    return generator


def common_dtype(layers: Iterable[nn.Module]) -> torch.dtype:
    """The one floating dtype of the layers' parameters and buffers (the default dtype when they
    have none); layers of different dtypes are a :class:`~ebflow.errors.ConfigError`."""
    seen: dict[torch.dtype, str] = {}
    for i, layer in enumerate(layers):
        for t in list(layer.parameters()) + list(layer.buffers()):
            if t.is_floating_point() and t.dtype not in seen:
                seen[t.dtype] = f"layer {i} ({type(layer).__name__})"
    if len(seen) > 1:
        which = ", ".join(f"{where} is {str(d).removeprefix('torch.')}" for d, where in seen.items())
        raise ConfigError(
            f"the layers mix dtypes: {which}; convert them to one dtype first "
            "(e.g. layer.double() for each), or build the model from layers of the "
            "default dtype and call model.to(dtype)"
        )
    return next(iter(seen), torch.get_default_dtype())


def check_sample_shape(sample_shape: object) -> tuple[int, ...]:
    """``sample_shape`` (an int, a tuple of ints or a ``torch.Size``) as a tuple of positive
    sizes; anything else is an :class:`~ebflow.errors.InputError`."""
    if isinstance(sample_shape, (str, bytes)) or not (
        hasattr(sample_shape, "__index__") or isinstance(sample_shape, Sequence)
    ):
        raise InputError(
            f"sample_shape must be a positive integer or a tuple of positive integers, got {sample_shape!r}"
        )
    sizes = (sample_shape,) if hasattr(sample_shape, "__index__") else tuple(sample_shape)  # type: ignore[arg-type]
    return tuple(check_count(s, "every size of sample_shape", error=InputError) for s in sizes)
