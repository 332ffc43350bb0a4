"""Data-parallel training under torchrun: 2 CPU processes with Gloo.

One torchrun launch runs this file as a worker (``python tests/test_distributed.py OUT``): it
trains a few tiny runs, evaluates an NLL on shards and measures data-parallel gradients, and
every rank writes what it holds. The tests compare those files with each other (ranks must
agree bit for bit) and with single-process runs in the test process (the same maths on one
process with the whole global batch). Two more launches check ``torchrun -m ebflow train``
end to end: a run killed mid-way and resumed equals the uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ebflow.experiment.config.builders import build_model, build_objective, build_preprocessing
from ebflow.experiment.config.resolve import parse_overrides, resolve_config
from ebflow.experiment.config.schema import RunConfig
from ebflow.experiment.data.datasets import load_data
from ebflow.experiment.evaluation.nll import evaluate_nll
from ebflow.experiment.parallel.gradient_sync import make_gradient_sync
from ebflow.experiment.parallel.process_group import SINGLE_PROCESS, Distributed
from ebflow.experiment.rundir.checkpoint import load_checkpoint
from ebflow.experiment.training.run import train
from kill_at_step import KILL_ENV as FAULT_ENV

WORLD = 2
STEPS = 6
COMMON = dict(
    tensorboard=False,
    progress=False,
    num_threads=1,
    dtype="float64",
    epochs=None,
    max_iters=STEPS,
    eval_every=3,
    checkpoint_every=100,
    log_every=2,
    num_samples=4,
    max_train=96,
    max_eval=60,
    batch_size=16,
    eval_batch_size=25,
)
# name -> (preset, overrides); every run trains on 2 processes in the worker
RUNS = {
    "dsm": ("digits-fc", {"loss": "dsm"}),
    "ssm": ("digits-fc", {"loss": "ssm", "actnorm": True}),  # ActNorm: data-dependent init
    "dsm-allreduce": ("digits-fc", {"loss": "dsm", "grad_sync": "allreduce"}),
    "ml": ("digits-fc", {"loss": "ml"}),
    "sml": ("digits-fc", {"loss": "sml"}),
    "fdssm": ("digits-fc", {"loss": "fdssm"}),
    "esm": (
        "toy2d-sine",
        {
            "loss": "esm",
            "blocks": 2,
            "hidden": 8,
            "toy_train_size": 96,
            "toy_eval_size": 60,
            "toy_points": 20,
        },
    ),
    # rank 1 alone gets a NaN loss at its 2nd step and an InputError at its 4th
    "bad-on-rank1": ("digits-fc", {"loss": "dsm"}),
}
BAD_CALLS = {2: "nan", 4: "raise"}
MATCH_SINGLE = ("dsm", "ssm", "dsm-allreduce")  # the same maths as 1 process x global batch
GRAD_OBJECTIVES = ("ml", "sml", "ssm", "dsm", "fdssm", "esm")


def _config(name: str) -> RunConfig:
    preset, extra = RUNS[name]
    return resolve_config(preset, {**COMMON, **extra})


def _eval_setup():
    """A perturbed digits model and the raw validation pixels (same on every process)."""
    config = _config("dsm")
    splits = load_data(config.data, num_bins=config.preprocessing.num_bins)
    pre = build_preprocessing(config.preprocessing, splits.num_bins)
    torch.manual_seed(11)
    model = build_model(config.model, splits.event_shape, pre, use_map=config.preprocessing.map)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, splits.val, pre


def _grad_setup(name: str):
    """A small dense model (LU weights, ActNorm), a global batch of 8 and its shared noise."""
    config = resolve_config("mm10-lu", {**COMMON, "loss": name})
    torch.manual_seed(5)
    model = build_model(config.model, (10,), None, use_map=config.preprocessing.map)
    x = torch.randn(4 * WORLD, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    model.initialize(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    objective = build_objective(config.objective)
    noise = objective.draw_noise(
        tuple(x.shape), dtype=x.dtype, device=x.device, generator=torch.Generator().manual_seed(7)
    )
    return model, objective, x, noise


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


# -- the worker (runs under torchrun) ---------------------------------------------------------------
def _worker(out: Path) -> None:
    from ebflow.experiment.parallel.process_group import init_from_env, shutdown

    ctx = init_from_env("cpu")
    assert ctx.world_size == WORLD and ctx.backend == "gloo"
    torch.set_num_threads(1)
    try:
        for name in RUNS:
            with _failing_objective(active=name == "bad-on-rank1" and ctx.rank == 1):
                train(_config(name), out / name, distributed=ctx, final_outputs=name == "dsm")
            _save_rank_state(ctx, out / name)
        model, val, pre = _eval_setup()
        nll = evaluate_nll(model, val, pre, True, batch_size=7, seed=3, dist=ctx)
        (out / f"eval-rank{ctx.rank}.json").write_text(json.dumps(nll))
        _gradient_check(ctx, out)
        ctx.barrier()
    finally:
        shutdown(ctx)


_LAST_STATE: dict = {}


@contextlib.contextmanager
def _failing_objective(active: bool):
    """Make this process's objective fail at the calls listed in BAD_CALLS."""
    from ebflow.errors import InputError
    from ebflow.objectives import Objective

    real = Objective.__call__
    calls = {"n": 0}

    def failing(self, model, x, noise=None):
        calls["n"] += 1
        kind = BAD_CALLS.get(calls["n"])
        if kind == "raise":
            raise InputError("injected failure")
        loss = real(self, model, x, noise=noise)
        return loss * float("nan") if kind == "nan" else loss

    if active:
        Objective.__call__ = failing
    try:
        yield
    finally:
        Objective.__call__ = real


