"""The benchmark runs at tiny sizes, reports every row, and checks its targets correctly.

No timing assertions: speed targets live in the benchmark's output, not in unit tests.
"""

from __future__ import annotations

import argparse
import csv
import math

import pytest
import torch

from ebflow.bench import (
    BenchConfig,
    Row,
    add_arguments,
    config_from_args,
    run,
    run_benchmark,
)
from ebflow.bench.memory import peak_memory_bytes
from ebflow.bench.report import check_targets, format_markdown
from ebflow.bench.timing import fit_power_law, time_round_robin
from ebflow.bench.workloads import METHODS, get_spec, make_inputs, make_optimizer, make_step
from ebflow.errors import ConfigError

TINY = dict(
    models=("toy2d",), dims=(8, 16, 32), fit_range=(8, 32), warmup=1, repeats=1, batch=8,
    eval_model="mnist-fc", eval_images=20, eval_batch=10, memory_model="toy2d",
)


@pytest.fixture(scope="module")
def tiny_result():
    return run_benchmark(BenchConfig(device="cpu", **TINY))


def test_every_section_has_every_row(tiny_result):
    rows = tiny_result.rows
    it = [r for r in rows if r.section == "iteration"]
    assert {(r.model, r.method) for r in it} == {("toy2d", m) for m in METHODS}
    assert all(r.value > 0 and r.unit == "ms" for r in it)
    assert all(r.vs_plain == pytest.approx(r.value / next(
        p.value for p in it if p.method == "plain")) for r in it)

    sc = [r for r in rows if r.section == "scaling"]
    assert {(r.dim, r.method) for r in sc if r.metric == "time"} == {
        (d, m) for d in (8, 16, 32) for m in METHODS}
    exps = {r.method: r for r in sc if r.metric.startswith("exponent")}
    assert set(exps) == set(METHODS) and all(math.isfinite(r.value) for r in exps.values())

    ev = {(r.method, r.metric): r for r in rows if r.section == "evaluation"}
    assert ev[("log Z", "computations per pass")].value == 1  # log Z once per pass
    assert ev[("log Z", "linear layers")].value == 4  # flatten, 2 dense, reshape
    assert any(k[0] == "NLL pass" and r.unit == "s" for k, r in ev.items())
    assert math.isfinite(ev[("NLL pass", "bits/dim (random model and images)")].value)

    mem = {r.method: r for r in rows if r.section == "memory"}
    assert set(METHODS) <= set(mem)
    assert mem["plain"].value > 0 and mem["plain"].vs_plain == 1


def test_markdown_lists_every_row_and_target(tiny_result):
    text = tiny_result.markdown
    for m in METHODS:
        assert f"| toy2d | 2 | {m} |" in text
        assert f"| toy2d | {m} |" in text  # memory table
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
    args = parser.parse_args([
        "--device", "cpu", "--out", str(tmp_path), "--quick", "--sections", "iteration,scaling",
        "--models", "toy2d", "--methods", "dsm,fdssm", "--dims", "8,16", "--fit-range", "8,16",
        "--repeats", "1", "--warmup", "0", "--batch", "4",
    ])
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert "| toy2d | 2 | dsm |" in printed and "| toy2d | 2 | plain |" in printed
    with open(tmp_path / "bench.csv") as f:
        lines = list(csv.DictReader(f))
    # 3 methods (plain added) on toy2d + 3 x 2 dims + 3 exponents
    assert len(lines) == 3 + 6 + 3
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
    assert full.models == ("mnist-fc", "cifar-fc", "mnist-cnn", "cifar-cnn", "toy2d")
    assert full.dims == (256, 512, 1024, 2048, 3072, 4096) and full.fit_range == (1024, 4096)


