"""One process of the ``compiled`` section: compile one model for one objective, and time it.

:mod:`benchmarks.compiled` runs ``python -m benchmarks.compile_probe REQUEST`` (``REQUEST``: a
:class:`~benchmarks.compiled.ProbeRequest` as JSON) with its own ``TORCHINDUCTOR_CACHE_DIR``,
so that the compile time is that of a fresh process with an empty (cold) or a filled (warm)
Inductor cache, as a training run sees it. The process prints one line,
:data:`~benchmarks.compiled.PROBE_MARK` followed by the result of :func:`probe` as JSON.

A *fallback* is the compiled path computing eagerly: ``ebflow.compile_model`` or a kernel's
first call failed, with one ``RuntimeWarning`` naming the cause (``docs/compiled.md``). Its
figures are never reported as compiled ones.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

import ebflow
from ebflow.compiled import compile_cache
from ebflow.flow import EBFlow

from .compiled import PROBE_MARK, ProbeRequest
from .timing import synchronize, time_round_robin
from .workloads import get_spec, make_inputs, make_optimizer, make_step

__all__ = ["fallback_cause", "probe", "main"]


def fallback_cause(model: EBFlow, caught: Sequence[warnings.WarningMessage]) -> str | None:
    """Why ``model`` computes eagerly although it was compiled (its kernels are missing or
    disabled, or ebflow warned that it computes eagerly); None while it uses compiled kernels."""
    said = [
        str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "eager" in str(w.message)
    ]
    kernels = model.kernels
    if kernels is None:
        return said[0] if said else "no compiled kernels"
    if not getattr(kernels, "enabled", True):
        return getattr(kernels, "failure", None) or (said[0] if said else "compiled kernels disabled")
    return said[0] if said else None


def _compile_seconds(model: EBFlow) -> float:
    return float(getattr(model.kernels, "compile_seconds", math.nan))


def probe(request: ProbeRequest) -> dict[str, Any]:
    """Compile a copy of the model (``ebflow.compile_model``) and run its first step: the
    compile time is ebflow's ``compile_seconds`` (the calls that compiled, forward and backward
    graphs, cache loads included). With ``request.timed``, then time the eager step, the
    compiled step (unless it fell back) and the plain eager step in the same rounds.

    Returns ``compile_s``, ``first_step_s``, ``fallback`` (the cause, or None), ``cache``
    (Inductor's on-disk caches on) and, when timed, ``timings``: name -> :class:`Timing` fields.
    """
    torch.set_num_threads(request.threads)
    device = torch.device(request.device)
    spec = get_spec(request.model)
    options = spec.options.get(request.method)
    torch.manual_seed(request.seed)
    eager = spec.build().to(device)
    x = make_inputs(spec, request.batch, device=device, generator=torch.Generator().manual_seed(request.seed))
    eager.initialize(x)  # data-dependent (ActNorm): both copies start from this model
    compiled = copy.deepcopy(eager)
    out: dict[str, Any] = {"model": request.model, "method": request.method, "cache": compile_cache().enabled}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ebflow.compile_model(compiled)
        compiled_step = make_step(compiled, request.method, x, make_optimizer(compiled), options)
        synchronize(device)
        start = time.perf_counter()
        compiled_step()
        synchronize(device)
        out["first_step_s"] = time.perf_counter() - start
        cause = fallback_cause(compiled, caught)
        if request.timed:
            optimizer = make_optimizer(eager)
            steps = {
                "plain": make_step(eager, "plain", x, optimizer),
                "eager": make_step(eager, request.method, x, optimizer, options),
            }
            if cause is None:  # an eager fallback is not timed as a compiled step
                steps["compiled"] = compiled_step
            timings = time_round_robin(steps, device=device, warmup=request.warmup, repeats=request.repeats)
            cause = fallback_cause(compiled, caught)  # a failure during the rounds counts too
            out["timings"] = {k: asdict(t) for k, t in timings.items() if k != "compiled" or cause is None}
    out["fallback"] = cause
    out["compile_s"] = _compile_seconds(compiled)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.compile_probe REQUEST_JSON``: print the probe's result line."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m benchmarks.compile_probe REQUEST_JSON", file=sys.stderr)
        return 2
    result = probe(ProbeRequest(**json.loads(args[0])))
    print(PROBE_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
