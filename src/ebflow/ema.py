r"""Exponential moving average of parameters: :math:`\bar\theta \leftarrow d_t\,\bar\theta + (1-d_t)\,\theta`,
with the warm-up :math:`d_t = \min(d, (1 + t) / (10 + t))` at update :math:`t` (optional)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["EMA"]


class EMA:
    r"""Keeps an exponential moving average of a model's floating-point parameters.

    The average starts from the parameters seen at the first :meth:`update` (update ``t = 0``),
    and is used for evaluation and sampling through :meth:`average_parameters`. With
    ``warmup=True`` (the paper's recipe) update ``t`` uses the decay
    :math:`\min(d, (1 + t)/(10 + t))`, so that early averages forget the first weights quickly
    (0.17 at ``t = 1``, 0.5 at ``t = 8``, 0.9 at ``t = 80``, ``d = 0.999`` from ``t = 8991``);
    with ``warmup=False`` every update uses ``d``.

    Example:
        >>> import torch, ebflow
        >>> model = ebflow.dense_flow((2,))
        >>> ema = ebflow.EMA(model, decay=0.999)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> objective = ebflow.make_objective("ssm")
        >>> for _ in range(3):
        ...     optimizer.zero_grad()
        ...     objective(model, torch.randn(8, 2)).backward()
        ...     optimizer.step()
        ...     ema.update()
        >>> ema.num_updates, round(ema.current_decay, 4)  # warm-up: (1 + t) / (10 + t) at t = 3
        (3, 0.3077)
        >>> with ema.average_parameters(), torch.no_grad():  # evaluate with the averages
        ...     nll = -model.log_prob(torch.randn(8, 2)).mean()
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {decay}")
        self.model = model
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {}

    def _params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.dtype.is_floating_point}

    @property
    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        t = self.num_updates
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameters into the average."""
        params = self._params()
        if not self.shadow:
            self.shadow = {n: p.detach().clone() for n, p in params.items()}
        else:
            names = list(params)
            torch._foreach_lerp_(
                [self.shadow[n] for n in names], [params[n].detach() for n in names], 1.0 - self.current_decay
            )
        self.num_updates += 1

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the model's parameters with the averages (no-op before the first update)."""
        for n, p in self._params().items():
            if n in self.shadow:
                p.copy_(self.shadow[n])

    @contextmanager
    def average_parameters(self) -> Iterator[nn.Module]:
        """Swap the averaged parameters in for the duration of the block, then restore."""
        params = self._params()
        backup = {n: p.detach().clone() for n, p in params.items()}
        self.copy_to_model()
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict:
        """The decay, warm-up flag, update count and averaged tensors (for checkpoints)."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": dict(self.shadow),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; its tensors must name the model's parameters."""
        params = self._params()
        shadow = state["shadow"]
        if shadow and set(shadow) != set(params):
            missing = sorted(set(params) - set(shadow))
            extra = sorted(set(shadow) - set(params))
            raise ConfigError(f"EMA state does not match the model (missing {missing}, unexpected {extra})")
        for n, t in shadow.items():
            if t.shape != params[n].shape:
                raise ConfigError(
                    f"EMA state for {n!r} has shape {tuple(t.shape)}, model has {tuple(params[n].shape)}"
                )
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", False))  # checkpoints before 0.2 had none
        self.num_updates = int(state["num_updates"])
        self.shadow = {n: t.detach().clone().to(params[n]) for n, t in shadow.items()}
