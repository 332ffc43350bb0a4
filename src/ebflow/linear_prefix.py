r"""The leading linear layers of a flow, shared by the directional objectives.

The layers before the first non-linear one make up an affine map :math:`P(x) = A x + c` that adds
nothing to the energy, so :math:`E(x \pm v)` needs only :math:`P(x)` and :math:`A v`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .layers.base import LinearFlowLayer

__all__ = ["push_point_and_direction"]


def push_point_and_direction(
    layers: Sequence[LinearFlowLayer], h: Tensor, direction: Tensor
) -> tuple[Tensor, Tensor]:
    r""":math:`(P(h), A v)` through the affine map :math:`P` of ``layers``, with
    :math:`A v = P(v) - P(0)` (the shift cancels, so gradients reach :math:`A` only)."""
    if not layers:
        return h, direction
    rows = torch.cat([direction, torch.zeros_like(direction[:1])])
    if h.requires_grad:
        # h on its own: its gradient must not run through v's rows.
        for layer in layers:
            h = layer.transform(h)
        for layer in layers:
            rows = layer.transform(rows)
        return h, rows[:-1] - rows[-1:]
    b = h.shape[0]
    rows = torch.cat([h, rows])  # one pass: larger products, one weight gradient per layer
    for layer in layers:
        rows = layer.transform(rows)
    return rows[:b], rows[b:-1] - rows[-1:]
