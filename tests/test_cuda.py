"""The CUDA path, end to end (skipped without a GPU; `benchmarks/gpu_smoke.sh` runs it with the
GPU benchmark): a training run per objective through the CLI, the exact NLL on the GPU against
the CPU's, sampling, inpainting, and 2-process DDP when two GPUs are visible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ebflow import EBFlow
from ebflow.cli import main
from ebflow.experiment.evaluation.nll import evaluate_nll
from ebflow.experiment.rundir.load import load_run
from ebflow.inpainting import inpaint_images, make_mask
from ebflow.layers import Conv2d, Dense, ResidualSmoothLeakyReLU, SmoothLeakyReLU, Squeeze

#: The device under test: cuda; EBFLOW_CUDA_TEST_DEVICE=cpu runs the same checks on the CPU (to
#: check the tests themselves on a machine without a GPU).
DEVICE = os.environ.get("EBFLOW_CUDA_TEST_DEVICE", "cuda")
GPUS = torch.cuda.device_count() if DEVICE == "cuda" else 2
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TINY = [
    "--set",
    "data=synthetic-mnist",
    "--set",
    "max_train=400",
    "--set",
    "max_eval=200",
    "--set",
    "max_iters=20",
    "--set",
    "epochs=null",
    "--set",
    "eval_every=10",
    "--set",
    "checkpoint_every=10",
    "--set",
    "num_samples=8",
    "--set",
    "tensorboard=false",
    "--set",
    "progress=false",
]


@pytest.mark.parametrize("loss", ["ml", "sml", "ssm", "dsm", "fdssm"])
@pytest.mark.parametrize("preset", ["mnist-fc", "mnist-cnn"])
def test_a_training_run_per_objective_on_the_gpu(tmp_path, preset, loss):
    run = tmp_path / "run"
    assert (
        main(["train", "--config", preset, "--loss", loss, "--device", DEVICE, "--out", str(run), *TINY]) == 0
    )
    results = json.loads((run / "results.json").read_text())
    assert results["device"].startswith(DEVICE) and results["iterations"] == 20
    assert torch.isfinite(torch.tensor(results["test_nll"]))
    # the same checkpoint evaluated on the CPU in float64 gives the same exact NLL
    cpu = load_run(run, device="cpu")
    cpu.model.double()
    gpu = load_run(run, device=DEVICE)
    data = cpu.data("test")[:100]
    on_cpu = evaluate_nll(cpu.model, data, cpu.preprocessing, cpu.map, 50, seed=3)["nll"]
    on_gpu = evaluate_nll(gpu.model, data, gpu.preprocessing, gpu.map, 50, seed=3)["nll"]
    assert abs(on_gpu - on_cpu) < 0.05, (on_gpu, on_cpu)  # float32 without TF32


def _cnn(device: str) -> EBFlow:
    torch.manual_seed(0)
    model = EBFlow([Conv2d(1, 3), ResidualSmoothLeakyReLU(0.3), Squeeze(), Conv2d(4, 3)], (1, 8, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(device)


def test_sampling_and_inversion_on_the_gpu():
    model = _cnn(DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = model.sample(16, generator=g)
    assert x.device.type == DEVICE and torch.isfinite(x).all()
    torch.testing.assert_close(model.inverse(model(x)), x, atol=1e-4, rtol=1e-4)
    cpu = _cnn("cpu")
    torch.testing.assert_close(model.log_prob(x).cpu(), cpu.log_prob(x.cpu()), atol=1e-3, rtol=1e-4)


def test_inpainting_on_the_gpu_is_reproducible():
    torch.manual_seed(0)
    model = EBFlow([Dense(16), SmoothLeakyReLU(0.3), Dense(16)], (16,)).to(DEVICE)
    images = torch.rand(4, 16, device=DEVICE)
    mask = make_mask("random:0.5", (16,), batch=1, generator=torch.Generator()).reshape(16).to(DEVICE)

    def run() -> torch.Tensor:
        g = torch.Generator(device=DEVICE).manual_seed(1)
        return inpaint_images(model, None, images, mask, steps=5, generator=g).filled

    first, second = run(), run()
    assert torch.equal(first, second) and torch.equal(first[:, ~mask], images[:, ~mask])


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_two_process_ddp_on_two_gpus(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "ebflow",
        "train",
        "--config",
        "mnist-fc",
        "--loss",
        "dsm",
        "--device",
        DEVICE,
        "--out",
        str(tmp_path / "run"),
        *TINY,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["processes"] == 2