def _save_rank_state(ctx: Distributed, run_dir: Path) -> None:
    trainer_state = _LAST_STATE.pop("state")
    torch.save(trainer_state, run_dir / f"rank{ctx.rank}.pt")


def _gradient_check(ctx: Distributed, out: Path) -> None:
    """Each objective's averaged gradient on this process's 4 rows, through GradientSync."""
    result = {}
    for mode in ("ddp", "allreduce"):
        for name in GRAD_OBJECTIVES:
            model, objective, x, noise = _grad_setup(name)
            rows = slice(4 * ctx.rank, 4 * (ctx.rank + 1))
            local_noise = None if noise is None else noise.narrow(objective.noise_batch_dim, rows.start, 4)
            # this process's own gradient first (before DDP hooks exist on the parameters)
            torch.manual_seed(100 + ctx.rank)  # SML: each process draws its own model samples
            (
                objective(model, x[rows], noise=local_noise)
                if local_noise is not None
                else objective(model, x[rows])
            ).backward()
            local = _grads(model)
            for p in model.parameters():
                p.grad = None
            torch.manual_seed(100 + ctx.rank)
            sync = make_gradient_sync(ctx, model, objective, mode)
            sync.loss(sync.train_module, x[rows], local_noise).backward()
            sync.after_backward(list(model.parameters()))
            synced = _grads(model)
            result[f"{mode}-{name}"] = {"synced": synced, "local": local}
    torch.save(result, out / f"grads-rank{ctx.rank}.pt")


def _capture_trainer_state() -> None:
    """Keep each finished Trainer's parameters and EMA (the worker saves them per rank)."""
    import ebflow.experiment.training.loop as training

    real_run = training.Trainer.run

    def run(self, log):
        try:
            real_run(self, log)
        finally:
            _LAST_STATE["state"] = {
                "model": {k: v.clone() for k, v in self.model.state_dict().items()},
                "ema": {k: v.clone() for k, v in self.ema.shadow.items()},
                "step": self.counters.step,
                "skipped": self.counters.skipped_steps,
                "ema_updates": self.ema.num_updates,
            }

    training.Trainer.run = run


# -- helpers for the tests ----------------------------------------------------------------------------
def _torchrun(args: list[str], env_extra: dict | None = None, timeout: int = 300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1]
    )


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    done = _torchrun([str(Path(__file__).resolve()), str(out)])
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return out


@pytest.fixture(autouse=True)
def _restore_threads(restore_threads):
    yield


def _assert_states_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# -- tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RUNS))
def test_both_ranks_hold_bit_identical_parameters_and_ema(worker_out, name):
    r0 = torch.load(worker_out / name / "rank0.pt", weights_only=True)
    r1 = torch.load(worker_out / name / "rank1.pt", weights_only=True)
    assert r0["step"] == r1["step"] == STEPS
    for part in ("model", "ema"):
        assert r0[part].keys() == r1[part].keys() and r0[part]
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{name}: {part}.{k} differs across ranks"
    # and the run moved: the parameters are not their initial values
    assert any(not torch.equal(r0["model"][k], r0["ema"][k]) for k in r0["ema"])
    skipped = len(BAD_CALLS) if name == "bad-on-rank1" else 0
    assert r0["skipped"] == r1["skipped"] == skipped  # a failure on one rank skips the step on all
    assert r0["ema_updates"] == r1["ema_updates"] == STEPS - skipped


@pytest.mark.parametrize("name", MATCH_SINGLE)
def test_two_processes_match_one_process_with_the_global_batch(worker_out, name, tmp_path):
    """2 processes x 8 rows == 1 process x 16 rows, same data order and noise (float64)."""
    config = _config(name)
    assert config.training.batch_size == 16
    single = train(config, tmp_path / "single", final_outputs=name == "dsm")
    assert single.world_size == 1
    one = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")
    two = torch.load(worker_out / name / "rank0.pt", weights_only=True)
    ckpt_two = load_checkpoint(worker_out / name / "checkpoints" / "last.pt")
    assert ckpt_two["step"] == one["step"] == STEPS and ckpt_two["world_size"] == WORLD
    _assert_states_close(two["model"], one["model"], rtol=1e-9, atol=1e-11)
    _assert_states_close(two["ema"], one["ema"]["shadow"], rtol=1e-9, atol=1e-11)
    assert ckpt_two["best_val_nll"] == pytest.approx(one["best_val_nll"], rel=1e-10)
    if name == "dsm":  # the distributed test NLL (sharded, reduced) equals the single one
        res2 = json.loads((worker_out / name / "results.json").read_text())
        res1 = json.loads((tmp_path / "single" / "results.json").read_text())
        assert res2["processes"] == 2 and res2["global_batch"] == 16 and res2["batch_per_process"] == 8
        assert res2["test_n"] == res1["test_n"] == 60
        assert res2["test_nll"] == pytest.approx(res1["test_nll"], rel=1e-10)


