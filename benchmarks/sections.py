"""The four measurements of the benchmark; each returns :class:`Row` records.

1. ``iteration``  -- time of one training step per model and method, and of the user loop per
   model and score-matching objective.
2. ``scaling``    -- the same on the FC architecture over ``D``, with fitted exponents.
3. ``evaluation`` -- exact test-set NLL pass of a convolutional model: ``log Z`` once, then
   the energies of every batch.
4. ``memory``     -- peak memory of one step per method.

Three more live in their own modules: ``compiled`` (:mod:`benchmarks.compiled`), ``peers``
(:mod:`benchmarks.peers`) and ``small`` (:mod:`benchmarks.small`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from ebflow.preprocessing import ImagePreprocessing

from .memory import peak_memory_bytes
from .timing import fit_power_law, synchronize, time_round_robin
from .workloads import (
    METHODS,
    SCORE_MATCHING,
    ModelSpec,
    fc_spec,
    get_spec,
    make_inputs,
    make_optimizer,
    make_step,
    make_user_step,
)

__all__ = [
    "BenchConfig",
    "Row",
    "SECTIONS",
    "DEFAULT_SECTIONS",
    "FactorizationCounter",
    "iteration_section",
    "scaling_section",
    "evaluation_section",
    "memory_section",
]

#: Every section, in the order they run (``--sections`` choices).
SECTIONS: tuple[str, ...] = ("iteration", "scaling", "evaluation", "memory", "compiled", "peers", "small")
#: The sections of a run without ``--sections``: all but ``compiled``, which spends most of its
#: time compiling (minutes per model and objective) and is asked for by name.
DEFAULT_SECTIONS: tuple[str, ...] = ("iteration", "scaling", "evaluation", "memory", "peers", "small")


@dataclass
class BenchConfig:
    """What to measure, and how hard. The defaults are the full benchmark (issues 4 and 21);
    the fields from ``compiled_models`` on belong to the sections of issue 21."""

    device: str = "cpu"
    sections: Sequence[str] = DEFAULT_SECTIONS
    models: Sequence[str] = ("mnist-fc", "cifar-fc", "mnist-cnn", "cifar-cnn", "mnist-glow", "toy2d")
    methods: Sequence[str] = METHODS
    dims: Sequence[int] = (256, 512, 1024, 2048, 3072, 4096)
    fit_range: tuple[int, int] = (1024, 4096)
    batch: int = 100
    warmup: int = 2
    repeats: int = 7
    eval_model: str = "cifar-cnn"
    eval_images: int = 10_000
    eval_batch: int = 500
    memory_model: str = "cifar-fc"
    #: models of the ``compiled`` section (mnist-glow-s1 stands in for mnist-glow: see
    #: :mod:`benchmarks.compiled`)
    compiled_models: Sequence[str] = ("mnist-cnn", "mnist-glow-s1")
    #: dimensions of the ``peers`` section
    peer_dims: Sequence[int] = (784, 3072)
    #: steps per timed block of the ``small`` section; None: the preset's validation period
    #: (its bookkeeping periods are scaled to a given block)
    small_block: int | None = None
    seed: int = 0
    reuse_allocations: bool = True
    log: Callable[[str], None] | None = field(default=None, repr=False)

    def say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)


@dataclass
class Row:
    """One measured figure; every ratio compares figures of the same run.

    ``vs_plain`` is the ratio to the plain (tuned) step of the same model (or dimension),
    ``vs_ml`` the speed-up over ML (ML's time / this time), ``vs_tuned`` a user-loop row's
    ratio to the tuned step of the same objective. ``user_loop`` marks the rows of the loop
    a library user writes (plain ``loss.backward()``). ``note`` says why a figure is missing or
    what it is not (an eager fallback is never reported as a compiled time)."""

    section: str
    model: str
    dim: int
    method: str
    metric: str
    value: float
    unit: str
    q1: float = math.nan
    q3: float = math.nan
    repeats: int = 0
    vs_plain: float = math.nan
    vs_ml: float = math.nan
    vs_tuned: float = math.nan
    user_loop: bool = False
    #: what the figure is not: ``eager fallback (...)``, ``skipped: nflows not installed`` ...
    note: str = ""


def _step_rows(
    section: str,
    specs: Sequence[ModelSpec],
    config: BenchConfig,
    device: torch.device,
    *,
    user_loop: bool = False,
) -> list[Row]:
    """Time every method on every model of ``specs`` in the same interleaved rounds, so that a
    slow spell of the machine shifts all of them alike (ratios, and fitted exponents, hold).
    With ``user_loop``, the user loop of each score-matching objective joins the same rounds."""
    methods = list(dict.fromkeys(["plain", *config.methods]))
    user_methods = [m for m in methods if m in SCORE_MATCHING] if user_loop else []
    steps = {}
    for spec in specs:
        torch.manual_seed(config.seed)
        model = spec.build().to(device)
        gen = torch.Generator().manual_seed(config.seed)
        x = make_inputs(spec, config.batch, device=device, generator=gen)
        model.initialize(x)  # data-dependent (ActNorm): every method starts from this model
        optimizer = make_optimizer(model)
        for m in methods:
            steps[(spec.name, m, False)] = make_step(model, m, x, optimizer, spec.options.get(m))
        for m in user_methods:
            steps[(spec.name, m, True)] = make_user_step(model, m, x, optimizer, spec.options.get(m))
    names = ", ".join(f"{s.name} (D={s.dim})" for s in specs)
    extra = f"; user loop: {', '.join(user_methods)}" if user_methods else ""
    config.say(f"{section}: {names}: {', '.join(methods)}{extra}")
    timings = time_round_robin(steps, device=device, warmup=config.warmup, repeats=config.repeats)
    rows = []
    for spec in specs:
        plain = timings[(spec.name, "plain", False)].median_ms
        ml = timings.get((spec.name, "ml", False))
        for m in methods:
            for user in (False, True) if m in user_methods else (False,):
                t = timings[(spec.name, m, user)]
                tuned = timings[(spec.name, m, False)].median_ms
                rows.append(
                    Row(
                        section,
                        spec.name,
                        spec.dim,
                        m,
                        "time",
                        t.median_ms,
                        "ms",
                        t.q1_ms,
                        t.q3_ms,
                        t.repeats,
                        vs_plain=t.median_ms / plain,
                        vs_ml=math.nan if ml is None else ml.median_ms / t.median_ms,
                        vs_tuned=t.median_ms / tuned if user else math.nan,
                        user_loop=user,
                    )
                )
    return rows


def iteration_section(config: BenchConfig, device: torch.device) -> list[Row]:
    """Per-iteration time of every method on every model (one model at a time), and of the
    user loop of every score-matching objective, in the same rounds."""
    rows: list[Row] = []
    for name in config.models:
        rows += _step_rows("iteration", [get_spec(name)], config, device, user_loop=True)
    return rows


def scaling_section(config: BenchConfig, device: torch.device) -> list[Row]:
    """Per-iteration time of the FC architecture over ``dims`` (all dimensions interleaved in
    the same rounds), and the exponent of a power law fitted over ``fit_range`` for each method
    (one ``exponent`` row per method)."""
    rows = _step_rows("scaling", [fc_spec(int(d)) for d in config.dims], config, device)
    lo, hi = config.fit_range
    for m in dict.fromkeys(["plain", *config.methods]):
        pts = [(r.dim, r.value) for r in rows if r.method == m and lo <= r.dim <= hi]
        k = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        rows.append(Row("scaling", "fc", 0, m, f"exponent {lo}-{hi}", k, "", repeats=len(pts)))
    return rows


class FactorizationCounter(TorchFunctionMode):
    """Counts the calls of torch's factorisation and determinant functions made inside it.

    Counting at torch's public function layer (a ``TorchFunctionMode``) touches no layer of the
    model, so it survives any change of the layers' private cache and covers every linear layer
    (wrapped ones included), where patching ``_log_abs_det`` reached into the layers. Its cost
    is a Python check per torch call (under a millisecond per batch of the NLL pass, within its
    noise); the sub-millisecond cached ``log Z`` is therefore timed outside it.
    """

    FUNCTIONS = frozenset(
        {
            torch.linalg.lu_factor,
            torch.linalg.lu_factor_ex,
            torch.linalg.lu,
            torch.linalg.slogdet,
            torch.linalg.det,
            torch.slogdet,
            torch.logdet,
            torch.det,
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FUNCTIONS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def evaluation_section(config: BenchConfig, device: torch.device) -> list[Row]:
    """Exact NLL (nats per image, MaP preprocessing included) of ``eval_images`` random 8-bit
    images: the time of ``log Z`` (first and cached), of the whole pass, and how many times
    ``log Z`` was computed during it: the factorisations made during the pass divided by those of
    the first ``log Z`` (1 means ``log Z`` was computed once, then served from the caches)."""
    spec = get_spec(config.eval_model)
    if spec.smoothness is None:
        raise ValueError(f"the evaluation section needs an image model, not {spec.name}")
    torch.manual_seed(config.seed)
    model = spec.build().to(device).eval()
    pre = ImagePreprocessing(smoothness=spec.smoothness)
    gen = torch.Generator().manual_seed(config.seed)
    pixels = torch.randint(0, 256, (config.eval_images, *spec.event_shape), generator=gen, dtype=torch.uint8)
    config.say(f"evaluation: exact NLL of {config.eval_images} images on {spec.name} (D={spec.dim})")
    first, _ = pre.forward(
        pre.dequantize(
            pixels[: config.eval_batch].float(), generator=torch.Generator().manual_seed(config.seed)
        )
    )
    model.initialize(first.to(device))  # data-dependent (ActNorm), untimed
    linear = model.linear_layers
    counter = FactorizationCounter()
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        with counter:
            model.log_partition()
            synchronize(device)
        log_z_s = time.perf_counter() - start
        per_log_z = counter.count
        # timed outside the counter: its per-call check would be a large part of this figure
        t1 = time.perf_counter()
        model.log_partition()
        synchronize(device)
        cached_s = time.perf_counter() - t1
        total, batches = 0.0, 0
        with counter:  # every batch's log_prob asks for log Z: a cache miss would count here
            for chunk in pixels.split(config.eval_batch):
                y, log_det = pre.forward(pre.dequantize(chunk.float(), generator=gen))
                log_p = model.log_prob(y.to(device)) + log_det.to(device)
                total += float(-log_p.double().sum())
                batches += 1
            synchronize(device)
        pass_s = time.perf_counter() - start
    nll = total / config.eval_images
    bpd = nll / (spec.dim * math.log(2))
    n_layers = len(linear)
    # without a factorisation per log Z (e.g. triangular layers only) there is nothing to recompute
    computations = counter.count / per_log_z if per_log_z else (0.0 if counter.count == 0 else math.inf)
    rows = [
        Row("evaluation", spec.name, spec.dim, "log Z", "first (computed)", log_z_s * 1e3, "ms"),
        Row("evaluation", spec.name, spec.dim, "log Z", "second (cached)", cached_s * 1e3, "ms"),
        Row(
            "evaluation",
            spec.name,
            spec.dim,
            "NLL pass",
            f"{config.eval_images} images, {batches} batches of {config.eval_batch}",
            pass_s,
            "s",
        ),
        Row(
            "evaluation",
            spec.name,
            spec.dim,
            "NLL pass",
            "images per second",
            config.eval_images / pass_s,
            "1/s",
        ),
        Row("evaluation", spec.name, spec.dim, "log Z", "computations per pass", computations, "count"),
        Row("evaluation", spec.name, spec.dim, "log Z", "linear layers", n_layers, "count"),
        Row("evaluation", spec.name, spec.dim, "log Z", "factorisations per log Z", per_log_z, "count"),
        Row("evaluation", spec.name, spec.dim, "NLL pass", "bits/dim (random model and images)", bpd, "bpd"),
    ]
    del model
    return rows


def memory_section(config: BenchConfig, device: torch.device) -> list[Row]:
    """Peak memory allocated during one step of each method on ``memory_model`` (after warm-up,
    so the optimiser state exists; the step's own gradients count)."""
    spec = get_spec(config.memory_model)
    torch.manual_seed(config.seed)
    model = spec.build().to(device)
    gen = torch.Generator().manual_seed(config.seed)
    x = make_inputs(spec, config.batch, device=device, generator=gen)
    model.initialize(x)
    optimizer = make_optimizer(model)
    methods = list(dict.fromkeys(["plain", *config.methods]))
    config.say(f"memory: {spec.name} (D={spec.dim}): {', '.join(methods)}")
    peaks: dict[str, int] = {}
    for m in methods:
        step = make_step(model, m, x, optimizer, spec.options.get(m))
        for _ in range(max(config.warmup, 1)):
            step()
        optimizer.zero_grad(set_to_none=True)
        peaks[m] = peak_memory_bytes(step, device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = [
        Row(
            "memory",
            spec.name,
            spec.dim,
            m,
            "peak of one step",
            peaks[m] / 2**20,
            "MiB",
            vs_plain=peaks[m] / max(peaks["plain"], 1),
        )
        for m in methods
    ]
    rows.append(Row("memory", spec.name, spec.dim, "parameters", "size", params / 2**20, "MiB"))
    return rows
