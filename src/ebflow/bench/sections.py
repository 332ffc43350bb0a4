"""The four measurements of the benchmark; each returns :class:`Row` records.

1. ``iteration``  -- time of one training step per model and method.
2. ``scaling``    -- the same on the FC architecture over ``D``, with fitted exponents.
3. ``evaluation`` -- exact test-set NLL pass of a convolutional model: ``log Z`` once, then
   the energies of every batch.
4. ``memory``     -- peak memory of one step per method.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..layers.base import LinearFlowLayer
from ..preprocessing import ImagePreprocessing
from .memory import peak_memory_bytes
from .timing import fit_power_law, synchronize, time_round_robin
from .workloads import (
    METHODS, ModelSpec, fc_spec, get_spec, make_inputs, make_optimizer, make_step,
)

__all__ = [
    "BenchConfig",
    "Row",
    "REFERENCE_MS",
    "iteration_section",
    "scaling_section",
    "evaluation_section",
    "memory_section",
]

#: ms per training iteration of the public reference implementation, measured on this machine
#: type (2 CPU cores, batch 100; DESIGN.md section 6). Keys: (model, method).
REFERENCE_MS: dict[tuple[str, str], float] = {
    ("mnist-fc", "ml"): 75.0, ("mnist-fc", "ssm"): 119.0,
    ("mnist-fc", "dsm"): 38.0, ("mnist-fc", "fdssm"): 48.0,
    ("cifar-fc", "ml"): 2261.0, ("cifar-fc", "ssm"): 2617.0,
    ("cifar-fc", "dsm"): 1322.0, ("cifar-fc", "fdssm"): 1196.0,
    ("mnist-cnn", "ml"): 299.0, ("mnist-cnn", "ssm"): 219.0,
    ("mnist-cnn", "dsm"): 115.0, ("mnist-cnn", "fdssm"): 107.0,
}

SECTIONS: tuple[str, ...] = ("iteration", "scaling", "evaluation", "memory")


@dataclass
class BenchConfig:
    """What to measure, and how hard. The defaults are the full benchmark of issue 4."""

    device: str = "cpu"
    sections: Sequence[str] = SECTIONS
    models: Sequence[str] = ("mnist-fc", "cifar-fc", "mnist-cnn", "cifar-cnn", "toy2d")
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
    seed: int = 0
    reuse_allocations: bool = True
    log: Callable[[str], None] | None = field(default=None, repr=False)

    def say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)


@dataclass
class Row:
    """One measured figure. ``vs_plain`` is the ratio to the plain step of the same model (or
    dimension); ``reference`` the reference implementation's figure, ``speedup`` = reference /
    value (CPU only)."""

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
    reference: float = math.nan
    speedup: float = math.nan


def _step_rows(
    section: str, specs: Sequence[ModelSpec], config: BenchConfig, device: torch.device
) -> list[Row]:
    """Time every method on every model of ``specs`` in the same interleaved rounds, so that a
    slow spell of the machine shifts all of them alike (ratios, and fitted exponents, hold)."""
    methods = list(dict.fromkeys(["plain", *config.methods]))
    steps = {}
    for spec in specs:
        torch.manual_seed(config.seed)
        model = spec.build().to(device)
        gen = torch.Generator().manual_seed(config.seed)
        x = make_inputs(spec, config.batch, device=device, generator=gen)
        optimizer = make_optimizer(model)
        for m in methods:
            steps[(spec.name, m)] = make_step(model, m, x, optimizer, spec.options.get(m))
    names = ", ".join(f"{s.name} (D={s.dim})" for s in specs)
    config.say(f"{section}: {names}: {', '.join(methods)}")
    timings = time_round_robin(steps, device=device, warmup=config.warmup, repeats=config.repeats)
    rows = []
    for spec in specs:
        plain = timings[(spec.name, "plain")].median_ms
        for m in methods:
            t = timings[(spec.name, m)]
            ref = REFERENCE_MS.get((spec.name, m), math.nan) if device.type == "cpu" else math.nan
            rows.append(Row(
                section, spec.name, spec.dim, m, "time", t.median_ms, "ms", t.q1_ms, t.q3_ms,
                t.repeats, t.median_ms / plain, ref, ref / t.median_ms,
            ))
    return rows


def iteration_section(config: BenchConfig, device: torch.device) -> list[Row]:
    """Per-iteration time of every method on every model (one model at a time)."""
    rows: list[Row] = []
    for name in config.models:
        rows += _step_rows("iteration", [get_spec(name)], config, device)
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


class _CallCounter:
    """Counts calls of each linear layer's log-determinant computation (cache misses)."""

    def __init__(self, layers: Sequence[LinearFlowLayer]) -> None:
        self.layers = list(layers)
        self.counts = [0] * len(self.layers)

    def __enter__(self) -> _CallCounter:
        for i, layer in enumerate(self.layers):
            original = layer._log_abs_det

            def counted(event_shape, _i=i, _original=original):
                self.counts[_i] += 1
                return _original(event_shape)

            layer._log_abs_det = counted  # instance attribute shadows the method
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            del layer._log_abs_det


