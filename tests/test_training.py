"""Training loop: exact resume after a kill, non-finite steps, NLL in data space, budgets."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ebflow.errors import ConfigError
from ebflow.experiment.config.builders import build_model, build_preprocessing
from ebflow.experiment.config.resolve import resolve_config
from ebflow.experiment.data.batches import EpochShuffleSampler, model_input
from ebflow.experiment.evaluation.nll import evaluate_nll
from ebflow.experiment.rundir.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ebflow.experiment.rundir.load import load_run, load_run_and_raw_weights, swap_weights
from ebflow.experiment.training.run import train
from ebflow.experiment.training.state import TrainingDivergedError
from kill_at_step import KILL_ENV as FAULT_ENV

QUIET = dict(tensorboard=False, progress=False, num_threads=1)


@pytest.fixture(autouse=True)
def _restore_threads(restore_threads):
    yield


def _run(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    # a run to be killed goes through the tests' fault-injection launcher
    launcher = [str(Path(__file__).with_name("kill_at_step.py"))] if FAULT_ENV in env else ["-m", "ebflow"]
    return subprocess.run(
        [sys.executable, *launcher, *args], env=env, capture_output=True, text=True, timeout=300
    )


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_and_resumed_run_ends_with_the_uninterrupted_parameters(tmp_path):
    sets = [
        "max_iters=40",
        "epochs=null",
        "checkpoint_every=10",
        "eval_every=20",
        "log_every=5",
        "num_samples=4",
        "tensorboard=false",
        "progress=false",
        "num_threads=1",
    ]
    args = ["train", "--config", "digits-fc", "--seed", "3"] + [a for s in sets for a in ("--set", s)]
    killed = tmp_path / "killed"
    first = _run(args + ["--out", str(killed)], {FAULT_ENV: "25"})
    assert first.returncode == -9, first.stderr[-2000:]
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["step"] == 20
    resumed = _run(["train", "--resume", str(killed)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    config = resolve_config(
        "digits-fc",
        {
            **QUIET,
            "max_iters": 40,
            "epochs": None,
            "seed": 3,
            "checkpoint_every": 10,
            "eval_every": 20,
            "log_every": 5,
            "num_samples": 4,
        },
    )
    train(config, tmp_path / "straight")
    a = load_checkpoint(killed / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 40 and a["epoch"] == b["epoch"]
    assert _equal_states(a["model"], b["model"])
    assert _equal_states(a["ema"]["shadow"], b["ema"]["shadow"])
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    # metrics.csv has no duplicated rows from the replayed steps
    rows = (killed / "metrics.csv").read_text().splitlines()[1:]
    train_steps = [int(r.split(",")[0]) for r in rows if r.split(",")[3]]
    assert train_steps == sorted(set(train_steps))


def _tiny(name="digits-fc", **overrides):
    return resolve_config(
        name,
        {
            **QUIET,
            "max_iters": 6,
            "epochs": None,
            "eval_every": 3,
            "checkpoint_every": 3,
            "log_every": 1,
            "num_samples": 4,
            **overrides,
        },
    )


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    import ebflow.experiment.training.loop as training

    real = training.optimization_step
    calls = {"n": 0}

    def flaky(model, objective, optimizer, x, grad_clip=None):
        calls["n"] += 1
        if calls["n"] in (2, 4):
            return real(model, lambda m, xb: objective(m, xb) * float("nan"), optimizer, x, grad_clip)
        return real(model, objective, optimizer, x, grad_clip)

    monkeypatch.setattr(training, "optimization_step", flaky)
    result = train(_tiny(), tmp_path / "r")
    assert result.skipped_steps == 2 and result.step == 6
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert ckpt["skipped_steps"] == 2 and ckpt["ema"]["num_updates"] == 4


@pytest.mark.parametrize("limit, stop_step", [(4, 7), (9, 12)])  # 12 = the end of epoch 0
def test_consecutive_non_finite_steps_stop_with_a_usable_checkpoint(tmp_path, monkeypatch, limit, stop_step):
    import ebflow.experiment.training.loop as training

    real = training.optimization_step
    calls = {"n": 0}

    def breaks_after_three(model, objective, optimizer, x, grad_clip=None):
        calls["n"] += 1
        if calls["n"] > 3:
            return real(model, lambda m, xb: objective(m, xb) + float("inf"), optimizer, x, grad_clip)
        return real(model, objective, optimizer, x, grad_clip)

    monkeypatch.setattr(training, "optimization_step", breaks_after_three)
    with pytest.raises(TrainingDivergedError, match=f"{limit} consecutive steps were skipped"):
        train(_tiny(max_iters=50, max_nonfinite=limit, checkpoint_every=100, eval_every=100), tmp_path / "r")
    run = load_run(tmp_path / "r" / "checkpoints" / "last.pt")
    assert run.step == stop_step
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    assert math.isfinite(run.evaluate("val")["nll"])
    monkeypatch.undo()  # the cause is fixed: the run continues from its last checkpoint
    result = train(None, tmp_path / "r", resume=True, overrides={"max_iters": 15})
    assert result.step == 15 and result.epoch == 1


def test_data_space_nll_with_map_equals_the_model_with_preprocessing_inside():
    config = _tiny()
    pre = build_preprocessing(config.preprocessing, 17)
    outside = build_model(config.model, (1, 8, 8), pre, use_map=True).double()
    with torch.no_grad():
        for p in outside.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inside = build_model(config.model, (1, 8, 8), pre, use_map=False).double()
    inside.layers[3:].load_state_dict(outside.layers.state_dict())
    pixels = torch.randint(0, 17, (40, 1, 8, 8)).double()
    a = evaluate_nll(outside, pixels, pre, True, batch_size=16, seed=1)
    b = evaluate_nll(inside, pixels, pre, False, batch_size=16, seed=1)
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-10)
    assert a["bpd"] == pytest.approx(a["nll"] / (64 * math.log(2)))
    y, logdet = model_input(pixels, pre, True, torch.Generator().manual_seed(0))
    assert y.shape == pixels.shape and logdet.shape == (40,)


def test_time_budget_stops_training_and_tests_the_best_checkpoint(tmp_path):
    config = _tiny(max_iters=None, max_minutes=0.01, eval_every=20, checkpoint_every=20)
    result = train(config, tmp_path / "r")
    assert 0.6 <= result.train_seconds < 60 and result.step > 1
    assert math.isfinite(result.test["nll"]) and (tmp_path / "r" / "results.json").exists()
    assert (tmp_path / "r" / "samples.png").exists() and (tmp_path / "r" / "checkpoints" / "best.pt").exists()


def test_final_test_frees_the_training_state_before_it_loads_the_best_checkpoint(tmp_path, monkeypatch):
    # the optimiser state, the gradients and the EMA averages are dead weight in the final test
    # (1.2 GB at D = 7,056); a trainer that kept them, or freed them only after loading the
    # checkpoint, would need that much more memory at the end of a long run
    from ebflow.experiment.training import loop, results

    trainers, seen = [], []
    run_loop = loop.Trainer.run

    def run_and_keep(self, log):
        trainers.append(self)
        return run_loop(self, log)

    def load_and_look(*args, **kwargs):
        t = trainers[0]
        grads = [p.grad for p in t.model.parameters()]
        seen.append((len(t.optimizer.state), sum(g is not None for g in grads), len(t.ema.shadow)))
        return load_run_and_raw_weights(*args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "run", run_and_keep)
    monkeypatch.setattr(results, "load_run_and_raw_weights", load_and_look)
    result = train(_tiny(), tmp_path / "r")
    # one read of the checkpoint serves the EMA and the raw weights, after the release
    assert seen == [(0, 0, 0)]
    assert math.isfinite(result.test["nll"]) and math.isfinite(result.test["raw_nll"])
    # the released trainer refuses to write a checkpoint that would lack them
    with pytest.raises(RuntimeError, match="released"):
        trainers[0].save("last.pt")
    state = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert state["optimizer"]["state"] and state["ema"]["shadow"]  # the run's own checkpoint is whole


def test_final_test_scores_the_raw_weights_and_draws_samples_from_the_ema_ones(tmp_path, monkeypatch):
    # the raw weights are swapped into the tested model and back: a swap that did nothing would
    # report the EMA NLL twice, one that was not undone would draw the samples from the raw weights
    from ebflow.experiment.training import results

    sampled = []
    save = results.save_samples

    def look_and_save(run, *args, **kwargs):
        sampled.append({k: v.clone() for k, v in run.model.state_dict().items()})
        return save(run, *args, **kwargs)

    monkeypatch.setattr(results, "save_samples", look_and_save)
    result = train(_tiny(max_iters=9), tmp_path / "r")
    ema, raw = load_run(tmp_path / "r"), load_run(tmp_path / "r", weights="raw")
    assert not _equal_states(ema.model.state_dict(), raw.model.state_dict())
    assert result.test["nll"] == pytest.approx(ema.evaluate("test")["nll"], rel=1e-12)
    assert result.test["raw_nll"] == pytest.approx(raw.evaluate("test")["nll"], rel=1e-12)
    assert result.test["raw_nll"] != result.test["nll"]
    assert len(sampled) == 1 and _equal_states(sampled[0], ema.model.state_dict())


def test_swap_weights_exchanges_the_states_and_refuses_weights_of_another_model(tmp_path):
    train(_tiny(), tmp_path / "r")
    run, raw = load_run_and_raw_weights(tmp_path / "r")
    ema = {k: v.clone() for k, v in run.model.state_dict().items()}
    held = {k: v.clone() for k, v in raw.items()}
    swap_weights(run.model, raw)
    assert _equal_states(run.model.state_dict(), held) and _equal_states(raw, ema)
    swap_weights(run.model, raw)
    assert _equal_states(run.model.state_dict(), ema) and _equal_states(raw, held)
    key = next(iter(raw))
    with pytest.raises(CheckpointError, match="missing"):
        swap_weights(run.model, {k: v for k, v in raw.items() if k != key})
    with pytest.raises(CheckpointError, match="shape"):
        swap_weights(run.model, {**raw, key: raw[key][..., :1]})
    assert _equal_states(run.model.state_dict(), ema)  # a refused swap changes nothing


def test_swap_weights_swaps_a_tensor_shared_by_two_keys_once():
    layer = torch.nn.Linear(3, 3)
    model = torch.nn.Module()
    model.a, model.b = layer, layer  # the same weights under two names
    raw = {k: torch.full_like(v, 7.0) for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swap_weights(model, raw)
    assert all(torch.equal(v, torch.full_like(v, 7.0)) for v in model.state_dict().values())
    swap_weights(model, raw)
    assert _equal_states(model.state_dict(), before)


def test_existing_run_is_never_overwritten_and_resume_keeps_the_maths(tmp_path):
    train(_tiny(), tmp_path / "r")
    with pytest.raises(ConfigError, match="--resume"):
        train(_tiny(), tmp_path / "r")
    with pytest.raises(ConfigError, match="'lr'"):
        train(None, tmp_path / "r", resume=True, overrides={"lr": 1.0})
    more = train(None, tmp_path / "r", resume=True, overrides={"max_iters": 9})
    assert more.step == 9


def test_mismatched_checkpoint_gives_a_clear_error(tmp_path):
    train(_tiny(), tmp_path / "r")
    path = tmp_path / "r" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    state["config"]["num_layers"] = 3  # the stored weights are for 2 layers
    save_checkpoint(path, {k: v for k, v in state.items() if k not in ("digest", "format", "version")})
    with pytest.raises(CheckpointError, match="does not match") as info:
        load_run(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    # the run's own config.yaml says 2 layers: this checkpoint is not the run's
    with pytest.raises(CheckpointError, match="does not belong to the run"):
        train(None, tmp_path / "r", resume=True)
    config_file = tmp_path / "r" / "config.yaml"
    config_file.write_text(config_file.read_text().replace("num_layers: 2", "num_layers: 3"))
    with pytest.raises(CheckpointError, match=r"best\.pt' does not belong"):  # best.pt is checked too
        train(None, tmp_path / "r", resume=True)
    (tmp_path / "r" / "checkpoints" / "best.pt").unlink()
    with pytest.raises(CheckpointError, match="does not match") as info:
        train(None, tmp_path / "r", resume=True)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    s = EpochShuffleSampler(10, seed=2)
    s.set_epoch(3)
    first = list(s)
    s.set_epoch(4)
    assert list(s) != first and sorted(s) == list(range(10))
    s.set_epoch(3)
    assert list(s) == first


def test_epoch_sampler_without_shuffle_gives_the_data_order_every_epoch():
    s = EpochShuffleSampler(10, seed=2, shuffle=False)
    for epoch in (0, 3):
        s.set_epoch(epoch)
        assert list(s) == list(range(10))


@pytest.mark.parametrize("shuffle", [True, False])
def test_shuffle_false_trains_on_the_same_batches_in_data_order_every_epoch(tmp_path, monkeypatch, shuffle):
    """``shuffle: false`` (the reference's MNIST loader): epoch e's batch k is rows [kB, (k+1)B)
    of the training split, every epoch; the default reshuffles every epoch."""
    from ebflow.experiment.training.loop import Trainer

    batches: list[torch.Tensor] = []
    real = Trainer.train_step
    monkeypatch.setattr(
        Trainer, "train_step", lambda self, xb: (batches.append(xb.clone()), real(self, xb))[1]
    )
    config = _tiny(
        max_iters=None, epochs=2, batch_size=400, eval_every=100, checkpoint_every=100, shuffle=shuffle
    )
    train(config, tmp_path / "r")
    rows = load_run(tmp_path / "r").data("train")
    per_epoch = rows.shape[0] // 400
    assert len(batches) == 2 * per_epoch
    in_order = [rows[k * 400 : (k + 1) * 400] for k in range(per_epoch)]
    same_order = [torch.equal(b, in_order[k % per_epoch]) for k, b in enumerate(batches)]
    assert all(same_order) if not shuffle else not any(same_order)


def test_load_run_gives_the_ema_model_and_raw_data(tmp_path):
    train(_tiny(), tmp_path / "r")
    for path in (tmp_path / "r", tmp_path / "r" / "checkpoints" / "last.pt"):
        run = load_run(path)
        assert run.run_dir == tmp_path / "r" and not run.model.training
        assert run.map is True and run.preprocessing.num_bins == 17
        assert run.config.runtime.name == "digits-fc"
        pixels = run.data("test")
        assert pixels.shape == (297, 1, 8, 8) and float(pixels.max()) <= 16
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    for name, p in run.model.named_parameters():
        assert torch.equal(p.detach(), ckpt["ema"]["shadow"][name])


def test_num_threads_applies_to_the_run_only(tmp_path, monkeypatch):
    import ebflow.experiment.training.loop as training

    seen = []
    real = training.optimization_step
    monkeypatch.setattr(
        training,
        "optimization_step",
        lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1],
    )
    torch.set_num_threads(2)
    train(_tiny(max_iters=2, num_threads=1), tmp_path / "r")
    assert seen == [1, 1] and torch.get_num_threads() == 2
