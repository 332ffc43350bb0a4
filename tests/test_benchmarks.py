"""The benchmark (``benchmarks/`` at the repository root) runs at tiny sizes, reports every row,
and checks its targets correctly.

No timing assertions: speed targets live in the benchmark's output, not in unit tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import (
    BenchConfig,
    Row,
    add_arguments,
    config_from_args,
    run,
    run_benchmark,
)
from benchmarks.machine import OtherProcessLoad, load_average
from benchmarks.memory import peak_memory_bytes
from benchmarks.report import REFERENCE_SOURCE, check_targets, format_markdown
from benchmarks.sections import FactorizationCounter
from benchmarks.timing import fit_power_law, time_round_robin
from benchmarks.workloads import (
    METHODS,
    MODELS,
    SCORE_MATCHING,
    get_spec,
    make_inputs,
    make_optimizer,
    make_step,
    make_user_step,
)
from ebflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(
    sections=("iteration", "scaling", "evaluation", "memory"),  # the others: test_benchmarks_sections.py
    models=("toy2d",),
    dims=(8, 16, 32),
    fit_range=(8, 32),
    warmup=1,
    repeats=1,
    batch=8,
    eval_model="mnist-fc",
    eval_images=20,
    eval_batch=10,
    memory_model="toy2d",
)


@pytest.fixture(scope="module")
def tiny_result():
    return run_benchmark(BenchConfig(device="cpu", **TINY))


def test_every_section_has_every_row(tiny_result):
    rows = tiny_result.rows
    it = [r for r in rows if r.section == "iteration"]
    assert {(r.model, r.method, r.user_loop) for r in it} == {("toy2d", m, False) for m in METHODS} | {
        ("toy2d", m, True) for m in SCORE_MATCHING
    }
    assert all(r.value > 0 and r.unit == "ms" for r in it)
    plain = next(p.value for p in it if p.method == "plain")
    ml = next(p.value for p in it if p.method == "ml")
    assert all(r.vs_plain == pytest.approx(r.value / plain) for r in it)
    assert all(r.vs_ml == pytest.approx(ml / r.value) for r in it)  # ratios of this run only
    for r in it:  # a user-loop row is compared with the tuned step of its objective
        tuned = next(t for t in it if t.method == r.method and not t.user_loop)
        if r.user_loop:
            assert r.vs_tuned == pytest.approx(r.value / tuned.value)
        else:
            assert math.isnan(r.vs_tuned)

    sc = [r for r in rows if r.section == "scaling"]
    assert {(r.dim, r.method) for r in sc if r.metric == "time"} == {
        (d, m) for d in (8, 16, 32) for m in METHODS
    }
    exps = {r.method: r for r in sc if r.metric.startswith("exponent")}
    assert set(exps) == set(METHODS) and all(math.isfinite(r.value) for r in exps.values())

    ev = {(r.method, r.metric): r for r in rows if r.section == "evaluation"}
    assert ev[("log Z", "computations per pass")].value == 1  # log Z once per pass
    assert ev[("log Z", "linear layers")].value == 4  # flatten, 2 dense, reshape
    assert ev[("log Z", "factorisations per log Z")].value == 2  # one LU per dense layer
    assert any(k[0] == "NLL pass" and r.unit == "s" for k, r in ev.items())
    assert math.isfinite(ev[("NLL pass", "bits/dim (random model and images)")].value)

    mem = {r.method: r for r in rows if r.section == "memory"}
    assert set(METHODS) <= set(mem)
    assert mem["plain"].value > 0 and mem["plain"].vs_plain == 1


def test_markdown_lists_every_row_and_target(tiny_result):
    text = tiny_result.markdown
    for m in METHODS:
        assert f"| toy2d | 2 | {m} | tuned |" in text
        assert f"| toy2d | {m} |" in text  # memory table
    for m in SCORE_MATCHING:
        assert f"| toy2d | 2 | {m} | user loop |" in text
    assert "| × plain | × tuned | ML ÷ this |" in text and "reference ms" not in text
    assert "process-wide" in text  # the caption says which allocator setting the rows ran under
    for d in (8, 16, 32):
        assert f"\n| {d} |" in text
    assert "exponent (8-32)" in text
    assert "computations per pass" in text
    for t in tiny_result.targets:
        assert t.name in text
    # targets of models that were not measured say so instead of passing silently
    statuses = {t.name: t.status for t in tiny_result.targets}
    assert statuses["cifar-fc DSM / plain step"] == "not measured"
    assert statuses["log Z computations per NLL pass"] == "met"


def test_cli_writes_csv_markdown_and_plot(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--quick",
            "--sections",
            "iteration,scaling",
            "--models",
            "toy2d",
            "--methods",
            "dsm,fdssm",
            "--dims",
            "8,16",
            "--fit-range",
            "8,16",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--batch",
            "4",
        ]
    )
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert "| toy2d | 2 | dsm | tuned |" in printed and "| toy2d | 2 | plain | tuned |" in printed
    assert "| toy2d | 2 | fdssm | user loop |" in printed
    with open(tmp_path / "bench.csv") as f:
        lines = list(csv.DictReader(f))
    # 3 methods (plain added) + 2 user loops on toy2d + 3 x 2 dims + 3 exponents
    assert len(lines) == 3 + 2 + 6 + 3
    assert sum(line["user_loop"] == "True" for line in lines) == 2
    assert {line["method"] for line in lines} == {"plain", "dsm", "fdssm"}
    assert (tmp_path / "bench.md").read_text().strip() in printed
    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_quick_preset_and_overrides():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--quick", "--device", "cpu", "--repeats", "5"]))
    assert config.repeats == 5 and config.models == ("toy2d", "mnist-fc")
    full = config_from_args(parser.parse_args(["--device", "cpu"]))
    assert full.models == ("mnist-fc", "cifar-fc", "mnist-cnn", "cifar-cnn", "mnist-glow", "toy2d")
    assert full.dims == (256, 512, 1024, 2048, 3072, 4096) and full.fit_range == (1024, 4096)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(models=("imagenet",)), "unknown model"),
        (dict(methods=("mle",)), "unknown method"),
        (dict(sections=("speed",)), "unknown section"),
        (dict(eval_model="toy2d"), "image model"),
        (dict(repeats=0), "repeats"),
        (dict(fit_range=(4096, 1024)), "fit range"),
        (dict(device="tpu"), "device"),
    ],
)
def test_bad_options_raise_clear_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        run_benchmark(BenchConfig(**{**TINY, "device": "cpu", **bad}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="no CUDA device"):
        run_benchmark(BenchConfig(**{**TINY, "device": "cuda"}))


def test_fit_power_law_recovers_exponents():
    dims = [1024, 2048, 3072, 4096]
    assert fit_power_law(dims, [3e-9 * d**3 for d in dims]) == pytest.approx(3.0)
    assert fit_power_law(dims, [5e-4 * d**2 for d in dims]) == pytest.approx(2.0)
    assert math.isnan(fit_power_law([1024], [1.0]))


def test_round_robin_interleaves_and_reports_every_step():
    order: list[str] = []
    steps = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    timings = time_round_robin(steps, device=torch.device("cpu"), warmup=1, repeats=3, min_round_s=0.0)
    assert set(timings) == {"a", "b", "c"}
    assert all(t.repeats == 3 and t.calls_per_round == 1 and t.median_ms >= 0 for t in timings.values())
    timed = order[3:]  # after one warm-up call each
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotating order


def test_peak_memory_counts_tensors_made_during_the_call():
    n = 1 << 20  # 4 MiB of float32

    def two_live_tensors():
        a = torch.ones(n)
        b = torch.ones(n)
        del a
        c = b * 2  # a was freed: never three at once
        return c

    peak = peak_memory_bytes(two_live_tensors, torch.device("cpu"))
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_steps_train_only_the_parameters():
    spec = get_spec("toy2d")
    model = spec.build()
    gen = torch.Generator().manual_seed(0)
    x = make_inputs(spec, 16, device=torch.device("cpu"), generator=gen)
    model.initialize(x)
    opt = make_optimizer(model)
    before = [p.detach().clone() for p in model.parameters()]
    for method in METHODS:
        make_step(model, method, x, opt, spec.options.get(method))()
    for method in SCORE_MATCHING:
        make_user_step(model, method, x, opt, spec.options.get(method))()
    assert x.grad is None and not x.requires_grad
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    with pytest.raises(ConfigError, match="unknown benchmark method"):
        make_step(model, "mle", x, opt)
    with pytest.raises(ConfigError, match="user loop"):
        make_user_step(model, "plain", x, opt)


def test_user_loop_is_the_quick_tour_loop():
    """Same start, same batch: the user loop (plain ``.backward()``) and the tuned step make the
    same update, so the two rows time the same training."""
    spec = get_spec("toy2d")
    x = make_inputs(spec, 16, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    after = []
    for make in (make_step, make_user_step):
        torch.manual_seed(0)
        model = spec.build().double().initialize(x.double())
        opt = make_optimizer(model)
        torch.manual_seed(1)
        make(model, "dsm", x.double(), opt, spec.options.get("dsm"))()
        after.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(*after, strict=True))


def test_mnist_glow_is_the_preset_architecture():
    spec = get_spec("mnist-glow")
    assert spec.event_shape == (1, 28, 28) and spec.smoothness == 1.0
    assert spec.options == {"dsm": {"sigma": 0.1}, "fdssm": {"eps": 0.1}}
    assert "mnist-glow" in MODELS


def test_targets_pass_and_fail_on_the_right_side():
    def it(method, value, plain=100.0):
        return Row("iteration", "cifar-fc", 3072, method, "time", value, "ms", vs_plain=value / plain)

    rows = [it("plain", 100.0), it("dsm", 200.0), it("fdssm", 230.0), it("ssm", 390.0), it("ml", 1300.0)]
    rows += [
        Row("scaling", "fc", 0, m, "exponent 1024-4096", k, "")
        for m, k in (("ssm", 2.1), ("dsm", 2.3), ("fdssm", 1.9))
    ]
    status = {t.name: t.status for t in check_targets(rows, "cpu")}
    assert status["cifar-fc DSM / plain step"] == "met"  # 2.0 <= 2.2
    assert status["cifar-fc FDSSM / plain step"] == "MISSED"  # 2.3 > 2.2
    assert status["cifar-fc SSM / plain step"] == "met"
    assert status["cifar-fc ML / DSM"] == "met"  # 6.5 >= 6
    assert status["DSM time exponent over D 1024-4096"] == "MISSED"
    assert status["SSM time exponent over D 1024-4096"] == "met"
    # the reference figures are constants from another day, and say so
    assert status[f"cifar-fc DSM speed-up vs reference (1322 ms, {REFERENCE_SOURCE})"] == "met"
    assert status[f"mnist-cnn DSM speed-up vs reference (115 ms, {REFERENCE_SOURCE})"] == ("not measured")
    assert "2026-11-29" in REFERENCE_SOURCE and "not this run" in REFERENCE_SOURCE
    # a slower user-loop row does not stand in for the tuned step in the targets
    rows.append(Row("iteration", "cifar-fc", 3072, "dsm", "time", 400.0, "ms", vs_plain=4.0, user_loop=True))
    assert {t.name: t.status for t in check_targets(rows, "cpu")} == status
    text = format_markdown(rows, check_targets(rows, "cpu"))
    assert "| cifar-fc FDSSM / plain step | 2.30 | <= 2.2 | MISSED |" in text
    assert f"Reference figures: {REFERENCE_SOURCE}" in text
    # the reference was measured on CPU: no speed-up target on a GPU
    assert not any("reference" in t.name for t in check_targets(rows, "cuda"))


def test_other_process_load_is_a_share_of_the_cpus():
    meter = OtherProcessLoad().start()
    sum(i * i for i in range(200_000))  # our own work is not "other"
    share = meter.share
    assert share is None or 0.0 <= share <= 1.0
    assert isinstance(load_average(), str)


def test_factorization_counter_sees_log_z_once_and_the_cache_after():
    from ebflow.architectures import dense_flow, glow_flow

    for model in (dense_flow((6,)), glow_flow((1, 8, 8), levels=2, steps=2, hidden=8)):
        model.initialize(torch.randn(4, *model.event_shape)).eval()
        with torch.no_grad():
            with FactorizationCounter() as first:
                model.log_partition()
            with FactorizationCounter() as again:
                model.log_partition()
                model.log_prob(torch.randn(3, *model.event_shape))
        assert first.count > 0 and again.count == 0  # wrapped (split-prior) layers included
    with FactorizationCounter() as outside:
        torch.linalg.slogdet(torch.eye(3))
        torch.linalg.lu_factor_ex(torch.eye(3))
        torch.eye(3).sum()
    assert outside.count == 2


def test_benchmark_uses_only_the_library_layer():
    code = (
        "import json, sys, benchmarks; print(json.dumps([m for m in sys.modules if m.startswith('ebflow')]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out))
    library = {
        "ebflow",
        "ebflow.layers",
        "ebflow.flow",
        "ebflow.objectives",
        "ebflow.preprocessing",
        "ebflow.architectures",
        "ebflow.errors",
        "ebflow.runtime",
    }
    assert library & loaded
    assert not any(
        m.startswith(("ebflow.experiment", "ebflow.training", "ebflow.config", "ebflow.cli", "ebflow.bench"))
        for m in loaded
    ), loaded


def test_runs_as_a_module_from_the_repository_root():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and "python -m benchmarks" in result.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--models",
            "imagenet",
            "--sections",
            "iteration",
            "--out",
            "/nonexistent-never-written",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown model" in bad.stderr


def test_cnn_glow_and_user_loop_targets():
    def it(model, method, value, plain=100.0, **extra):
        return Row("iteration", model, 784, method, "time", value, "ms", vs_plain=value / plain, **extra)

    rows = [
        it("mnist-cnn", "ssm", 290.0),
        it("mnist-cnn", "dsm", 210.0),
        it("mnist-cnn", "fdssm", 190.0),
        it("mnist-glow", "ssm", 410.0),
        it("mnist-glow", "dsm", 250.0),
        it("mnist-cnn", "dsm", 214.0, user_loop=True, vs_tuned=214.0 / 210.0),
        it("mnist-cnn", "ssm", 310.0, user_loop=True, vs_tuned=310.0 / 290.0),
    ]
    status = {t.name: (t.status, t.measured) for t in check_targets(rows, "cpu")}
    assert status["mnist-cnn SSM / plain step"][0] == "met"  # 2.9 <= 3
    assert status["mnist-cnn DSM / plain step"][0] == "MISSED"  # 2.1 > 2
    assert status["mnist-cnn FDSSM / plain step"][0] == "met"
    assert status["mnist-glow SSM / plain step"][0] == "MISSED"  # 4.1 > 4
    assert status["mnist-glow DSM / plain step"][0] == "met"  # 2.5 <= 2.5
    assert status["cifar-cnn SSM / plain step"][0] == "not measured"
    # the worst user loop is named, and 1.069 > 1.05 misses
    assert status["user loop / tuned step, worst (mnist-cnn ssm)"] == ("MISSED", pytest.approx(310 / 290))