def evaluation_section(config: BenchConfig, device: torch.device) -> list[Row]:
    """Exact NLL (nats per image, MaP preprocessing included) of ``eval_images`` random 8-bit
    images: the time of ``log Z`` (first and cached), of the whole pass, and how many times each
    linear layer's log-determinant was computed during it (1 means ``log Z`` was computed once)."""
    spec = get_spec(config.eval_model)
    if spec.smoothness is None:
        raise ValueError(f"the evaluation section needs an image model, not {spec.name}")
    torch.manual_seed(config.seed)
    model = spec.build().to(device).eval()
    pre = ImagePreprocessing(smoothness=spec.smoothness)
    gen = torch.Generator().manual_seed(config.seed)
    pixels = torch.randint(0, 256, (config.eval_images, *spec.event_shape), generator=gen,
                           dtype=torch.uint8)
    config.say(f"evaluation: exact NLL of {config.eval_images} images on {spec.name} "
               f"(D={spec.dim})")
    linear = model.linear_layers
    with torch.no_grad(), _CallCounter(linear) as counter:
        synchronize(device)
        start = time.perf_counter()
        model.log_partition()
        synchronize(device)
        log_z_s = time.perf_counter() - start
        t1 = time.perf_counter()
        model.log_partition()
        synchronize(device)
        cached_s = time.perf_counter() - t1
        total, batches = 0.0, 0
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
    most = max(counter.counts) if counter.counts else 0
    rows = [
        Row("evaluation", spec.name, spec.dim, "log Z", "first (computed)", log_z_s * 1e3, "ms"),
        Row("evaluation", spec.name, spec.dim, "log Z", "second (cached)", cached_s * 1e3, "ms"),
        Row("evaluation", spec.name, spec.dim, "NLL pass", f"{config.eval_images} images, "
            f"{batches} batches of {config.eval_batch}", pass_s, "s"),
        Row("evaluation", spec.name, spec.dim, "NLL pass", "images per second",
            config.eval_images / pass_s, "1/s"),
        Row("evaluation", spec.name, spec.dim, "log Z", "computations per pass", most, "count"),
        Row("evaluation", spec.name, spec.dim, "log Z", "linear layers", n_layers, "count"),
        Row("evaluation", spec.name, spec.dim, "NLL pass", "bits/dim (random model and images)",
            bpd, "bpd"),
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
        Row("memory", spec.name, spec.dim, m, "peak of one step", peaks[m] / 2**20, "MiB",
            vs_plain=peaks[m] / max(peaks["plain"], 1))
        for m in methods
    ]
    rows.append(Row("memory", spec.name, spec.dim, "parameters", "size", params / 2**20, "MiB"))
    return rows
