"""The benchmark's sections of issue 21 (``compiled``, ``peers``, ``small``) at tiny sizes: every
row, the break-even arithmetic, the labelling of an eager fallback and of a missing peer, and
the targets. No timing assertions; the tests that compile for real are marked ``slow``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import QUICK, SECTIONS, BenchConfig, Row, add_arguments, config_from_args, run, run_benchmark
from benchmarks.compiled import (
    FALLBACK,
    ProbeRequest,
    break_even_steps,
    compiled_section,
    compiled_table,
    compiled_targets,
    method_rows,
    probe_in_process,
    probe_in_subprocess,
)
from benchmarks.peers import LeakyReLUTransform, peers_section, peers_targets
from benchmarks.report import check_targets, format_markdown
from benchmarks.small import bookkeeping_periods, small_section
from benchmarks.workloads import get_spec

CPU = torch.device("cpu")
#: The smallest settings of every section of issue 21.
TINY = dict(
    device="cpu", methods=("dsm",), batch=8, warmup=0, repeats=1, compiled_models=("fc-8",),
    peer_dims=(8,), small_block=4,
)  # fmt: skip


def _config(**changes) -> BenchConfig:
    return BenchConfig(**{**TINY, **changes})


# -- compiled -------------------------------------------------------------------------------------
def test_break_even_is_compile_time_over_the_time_saved_per_step():
    assert break_even_steps(60.0, 100.0, 40.0) == pytest.approx(1000.0)  # 60 s / 0.06 s per step
    assert break_even_steps(3.0, 10.0, 9.0) == pytest.approx(3000.0)
    assert break_even_steps(60.0, 100.0, 100.0) == math.inf  # not faster: never
    assert break_even_steps(60.0, 100.0, 120.0) == math.inf
    assert math.isnan(break_even_steps(math.nan, 100.0, 40.0))
    assert math.isnan(break_even_steps(60.0, 100.0, math.nan))


def _timings(**medians: float) -> dict:
    return {
        k: {"median_ms": v, "q1_ms": v, "q3_ms": v, "repeats": 3, "calls_per_round": 1}
        for k, v in medians.items()
    }


def test_rows_of_one_model_and_method_from_its_probes():
    spec = get_spec("mnist-cnn")
    cold = {"compile_s": 90.0, "fallback": None, "cache": True}
    warm = {"compile_s": 6.0, "fallback": None, "cache": True,
            "timings": _timings(plain=50.0, eager=200.0, compiled=140.0)}  # fmt: skip
    rows = {r.metric: r for r in method_rows(spec, "ssm", cold, warm)}
    assert rows["compiled step"].value == 140.0 and rows["compiled step"].vs_plain == pytest.approx(2.8)
    assert rows["eager step"].vs_plain == pytest.approx(4.0) and rows["plain eager step"].vs_plain == 1.0
    assert rows["compile cold"].value == 90.0 and rows["compile warm"].value == 6.0
    assert rows["break-even cold"].value == pytest.approx(1500.0)  # 90 s / 0.06 s
    assert rows["break-even warm"].value == pytest.approx(100.0)
    assert all(r.note == "" for r in rows.values())
    status = {t.name: t.status for t in compiled_targets(list(rows.values()))}
    assert status["mnist-cnn SSM compiled / plain eager step"] == "met"  # 2.8 <= 3.5
    assert status["mnist-cnn DSM compiled / plain eager step"] == "not measured"
    assert status["mnist-glow SSM compiled / plain eager step"] == "not measured"
    text = compiled_table(list(rows.values()))
    assert (
        "| mnist-cnn | 784 | ssm | 50.0 | 200.0 | 140.0 | 4.00 | 2.80 | 1.43 | 90.0 | 6.0 | 1,500 | 100 |"
        in text
    )


def test_a_slower_compiled_step_never_breaks_even_and_a_stand_in_says_so():
    spec = get_spec("mnist-glow-s1")
    warm = {"compile_s": 6.0, "timings": _timings(plain=50.0, eager=100.0, compiled=120.0)}
    rows = method_rows(spec, "dsm", {"compile_s": 60.0}, warm)
    assert {r.metric: r.value for r in rows}["break-even cold"] == math.inf
    assert "| never | never |" in compiled_table(rows)
    status = {t.name: t.status for t in compiled_targets(rows)}
    assert status["mnist-glow-s1 (stand-in, mnist-glow's bound) DSM compiled / plain eager step"] == "MISSED"
    assert not any(name.startswith("mnist-glow DSM") for name in status)  # the full model was not run


def test_an_eager_fallback_is_labelled_and_never_reported_as_compiled():
    spec = get_spec("fc-8")
    cause = "compiled kernels disabled, computing eagerly: compilation failed (InvalidCxxCompiler: no)"
    warm = {"compile_s": 0.1, "fallback": cause, "timings": _timings(plain=1.0, eager=2.0)}
    rows = {r.metric: r for r in method_rows(spec, "dsm", {"compile_s": 0.1, "fallback": cause}, warm)}
    for metric in ("compiled step", "compile cold", "compile warm", "break-even cold", "break-even warm"):
        assert math.isnan(rows[metric].value) and rows[metric].note.startswith(FALLBACK), metric
    assert rows["eager step"].value == 2.0 and rows["eager step"].note == ""
    text = compiled_table(list(rows.values()))
    assert f"| fc-8 | 8 | dsm | 1.0 | 2.0 | {FALLBACK} |" in text and "InvalidCxxCompiler" in text


def test_a_failed_probe_is_reported_not_raised():
    spec = get_spec("fc-8")
    rows = {r.metric: r for r in method_rows(spec, "ssm", {"error": "exit status 1: boom"}, {"error": "x"})}
    assert math.isnan(rows["compiled step"].value) and "probe failed" in rows["compiled step"].note
    assert rows["compile cold"].note == "probe failed: exit status 1: boom"


def _failing_compile(*args, **kwargs):
    def compiled(*a, **k):
        raise RuntimeError("no working C++ compiler (test)")

    return compiled


def _unavailable_compile(*args, **kwargs):
    raise RuntimeError("Dynamo is not supported here (test)")


@pytest.mark.parametrize("fake", [_failing_compile, _unavailable_compile], ids=["fails", "unavailable"])
def test_compiled_section_labels_a_real_fallback(monkeypatch, fake):
    """ebflow's own fallback (its RuntimeWarning) makes the section say "eager fallback"."""
    monkeypatch.setattr(torch, "compile", fake)
    rows = compiled_section(_config(), CPU, runner=probe_in_process)
    by = {r.metric: r for r in rows}
    assert by["compiled step"].note.startswith(FALLBACK) and math.isnan(by["compiled step"].value)
    assert "test)" in by["compiled step"].note  # the cause is named
    assert by["eager step"].value > 0 and by["plain eager step"].value > 0
    assert FALLBACK in format_markdown(rows, check_targets(rows))


