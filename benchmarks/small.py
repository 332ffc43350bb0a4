"""Section 7, ``small``: what the training loop adds to a small model's step.

The default ``ebflow train`` job (preset digits-fc: an FC EBFlow on the 8×8 digits shipped with
ebflow, D = 64, SSM, Adam, batch 100, at the preset's thread count) is timed three ways, in the
same interleaved rounds of one process:

* *bare step*: the objective, ``loss.backward()`` and the optimiser step on one fixed,
  preprocessed batch; no bookkeeping;
* ``Trainer.train_step``: the trainer's step on a fixed batch of pixels (dequantisation and MaP
  preprocessing of the batch, the optimisation step with its finiteness check, the EMA update,
  the counters), on a second trainer of the same config;
* *training loop*: ``Trainer.run`` itself over a block of steps (the loader's batches, the step,
  the clock, ``after_step``: logging every ``log_every`` steps, validation and checkpoint every
  ``eval_every`` / ``checkpoint_every`` steps, ``curves.png`` and TensorBoard events as a real
  run writes them, into a temporary run directory).

A block is the preset's validation period (1,200 steps), so every block holds its share of the
periodic work and the per-step figure amortises it as a real run does. A smaller
``small_block`` (``--quick``) scales the three periods down with it. The overhead is
``loop / bare - 1`` in percent.

The experiment layer is imported inside the section, so ``import benchmarks`` stays on the
library layer.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .sections import BenchConfig, Row
from .tables import INFO, Target, fmt, markdown_table, row_value
from .timing import Timing, time_round_robin

__all__ = ["PRESET", "small_section", "small_table", "small_targets", "bookkeeping_periods"]

#: The preset of the default ``ebflow train`` job.
PRESET = "digits-fc"
#: The three timed entries, in table order.
ENTRIES = ("bare step", "Trainer.train_step", "training loop")
#: The metric of the loop's overhead row.
LOOP_OVERHEAD = "training loop overhead over the bare step"


def bookkeeping_periods(
    log_every: int, eval_every: int, checkpoint_every: int, block: int | None
) -> dict[str, int]:
    """The periods (in steps) of one timed block: the preset's own when ``block`` is None (the
    block is then their least common multiple), else each scaled by ``block / that multiple``
    (at least 1), with validation and checkpoint at the block's end."""
    natural = math.lcm(log_every, eval_every, checkpoint_every)
    if block is None:
        return {"log_every": log_every, "eval_every": eval_every, "checkpoint_every": checkpoint_every,
                "block": natural}  # fmt: skip
    scale = block / natural
    return {
        "log_every": max(1, round(log_every * scale)),
        "eval_every": max(1, round(eval_every * scale)),
        "checkpoint_every": max(1, round(checkpoint_every * scale)),
        "block": block,
    }


def _repeat(step: Callable[[], object], n: int) -> Callable[[], None]:
    def block() -> None:
        for _ in range(n):
            step()

    return block


def _per_step(t: Timing, n: int) -> tuple[float, float, float]:
    return t.median_ms / n, t.q1_ms / n, t.q3_ms / n


def _timed_entries(
    config: BenchConfig, device: torch.device, run_dir: Path
) -> tuple[dict[str, Timing], dict[str, Any]]:
    """Build the trainers and time :data:`ENTRIES` in blocks; the timings per block and what
    the rows say about the run (threads, periods, loss, dimension)."""
    from ebflow.experiment.config.resolve import resolve_config
    from ebflow.experiment.data.batches import model_input
    from ebflow.experiment.rundir.metrics import MetricsLog
    from ebflow.experiment.training.loop import Trainer

    preset = resolve_config(PRESET)
    b = preset.bookkeeping
    periods = bookkeeping_periods(b.log_every, b.eval_every, b.checkpoint_every, config.small_block)
    block = periods.pop("block")
    # the loop runs block by block: a step budget replaces the preset's epochs (same schedule)
    cfg = preset.updated(progress=False, epochs=None, max_iters=block, seed=config.seed, **periods)
    loop = Trainer(cfg, run_dir / "loop", device=device)
    (run_dir / "loop").mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / "loop", None, cfg.bookkeeping.tensorboard)
    side = Trainer(cfg, run_dir / "side", device=device)
    xb = next(iter(side.loader))
    x, _ = model_input(xb.to(loop.dtype), loop.pre, loop.use_map, generator=torch.Generator().manual_seed(0))
    model, objective, optimizer = loop.model, loop.objective, loop.optimizer

    def bare() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = objective(model, x)
        loss.backward()
        optimizer.step()

    def run_block() -> None:
        loop.config = loop.config.updated(max_iters=loop.counters.step + block)
        loop.run(log)

    steps = {"bare step": _repeat(bare, block), "Trainer.train_step": _repeat(lambda: side.train_step(xb), block),
             "training loop": run_block}  # fmt: skip
    try:
        timings = time_round_robin(
            steps, device=device, warmup=min(config.warmup, 1), repeats=config.repeats, min_round_s=0.0
        )
    finally:
        log.close()
    about = {"threads": torch.get_num_threads(), "loss": cfg.objective.loss, "block": block,
             "dim": math.prod(loop.splits.event_shape), **periods}  # fmt: skip
    return timings, about


