"""The scaling study's report: time to target (interpolated, first crossing), the step-time
exponent, the speed-ups, and partial reports (cells or D values missing, cells unfinished)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from ebflow.experiment.reproduce.scaling_metrics import growth_exponent, time_to_target
from ebflow.experiment.reproduce.scaling_report import render_scaling_report, summarise, write_scaling_report
from ebflow.experiment.reproduce.tables import cells_of
from ebflow.experiment.training import memory as memory_module
from ebflow.experiment.training.memory import peak_memory_bytes


# -- time to target -------------------------------------------------------------------------------
def test_time_to_target_interpolates_between_the_validations_around_the_crossing():
    curve = [(60.0, 100.0), (120.0, 90.0), (180.0, 80.0), (240.0, 70.0)]
    # 85 lies half-way from 90 (at 120 s) to 80 (at 180 s): 150 s, not 180 s (the validation at
    # or below) nor 120 s (the one before)
    assert time_to_target(curve, 85.0) == pytest.approx(150.0)
    assert time_to_target(curve, 88.0) == pytest.approx(132.0)  # 120 + 60 * (90 - 88) / 10
    assert time_to_target(curve, 80.0) == pytest.approx(180.0)  # exactly at a validation
    assert time_to_target(curve, 65.0) is None  # never reached
    assert time_to_target(curve, 120.0) == 60.0  # the first validation is already below
    assert time_to_target([], 1.0) is None


def test_time_to_target_is_the_first_crossing_not_the_last():
    curve = [(60.0, 100.0), (120.0, 80.0), (180.0, 95.0), (240.0, 70.0)]
    assert time_to_target(curve, 90.0) == pytest.approx(90.0)  # 60 + 60 * 10 / 20; the last: 192


def test_time_to_target_skips_non_finite_validations():
    assert time_to_target([(60.0, math.nan), (120.0, 80.0)], 90.0) == 120.0
    assert time_to_target([(60.0, math.inf), (120.0, 95.0), (180.0, 85.0)], 90.0) == pytest.approx(150.0)


# -- the exponent ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("a", [1.0, 2.0, 2.37, 3.0])
def test_growth_exponent_is_exact_on_power_laws(a):
    assert growth_exponent({d: 0.003 * d**a for d in (784, 3136, 7056)}) == pytest.approx(a, rel=1e-12)
    assert growth_exponent({784: 5.0, 7056: 5.0 * 9**a}) == pytest.approx(a, rel=1e-12)


def test_growth_exponent_is_the_least_squares_slope():
    """log-log points (0, 0), (1, 0), (3, 3): the least-squares slope is 5 / (14/3) = 15/14, not
    the slope of the end points (1.0) nor of the last two (1.5)."""
    e = math.e
    assert growth_exponent({1: 1.0, e: 1.0, e**3: e**3}) == pytest.approx(15 / 14)  # type: ignore[dict-item]
    assert growth_exponent({784: 10.0}) is None and growth_exponent({}) is None


# -- summaries and partial reports -------------------------------------------------------------------------
def _record(cell, curve, *, status="finished", ms=100.0, steps=1000, test=None):
    results = {
        "iterations": steps,
        "train_seconds": ms * steps / 1000,
        "checkpoint_step": steps,
        "test_nll": test if test is not None else curve[-1][1] if curve else None,
        "test_bpd": 2.0,
        "train_peak_memory_bytes": 2 * 2**30 + 2**29,
        "peak_memory_bytes": 3 * 2**30,
    }
    rec = {"cell": cell, "status": status, "curve": curve, "run_dir": "/nonexistent", "budget_minutes": 30.0}
    if status == "finished":
        rec["results"] = results
    return rec


def _planted():
    """D = 784: ML ends at 100 after 30 min (its final validation, first reached at 1,800 s), SSM
    reaches 100 at 600 s, DSM at 300 s, ML-LU at 1,000 s, FDSSM never. D = 3,136: ML only 50 % of
    the way, SSM reaches its final value at 120 s, ML-LU never (its last validation at 1,500 s)."""
    return [
        _record("d784-ml", [(600.0, 130.0), (1200.0, 110.0), (1800.0, 100.0)], ms=200.0, steps=9000),
        _record("d784-ml-lu", [(600.0, 120.0), (1200.0, 90.0)], ms=50.0),
        _record("d784-ssm", [(300.0, 120.0), (900.0, 80.0)], ms=40.0),
        _record("d784-dsm", [(300.0, 100.0), (600.0, 95.0)], ms=20.0),
        _record("d784-fdssm", [(300.0, 150.0), (1800.0, 101.0)], ms=20.0),
        _record("d3136-ml", [(600.0, 500.0), (1800.0, 450.0)], ms=200.0 * 4**3),
        _record("d3136-ml-lu", [(600.0, 600.0), (1500.0, 460.0)], ms=50.0 * 4**2),
        _record("d3136-ssm", [(60.0, 460.0), (180.0, 440.0)], ms=40.0 * 4**2),
    ]


def test_summary_targets_times_speedups_and_exponents():
    summary = summarise(_planted())
    d784, d3136 = summary["dimensions"]
    assert d784["target_nll"] == 100.0 and d3136["target_nll"] == 450.0
    times = {r["objective"]: r["time_to_target_s"] for r in d784["rows"]}
    assert times == {"ml": 1800.0, "ml-lu": 1000.0, "ssm": 600.0, "dsm": 300.0, "fdssm": None}
    assert d784["order"] == ["dsm", "ssm", "ml-lu", "ml"] and d784["best_score_matching"] == "dsm"
    assert d784["speedup_over_ml"] == {"factor": 6.0, "lower_bound": False}
    assert d784["speedup_over_ml_lu"]["factor"] == pytest.approx(1000 / 300)
    # at 3,136 SSM reaches 450 at 60 + 120 * 10 / 20 = 120 s; ML-LU never did (a bound: 1,500 s)
    assert d3136["speedup_over_ml"]["factor"] == pytest.approx(1800 / 120)
    assert d3136["speedup_over_ml_lu"] == {"factor": pytest.approx(1500 / 120), "lower_bound": True}
    exps = summary["exponents"]
    assert exps["ml"]["exponent"] == pytest.approx(3.0) and exps["ssm"]["exponent"] == pytest.approx(2.0)
    assert exps["dsm"]["exponent"] is None  # one D only
    text = render_scaling_report(summary, "test machine")
    assert "Target: **100.0 nats**" in text and "| DSM | finished | 95.0 |" in text
    assert "| FDSSM | finished |" in text and "| not reached |" in text and "2.50 GiB / 3.00 GiB" in text
    assert "DSM reaches ML's final validation NLL (100.0 nats) first (DSM 5.0 min, SSM 10.0 min" in text
    assert "Score matching (DSM) reaches it 6.0× sooner than ML and 3.3× sooner than ML-LU" in text
    assert "reaches it 15.0× sooner than ML and ≥ 12.5× sooner than ML-LU" in text  # D = 3,136
    assert "≥ 12.5× over ML-LU" in text and "FDSSM (best 101.0, +1.0)" in text
    assert "ML 3.00 (D = 784, 3,136)" in text and "| ML | 200.0 | 12,800.0 | 3.00 |" in text


def test_partial_reports_missing_ml_missing_d_and_no_score_matching():
    records = [r for r in _planted() if r["cell"] not in ("d3136-ml", "d784-ssm", "d784-dsm")]
    summary = summarise(records)
    d784, d3136 = summary["dimensions"]
    assert d3136["target_nll"] is None and d3136["best_score_matching"] is None
    assert all(r["time_to_target_s"] is None for r in d3136["rows"])
    assert d784["best_score_matching"] is None and d784["speedup_over_ml"] is None
    text = render_scaling_report(summary, "m")
    assert "No target: the ML cell at this D has no validation yet." in text
    assert "No score-matching objective reaches it within its budget" in text
    assert "D = 7,056" not in text  # a D with no cell selected has no section
    only_one = render_scaling_report(summarise([_record("d7056-ssm", [])]), "m")
    assert "No step-time exponent yet" in only_one and "no target yet" in only_one


def test_an_unfinished_cell_reports_its_steps_so_far_and_a_provisional_target(tmp_path):
    run = tmp_path / "d784-ml"
    run.mkdir()
    (run / "metrics.csv").write_text("step,train_s,val_nll\n50,10.0,\n100,20.0,300.0\n")
    rec = {**_record("d784-ml", [(20.0, 300.0)], status="unfinished"), "run_dir": str(run)}
    summary = summarise([rec])
    row = summary["dimensions"][0]["rows"][0]
    assert (row["steps"], row["ms_per_step"], row["test_nll"]) == (100, 200.0, None)
    assert "(ML unfinished: provisional)" in render_scaling_report(summary, "m")


def test_write_scaling_report_with_nothing_run(tmp_path):
    cells = cells_of("scaling", only=["d784-*", "d7056-ssm"])
    write_scaling_report("scaling", cells, tmp_path)
    text = (tmp_path / "scaling" / "report.md").read_text()
    assert text.count("| not run |") == 6 and not (tmp_path / "scaling" / "val_nll_vs_time.png").exists()
    data = json.loads((tmp_path / "scaling" / "results.json").read_text())
    assert [d["dimension"] for d in data["dimensions"]] == [784, 7056]
    assert data["dimensions"][0]["rows"][0]["budget_minutes"] == 30.0


def test_peak_memory_is_in_bytes_and_sees_a_large_allocation():
    before = peak_memory_bytes()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert before is not None and peak_memory_bytes() >= 64 * 2**20
    del x


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inherited peak is Linux's ru_maxrss")
def test_a_process_started_by_a_large_one_reports_its_own_peak():
    """Linux keeps ``ru_maxrss`` across ``exec``: a cell started by a large parent would report
    the parent's peak. A small child (the memory module alone, no torch) of this process, made
    at least 512 MiB larger first, reports far less than this process's peak."""
    buffer = torch.ones(128 * 2**20)  # 512 MiB, touched
    parent = peak_memory_bytes()
    code = "import runpy, sys; print(runpy.run_path(sys.argv[1])['peak_memory_bytes']())"
    out = subprocess.run(
        [sys.executable, "-c", code, memory_module.__file__], capture_output=True, text=True, check=True
    ).stdout
    del buffer
    assert parent is not None and parent >= 512 * 2**20
    assert 0 < int(out) < 256 * 2**20 < parent - 256 * 2**20, (int(out), parent)


