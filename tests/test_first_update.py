"""``python -m benchmarks.first_update``: the size of a recipe's first update of each square
weight (the scaling study's explanation of the early rise of its D = 7,056 curves)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.first_update import first_update, main, operator_norm


def test_operator_norm_is_the_largest_singular_value():
    m = torch.randn(40, 40, generator=torch.Generator().manual_seed(3))
    assert operator_norm(m) == pytest.approx(float(torch.linalg.matrix_norm(m.double(), ord=2)), rel=1e-6)
    rank_one = 0.01 * torch.outer(torch.tensor([1.0, -1, 1, 1]), torch.tensor([-1.0, 1, 1, -1]))
    assert operator_norm(rank_one) == pytest.approx(0.01 * 4)  # entries ±m in a rank-one pattern: m·D
    assert operator_norm(torch.zeros(3, 3)) == 0.0


@pytest.mark.parametrize("optimizer, first_move", [("adam", 1.0), ("rmsprop", 10.0)])
def test_first_step_moves_every_weight_by_the_optimisers_first_move(optimizer, first_move):
    # Adam's first step moves each weight by lr, RMSprop's (alpha = 0.99) by 10·lr: a broken
    # measurement (no step taken, or the weights compared with themselves) reads 0
    run = first_update("digits-fc", "ml", {"optimizer": optimizer, "max_train": 200, "max_eval": 50})
    assert [r.weight for r in run.sizes] == ["layers.1.weight", "layers.3.weight"]
    assert run.val_nll_before is None and run.val_nll_after is None  # not asked for
    for r in run.sizes:
        assert r.dimension == 64 and r.initial_norm == pytest.approx(1.0)  # W0 = -I
        assert r.max_abs_update == pytest.approx(first_move * r.lr, rel=1e-3)
        assert 0.2 * r.bound < r.update_norm <= r.bound * (1 + 1e-6)


def test_nll_is_of_the_weights_themselves_before_and_after_the_step():
    # the NLL after is that of the stepped weights (not of an EMA still equal to the start), and
    # the one before is that of the initial weights: the two differ, and a fresh model reproduces them
    overrides = {"max_train": 200, "max_eval": 50}
    run = first_update("digits-fc", "ml", overrides, nll=True)
    again = first_update("digits-fc", "ml", overrides, nll=True)
    before, after = run.val_nll_before, run.val_nll_after
    assert before is not None and after is not None and again.val_nll_before is not None
    assert before["n"] == after["n"] == 50 and before["nll"] != pytest.approx(after["nll"], rel=1e-3)
    assert again.val_nll_before["nll"] == before["nll"]  # deterministic: seed, data, dequantisation noise
    assert before["bpd"] == pytest.approx(before["nll"] / (64 * math.log(2)))


def test_main_prints_one_row_per_preset_objective_and_weight(capsys):
    assert main(["--preset", "digits-fc", "--loss", "ml", "ssm", "--max-train", "200"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| digits-fc")]
    assert len(rows) == 4 and sum("| ssm |" in r for r in rows) == 2 and "val NLL" not in out
    assert main(["--loss", "ssm", "--max-train", "200", "--nll"]) == 0
    out = capsys.readouterr().out
    assert (
        "| val NLL before (nats) |" in out
        and len([ln for ln in out.splitlines() if ln.startswith("| digits")]) == 3
    )
