"""Section 5, ``compiled``: the opt-in compiled step (``ebflow.compile_model``) against the eager
one, and what compiling costs.

For each model of ``compiled_models`` and each score-matching method (SSM, DSM, FDSSM), two
fresh processes (:mod:`benchmarks.compile_probe`) share one new, empty ``TORCHINDUCTOR_CACHE_DIR``:

1. *cold*: compile with the empty cache and run the first step;
2. *warm*: compile again, now loading from that cache, then time the eager step, the compiled
   step and the plain eager step (``mean E(x)`` forward and backward) in the same interleaved
   rounds.

Each compile time is ebflow's ``compile_seconds`` (the calls that compiled, as a training run
logs it). The break-even step count is ``compile s / (eager s/step - compiled s/step)``: after
that many steps a compiled run has caught up; infinite ("never") when compiling is not faster.
An eager fallback (compilation failed and ebflow warned) is labelled so and never reported as a
compiled time.

The default models are mnist-cnn and mnist-glow-s1, mnist-glow with one step per level instead
of 16: Inductor unrolls every layer into the graph, so a cold compile of the full Glow's SSM
kernel alone would take far longer than this section's budget. ``--models mnist-glow`` measures
the full model (expect an hour or more of cold compiling on 2 CPU cores).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .sections import BenchConfig, Row
from .tables import Target, find_row, fmt, markdown_table, row_value
from .workloads import SCORE_MATCHING, ModelSpec, get_spec

__all__ = [
    "COMPILED_BOUNDS",
    "PROBE_MARK",
    "PROBE_TIMEOUT_S",
    "ProbeRequest",
    "ProbeRunner",
    "break_even_steps",
    "compiled_section",
    "compiled_table",
    "compiled_targets",
    "probe_in_process",
    "probe_in_subprocess",
]

#: A probe process that takes longer than this is stopped, and its rows say so.
PROBE_TIMEOUT_S = 3 * 3600

#: The issue's bounds on a compiled score-matching step / the plain eager step.
COMPILED_BOUNDS: dict[str, dict[str, float]] = {
    "mnist-cnn": {"ssm": 3.5, "dsm": 2.0, "fdssm": 2.0},
    "mnist-glow": {"ssm": 4.0, "dsm": 2.0},
}
#: Smaller models measured in the place of a bounded one (their rows say so).
STAND_INS = {"mnist-glow-s1": "mnist-glow"}

ROOT = Path(__file__).resolve().parents[1]

#: Start of the result line that a probe process prints.
PROBE_MARK = "ebflow-compile-probe: "


@dataclass(frozen=True)
class ProbeRequest:
    """What one probe (:func:`benchmarks.compile_probe.probe`) measures: ``model`` (a
    :func:`~benchmarks.workloads.get_spec` name) compiled for ``method``; with ``timed``, also
    the eager, compiled and plain steps in ``repeats`` interleaved rounds after ``warmup`` steps."""

    model: str
    method: str
    batch: int
    seed: int
    device: str
    threads: int
    warmup: int
    repeats: int
    timed: bool = False


#: Runs one probe with the given Inductor cache folder and returns its result.
ProbeRunner = Callable[[ProbeRequest, Path], dict[str, Any]]

FALLBACK = "eager fallback"


def break_even_steps(compile_s: float, eager_ms: float, compiled_ms: float) -> float:
    """Steps after which compiling has paid for itself: ``compile_s / (eager - compiled)`` with
    both step times in seconds; ``inf`` when the compiled step is not faster, NaN when a figure
    is missing."""
    if any(math.isnan(v) for v in (compile_s, eager_ms, compiled_ms)):
        return math.nan
    saved_s = (eager_ms - compiled_ms) / 1000.0
    return math.inf if saved_s <= 0 else compile_s / saved_s


def probe_in_subprocess(request: ProbeRequest, cache_dir: Path) -> dict[str, Any]:
    """Run :func:`~benchmarks.compile_probe.probe` in a fresh Python process whose Inductor (and
    Triton) caches live in ``cache_dir``; ``{"error": ...}`` when it fails or times out."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), TRITON_CACHE_DIR=str(cache_dir / "triton"))
    command = [sys.executable, "-m", "benchmarks.compile_probe", json.dumps(asdict(request))]
    try:
        proc = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {PROBE_TIMEOUT_S} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_MARK):
            result: dict[str, Any] = json.loads(line[len(PROBE_MARK) :])
            return result
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit status {proc.returncode}: {last}"}