@pytest.mark.parametrize("bad, match", [
    (dict(models=("imagenet",)), "unknown model"),
    (dict(methods=("mle",)), "unknown method"),
    (dict(sections=("speed",)), "unknown section"),
    (dict(eval_model="toy2d"), "image model"),
    (dict(repeats=0), "repeats"),
    (dict(fit_range=(4096, 1024)), "fit range"),
    (dict(device="tpu"), "device"),
])
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
    timings = time_round_robin(steps, device=torch.device("cpu"), warmup=1, repeats=3,
                               min_round_s=0.0)
    assert set(timings) == {"a", "b", "c"}
    assert all(t.repeats == 3 and t.calls_per_round == 1 and t.median_ms >= 0
               for t in timings.values())
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
    opt = make_optimizer(model)
    before = [p.detach().clone() for p in model.parameters()]
    for method in METHODS:
        make_step(model, method, x, opt, spec.options.get(method))()
    assert x.grad is None and not x.requires_grad
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    with pytest.raises(ConfigError, match="unknown benchmark method"):
        make_step(model, "mle", x, opt)


def test_targets_pass_and_fail_on_the_right_side():
    def it(method, value, plain=100.0):
        return Row("iteration", "cifar-fc", 3072, method, "time", value, "ms",
                   vs_plain=value / plain, reference=1322.0 if method == "dsm" else math.nan,
                   speedup=1322.0 / value if method == "dsm" else math.nan)

    rows = [it("plain", 100.0), it("dsm", 200.0), it("fdssm", 230.0), it("ssm", 390.0),
            it("ml", 1300.0)]
    rows += [Row("scaling", "fc", 0, m, "exponent 1024-4096", k, "")
             for m, k in (("ssm", 2.1), ("dsm", 2.3), ("fdssm", 1.9))]
    status = {t.name: t.status for t in check_targets(rows, "cpu")}
    assert status["cifar-fc DSM / plain step"] == "met"  # 2.0 <= 2.2
    assert status["cifar-fc FDSSM / plain step"] == "MISSED"  # 2.3 > 2.2
    assert status["cifar-fc SSM / plain step"] == "met"
    assert status["cifar-fc ML / DSM"] == "met"  # 6.5 >= 6
    assert status["DSM time exponent over D 1024-4096"] == "MISSED"
    assert status["SSM time exponent over D 1024-4096"] == "met"
    assert status["cifar-fc DSM speed-up vs reference (1322 ms)"] == "met"  # 6.6x
    assert status["mnist-cnn DSM speed-up vs reference (115 ms)"] == "not measured"
    text = format_markdown(rows, check_targets(rows, "cpu"))
    assert "| cifar-fc FDSSM / plain step | 2.30 | <= 2.2 | MISSED |" in text
    # the reference was measured on CPU: no speed-up target on a GPU
    assert not any("reference" in t.name for t in check_targets(rows, "cuda"))


