"""Exponential moving average of parameters."""

from __future__ import annotations

import pytest
import torch

from ebflow import EMA, EBFlow
from ebflow.errors import ConfigError
from ebflow.layers import ActNorm, Dense


def test_average_follows_the_recursion_and_starts_after_data_init():
    model = EBFlow([ActNorm(2), Dense(2)], (2,)).double()
    ema = EMA(model, decay=0.9)
    model.energy(torch.randn(16, 2, dtype=torch.float64) * 3 + 1)  # ActNorm data-dependent init
    ema.update()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(ema.shadow["layers.0.shift"], start["layers.0.shift"])
    expected = dict(start)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        for n, p in model.named_parameters():
            expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
    for n in expected:
        torch.testing.assert_close(ema.shadow[n], expected[n])


def test_context_swaps_averages_in_and_restores_and_log_partition_follows():
    model = EBFlow([Dense(3)], (3,)).double()
    ema = EMA(model, decay=0.5)
    ema.update()
    with torch.no_grad():
        model.layers[0].weight.mul_(2.0)
    ema.update()
    current = model.layers[0].weight.detach().clone()
    logz_current = model.log_partition().detach()
    with ema.average_parameters():
        torch.testing.assert_close(model.layers[0].weight, ema.shadow["layers.0.weight"])
        logz_avg = model.log_partition().detach()
        expected = -torch.linalg.slogdet(ema.shadow["layers.0.weight"])[1]
        torch.testing.assert_close(logz_avg, expected)
    torch.testing.assert_close(model.layers[0].weight, current)
    torch.testing.assert_close(model.log_partition().detach(), logz_current)


def test_state_dict_round_trip_and_mismatch():
    model = EBFlow([Dense(3)], (3,))
    ema = EMA(model, 0.99)
    ema.update()
    other = EMA(EBFlow([Dense(3)], (3,)), 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.99 and other.num_updates == 1
    torch.testing.assert_close(other.shadow["layers.0.weight"], ema.shadow["layers.0.weight"])
    with pytest.raises(ConfigError, match="does not match"):
        EMA(EBFlow([Dense(3), Dense(3)], (3,))).load_state_dict(ema.state_dict())
    with pytest.raises(ConfigError, match="shape"):
        EMA(EBFlow([Dense(4)], (4,))).load_state_dict(ema.state_dict())


def test_invalid_decay():
    with pytest.raises(ConfigError, match="decay"):
        EMA(EBFlow([Dense(2)], (2,)), decay=1.0)