def small_section(config: BenchConfig, device: torch.device) -> list[Row]:
    """ms per step of the bare step, ``Trainer.train_step`` and the training loop of the
    digits-fc job, at the preset's thread count (restored afterwards), and the overheads."""
    from ebflow.experiment.config.resolve import resolve_config

    threads = torch.get_num_threads()
    wanted = resolve_config(PRESET).runtime.num_threads
    config.say(f"small: {PRESET} ({wanted or threads} thread(s)): bare step, Trainer.train_step, Trainer.run")
    try:
        if wanted is not None:
            torch.set_num_threads(wanted)
        with tempfile.TemporaryDirectory(prefix="ebflow-small-") as tmp:
            timings, about = _timed_entries(config, device, Path(tmp))
    finally:
        torch.set_num_threads(threads)
    block, dim = about["block"], about["dim"]
    note = (f"{about['threads']} thread(s); blocks of {block} steps; log every {about['log_every']}, "
            f"validation every {about['eval_every']}, checkpoint every {about['checkpoint_every']}")  # fmt: skip
    bare = timings["bare step"].median_ms / block
    rows = []
    for name in ENTRIES:
        median, q1, q3 = _per_step(timings[name], block)
        rows.append(Row("small", PRESET, dim, about["loss"], name, median, "ms", q1, q3,
                        timings[name].repeats, vs_plain=median / bare, note=note))  # fmt: skip
    for name in ENTRIES[1:]:
        overhead = 100.0 * (timings[name].median_ms / block / bare - 1.0)
        rows.append(Row("small", PRESET, dim, about["loss"], f"{name} overhead over the bare step", overhead, "%",
                        note=note))  # fmt: skip
    return rows


# -- report ---------------------------------------------------------------------------------------
CAPTION = (
    "The default `ebflow train` job (preset digits-fc). *bare step*: objective, backward, optimiser "
    "step on a fixed preprocessed batch. *Trainer.train_step*: the trainer's step on a fixed batch of "
    "pixels (preprocessing, step, EMA, counters). *training loop*: `Trainer.run` over whole blocks "
    "(loader, step, `after_step`: logging, validation, checkpoints, curves.png, TensorBoard), so the "
    "periodic work is amortised as in a real run. × bare: this / the bare step."
)


def small_table(rows: Sequence[Row]) -> str:
    """The three timed entries and the two overheads."""
    timed = [r for r in rows if r.unit == "ms"]
    body = [[r.model, str(r.dim), r.method, r.metric, fmt(r.value, 2), f"{fmt(r.q1, 2)}–{fmt(r.q3, 2)}",
             fmt(r.vs_plain, 2)] for r in timed]  # fmt: skip
    body += [[r.model, str(r.dim), r.method, r.metric, f"{fmt(r.value, 1)} %", "", ""]
             for r in rows if r.unit == "%"]  # fmt: skip
    notes = sorted({r.note for r in rows if r.note})
    table = markdown_table(["preset", "D", "loss", "what", "ms / step (median)", "IQR (ms)", "× bare"], body)
    return "\n\n".join([CAPTION, table, *(f"Run: {n}." for n in notes)])


def small_targets(rows: Sequence[Row]) -> list[Target]:
    """The loop's overhead over the bare step, reported (the issue sets no bound)."""
    row = next((r for r in rows if r.section == "small" and r.metric == LOOP_OVERHEAD), None)
    if not any(r.section == "small" for r in rows):
        return []
    return [Target(f"{PRESET} training loop overhead over the bare step, %", row_value(row), INFO)]