def test_probe_process_failure_comes_back_as_an_error(tmp_path):
    request = ProbeRequest("imagenet", "dsm", 4, 0, "cpu", 1, 0, 1)
    result = probe_in_subprocess(request, tmp_path)
    assert "error" in result and "imagenet" in result["error"]


@pytest.mark.slow
def test_compiled_section_compiles_cold_then_warm_in_fresh_processes():
    """A real Inductor compile of a 8-D dense flow's DSM kernel (tens of seconds)."""
    rows = {r.metric: r for r in compiled_section(_config(repeats=2), CPU)}
    assert rows["compiled step"].value > 0 and rows["compiled step"].note == ""
    assert rows["compile cold"].value > rows["compile warm"].value > 0  # the warm one loads the cache
    assert not math.isnan(rows["break-even warm"].value)


# -- peers ----------------------------------------------------------------------------------------
def test_peers_rows_of_ebflow_and_a_skip_line_for_missing_peers(monkeypatch):
    monkeypatch.setitem(sys.modules, "nflows", None)  # import nflows raises ImportError
    monkeypatch.setitem(sys.modules, "zuko", None)
    rows = peers_section(_config(), CPU)
    by = {(r.metric, r.method): r for r in rows}
    assert by[("nflows lu", "ml")].note == "skipped: nflows not installed"
    assert by[("zuko lu", "ml")].note == "skipped: zuko not installed"
    assert math.isnan(by[("nflows lu", "ml")].value)
    for key in [("ebflow full", "ml"), ("ebflow lu", "ml"), ("ebflow lu", "dsm"), ("ebflow full", "dsm"),
                ("ebflow full", "ssm")]:  # fmt: skip
        assert by[key].value > 0 and by[key].dim == 8 and by[key].model == "fc-8"
        assert math.isnan(by[key].vs_ml)  # no nflows row to compare with
    text = format_markdown(rows, check_targets(rows))
    assert "skipped: nflows not installed" in text and "| 8 | ebflow | lu | DSM |" in text


def test_peers_time_nflows_next_to_ebflow():
    pytest.importorskip("nflows")
    rows = peers_section(_config(), CPU)
    nflows = next(r for r in rows if r.metric == "nflows lu")
    assert nflows.value > 0 and nflows.note == "" and nflows.vs_ml == pytest.approx(1.0)
    assert all(r.vs_ml == pytest.approx(nflows.value / r.value) for r in rows if math.isfinite(r.value))


def test_zuko_flow_is_timed_when_installed():
    pytest.importorskip("zuko")
    rows = peers_section(_config(), CPU)
    zuko = next(r for r in rows if r.metric == "zuko lu")
    assert zuko.value > 0 and zuko.note == ""


def test_leaky_relu_transform_inverts_and_has_the_log_slope():
    t = LeakyReLUTransform(0.3)
    x = torch.tensor([-2.0, 0.5])
    y = t(x)
    assert torch.allclose(y, torch.tensor([-0.6, 0.5])) and torch.allclose(t.inv(y), x)
    assert torch.allclose(t.log_abs_det_jacobian(x, y), torch.tensor([math.log(0.3), 0.0]))


