"""What a CUDA run depends on, shown on the CPU: devices compared by type and index, generators
on the model's device, layers that follow ``.to()`` without parameters of their own, the local
rank of every launcher, GPUs spread over concurrent cells, and TF32 off in exact computations."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from ebflow import EBFlow
from ebflow.errors import ConfigError, InputError
from ebflow.experiment.evaluation.nll import evaluate_nll
from ebflow.experiment.parallel.devices import LOCAL_RANK_VARS, gpu_for_local_rank, local_rank_from_env
from ebflow.experiment.reproduce.cells import device_slots
from ebflow.layers import Dense, FlowLayer, LinearMap, SmoothLeakyReLU
from ebflow.runtime import full_precision
from ebflow.validation import check_batch, check_generator, same_device


# -- devices and generators --------------------------------------------------------------------------
def test_devices_compare_by_type_and_index():
    assert same_device("cpu", torch.device("cpu"))
    assert same_device("cuda", "cuda:0") or torch.cuda.is_available()  # cuda = the current GPU
    assert not same_device("cuda:0", "cuda:1")
    assert not same_device("cpu", "cuda:0")
    with pytest.raises(InputError, match="on device cpu but the model is on cuda:1"):
        check_batch(torch.zeros(2, 3), (3,), device=torch.device("cuda", 1))


def test_a_generator_must_be_on_the_device_it_draws_for():
    cpu = torch.Generator()
    assert check_generator(cpu, device="cpu") is cpu and check_generator(None, device="cuda:0") is None
    with pytest.raises(
        InputError,
        match=r"generator is on device cpu but the model is on cuda:0.*"
        r"torch.Generator\(device='cuda:0'\)",
    ):
        check_generator(cpu, device="cuda:0")
    with pytest.raises(ConfigError, match=r"torch\.Generator or None"):
        check_generator(123, device="cpu")


def test_sample_checks_its_generator_against_the_model_device(monkeypatch):
    """A CPU generator with a CUDA model is a clear InputError, before anything is drawn."""
    model = EBFlow([Dense(2)], (2,))
    monkeypatch.setattr(EBFlow, "device", property(lambda self: torch.device("cuda", 0)))
    with pytest.raises(InputError, match="generator is on device cpu"):
        model.sample(3, generator=torch.Generator())


def test_inpainting_checks_its_generator_against_the_model_device(monkeypatch):
    from ebflow.inpainting import inpaint_images

    model = EBFlow([Dense(4)], (4,))
    monkeypatch.setattr(EBFlow, "device", property(lambda self: torch.device("cuda", 0)))
    with pytest.raises(InputError, match="generator is on device cpu"):
        inpaint_images(
            model,
            None,
            torch.rand(2, 4),
            torch.ones(4, dtype=torch.bool),
            steps=1,
            generator=torch.Generator(),
        )


def test_a_linear_map_without_parameters_follows_to():
    """Its matrix, factors and shift are built where the layer is, not on the CPU."""
    layer = LinearMap(lambda x: 2.0 * x.flip(-1) - x, (3,), check=False)
    assert layer.shift().device.type == "cpu"
    layer = layer.to("meta")
    assert layer.shift().device.type == "meta"
    assert "_device_anchor" not in layer.state_dict()  # nothing new in checkpoints


# -- launchers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env, rank, world, expected",
    [
        ({"LOCAL_RANK": "3"}, 7, 8, 3),  # torchrun
        ({"SLURM_LOCALID": "1"}, 5, 8, 1),  # srun without torchrun
        ({"OMPI_COMM_WORLD_LOCAL_RANK": "2"}, 2, 4, 2),  # mpirun (Open MPI)
        ({"LOCAL_RANK": "0", "SLURM_LOCALID": "1"}, 1, 2, 0),  # torchrun under srun: torchrun's wins
        ({}, 0, 1, 0),  # one process
    ],
)
def test_local_rank_of_each_launcher(monkeypatch, env, rank, world, expected):
    for var in LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert local_rank_from_env(rank, world) == expected


def test_a_multi_process_run_without_a_local_rank_is_refused(monkeypatch):
    for var in LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        local_rank_from_env(1, 2)
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ConfigError, match="not an integer"):
        local_rank_from_env(1, 2)


def test_gpu_of_a_local_rank():
    assert gpu_for_local_rank(3, 8) == 3
    assert gpu_for_local_rank(3, 1) == 0  # one visible GPU per task (--gpus-per-task=1)
    with pytest.raises(ConfigError, match="local rank 4 has no GPU: 2 are visible"):
        gpu_for_local_rank(4, 2)


def test_concurrent_cells_spread_over_the_gpus():
    assert device_slots("cuda", 3, 2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert device_slots("cuda", 2, 1) == ["cuda", "cuda"]
    assert device_slots("cuda:1", 2, 4) == ["cuda:1", "cuda:1"]  # an explicit GPU is kept
    assert device_slots(None, 2, 4) == [None, None]


def test_the_benchmark_refuses_a_gpu_the_machine_lacks():
    from benchmarks import BenchConfig, _check_config

    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ConfigError, match=r"GPU|CUDA"):
        _check_config(BenchConfig(device=missing))


# -- TF32 ----------------------------------------------------------------------------------------------
class _FlagProbe(FlowLayer):
    """The identity, recording the TF32 flags in force when it runs."""

    seen: ClassVar[list[tuple[bool, bool, str]]] = []

    def _record(self) -> None:
        self.seen.append(
            (
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision(),
            )
        )

    def forward(self, x):
        self._record()
        return x, x.new_zeros(x.shape[0])

    def inverse(self, y):
        self._record()
        return y


@pytest.fixture
def tf32_on():
    before = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
    torch.set_float32_matmul_precision(before[2])


def test_exact_computations_run_without_tf32_and_restore_the_settings(tf32_on):
    model = EBFlow([Dense(3), SmoothLeakyReLU(0.3), _FlagProbe(), Dense(3)], (3,))
    x = torch.randn(4, 3)
    _FlagProbe.seen.clear()
    model.log_prob(x)
    model.inverse(x)
    model.sample(2)
    model.forward_with_log_det(x)
    evaluate_nll(model, x, None, True, batch_size=2)
    assert len(_FlagProbe.seen) >= 6 and set(_FlagProbe.seen) == {(False, False, "highest")}
    assert (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    ) == (True, True, "high")
    _FlagProbe.seen.clear()
    model.energy(x)  # training-side calls keep the user's settings
    assert _FlagProbe.seen == [(True, True, "high")]


def test_full_precision_restores_the_settings_after_an_error(tf32_on):
    with pytest.raises(RuntimeError), full_precision():
        raise RuntimeError("boom")
    assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"


# -- random state ----------------------------------------------------------------------------------
def test_training_leaves_every_global_generator_alone(monkeypatch, tmp_path):
    """The initial weights come from a seeded CPU generator inside a fork: the caller's CPU
    state is restored and no CUDA generator is seeded (torch.manual_seed would seed them all)."""
    from ebflow.experiment.config.resolve import resolve_config
    from ebflow.experiment.training.run import train

    torch.manual_seed(123)
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(("all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append(("one", seed)))
    before = torch.get_rng_state()
    config = resolve_config(
        "digits-fc",
        {
            "max_iters": 2,
            "epochs": None,
            "tensorboard": False,
            "progress": False,
            "num_threads": 1,
            "num_samples": 2,
        },
    )
    train(config, tmp_path / "r")
    assert torch.equal(torch.get_rng_state(), before)
    assert seeded == []


def test_resuming_on_another_kind_of_device_warns(tmp_path):
    """The checkpoint records the device type; a resume elsewhere says the noise streams change."""
    from ebflow.experiment.config.resolve import resolve_config
    from ebflow.experiment.rundir.checkpoint import load_checkpoint, save_checkpoint
    from ebflow.experiment.training.run import train

    config = resolve_config(
        "digits-fc",
        {
            "max_iters": 2,
            "epochs": None,
            "tensorboard": False,
            "progress": False,
            "num_threads": 1,
            "num_samples": 2,
        },
    )
    train(config, tmp_path / "r")
    path = tmp_path / "r" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    assert state["device_type"] == "cpu"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same device: no warning
        train(None, tmp_path / "r", resume=True, overrides={"max_iters": 3})
    state = load_checkpoint(path)
    state["device_type"] = "cuda"  # as if it had trained on a GPU
    save_checkpoint(path, {k: v for k, v in state.items() if k not in ("digest", "format", "version")})
    with pytest.warns(UserWarning, match="trained on cuda and resumes on cpu"):
        train(None, tmp_path / "r", resume=True, overrides={"max_iters": 4})