def probe_in_process(request: ProbeRequest, cache_dir: Path) -> dict[str, Any]:
    """The probe in this process (for tests: no fresh process, so no cold or warm cache)."""
    from .compile_probe import probe

    return probe(request)


def compiled_section(
    config: BenchConfig, device: torch.device, runner: ProbeRunner | None = None
) -> list[Row]:
    """Cold and warm compile times, eager, compiled and plain step times, and break-even step
    counts for every model of ``config.compiled_models`` and score-matching method."""
    run_probe = runner or probe_in_subprocess
    methods = [m for m in config.methods if m in SCORE_MATCHING]
    rows: list[Row] = []
    for name in config.compiled_models:
        spec = get_spec(name)
        for method in methods:
            request = ProbeRequest(
                name, method, config.batch, config.seed, str(device), torch.get_num_threads(),
                config.warmup, config.repeats,
            )  # fmt: skip
            with tempfile.TemporaryDirectory(prefix="ebflow-inductor-") as cache:
                config.say(f"compiled: {name} (D={spec.dim}) {method}: compile, empty Inductor cache")
                cold = run_probe(request, Path(cache))
                config.say(f"compiled: {name} {method}: compile from that cache, then eager/compiled rounds")
                warm = run_probe(replace(request, timed=True), Path(cache))
            rows += method_rows(spec, method, cold, warm)
    return rows


def _timing(result: dict[str, Any], name: str) -> dict[str, float]:
    nan = {"median_ms": math.nan, "q1_ms": math.nan, "q3_ms": math.nan, "repeats": 0}
    return dict(result.get("timings", {}).get(name, nan))


def _notes(cold: dict[str, Any], warm: dict[str, Any]) -> tuple[str, str, str]:
    """The notes of the compiled step, of the cold compile and of the warm compile: ``eager
    fallback (cause)`` on all three after a fallback in either probe, else a failed probe's
    error on its own figures (the compiled step's with the warm probe's); empty when all went well."""
    cause = cold.get("fallback") or warm.get("fallback")
    if cause:
        note = f"{FALLBACK} ({cause})"
        return note, note, note
    cold_note = f"probe failed: {cold['error']}" if "error" in cold else ""
    warm_note = f"probe failed: {warm['error']}" if "error" in warm else ""
    if not warm_note and cold.get("cache") is False:
        warm_note = "Inductor caches off: compiled again"
    return (warm_note if "error" in warm else ""), cold_note, warm_note


def method_rows(spec: ModelSpec, method: str, cold: dict[str, Any], warm: dict[str, Any]) -> list[Row]:
    """The rows of one model and method from its cold and warm probes."""
    compiled_note, cold_note, warm_note = _notes(cold, warm)
    plain, eager = _timing(warm, "plain"), _timing(warm, "eager")
    compiled = _timing({} if compiled_note else warm, "compiled")
    base = ("compiled", spec.name, spec.dim, method)

    def step_row(metric: str, t: dict[str, float], note: str = "") -> Row:
        return Row(
            *base, metric, t["median_ms"], "ms", t["q1_ms"], t["q3_ms"], int(t["repeats"]),
            vs_plain=t["median_ms"] / plain["median_ms"], note=note,
        )  # fmt: skip

    rows = [
        step_row("plain eager step", plain, warm_note if "error" in warm else ""),
        step_row("eager step", eager, warm_note if "error" in warm else ""),
        step_row("compiled step", compiled, compiled_note),
    ]
    compile_s = {}
    for label, result, note in (("cold", cold, cold_note), ("warm", warm, warm_note)):
        failed = bool(compiled_note) or "error" in result
        compile_s[label] = math.nan if failed else float(result.get("compile_s", math.nan))
        rows.append(Row(*base, f"compile {label}", compile_s[label], "s", note=note))
    for label, seconds in compile_s.items():
        steps = break_even_steps(seconds, eager["median_ms"], compiled["median_ms"])
        note = "never: the compiled step is not faster" if steps == math.inf else compiled_note
        rows.append(Row(*base, f"break-even {label}", steps, "steps", note=note))
    return rows


