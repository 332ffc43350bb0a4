r"""Opt-in compiled training kernels: :func:`compile_model`.

**What is compiled.** Score matching differentiates the energy two or three times: DSM needs
the score :math:`\nabla_h E` and then its gradient in the parameters, SSM also the
Hessian-vector product :math:`\nabla_h^2 E\,u`. Eagerly, every order is a pass of small
element-wise kernels through the non-linear layers (the coupling conditioners' activations,
``tanh``, ``exp``, the affine couplings), recorded by autograd and replayed by the next order.
:func:`compile_model` replaces three computations of the *tail* of the model (every layer from
the first non-linear one on, where the element-wise work is; the leading linear layers stay
eager, see :meth:`~ebflow.EBFlow.linear_prefix`) by kernels compiled with :func:`torch.compile`:

* ``energy(h)``: :math:`E` (ML, SML, FDSSM, the energy regulariser);
* ``energy_and_grad(h)``: :math:`(E, \nabla_h E)` (DSM, :meth:`~ebflow.EBFlow.energy_and_grad`);
* ``energy_grad_hvp(h, u)``: :math:`(E, \nabla_h E, \nabla_h^2 E\,u)` (SSM).

Inside each kernel the input derivatives are taken by :mod:`torch.func` (``grad``, ``vjp``),
which Dynamo traces into one graph (``fullgraph=True``: no graph breaks) with the energy; the
parameters' gradient is AOTAutograd's backward of that graph, compiled with it. This is the
granularity that works: a compiled graph cannot be differentiated twice (AOTAutograd has no
double backward), so compiling the energy alone and differentiating it with
``torch.autograd.grad(..., create_graph=True)`` fails; the kernels hold every order but the
last. The closed-form SiLU derivatives (:mod:`ebflow.layers.silu`) are custom autograd
functions that Dynamo refuses under ``torch.func``, and it traces the few-channel convolutions'
custom function (:func:`~ebflow.layers.conv.same_padding_conv2d`) but silently drops its higher
derivatives: inside a compiled kernel both are the plain operations (``F.silu``, ``F.conv2d``)
and Inductor derives and fuses their derivatives itself. The values are the eager path's to
float32 rounding (``tests/test_compiled.py``). Shapes are static (``dynamic=False``): another
batch size compiles another graph.

**Cost.** One compilation per kernel, input signature (shapes, dtypes, devices) and model:
seconds to minutes on a CPU, growing with the number of layers (the graph unrolls them).
:attr:`CompiledEnergy.compile_seconds` counts it (the backward graph is compiled with the
forward one, so the whole cost falls in the first call). Inductor's on-disk caches (the FX
graph cache and the AOTAutograd cache, on by default: :func:`compile_cache`) keep the compiled
graphs across processes: a second process (a resumed run) loads them instead of compiling.
Evaluation and sampling (gradients off) and computations inside ``torch.func`` transforms (ESM)
stay eager.

**Fallback.** If ``torch.compile`` is unavailable or compilation fails (no C compiler, a layer
that breaks the graph, e.g. the data-dependent domain check of a
:class:`~ebflow.layers.Logit`), one :class:`RuntimeWarning` names the cause and the model
computes eagerly from then on.
"""

from __future__ import annotations

import logging
import time
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from .errors import ConfigError, EBFlowError
from .flow import EBFlow

__all__ = ["CompileCache", "CompiledEnergy", "compile_cache", "compile_model"]

logger = logging.getLogger(__name__)

_VjpWithAux = tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]], Tensor]


def _energy(model: EBFlow, h: Tensor) -> Tensor:
    return model._energy_from(model.linear_prefix_length, h)


def _energy_and_grad(model: EBFlow, h: Tensor) -> tuple[Tensor, Tensor]:
    def total(z: Tensor) -> tuple[Tensor, Tensor]:
        e = _energy(model, z)
        return e.sum(), e

    g, e = torch.func.grad(total, has_aux=True)(h)
    return e, g


