"""benchmarks.precision: float32 against float64 gradients of the score-matching objectives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.precision import compare_precision, markdown
from ebflow import EBFlow
from ebflow.layers import Conv2d, ResidualSmoothLeakyReLU
from helpers import TINY_CLI, cli_sets

ROOT = Path(__file__).resolve().parents[1]


def _conv_model() -> EBFlow:
    torch.manual_seed(0)
    model = EBFlow([Conv2d(1, 3), ResidualSmoothLeakyReLU(0.3), Conv2d(1, 3)], (1, 6, 6))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_fdssm_with_a_tiny_step_loses_its_gradient_to_float32_rounding_and_dsm_does_not():
    """The second difference of energies divided by eps^2 amplifies rounding; DSM's gradient
    of the energy does not. A comparison of float64 with itself (both copies in one precision)
    would report zeros and fail here."""
    x = 6 * torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    rows = compare_precision(
        _conv_model(), x, {"dsm": {"sigma": 0.1}, "ssm": {}, "fdssm": {"eps": 1e-3}}, draws=3
    )
    by_name = {r.objective: r for r in rows}
    assert list(by_name) == ["dsm", "ssm", "fdssm"]
    assert 0 < by_name["dsm"].grad_rel_error < 1e-4
    assert 0 < by_name["ssm"].grad_rel_error < 1e-3
    assert by_name["fdssm"].grad_rel_error > 0.1
    # the spread over noise draws is measured on float64 gradients: positive, and the same
    # objective with a larger step is less hurt by rounding
    assert all(r.grad_spread_over_noise > 0 for r in rows)
    wide = compare_precision(_conv_model(), x, {"fdssm": {"eps": 1.0}}, draws=3)[0]
    assert wide.grad_rel_error < by_name["fdssm"].grad_rel_error / 100
    table = markdown(rows)
    assert table.count("\n") == 4 and "| fdssm |" in table


def test_needs_two_draws_for_a_spread():
    with pytest.raises(ValueError, match="draws"):
        compare_precision(_conv_model(), torch.randn(2, 1, 6, 6), {"dsm": {"sigma": 0.1}}, draws=1)


def test_command_reads_a_trained_image_run(tmp_path):
    run = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "ebflow", "train", "--config", "digits-fc", "--loss", "dsm", "--out", str(run)]
        + cli_sets(TINY_CLI),
        capture_output=True,
        text=True,
    )
    assert train.returncode == 0, train.stderr
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.precision", str(run), "--batch", "8", "--draws", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    for name in ("ssm", "dsm", "fdssm"):
        assert f"| {name} |" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks.precision", str(run), "--draws", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--draws" in bad.stderr
