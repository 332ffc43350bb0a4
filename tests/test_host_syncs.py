"""Host-device synchronisations in the training loop, counted on the CPU: every read of a tensor's
value by the host (``.item()``, ``float()``, ``int()``, ``bool()``, ``.tolist()``) is a sync on a
GPU. The default loop reads at most once per step (the loss and the gradient norm together);
logging, validation and checkpoints read more, every ``log_every`` / ``eval_every`` steps."""

from __future__ import annotations

import traceback

import pytest

import ebflow.experiment.training.loop as trainer_module
from ebflow.experiment.config.resolve import resolve_config
from ebflow.experiment.training.run import train
from helpers import count_host_reads

#: Reads that are no device sync on a GPU: torch's optimizers keep their step counters as CPU
#: tensors (``capturable=False``, the default) and read them on the host.
HOST_SIDE = ("/torch/optim/",)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _count_reads_per_step(monkeypatch, tmp_path, preset: str, loss: str, steps: int = 12, **extra) -> float:
    counts = {"steps": 0, "inside": False}

    def loop_read() -> bool:  # inside the counted steps, and not an optimizer's CPU step counter
        return counts["inside"] and not any(
            part in frame.filename for frame in traceback.extract_stack(limit=5) for part in HOST_SIDE
        )

    reads = count_host_reads(monkeypatch, loop_read)

    real_step, real_after = trainer_module.Trainer.train_step, trainer_module.Trainer.after_step

    def train_step(self, xb):
        counts["inside"] = True
        try:
            return real_step(self, xb)
        finally:
            counts["inside"] = False
            counts["steps"] += 1

    def after_step(self, out):
        # the last step also validates, tests and checkpoints (done): those reads are not the loop's
        counts["inside"] = counts["steps"] < steps
        try:
            return real_after(self, out)
        finally:
            counts["inside"] = False

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)
    monkeypatch.setattr(trainer_module.Trainer, "after_step", after_step)
    quiet = 10 * steps  # no log line, validation or checkpoint inside the counted steps
    config = resolve_config(
        preset,
        {
            "loss": loss,
            "max_iters": steps,
            "epochs": None,
            "log_every": quiet,
            "eval_every": quiet,
            "checkpoint_every": quiet,
            "tensorboard": False,
            "progress": False,
            "num_threads": 1,
            "num_samples": 4,
            **extra,
        },
    )
    train(config, tmp_path / f"{preset}-{loss}")
    assert counts["steps"] == steps
    return reads[0] / steps


@pytest.mark.parametrize("loss", ["ssm", "dsm", "fdssm"])
def test_the_default_training_loop_reads_the_device_at_most_once_per_step(monkeypatch, tmp_path, loss):
    per_step = _count_reads_per_step(monkeypatch, tmp_path, "digits-fc", loss)
    assert 0 < per_step <= 1.0, f"{loss}: {per_step} host reads per step"  # 0: the counter broke


def test_a_conv_model_with_clipping_reads_once_per_step(monkeypatch, tmp_path):
    per_step = _count_reads_per_step(
        monkeypatch,
        tmp_path,
        "mnist-cnn",
        "fdssm",
        data="synthetic-mnist",
        max_train=200,
        max_eval=50,
        batch_size=20,
    )
    assert 0 < per_step <= 1.0


def test_a_non_finite_step_is_still_skipped_with_one_read(monkeypatch, tmp_path):
    """The single read carries the finiteness test: a NaN loss skips the update."""
    real = trainer_module.optimization_step
    calls = {"n": 0}

    def flaky(model, objective, optimizer, x, grad_clip=None, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            return real(model, lambda m, xb: objective(m, xb) * float("nan"), optimizer, x, grad_clip, **kw)
        return real(model, objective, optimizer, x, grad_clip, **kw)

    monkeypatch.setattr(trainer_module, "optimization_step", flaky)
    config = resolve_config(
        "digits-fc",
        {
            "max_iters": 6,
            "epochs": None,
            "tensorboard": False,
            "progress": False,
            "num_threads": 1,
            "num_samples": 4,
        },
    )
    result = train(config, tmp_path / "r")
    assert result.skipped_steps == 1 and result.step == 6


@pytest.mark.parametrize("loss", ["ml", "sml"])
def test_likelihood_objectives_read_the_device_once_per_step(monkeypatch, tmp_path, loss):
    """ML computes every linear layer's log-determinant with gradients at each step: no per-layer
    finiteness check, pivot check or cache fingerprint read (a singular weight shows as a
    non-finite loss). SML samples by inversion: the Newton inverse of the smooth leaky ReLU tests
    convergence once per 4 steps, not at every step."""
    per_step = _count_reads_per_step(monkeypatch, tmp_path, "digits-fc", loss)
    # SML: the loss (1), per dense layer the cache key and the pivot check of its fresh LU
    # factorisation (2 x 2), the Newton inverse of the one smooth leaky ReLU (2)
    limit = 1.0 if loss == "ml" else 7.0
    assert per_step <= limit, f"{loss}: {per_step} host reads per step"


def test_a_convolutional_ml_step_reads_once(monkeypatch, tmp_path):
    per_step = _count_reads_per_step(
        monkeypatch,
        tmp_path,
        "mnist-cnn",
        "ml",
        data="synthetic-mnist",
        max_train=200,
        max_eval=50,
        batch_size=20,
    )
    assert 0 < per_step <= 1.0