def _energy_grad_hvp(model: EBFlow, h: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    def total(z: Tensor) -> tuple[Tensor, Tensor]:
        e = _energy(model, z)
        return e.sum(), e

    # torch annotates vjp's result as a union with the pair of has_aux=False
    g, hvp, e = cast(_VjpWithAux, torch.func.vjp(torch.func.grad(total, has_aux=True), h, has_aux=True))
    (hu,) = hvp(u)
    return e, g, hu


_KERNELS: dict[str, Callable[..., Any]] = {
    "energy": _energy,
    "energy_and_grad": _energy_and_grad,
    "energy_grad_hvp": _energy_grad_hvp,
}


def _own_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its own code object: Dynamo keeps compiled graphs and recompilation counts per
    code object, so each :class:`CompiledEnergy` (each model) has its own."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


@contextmanager
def _while_compiling() -> Iterator[None]:
    """Compile the backward graph with the forward one (AOTAutograd defers it to the first
    backward otherwise) and raise, rather than run eagerly unnoticed, past the recompile limit:
    every compiler failure then surfaces in the kernel's call. (Imported here: ``torch._dynamo``
    takes a second to import, which ``import ebflow`` does not pay.)"""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    with (
        functorch_config.patch(force_non_lazy_backward_lowering=True),
        dynamo_config.patch(fail_on_recompile_limit_hit=True),
    ):
        yield


def _cause(err: BaseException) -> str:
    """``"Type: first line"`` of the innermost exception behind ``err`` (the compiler's own)."""
    for _ in range(16):  # (a chain, never a cycle; bounded all the same)
        inner = getattr(err, "inner_exception", None) or err.__cause__
        if inner is None:
            break
        err = inner
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


class CompiledEnergy:
    """The compiled kernels of :func:`compile_model` (:class:`~ebflow.flow.EnergyKernels`), for
    any number of models (each kernel takes the model as an argument; a copy of a compiled model
    shares them and compiles its own graphs on first use).

    Attributes:
        enabled: False after a failure: the models then compute eagerly.
        failure: the cause of that failure (``"ExceptionType: first line"``), else None.
        compile_seconds: time spent in calls that compiled (the first call of each kernel for
            each model and input signature), forward and backward graphs, cache loads included.
        signatures: the signatures compiled so far: ``(kernel, id(model), model.training, (shape,
            dtype, device, requires_grad) per input)``.
    """

    def __init__(
        self,
        *,
        backend: str | Callable[..., Any] = "inductor",
        mode: str | None = None,
        dynamic: bool | None = False,
    ) -> None:
        self.backend, self.mode, self.dynamic = backend, mode, dynamic
        self.enabled = True
        self.failure: str | None = None
        self.compile_seconds = 0.0
        self.signatures: set[tuple[Any, ...]] = set()
        options: dict[str, Any] = {"fullgraph": True, "backend": backend, "dynamic": dynamic}
        if mode is not None:
            options["mode"] = mode
        self._compiled = {name: torch.compile(_own_copy(fn), **options) for name, fn in _KERNELS.items()}

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else f"disabled ({self.failure})"
        return (
            f"CompiledEnergy(backend={self.backend!r}, {state}, compile_seconds={self.compile_seconds:.1f})"
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledEnergy:
        return self  # stateless in the model: shared by copies

    def __reduce__(self) -> tuple[Any, ...]:  # a pickled model compiles again where it is loaded
        return (_rebuild, (self.backend, self.mode, self.dynamic))

    def disable(self, err: BaseException) -> None:
        """Stop compiling after ``err`` (one warning naming it); the models compute eagerly."""
        self.enabled, self.failure = False, _cause(err)
        warnings.warn(
            f"compiled kernels disabled, computing eagerly: compilation failed ({self.failure})",
            RuntimeWarning,
            stacklevel=4,
        )

    def _call(self, name: str, model: EBFlow, *args: Tensor) -> Any:
        if self.enabled:
            sig = (
                name,
                id(model),
                model.training,
                *((a.shape, a.dtype, a.device, a.requires_grad) for a in args),
            )
            start = time.perf_counter()
            try:
                with _while_compiling():
                    out = self._compiled[name](model, *args)
            except EBFlowError:
                raise
            except Exception as err:  # noqa: BLE001 -- any compiler failure: eager from here on
                self.disable(err)
            else:
                if sig not in self.signatures:
                    self.signatures.add(sig)
                    seconds = time.perf_counter() - start
                    self.compile_seconds += seconds
                    logger.debug("compiled %s for %s in %.1f s", name, sig[3:], seconds)
                return out
        return _KERNELS[name](model, *args)

    def energy(self, model: EBFlow, h: Tensor) -> Tensor:
        """:math:`E` from ``h``, the output of the model's linear prefix."""
        return self._call("energy", model, h)

    def energy_and_grad(self, model: EBFlow, h: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(E, \nabla_h E)`."""
        return self._call("energy_and_grad", model, h)

    def energy_grad_hvp(self, model: EBFlow, h: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r""":math:`(E, \nabla_h E, \nabla_h^2 E\, u)` (``u`` of ``h``'s shape)."""
        return self._call("energy_grad_hvp", model, h, u)


def _rebuild(
    backend: str | Callable[..., Any], mode: str | None, dynamic: bool | None
) -> CompiledEnergy | None:
    try:
        return CompiledEnergy(backend=backend, mode=mode, dynamic=dynamic)
    except Exception:  # noqa: BLE001 -- unavailable where it is loaded: eager
        return None


def compile_model(
    model: EBFlow,
    *,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    dynamic: bool | None = False,
) -> EBFlow:
    """Give ``model`` compiled energy kernels (:class:`CompiledEnergy`, as ``model.kernels``;
    see the module's documentation for what is compiled and what it costs) and return it.
    ``backend``, ``mode`` and ``dynamic`` are :func:`torch.compile`'s (``"aot_eager"``: the
    same graphs without code generation, for tests). ``dynamic=False`` (the default): one graph
    per input shape, as training has fixed shapes (with torch 2.14, dynamic shapes failed to
    compile the conv and Glow models; Dynamo's automatic dynamic shapes are off too). Every objective and
    :meth:`~ebflow.EBFlow.energy_and_grad` use them while gradients are on; the values are the
    eager ones to rounding. ``model.kernels = None`` undoes it.

    If ``torch.compile`` is unavailable here, one :class:`RuntimeWarning` names the cause and
    the model is returned unchanged (eager).

    Example:
        >>> import ebflow
        >>> model = ebflow.compile_model(ebflow.dense_flow((4,)), backend="aot_eager")
        >>> model.kernels.enabled
        True
    """
    if not isinstance(model, EBFlow):
        raise ConfigError(f"compile_model takes an ebflow.EBFlow, got {type(model).__name__}")
    try:
        model.kernels = CompiledEnergy(backend=backend, mode=mode, dynamic=dynamic)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 -- e.g. a Python version Dynamo does not support
        warnings.warn(
            f"torch.compile is unavailable, computing eagerly ({_cause(err)})", RuntimeWarning, stacklevel=2
        )
    return model


class CompileCache(NamedTuple):
    """Inductor's on-disk caches: whether they are on and their folder."""

    enabled: bool
    directory: str


def compile_cache() -> CompileCache:
    """Whether Inductor's local FX-graph and AOTAutograd caches are on (the default; off with
    ``TORCHINDUCTOR_FX_GRAPH_CACHE=0`` or ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``) and their
    folder (``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_$USER``)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    on = bool(
        inductor_config.fx_graph_cache
        and functorch_config.enable_autograd_cache
        and not torch.compiler.config.force_disable_caches
    )
    return CompileCache(on, cache_dir())
