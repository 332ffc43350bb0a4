"""Exponential moving average of parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ebflow import EMA, EBFlow
from ebflow.errors import ConfigError
from ebflow.layers import ActNorm, Dense


def test_average_follows_the_recursion_and_starts_after_data_init():
    model = EBFlow([ActNorm(2), Dense(2)], (2,)).double()
    ema = EMA(model, decay=0.9, warmup=False)
    model.initialize(torch.randn(16, 2, dtype=torch.float64) * 3 + 1)  # ActNorm data-dependent init
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


def test_warmup_uses_the_papers_decay_schedule():
    """Update t folds the weights in with decay min(d, (1+t)/(10+t)): early averages forget the
    first weights (the reference recipe); without warm-up the decay is d throughout."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    ema = EMA(model, decay=0.999)
    ema.update()  # t = 0: the average starts at the current weights
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    decays = []
    for t in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decays.append(ema.current_decay)
        ema.update()
        d = min(0.999, (1 + t) / (10 + t))
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach()
    assert decays[0] == pytest.approx(2 / 11) and decays[7] == pytest.approx(0.5)
    for n in expected:
        torch.testing.assert_close(ema.shadow[n], expected[n])
    # far into training the schedule reaches the configured decay
    ema.num_updates = 100_000
    assert ema.current_decay == 0.999
    assert EMA(model, 0.999, warmup=False).current_decay == 0.999


def test_warmup_average_tracks_moving_weights_much_closer():
    """The point of the warm-up: after 200 steps of a drifting weight, the warm-up average is
    near the recent weights, the constant-decay one is still near the start."""
    model = nn.Linear(1, 1, bias=False).double()
    with_warmup, without = EMA(model, 0.999), EMA(model, 0.999, warmup=False)
    for step in range(200):
        with torch.no_grad():
            model.weight.fill_(float(step))
        with_warmup.update()
        without.update()
    assert float(with_warmup.shadow["weight"]) > 150
    assert float(without.shadow["weight"]) < 30


def test_warmup_switch_survives_state_dict():
    model = nn.Linear(2, 2)
    ema = EMA(model, 0.99, warmup=False)
    ema.update()
    other = EMA(model, 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.warmup is False and other.decay == 0.99
