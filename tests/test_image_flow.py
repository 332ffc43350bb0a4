"""ebflow.ImageFlow: the likelihood and samples of an image model in pixel space.

The bug these tests exist for: ``-model.log_prob(y)`` on preprocessed images leaves out the
preprocessing's log-determinant (57.7 of 109 nats on digits), and samples come back in logit space.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import ebflow
from ebflow import EBFlow, ImageFlow, ImagePreprocessing, InputError
from ebflow.layers import Dense
from helpers import TINY_CLI, cli_sets


def _flow(event_shape: tuple[int, ...], seed: int = 0) -> EBFlow:
    """A 2-layer dense flow with random (not identity) weights, float64."""
    torch.manual_seed(seed)
    flow = ebflow.dense_flow(event_shape, num_layers=2).double()
    with torch.no_grad():
        for layer in flow.layers:
            if isinstance(layer, Dense):
                layer.weight.add_(0.3 * torch.randn_like(layer.weight))
    return flow


def test_log_prob_adds_the_preprocessing_log_determinant():
    """log p(x~) = log p_model(f(x~)) + sum log f'(x~), f'(t) from autograd, element by element."""
    pre = ImagePreprocessing(smoothness=0.5, num_bins=17)
    flow = _flow((1, 2, 2))
    images = ImageFlow(flow, pre)
    x = torch.rand(5, 1, 2, 2, dtype=torch.float64) * 17
    t = x.clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(pre.forward(t)[0].sum(), t)  # element-wise map: diagonal Jacobian
    expected = flow.log_prob(pre.forward(x)[0]) + slope.log().sum(dim=(1, 2, 3))
    torch.testing.assert_close(images.log_prob(x), expected, rtol=0, atol=1e-10)
    # the term is not negligible here, so leaving it out (or its sign wrong) fails the check above
    assert slope.log().sum(dim=(1, 2, 3)).abs().max() > 0.5


def test_pixel_density_integrates_to_one():
    """One pixel of 5 levels: the density of x~ on (0, 5) integrates to 1 (midpoint rule)."""
    images = ImageFlow(_flow((1, 1, 1), seed=3), ImagePreprocessing(smoothness=0.5, num_bins=5))
    n = 200_000
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) * (5 / n)
    with torch.no_grad():
        mass = images.log_prob(grid.view(n, 1, 1, 1)).exp().sum() * (5 / n)
    assert abs(float(mass) - 1.0) < 1e-3


def test_without_map_the_preprocessing_is_inside_the_flow():
    """use_map=False: a flow whose first layers are the preprocessing gives the same density."""
    pre = ImagePreprocessing(smoothness=0.75, num_bins=17)
    outer = _flow((1, 2, 2), seed=1)
    inner = EBFlow([*pre.as_layers(), *outer.layers], (1, 2, 2)).double()
    x = torch.rand(4, 1, 2, 2, dtype=torch.float64) * 17
    torch.testing.assert_close(
        ImageFlow(inner, pre, use_map=False).log_prob(x), ImageFlow(outer, pre).log_prob(x), rtol=0, atol=1e-9
    )
    # and model_input gives each flow its own input space
    g = torch.Generator().manual_seed(0)
    px = torch.randint(0, 17, (3, 1, 2, 2)).double()
    x_deq = ImageFlow(inner, pre, use_map=False).model_input(px, torch.Generator().manual_seed(0))
    assert ((x_deq - px) >= 0).all() and ((x_deq - px) < 1).all()
    torch.testing.assert_close(ImageFlow(outer, pre).model_input(px, g), pre.forward(x_deq)[0])


def test_nll_is_the_mean_negative_log_prob_with_seeded_noise():
    pre = ImagePreprocessing(num_bins=17)
    images = ImageFlow(_flow((1, 2, 2)), pre)
    px = torch.randint(0, 17, (7, 1, 2, 2)).float()
    out = images.nll(px, seed=4, batch_size=3)
    assert out["n"] == 7
    assert out["bpd"] == pytest.approx(out["nll"] / (4 * math.log(2)))
    # by hand: batch k's noise from a generator seeded by step_seed(4, k)
    from ebflow.utils import step_seed

    total = 0.0
    for k, b in enumerate(px.split(3)):
        x = pre.dequantize(b.double(), torch.Generator().manual_seed(step_seed(4, k)))
        total -= float(images.log_prob(x).detach().sum())
    assert out["nll"] == pytest.approx(total / 7, rel=1e-12)
    assert images.nll(px, seed=4, batch_size=3) == out  # repeatable
    assert images.nll(px, seed=5, batch_size=3)["nll"] != out["nll"]  # the seed is used


def test_samples_are_pixel_levels():
    pre = ImagePreprocessing(num_bins=17)
    images = ImageFlow(_flow((1, 2, 2)), pre)
    s = images.sample(50, generator=torch.Generator().manual_seed(0))
    assert s.shape == (50, 1, 2, 2)
    assert s.min() >= 0 and s.max() <= 16 and torch.equal(s, s.floor())
    again = images.sample(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, again)
    # the same draw through the model, mapped back by hand
    y = images.flow.sample(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, pre.to_pixels(y))
    assert images.sample((2, 3)).shape == (2, 3, 1, 2, 2)


def test_bad_input_is_named():
    flow = _flow((1, 2, 2))
    with pytest.raises(InputError, match="EBFlow"):
        ImageFlow(torch.nn.Linear(2, 2), ImagePreprocessing())  # type: ignore[arg-type]
    with pytest.raises(InputError, match="ImagePreprocessing"):
        ImageFlow(flow, None)  # type: ignore[arg-type]
    images = ImageFlow(flow, ImagePreprocessing(num_bins=17))
    with pytest.raises(InputError, match="pixel values"):
        images.nll(torch.full((2, 1, 2, 2), 17.0))
    with pytest.raises(InputError, match="shape"):
        images.nll(torch.zeros(2, 1, 3, 3))
    with pytest.raises(ebflow.EBFlowError, match="batch_size"):
        images.nll(torch.zeros(2, 1, 2, 2), batch_size=0)


def test_nll_equals_the_command_line_evaluation(tmp_path):
    """The number `ebflow eval` prints for a checkpoint is ImageFlow.nll on the same weights."""
    run = tmp_path / "run"
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "ebflow",
            "train",
            "--config",
            "digits-fc",
            "--loss",
            "ssm",
            "--out",
            str(run),
            *cli_sets(TINY_CLI),
        ],
        capture_output=True,
        text=True,
    )
    assert train.returncode == 0, train.stderr
    ev = subprocess.run(
        [sys.executable, "-m", "ebflow", "eval", str(run), "--json"], capture_output=True, text=True
    )
    assert ev.returncode == 0, ev.stderr
    cli = json.loads(ev.stdout)
    loaded = ebflow.load_run(run)
    images = loaded.image_flow
    assert isinstance(images, ImageFlow)
    ours = images.nll(
        loaded.data("test"), seed=loaded.eval_seed, batch_size=loaded.config.bookkeeping.eval_batch_size
    )
    assert ours["nll"] == pytest.approx(cli["nll"], rel=1e-12)
    assert ours["bpd"] == pytest.approx(cli["bpd"], rel=1e-12)
    # the model-space number a user would get without the preprocessing term is far off
    y = images.model_input(loaded.data("test"), torch.Generator().manual_seed(0))
    assert abs(float(-loaded.model.log_prob(y).mean().detach()) - ours["nll"]) > 20