# -- report ---------------------------------------------------------------------------------------
CAPTION = (
    "Eager: the tuned step (as in section 1). Compiled: the same step on a copy of the model after "
    "`ebflow.compile_model` (every objective uses its compiled kernels). Plain: `mean E(x)` forward "
    "and backward, eager. The three ran in the same rounds of one process. Compile: ebflow's "
    "`compile_seconds` in a fresh process, with an empty Inductor cache (cold) and again from that "
    "cache (warm). Break-even: compile s / (eager − compiled) s per step; *never* when the compiled "
    "step is not faster. *eager fallback*: compilation failed and ebflow computed eagerly."
)


def _steps(v: float) -> str:
    return "never" if v == math.inf else fmt(v, 0)


def compiled_table(rows: Sequence[Row]) -> str:
    """One line per model and method."""
    body = []
    for model, dim, method in dict.fromkeys((r.model, r.dim, r.method) for r in rows):

        def get(metric: str, model: str = model, method: str = method) -> Row | None:
            return find_row(rows, "compiled", model, method, metric)

        plain, eager, comp = get("plain eager step"), get("eager step"), get("compiled step")
        note = comp.note if comp is not None else ""
        failed = FALLBACK if note.startswith(FALLBACK) else ("failed" if note else "")
        comp_cell = failed or fmt(row_value(comp))
        speedup = row_value(eager) / row_value(comp)
        body.append([
            model, str(dim), method, fmt(row_value(plain)), fmt(row_value(eager)), comp_cell,
            fmt(row_value(eager, "vs_plain"), 2), failed or fmt(row_value(comp, "vs_plain"), 2),
            failed or fmt(speedup, 2), failed or fmt(row_value(get("compile cold")), 1),
            failed or fmt(row_value(get("compile warm")), 1),
            failed or _steps(row_value(get("break-even cold"))),
            failed or _steps(row_value(get("break-even warm"))),
        ])  # fmt: skip
    notes = sorted({r.note for r in rows if r.note and not r.note.startswith("never")})
    table = markdown_table(
        ["model", "D", "method", "plain (ms)", "eager (ms)", "compiled (ms)", "eager × plain",
         "compiled × plain", "eager ÷ compiled", "compile cold (s)", "compile warm (s)",
         "break-even cold (steps)", "break-even warm (steps)"],
        body,
    )  # fmt: skip
    return "\n\n".join([CAPTION, table, *(f"Note: {n}" for n in notes)])


def compiled_targets(rows: Sequence[Row]) -> list[Target]:
    """The issue's bounds on compiled step / plain eager step (only when the section ran); a
    stand-in model is checked against the bound of the model it stands for, and says so."""
    if not any(r.section == "compiled" for r in rows):
        return []
    measured = {r.model for r in rows if r.section == "compiled"}
    targets = []
    for model, bounds in COMPILED_BOUNDS.items():
        stand_ins = [s for s, full in STAND_INS.items() if full == model and s in measured]
        for name in [model, *stand_ins] if model in measured or not stand_ins else stand_ins:
            label = name if name == model else f"{name} (stand-in, {model}'s bound)"
            for method, bound in bounds.items():
                row = find_row(rows, "compiled", name, method, "compiled step")
                suffix = f" — {FALLBACK}" if row is not None and row.note.startswith(FALLBACK) else ""
                targets.append(Target(
                    f"{label} {method.upper()} compiled / plain eager step{suffix}",
                    row_value(row, "vs_plain"), "<=", bound,
                ))  # fmt: skip
    return targets