def test_peers_targets_at_3072():
    def row(lib, param, method, ms):
        return Row("peers", "fc-3072", 3072, method, f"{lib} {param}", ms, "ms")

    rows = [row("nflows", "lu", "ml", 100.0), row("ebflow", "lu", "ml", 110.0), row("ebflow", "lu", "dsm", 30.0),
            row("ebflow", "full", "dsm", 40.0), row("ebflow", "full", "ssm", 80.0)]  # fmt: skip
    targets = {t.name: t for t in peers_targets(rows)}
    assert targets["ebflow LU ML / nflows LU ML at D = 3,072"].status == "met"  # 1.1 <= 1.2
    assert targets["ebflow LU DSM / ebflow full DSM at D = 3,072"].status == "met"  # 0.75 < 1
    headline = targets["headline: ebflow full DSM / nflows LU ML at D = 3,072"]
    assert (
        headline.measured == pytest.approx(0.4) and headline.status == "reported" and headline.required == "–"
    )
    skipped = [r for r in rows if r.metric != "nflows lu"]  # nflows not installed: not measured
    assert peers_targets(skipped)[0].status == "not measured"
    assert peers_targets([]) == []  # no peers section, no peers targets


# -- small ----------------------------------------------------------------------------------------
def test_bookkeeping_periods_amortise_whole_blocks():
    assert bookkeeping_periods(100, 1200, 1200, None) == dict(
        log_every=100, eval_every=1200, checkpoint_every=1200, block=1200
    )
    assert bookkeeping_periods(100, 1200, 1200, 48) == dict(
        log_every=4, eval_every=48, checkpoint_every=48, block=48
    )
    assert bookkeeping_periods(100, 1200, 1200, 4)["log_every"] == 1  # never 0


def test_small_section_times_the_loop_and_the_bare_step():
    threads = torch.get_num_threads()
    rows = small_section(_config(), CPU)
    assert torch.get_num_threads() == threads  # the preset's thread count was restored
    by = {r.metric: r for r in rows}
    for name in ("bare step", "Trainer.train_step", "training loop"):
        assert by[name].value > 0 and by[name].unit == "ms" and by[name].model == "digits-fc"
        assert by[name].dim == 64 and by[name].method == "ssm"
    assert by["bare step"].vs_plain == 1.0
    loop = by["training loop overhead over the bare step"]
    assert loop.unit == "%" and loop.value == pytest.approx(100 * (by["training loop"].vs_plain - 1))
    assert "blocks of 4 steps" in loop.note
    text = format_markdown(rows, check_targets(rows))
    assert "### 7. Small model" in text and "digits-fc training loop overhead over the bare step, %" in text


# -- command line ---------------------------------------------------------------------------------
def _args(*argv: str) -> BenchConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(["--device", "cpu", *argv]))


def test_options_reach_the_new_sections():
    assert _args("--sections", "all").sections == SECTIONS
    config = _args("--models", "mnist-cnn", "--dims", "784")
    assert config.compiled_models == ("mnist-cnn",) and config.peer_dims == (784,)
    default = _args()
    assert "compiled" not in default.sections and {"peers", "small"} <= set(default.sections)
    assert default.compiled_models == ("mnist-cnn", "mnist-glow-s1") and default.peer_dims == (784, 3072)
    quick = _args("--quick")
    assert quick.compiled_models == ("fc-16",) and quick.small_block == 48


def test_bad_new_options_raise_clear_errors():
    from ebflow.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model"):
        run_benchmark(_config(sections=("compiled",), compiled_models=("imagenet",)))
    with pytest.raises(ConfigError, match="peer dimensions"):
        run_benchmark(_config(sections=("peers",), peer_dims=(1,)))
    with pytest.raises(ConfigError, match="small_block"):
        run_benchmark(_config(sections=("small",), small_block=0))


def test_cli_writes_the_new_sections(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", _failing_compile)  # no real compile: an eager fallback
    monkeypatch.setattr("benchmarks.compiled.probe_in_subprocess", probe_in_process)
    monkeypatch.setattr("benchmarks.QUICK", {**QUICK, "small_block": 4})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([
        "--device", "cpu", "--out", str(tmp_path), "--quick", "--sections", "compiled,peers,small",
        "--models", "fc-8", "--dims", "8", "--methods", "dsm", "--repeats", "1", "--warmup", "0", "--batch", "8",
    ])  # fmt: skip
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert "### 5. Compiled step" in printed and "### 6. Peers" in printed and "### 7. Small model" in printed
    assert "note" in (tmp_path / "bench.csv").read_text().splitlines()[0]


def test_own_cpu_time_counts_finished_child_processes():
    """The compile probes run in child processes: their CPU time is the benchmark's own, not
    another process's load (a run of the compiled section was once flagged as shared by them)."""
    import subprocess
    import sys

    from benchmarks.machine import _own_seconds

    before = _own_seconds()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert _own_seconds() - before >= 0.45