_PLANTED_TEST_ALLOCATION = r"""
import sys, torch
import ebflow.experiment.training.results as results
real = results.evaluate_nll
def evaluate_with_a_large_buffer(*args, **kwargs):
    buffer = torch.ones(128 * 2**20)  # 512 MiB, touched: only the final test allocates it
    out = real(*args, **kwargs)
    return out if buffer.sum() > 0 else None
results.evaluate_nll = evaluate_with_a_large_buffer
from ebflow.cli import main
sys.exit(main(["train", "--out", sys.argv[1], "--set", "max_iters=3", "--set", "epochs=null",
               "--set", "eval_every=100", "--set", "progress=false", "--set", "tensorboard=false",
               "--set", "num_samples=4"]))
"""


def test_results_record_the_training_peak_apart_from_the_final_test(tmp_path):
    """``train_peak_memory_bytes`` is read when training stops, before the final test:
    a 512 MiB buffer that only the test allocates raises ``peak_memory_bytes`` (the whole
    process) by about that much and leaves the training peak below it."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _PLANTED_TEST_ALLOCATION, str(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    train_peak, peak = results["train_peak_memory_bytes"], results["peak_memory_bytes"]
    assert 20 * 2**20 < train_peak < peak - 300 * 2**20, (train_peak, peak)


def test_a_score_matching_objective_slower_than_ml_lu_is_not_called_faster():
    """A speed-up below 1 is a slow-down: "takes 1.3× as long as ML-LU", never "0.8× faster"."""
    records = [
        _record("d784-ml", [(600.0, 120.0), (1800.0, 100.0)]),
        _record("d784-ml-lu", [(300.0, 100.0)]),
        _record("d784-dsm", [(390.0, 100.0)]),
    ]
    text = render_scaling_report(summarise(records), "m")
    assert "Score matching (DSM) reaches it 4.6× sooner than ML and takes 1.3× as long as ML-LU." in text
    assert "faster" not in text


def test_cells_still_to_run_or_finish_are_not_reported_as_having_missed_the_target():
    """While cells run, "not reached" is kept for stopped cells: an unfinished one is "not yet",
    one not run has no time, and the finding says that score matching has not reached it *yet*."""
    records = [
        _record("d7056-ml", [(600.0, 120.0), (3600.0, 100.0)]),
        _record("d7056-ssm", [(120.0, 300.0)], status="unfinished"),
        _record("d7056-dsm", [], status="not run"),
        _record("d7056-fdssm", [(120.0, 400.0), (3600.0, 150.0)]),
    ]
    text = render_scaling_report(summarise(records), "m")
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.count(" | ") == 9}  # cells
    assert rows["| SSM"].split(" | ")[7] == "not yet"
    assert rows["| DSM"].split(" | ")[7] == "–"
    assert rows["| FDSSM"].split(" | ")[7] == "not reached"
    assert "not reached by FDSSM (best 150.0, +50.0); not yet reached by SSM (best 300.0, +200.0)" in text
    assert "No score-matching objective has reached it yet (SSM unfinished, DSM not run)" in text
    assert "within its budget" not in text
    # once every score-matching cell has stopped, the finding is final
    done = [records[0], records[3]]
    assert "No score-matching objective reaches it within its budget" in render_scaling_report(
        summarise(done), "m"
    )


def test_an_unfinished_ml_lu_gives_no_speed_up_bound_over_it():
    """ML-LU still training (8.8 of 60 min, above the target) may yet reach it before DSM's 47.6 min:
    no "≥ 0.2×" bound from its time so far, only the speed-up over ML and ML-LU listed as pending."""
    records = [
        _record("d7056-ml", [(600.0, 40000.0), (3618.0, 27812.9)]),
        _record("d7056-ml-lu", [(120.0, 285000.0), (528.0, 186480.0)], status="unfinished"),
        _record("d7056-dsm", [(2760.0, 29784.9), (2881.0, 27346.5), (3600.0, 20206.5)]),
    ]
    dim = summarise(records)["dimensions"][0]
    assert dim["speedup_over_ml_lu"] is None and dim["speedup_over_ml"]["lower_bound"] is False
    text = render_scaling_report(summarise(records), "m")
    assert "≥" not in text and "over ML-LU" not in text and "than ML-LU" not in text
    assert (
        "not yet reached by ML-LU (best 186,480.0, +158,667.1). Score matching (DSM) reaches it 1.3× sooner than ML."
        in text
    )
    # stopped without reaching it, its training time is a bound again
    records[1] = _record("d7056-ml-lu", [(120.0, 285000.0), (3600.0, 30000.0)])
    assert summarise(records)["dimensions"][0]["speedup_over_ml_lu"]["lower_bound"] is True
