"""Section 6, ``peers``: one training step of the same small flow in ebflow and in two other flow
libraries, nflows and zuko, which train by maximum likelihood only.

The flow is "linear – leaky ReLU – linear" on ``D``-vectors (batch ``config.batch``, standard
normal inputs and base distribution), at each ``D`` of ``peer_dims``. Every step is
``zero_grad``, the loss, the backward pass and an RMSprop step (lr 1e-4), in the same
interleaved rounds of one process:

* nflows 0.14: ``LULinear`` – ``LeakyReLU`` – ``LULinear``, loss ``-log_prob(x).mean()``;
* zuko: ``LULinearTransform`` – leaky ReLU – ``LULinearTransform`` (zuko has no leaky ReLU
  transform; a four-line one is defined here), same loss;
* ebflow: ``dense_flow((D,))`` (smooth leaky ReLU, the non-linearity score matching needs) with
  ``Dense`` full or ``parameterization="lu"``: ML full and LU, DSM LU and full, SSM full.

All leaky ReLUs have slope 0.3 on the negative side. nflows and zuko are optional (the ``peers``
extra); a missing one gives a row that says ``skipped: ... not installed``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from ebflow.architectures import dense_flow

from .sections import BenchConfig, Row
from .tables import INFO, Target, find_row, fmt, markdown_table, row_value
from .timing import time_round_robin
from .workloads import make_optimizer, make_step

__all__ = ["PEERS", "SLOPE", "peers_section", "peers_table", "peers_targets", "LeakyReLUTransform"]

#: Negative-side slope of every leaky ReLU (ebflow's ``alpha``).
SLOPE = 0.3
#: (library, parameterisation, method) of each row, the reference (nflows LU ML) first.
PEERS: tuple[tuple[str, str, str], ...] = (
    ("nflows", "lu", "ml"),
    ("zuko", "lu", "ml"),
    ("ebflow", "full", "ml"),
    ("ebflow", "lu", "ml"),
    ("ebflow", "lu", "dsm"),
    ("ebflow", "full", "dsm"),
    ("ebflow", "full", "ssm"),
)
#: The options of the score-matching objectives (those of the scaling sweep).
OPTIONS = {"dsm": {"sigma": 0.1}}
#: The dimension at which the targets are checked.
TARGET_DIM = 3072

Step = Callable[[], None]


class LeakyReLUTransform(Transform):
    """Element-wise leaky ReLU as a ``torch.distributions`` transform (for zuko):
    ``y = x`` for ``x >= 0``, ``y = a x`` otherwise; ``log|dy/dx| = log a`` where ``x < 0``."""

    domain = constraints.real
    codomain = constraints.real
    bijective = True
    sign = +1

    def __init__(self, slope: float = SLOPE) -> None:
        super().__init__()
        self.slope = slope

    def _call(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.slope)

    def _inverse(self, y: Tensor) -> Tensor:
        return F.leaky_relu(y, 1.0 / self.slope)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return (x < 0).to(x.dtype) * math.log(self.slope)


def _ml_step(module: nn.Module, log_prob: Callable[[Tensor], Tensor], x: Tensor) -> Step:
    """``zero_grad``, ``-log_prob(x).mean()``, backward, RMSprop step (lr 1e-4)."""
    optimizer = torch.optim.RMSprop(module.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = -log_prob(x).mean()
        loss.backward()
        optimizer.step()

    return step


def _nflows_step(dim: int, x: Tensor) -> Step:
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import CompositeTransform, LeakyReLU, LULinear

    transform = CompositeTransform([LULinear(dim), LeakyReLU(SLOPE), LULinear(dim)])
    flow = Flow(transform, StandardNormal([dim])).to(x.device)
    return _ml_step(flow, flow.log_prob, x)


def _zuko_step(dim: int, x: Tensor) -> Step:
    from zuko.distributions import DiagNormal
    from zuko.flows import Flow, UnconditionalDistribution, UnconditionalTransform
    from zuko.transforms import LULinearTransform

    def lu() -> UnconditionalTransform:  # L U x, L and U starting at the identity
        return UnconditionalTransform(LULinearTransform, torch.eye(dim))

    zeros, ones = torch.zeros(dim), torch.ones(dim)
    base = UnconditionalDistribution(DiagNormal, zeros, ones, buffer=True)
    flow = Flow([lu(), UnconditionalTransform(LeakyReLUTransform), lu()], base).to(x.device)
    return _ml_step(flow, lambda v: flow().log_prob(v), x)


PEER_BUILDERS: dict[str, Callable[[int, Tensor], Step]] = {"nflows": _nflows_step, "zuko": _zuko_step}


def _peer_step(library: str, dim: int, x: Tensor) -> tuple[Step | None, str]:
    """The ML step of a peer library, or None and why not (not installed, or failed once)."""
    try:
        importlib.import_module(library)
    except ImportError:
        return None, f"skipped: {library} not installed"
    try:
        step = PEER_BUILDERS[library](dim, x)
        step()  # a failure here (e.g. a CPU-only operation on a GPU) is reported, not raised
    except Exception as err:  # noqa: BLE001 -- an optional peer must never stop the benchmark
        return None, f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return step, ""


def _dim_rows(config: BenchConfig, device: torch.device, dim: int) -> list[Row]:
    """Every entry of :data:`PEERS` at one dimension, timed in the same rounds."""
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randn(config.batch, dim, generator=gen).to(device)
    steps: dict[tuple[str, str, str], Step] = {}
    notes: dict[tuple[str, str, str], str] = {}
    models = {}
    for key in PEERS:
        library, param, method = key
        if library != "ebflow":
            step, notes[key] = _peer_step(library, dim, x)
            if step is not None:
                steps[key] = step
            continue
        if param not in models:
            torch.manual_seed(config.seed)
            model = dense_flow((dim,), parameterization=param).to(device)
            models[param] = (model, make_optimizer(model))
        model, optimizer = models[param]
        steps[key] = make_step(model, method, x, optimizer, OPTIONS.get(method))
    config.say(f"peers: D={dim}: {', '.join(' '.join(k) for k in steps)}")
    timings = time_round_robin(steps, device=device, warmup=config.warmup, repeats=config.repeats)
    reference = timings.get(PEERS[0])
    rows = []
    for key in PEERS:
        library, param, method = key
        t = timings.get(key)
        value = math.nan if t is None else t.median_ms
        rows.append(Row(
            "peers", f"fc-{dim}", dim, method, f"{library} {param}", value, "ms",
            math.nan if t is None else t.q1_ms, math.nan if t is None else t.q3_ms,
            0 if t is None else t.repeats,
            vs_ml=math.nan if reference is None else reference.median_ms / value, note=notes.get(key, ""),
        ))  # fmt: skip
    return rows


def peers_section(config: BenchConfig, device: torch.device) -> list[Row]:
    """The rows of :data:`PEERS` at every dimension of ``config.peer_dims``."""
    rows: list[Row] = []
    for dim in config.peer_dims:
        rows += _dim_rows(config, device, int(dim))
    return rows


# -- report ---------------------------------------------------------------------------------------
CAPTION = (
    "Linear – leaky ReLU – linear on D-vectors, batch and optimiser as above (RMSprop, lr 1e-4), all "
    "rows of one D in the same rounds. nflows and zuko: `LULinear` / `LULinearTransform` and maximum "
    "likelihood (`-log_prob(x).mean()`). ebflow: `dense_flow` with `Dense` full or "
    '`parameterization="lu"`. nflows LU ML ÷ this: how many times faster than nflows\'s LU ML step.'
)


def peers_table(rows: Sequence[Row]) -> str:
    """One line per dimension and library, parameterisation and method."""
    body = [[
        str(r.dim), r.metric.split()[0], r.metric.split()[1], r.method.upper(),
        r.note or fmt(r.value), "" if r.note else f"{fmt(r.q1)}–{fmt(r.q3)}", fmt(r.vs_ml, 2),
    ] for r in rows]  # fmt: skip
    table = markdown_table(
        ["D", "library", "linear layers", "objective", "ms / iteration (median)", "IQR (ms)",
         "nflows LU ML ÷ this"],
        body,
    )  # fmt: skip
    return "\n\n".join([CAPTION, table])


def _time(rows: Sequence[Row], dim: int, library: str, param: str, method: str) -> float:
    return row_value(find_row(rows, "peers", f"fc-{dim}", method, f"{library} {param}"))


def peers_targets(rows: Sequence[Row]) -> list[Target]:
    """At D = 3,072 (only when the section ran): ebflow LU ML within 1.2x of nflows LU ML,
    ebflow LU DSM faster than full DSM, and the headline ratios of ebflow's full DSM and SSM to
    nflows's LU ML (reported, no bound)."""
    if not any(r.section == "peers" for r in rows):
        return []
    d = TARGET_DIM
    nflows = _time(rows, d, "nflows", "lu", "ml")
    return [
        Target(f"ebflow LU ML / nflows LU ML at D = {d:,}", _time(rows, d, "ebflow", "lu", "ml") / nflows,
               "<=", 1.2),
        Target(f"ebflow LU DSM / ebflow full DSM at D = {d:,}",
               _time(rows, d, "ebflow", "lu", "dsm") / _time(rows, d, "ebflow", "full", "dsm"), "<", 1.0),
        Target(f"headline: ebflow full DSM / nflows LU ML at D = {d:,}",
               _time(rows, d, "ebflow", "full", "dsm") / nflows, INFO),
        Target(f"headline: ebflow full SSM / nflows LU ML at D = {d:,}",
               _time(rows, d, "ebflow", "full", "ssm") / nflows, INFO),
    ]  # fmt: skip