# -- the fast paths the benchmark relies on stay exact ---------------------------------------
def test_same_padding_conv_matches_conv2d_to_second_order():
    import torch.nn.functional as F
    from torch.autograd import gradcheck, gradgradcheck

    from ebflow.layers.conv import same_padding_conv2d

    for c, k in ((1, 3), (3, 5)):
        x = torch.randn(2, c, 5, 5, dtype=torch.float64, requires_grad=True)
        w = torch.randn(c, c, k, k, dtype=torch.float64, requires_grad=True)
        b = torch.randn(c, dtype=torch.float64, requires_grad=True)
        assert torch.equal(same_padding_conv2d(x, w, b), F.conv2d(x, w, b, padding=k // 2))
        assert gradcheck(same_padding_conv2d, (x, w, b))
        assert gradgradcheck(same_padding_conv2d, (x, w, b))
        # a score-matching style second derivative agrees with the native convolution's
        def score_norm(conv):
            y = conv(x)
            (g,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
            return torch.autograd.grad(g.pow(2).sum(), w)[0]
        ours = score_norm(lambda t: same_padding_conv2d(t, w, b))
        native = score_norm(lambda t: F.conv2d(t, w, b, padding=k // 2))
        assert torch.allclose(ours, native, rtol=1e-10, atol=1e-10)


def test_convolution_matrix_equals_convolving_the_basis():
    import torch.nn.functional as F

    from ebflow.layers.conv import convolution_matrix

    for c, h, w, k in ((1, 5, 4, 3), (2, 3, 3, 7), (3, 4, 6, 5)):
        weight = torch.randn(c, c, k, k, dtype=torch.float64, requires_grad=True)
        d = c * h * w
        basis = torch.eye(d, dtype=torch.float64).view(d, c, h, w)
        expected = F.conv2d(basis, weight, padding=k // 2).reshape(d, d).T
        got = convolution_matrix(weight, (c, h, w))
        assert torch.equal(got, expected)
        probe = torch.randn(d, d, dtype=torch.float64)
        g1 = torch.autograd.grad((got * probe).sum(), weight)[0]
        g2 = torch.autograd.grad((expected * probe).sum(), weight)[0]
        assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-12)


def test_linear_prefix_splits_the_energy_exactly():
    from ebflow import EBFlow
    from ebflow.layers import ActNorm, Dense, Flatten, SmoothLeakyReLU
    from ebflow.objectives import fdssm_loss, ssm_loss

    model = EBFlow([Flatten((1, 2, 3)), ActNorm(6), Dense(6), SmoothLeakyReLU(0.3), Dense(6)],
                   (1, 2, 3)).double()
    x = torch.randn(8, 1, 2, 3, dtype=torch.float64) * 2 + 1
    v = torch.randn_like(x)
    assert model.linear_prefix_length == 3
    h, u = model.linear_prefix(x, v)  # also runs ActNorm's data initialisation, on x
    assert torch.allclose(model.layers[1](model.layers[0](x)[0])[0].mean(0),
                          torch.zeros(6, dtype=torch.float64), atol=1e-12)
    for sign in (1, -1):
        assert torch.allclose(model.tail_energy(h + sign * u), model.energy(x + sign * v),
                              rtol=1e-12, atol=1e-10)
    # initialised and without a gradient to x, [x; v; 0] go through the prefix in one pass
    h2, u2 = model.linear_prefix(x, v)
    assert torch.allclose(h2, h, rtol=1e-12, atol=1e-12)
    assert torch.allclose(u2, u, rtol=1e-12, atol=1e-12)
    # SSM through the prefix equals the textbook double backward with respect to x
    signs = torch.randn(1, *x.shape, dtype=torch.float64).sign()
    xr = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model.energy(xr).sum(), xr, create_graph=True)
    (hv,) = torch.autograd.grad((g * signs[0]).sum(), xr, create_graph=True)
    textbook = (-(hv * signs[0]).flatten(1).sum(1) + 0.5 * g.flatten(1).pow(2).sum(1)).mean()
    assert torch.allclose(ssm_loss(model, x, noise=signs).loss.mean(), textbook / 6, rtol=1e-12)  # per dimension
    assert torch.isfinite(fdssm_loss(model, x, 0.1, noise=v).loss).all()
    with pytest.raises(Exception, match="direction must have the shape"):
        model.linear_prefix(x, v[:3])


def test_reuse_large_allocations_is_idempotent():
    import platform

    from ebflow.runtime import large_allocation_reuse_active, reuse_large_allocations

    first = reuse_large_allocations()
    assert reuse_large_allocations() == first == large_allocation_reuse_active()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first
    big = torch.ones(3000, 3000)  # 36 MB: still an ordinary, correct tensor
    assert float(big.sum()) == 9e6


def test_other_process_load_is_a_share_of_the_cpus():
    from ebflow.bench.machine import OtherProcessLoad, load_average

    meter = OtherProcessLoad().start()
    sum(i * i for i in range(200_000))  # our own work is not "other"
    share = meter.share
    assert share is None or 0.0 <= share <= 1.0
    assert isinstance(load_average(), str)