def test_distributed_nll_equals_the_single_process_nll(worker_out):
    model, val, pre = _eval_setup()
    single = evaluate_nll(model, val, pre, True, batch_size=7, seed=3)
    for rank in range(WORLD):
        dist = json.loads((worker_out / f"eval-rank{rank}.json").read_text())
        assert dist["n"] == single["n"] == 60  # 9 batches of 7 rows, the last of 4, on 2 ranks
        assert dist["nll"] == pytest.approx(single["nll"], rel=1e-12)
        assert math.isfinite(dist["bpd"])


@pytest.mark.parametrize("mode", ["ddp", "allreduce"])
def test_averaged_gradient_is_the_gradient_of_the_global_batch(worker_out, mode):
    """For every objective the averaged gradient is the mean of the processes' gradients; with
    shared noise (all but SML, which samples per process) it is the global batch's gradient."""
    ranks = [torch.load(worker_out / f"grads-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in GRAD_OBJECTIVES:
        key = f"{mode}-{name}"
        synced = [r[key]["synced"] for r in ranks]
        local = [r[key]["local"] for r in ranks]
        for a, b in zip(*synced, strict=True):
            assert torch.equal(a, b), f"{key}: ranks hold different averaged gradients"
        assert any(not torch.equal(a, b) for a, b in zip(*local, strict=True)), (
            f"{key}: same data on both ranks"
        )
        mean = [(a + b) / 2 for a, b in zip(*local, strict=True)]
        for s, m in zip(synced[0], mean, strict=True):
            torch.testing.assert_close(s, m, rtol=1e-12, atol=1e-12)
        if name == "sml":
            continue
        model, objective, x, noise = _grad_setup(name)
        (objective(model, x, noise=noise) if noise is not None else objective(model, x)).backward()
        for s, g in zip(synced[0], _grads(model), strict=True):
            torch.testing.assert_close(s, g, rtol=1e-9, atol=1e-10)


def test_single_process_has_no_gradient_sync():
    model, objective, _, _ = _grad_setup("dsm")
    assert make_gradient_sync(SINGLE_PROCESS, model, objective) is None
    assert SINGLE_PROCESS.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert SINGLE_PROCESS.from_main(lambda: 7) == 7


def test_torchrun_cli_run_killed_and_resumed_equals_the_single_process_run(tmp_path):
    sets = [
        "max_iters=8",
        "epochs=null",
        "checkpoint_every=4",
        "eval_every=4",
        "log_every=2",
        "num_samples=4",
        "tensorboard=false",
        "progress=false",
        "num_threads=1",
        "dtype=float64",
        "max_train=96",
        "max_eval=60",
        "batch_size=16",
        "eval_batch_size=25",
    ]
    args = [
        "-m",
        "ebflow",
        "train",
        "--config",
        "digits-fc",
        "--loss",
        "dsm",
        "--device",
        "cpu",
        "--seed",
        "2",
    ] + [a for s in sets for a in ("--set", s)]
    run = tmp_path / "run"
    launcher = [str(Path(__file__).with_name("kill_at_step.py"))]  # the tests' fault injection
    killed = _torchrun(launcher + args[2:] + ["--out", str(run)], {FAULT_ENV: "6"})
    assert killed.returncode != 0
    assert "2 processes: global batch 16 = 2 x 8 per process" in killed.stdout
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    resumed = _torchrun(["-m", "ebflow", "train", "--resume", str(run)])
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert resumed.stdout.count("finished:") == 1 and "examples/s" in resumed.stdout
    assert "test NLL" in resumed.stdout

    config = resolve_config("digits-fc", {**parse_overrides(sets), "loss": "dsm", "seed": 2, "device": "cpu"})
    train(config, tmp_path / "single", final_outputs=False)
    a = load_checkpoint(run / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 8 and a["world_size"] == 2
    _assert_states_close(a["model"], b["model"], rtol=1e-9, atol=1e-11)
    _assert_states_close(a["ema"]["shadow"], b["ema"]["shadow"], rtol=1e-9, atol=1e-11)
    results = json.loads((run / "results.json").read_text())
    assert results["processes"] == 2 and results["batch_per_process"] == 8
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    train_steps = [int(r.split(",")[0]) for r in rows if r.split(",")[3]]
    assert train_steps == [2, 4, 6, 8]  # rank 0 alone logs, no replayed rows


if __name__ == "__main__":
    _capture_trainer_state()
    _worker(Path(sys.argv[1]))
