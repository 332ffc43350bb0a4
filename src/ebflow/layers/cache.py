r"""The one cache policy of linear layers: log-determinants and factorisations.

A :class:`~ebflow.layers.LinearFlowLayer` owns one :class:`ParameterCache`. Its entries are
values derived from the layer's parameters alone (``log|det A|``, an LU factorisation of
:math:`A`), computed at most once per *state* of the parameters.

**Key.** An entry is stored under ``(name, event_shape, state)``, where ``state`` is
:func:`parameter_state` of the layer -- for every parameter and buffer of the layer *and of its
sub-modules*:

* the storage address, the version counter, the dtype and the device. Every in-place update
  (``optimizer.step()``, ``load_state_dict``, ``copy_``, ``add_`` under ``no_grad``) bumps the
  version counter; ``.to(dtype/device)`` and ``param.data = t`` change the storage;
* a float64 fingerprint of the values (sum and 2-norm) of every floating tensor. It catches
  writes that bypass the version counter (``param.data.mul_()``, fused optimizers, storage
  reused at the same address). Cost: one pass over the weights and one device sync, far below
  the :math:`O(D^3)` of a factorisation.

**Rules.**

* A value that must carry gradients -- grad mode on and some parameter requiring grad
  (:func:`needs_grad`) -- is computed afresh, never served from the cache; a detached copy is
  kept for later calls without gradients (its key's fingerprints are read then, so a training
  step reads nothing from the device).
* Otherwise a value is computed once per key, under ``no_grad``, and served until the state
  changes; entries of an older state are dropped as soon as a new state is seen (the cache
  holds one state at a time).
* :meth:`ParameterCache.clear` forgets everything (``LinearFlowLayer.clear_cache``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ParameterCache", "needs_grad", "parameter_state"]


def _state_parts(module: nn.Module) -> tuple[tuple, Tensor | None]:
    """``(meta, fingerprints)``: the hashable part of :func:`parameter_state`, and the float64
    ``(n, 2)`` tensor of fingerprints still on the parameters' device (not read yet)."""
    tensors = list(chain(module.parameters(), module.buffers()))
    meta = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    floating = [t.detach() for t in tensors if t.is_floating_point()]
    if not floating:
        return meta, None
    with torch.no_grad():
        prints = torch.stack(
            [
                torch.stack([t.sum(dtype=torch.float64), torch.linalg.vector_norm(t, dtype=torch.float64)])
                for t in floating
            ]
        )
    return meta, prints


def _as_state(meta: tuple, prints: Tensor | None) -> tuple:
    return meta if prints is None else meta + tuple(tuple(p) for p in prints.tolist())  # one device sync


def parameter_state(module: nn.Module) -> tuple:
    """Identity of the current values of ``module``'s parameters and buffers (sub-modules
    included): ``(storage address, version, dtype, device)`` of each tensor, then the float64
    ``(sum, norm)`` fingerprint of each floating tensor. Hashable; equal keys mean equal values
    (up to a fingerprint collision of a write that also kept every version counter)."""
    return _as_state(*_state_parts(module))


def needs_grad(module: nn.Module) -> bool:
    """True when a value computed now must carry gradients: grad mode is on and some parameter
    of ``module`` requires grad. Such a value is never served from a cache."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


class ParameterCache:
    """Values derived from a module's parameters, reused until the parameters change.

    ``get(name, event_shape, compute, module)`` returns ``compute()`` -- computed now, or served
    from the cache when ``module``'s :func:`parameter_state` has not changed since it was
    computed (see the module docstring for the rules). Not a :class:`~torch.nn.Module`: it is
    never saved in a state dict.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, tuple[int, ...], tuple], Any] = {}  # (name, shape, state)
        # a value computed with gradients, kept detached with its state's fingerprints still on
        # the device: reading them is a host sync, deferred to the next call without gradients
        self._pending: tuple[str, tuple[int, ...], tuple, Tensor | None, Tensor] | None = None

    def __len__(self) -> int:
        return len(self._entries) + (self._pending is not None)

    def get(
        self, name: str, event_shape: Sequence[int], compute: Callable[[], Any], module: nn.Module
    ) -> Any:
        """``compute()`` for ``module``'s current parameters, cached under
        ``(name, event_shape, parameter_state(module))``. With gradients it reads nothing from
        the device (maximum-likelihood training steps stay free of host syncs)."""
        if needs_grad(module):
            value = compute()
            if isinstance(value, Tensor):
                self._entries = {}
                self._pending = (name, tuple(event_shape), *_state_parts(module), value.detach())
            return value
        if self._pending is not None:
            p_name, p_shape, p_meta, p_prints, p_value = self._pending
            self._pending = None
            self._entries[(p_name, p_shape, _as_state(p_meta, p_prints))] = p_value
        state = parameter_state(module)
        key = (name, tuple(event_shape), state)
        if key not in self._entries:
            # keep only the entries that still describe the current parameters
            self._entries = {k: v for k, v in self._entries.items() if k[2] == state}
            with torch.no_grad():
                self._entries[key] = compute()
        return self._entries[key]

    def clear(self) -> None:
        """Forget every entry."""
        self._entries = {}
        self._pending = None
