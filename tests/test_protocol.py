"""The training protocol's promises, each pinned by the behaviour a user relies on: the LR
schedule applied at every step, and the best-validation checkpoint that the reported test NLL
comes from."""

from __future__ import annotations

import csv
import json
import math

import pytest

import ebflow.experiment.training.loop as trainer_module
from ebflow.experiment.config.resolve import resolve_config
from ebflow.experiment.rundir.load import load_run
from ebflow.experiment.training.loop import Trainer
from ebflow.experiment.training.run import train

QUIET = dict(tensorboard=False, progress=False, num_threads=1, num_samples=4)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_lr_applied_in_epoch_k_is_lr0_times_gamma_to_the_min_of_k_and_n(tmp_path, monkeypatch):
    """The reference's MultiStepLR(milestones 1..N-1 epochs) stepped per epoch: every step of
    epoch k runs at lr0 * gamma^min(k, N). Fails for a schedule shifted by one epoch
    (gamma^min(k+1, N)), one that never stops decaying, or one stepped per batch."""
    lr0, gamma, n, batch, train_size, epochs = 1e-3, 0.5, 2, 50, 200, 5
    config = resolve_config(
        "digits-fc",
        {
            **QUIET,
            "max_train": train_size,
            "batch_size": batch,
            "epochs": epochs,
            "max_iters": None,
            "lr": lr0,
            "lr_decay": gamma,
            "lr_decay_epochs": n,
            "eval_every": 1000,
            "checkpoint_every": 1000,
            "log_every": 1,
        },
    )
    applied: list[float] = []
    real = trainer_module.optimization_step

    def spy(model, objective, optimizer, x, grad_clip=None, **kw):
        applied.append(optimizer.param_groups[0]["lr"])
        return real(model, objective, optimizer, x, grad_clip, **kw)

    monkeypatch.setattr(trainer_module, "optimization_step", spy)
    result = train(config, tmp_path / "r")
    per_epoch = train_size // batch
    assert result.epoch == epochs and len(applied) == epochs * per_epoch == result.step
    expected = [lr0 * gamma ** min(i // per_epoch, n) for i in range(len(applied))]
    assert applied == pytest.approx(expected, rel=1e-12)
    # the CSV's lr column is the same schedule, read with the epoch it was logged at
    with open(tmp_path / "r" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["lr"]]
    assert rows and all(float(r["lr"]) == pytest.approx(lr0 * gamma ** min(int(r["epoch"]), n)) for r in rows)


def test_best_checkpoint_is_the_lowest_validation_and_the_test_nll_comes_from_it(tmp_path, monkeypatch):
    """best.pt holds the step of the lowest validation NLL in metrics.csv (not the last
    validation), and results.json's test NLL is that checkpoint's. The validation NLLs are
    scripted (4th of 6 is lowest) so that a best.pt rewritten at every validation, or a test
    run on last.pt, gives another step and another number."""
    scripted = iter([50.0, 40.0, 45.0, 30.0, 35.0, 60.0])
    real_evaluate = Trainer.evaluate

    def evaluate(self, split):
        out = real_evaluate(self, split)
        if split == "val":
            out = {**out, "nll": next(scripted)}
        return out

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    config = resolve_config(
        "digits-fc",
        {
            **QUIET,
            "max_iters": 12,
            "epochs": None,
            "eval_every": 2,
            "checkpoint_every": 2,
            "log_every": 2,
            "lr": 3e-3,
        },
    )
    result = train(config, tmp_path / "r")
    with open(tmp_path / "r" / "metrics.csv", newline="") as f:
        vals = [(int(r["step"]), float(r["val_nll"])) for r in csv.DictReader(f) if r["val_nll"]]
    assert [v for _, v in vals] == [50.0, 40.0, 45.0, 30.0, 35.0, 60.0]
    best_step = min(vals, key=lambda sv: sv[1])[0]
    assert best_step == 8 and result.best_val_nll == 30.0

    best = load_run(tmp_path / "r" / "checkpoints" / "best.pt")
    last = load_run(tmp_path / "r" / "checkpoints" / "last.pt")
    assert best.step == best_step and last.step == 12
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["checkpoint_step"] == best_step and results["iterations"] == 12

    from_best, from_last = best.evaluate("test")["nll"], last.evaluate("test")["nll"]
    assert results["test_nll"] == pytest.approx(from_best, rel=1e-12)
    assert math.isfinite(from_last) and abs(from_last - from_best) > 1e-6 * abs(from_best)
    assert math.isfinite(results["test_raw_nll"])


class _FakeClock:
    """``time.perf_counter`` that advances by ``tick`` seconds per read: every training step of
    the loop (from one read to the next) lasts exactly ``tick`` seconds."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def _val_steps(run_dir) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("val_nll")]


def test_eval_every_seconds_validates_at_the_first_step_past_each_period_and_on_resume(tmp_path, monkeypatch):
    """With 0.125 s steps and ``eval_every_seconds=1``, validation happens every 8 steps (not at
    the iteration-based ``eval_every``), and a resumed run goes on from its clock: no period is
    validated twice or skipped. Fails if the key is ignored, the period counts steps, or the
    slot restarts at 0 on resume."""
    monkeypatch.setattr(trainer_module, "time", _FakeClock(0.125))
    sets = {**QUIET, "max_train": 200, "batch_size": 20, "eval_every": 10_000, "checkpoint_every": 10_000}
    config = resolve_config("digits-fc", {**sets, "max_iters": 25, "eval_every_seconds": 1.0})
    train(config, tmp_path / "r")
    # steps 8, 16, 24 (train_s 1, 2, 3 s: the first step at or past each period) and the last
    first = _val_steps(tmp_path / "r")
    assert first == [8, 16, 24, 25], first
    train(None, tmp_path / "r", resume=True, overrides={"max_iters": 45})
    assert _val_steps(tmp_path / "r") == [8, 16, 24, 25, 32, 40, 45]
