"""Langevin dynamics and MALA driven by the energy (ebflow.mcmc).

The reference target is an EBFlow made of one dense layer with bias, ``z = W x + b``: its
density is exactly Gaussian, with mean ``-W^{-1} b`` and precision ``W^T W``.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from ebflow import EBFlow, dense_flow
from ebflow.errors import ConfigError, EBFlowError, InputError
from ebflow.layers import Dense
from ebflow.mcmc import (
    default_step_size,
    gaussian_blur,
    langevin,
    mala,
    refine_samples,
    ula,
)
from ebflow.mcmc.schedules import step_sizes
from helpers import count_host_reads

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_flow(d: int, seed: int = 0) -> tuple[EBFlow, torch.Tensor, torch.Tensor]:
    """(model, mean, precision) of a float64 one-layer EBFlow with a non-isotropic Gaussian law."""
    g = torch.Generator().manual_seed(seed)
    layer = Dense(d).double()
    with torch.no_grad():
        noise = torch.randn(d, d, generator=g, dtype=torch.float64)
        layer.weight.copy_(torch.eye(d, dtype=torch.float64) + 0.6 * noise)
        layer.bias.copy_(torch.randn(d, generator=g, dtype=torch.float64))
    model = EBFlow([layer], (d,)).double()
    w, b = layer.weight.detach(), layer.bias.detach()
    return model, -torch.linalg.solve(w, b), w.T @ w


def run_and_collect(model, x0, *, burn_in: int, rounds: int, thin: int, generator, **options):
    """Adaptive burn-in, then fixed-step MALA; returns (stacked samples, acceptance rate, step)."""
    warm = mala(
        model,
        x0,
        burn_in,
        default_step_size(model, x0, options.get("mask")),
        target_acceptance=0.574,
        generator=generator,
        **options,
    )
    step = float(warm.step_size.median())
    x, kept, rates = warm.samples, [], []
    for _ in range(rounds):
        res = mala(model, x, thin, step, generator=generator, **options)
        x = res.samples
        kept.append(x)
        rates.append(res.acceptance_rate)
    return torch.cat(kept), sum(rates) / len(rates), step


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_mala_recovers_gaussian_mean_and_covariance():
    model, mean, precision = gaussian_flow(3)
    cov = torch.linalg.inv(precision)
    g = torch.Generator().manual_seed(1)
    x0 = torch.zeros(300, 3, dtype=torch.float64)  # far from the mode: the chain must move there
    samples, rate, _ = run_and_collect(model, x0, burn_in=200, rounds=30, thin=8, generator=g)
    # Tolerances: 300 chains x 30 thinned draws (effective size ~ several thousand) give a
    # Monte Carlo error of a few hundredths; the test allows 0.1 absolute on the mean (scale of
    # the largest std ~ 1.8) and 10 % relative (Frobenius) on the covariance.
    assert float((samples.mean(0) - mean).abs().max()) < 0.1
    assert relative_error(torch.cov(samples.T), cov) < 0.10
    assert 0.3 < rate < 0.9


def test_masked_mala_samples_the_conditional_and_keeps_unmasked_bits():
    model, mean, precision = gaussian_flow(4, seed=3)
    g = torch.Generator().manual_seed(2)
    chains = 300
    mask = torch.tensor([True, False, True, False])
    x0 = mean + 2.0 * torch.randn(chains, 4, generator=g, dtype=torch.float64)  # observed parts vary
    observed = x0[:, ~mask].clone()
    warm = mala(model, x0, 150, 0.05, mask=mask, target_acceptance=0.574, generator=g)
    assert torch.equal(warm.samples[:, ~mask], observed)  # bit for bit
    step = float(warm.step_size.median())
    x, residuals = warm.samples, []
    m, o = mask, ~mask
    lam_mm, lam_mo = precision[m][:, m], precision[m][:, o]
    for _ in range(25):
        x = mala(model, x, 8, step, mask=mask, generator=g).samples
        assert torch.equal(x[:, o], observed)
        cond_mean = mean[m] - (observed - mean[o]) @ torch.linalg.solve(lam_mm, lam_mo).T
        residuals.append(x[:, m] - cond_mean)
    r = torch.cat(residuals)
    # Conditional law N(mu_m - Lmm^-1 Lmo (x_o - mu_o), Lmm^-1); tolerances as in the test above.
    assert float(r.mean(0).abs().max()) < 0.1
    assert relative_error(torch.cov(r.T), torch.linalg.inv(lam_mm)) < 0.10


def test_ula_moves_only_masked_coordinates_and_approaches_the_mean():
    model, mean, _ = gaussian_flow(3, seed=5)
    g = torch.Generator().manual_seed(4)
    x0 = torch.zeros(400, 3, dtype=torch.float64)
    mask = torch.zeros(400, 3, dtype=torch.bool)
    mask[:, :2] = True
    res = ula(model, x0, 50, 0.03, mask=mask, generator=g)
    assert res.acceptance_rate is None
    assert torch.equal(res.samples[:, 2], x0[:, 2])
    free = ula(model, x0, 400, 0.03, generator=g).samples
    # ULA's bias is O(step) = O(0.03); sampling error of 400 chains is ~0.1 at most.
    assert float((free.mean(0) - mean).abs().max()) < 0.25


def test_smoothness_pull_is_a_gaussian_smoothness_prior():
    # Image model (1, 3, 3) with a Gaussian law; the pull adds (lam/2)||x - Bx||^2 to the energy,
    # so MALA must sample the Gaussian with precision W^T W + lam (I - B)^T (I - B).
    model = dense_flow((1, 3, 3), num_layers=1).double()
    dense = next(l for l in model.layers if isinstance(l, Dense))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        noise = torch.randn(9, 9, generator=g, dtype=torch.float64)
        dense.weight.copy_(torch.eye(9, dtype=torch.float64) + 0.3 * noise)
        dense.bias.zero_()
    lam = 4.0
    basis = torch.eye(9, dtype=torch.float64).view(9, 1, 3, 3)
    blur = gaussian_blur(basis, 1.0).reshape(9, 9).T  # column j = B e_j
    w = dense.weight.detach()
    rough = torch.eye(9, dtype=torch.float64) - blur
    cov_tilted = torch.linalg.inv(w.T @ w + lam * rough.T @ rough)
    cov_plain = torch.linalg.inv(w.T @ w)
    x0 = torch.zeros(300, 1, 3, 3, dtype=torch.float64)
    samples, _, _ = run_and_collect(
        model, x0, burn_in=200, rounds=25, thin=8, generator=g, smoothness=lam, blur_sigma=1.0
    )
    emp = torch.cov(samples.reshape(-1, 9).T)
    assert relative_error(cov_plain, cov_tilted) > 0.3  # the pull changes the law a lot...
    assert relative_error(emp, cov_tilted) < 0.12  # ...and MALA samples the tilted law


def test_step_size_schedules_end_at_the_final_step():
    model, _, _ = gaussian_flow(2)
    x0 = torch.zeros(5, 2, dtype=torch.float64)
    for schedule in ("linear", "geometric", "cosine"):
        res = ula(model, x0, 20, 0.1, schedule=schedule, final_step_size=0.001)
        assert torch.allclose(res.step_size, torch.full((5,), 0.001, dtype=torch.float64))
    res = ula(model, x0, 10, 0.1, schedule=lambda i, n: 0.5**i)
    assert math.isclose(float(res.step_size[0]), 0.1 * 0.5**9)


def test_default_step_size_matches_gaussian_scaling():
    # N(0, s^2 I) in D dims: eta0 = 1.36 D^(2/3) / |grad E|^2 ~ 1.36 s^2 D^(-1/3).
    s, d = 0.5, 8
    layer = Dense(d, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.eye(d, dtype=torch.float64) / s)
    model = EBFlow([layer], (d,)).double()
    x = s * torch.randn(2000, d, dtype=torch.float64)
    eta = default_step_size(model, x)
    assert 0.8 < eta / (1.36 * s**2 * d ** (-1 / 3)) < 1.25


def test_refine_samples_keeps_the_law_and_moves_the_samples():
    model, mean, precision = gaussian_flow(3, seed=7)
    torch.manual_seed(8)
    x = model.sample(2000)
    assert refine_samples(model, x, 0) is x
    refined = refine_samples(model, x, 30, generator=torch.Generator().manual_seed(9))
    assert refined.shape == x.shape
    assert float((refined - x).abs().mean()) > 0.1
    assert float((refined.mean(0) - mean).abs().max()) < 0.15
    assert relative_error(torch.cov(refined.T), torch.linalg.inv(precision)) < 0.12
    fixed = refine_samples(model, x, 5, step_size=0.01)  # unadjusted Langevin with a given step
    assert torch.isfinite(fixed).all() and not torch.equal(fixed, x)


def test_refine_in_pixel_space_runs_through_the_preprocessing():
    # A model whose input is dequantised pixels (preprocessing inside, no MaP): refined samples
    # must stay inside the pixel range where the model is defined, (0, 256) widened by the
    # logit shift (1e-6 * 256).
    from ebflow import ImagePreprocessing

    pre = ImagePreprocessing(smoothness=0.5)
    inner = dense_flow((1, 3, 3)).double()
    model = EBFlow([*pre.as_layers(), *inner.layers], (1, 3, 3)).double()
    x = model.sample(50)
    refined = refine_samples(model, x, 20, preprocessing=pre, generator=torch.Generator().manual_seed(0))
    assert refined.shape == x.shape and not torch.equal(refined, x)
    assert bool(((refined > -1e-3) & (refined < 256 + 1e-3)).all())
    assert torch.isfinite(model.energy(refined)).all()


def test_chains_are_reproducible_with_a_generator():
    model, _, _ = gaussian_flow(3)
    x0 = torch.zeros(4, 3, dtype=torch.float64)
    a = mala(model, x0, 10, 0.1, generator=torch.Generator().manual_seed(0)).samples
    b = mala(model, x0, 10, 0.1, generator=torch.Generator().manual_seed(0)).samples
    assert torch.equal(a, b)


# -- clear errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [0.0, -0.1, float("nan"), float("inf")])
def test_non_positive_step_size_is_rejected(step):
    model, _, _ = gaussian_flow(2)
    with pytest.raises(ConfigError, match="step size"):
        ula(model, torch.zeros(2, 2, dtype=torch.float64), 5, step)
    with pytest.raises(ConfigError, match="step size"):
        refine_samples(model, torch.zeros(2, 2, dtype=torch.float64), 5, step_size=step)


def test_mask_that_does_not_match_the_data_is_rejected():
    model, _, _ = gaussian_flow(3)
    x0 = torch.zeros(4, 3, dtype=torch.float64)
    for bad in (
        torch.ones(2, dtype=torch.bool),
        torch.ones(5, 3, dtype=torch.bool),
        torch.ones(4, 3, 1, dtype=torch.bool),
    ):
        with pytest.raises(InputError, match="mask of shape"):
            mala(model, x0, 2, 0.1, mask=bad)
    with pytest.raises(InputError, match="no coordinate"):
        mala(model, x0, 2, 0.1, mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(InputError, match="0/1"):
        mala(model, x0, 2, 0.1, mask=torch.full((3,), 0.5))


@pytest.mark.parametrize("thing", [nn.Linear(3, 3), lambda x: x.sum(1), "model"])
def test_model_without_an_energy_is_rejected(thing):
    with pytest.raises(ConfigError, match="energy"):
        mala(thing, torch.zeros(2, 3), 2, 0.1)
    with pytest.raises(ConfigError, match="energy"):
        refine_samples(thing, torch.zeros(2, 3), 2)


def test_bad_options_are_rejected():
    model, _, _ = gaussian_flow(3)
    x0 = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="shape"):
        ula(model, torch.zeros(2, 4, dtype=torch.float64), 2, 0.1)
    with pytest.raises(ConfigError, match="unknown step-size schedule"):
        ula(model, x0, 2, 0.1, schedule="fast")
    with pytest.raises(ConfigError, match="final_step_size"):
        ula(model, x0, 2, 0.1, schedule="linear")
    with pytest.raises(ConfigError, match="image events"):
        ula(model, x0, 2, 0.1, smoothness=1.0)
    with pytest.raises(ConfigError, match="metropolis"):
        ula(model, x0, 2, 0.1, target_acceptance=0.5)
    with pytest.raises(ConfigError, match="steps"):
        langevin(model, x0, -1, 0.1)


def test_step_sizes_checks_its_own_inputs():
    """``step_sizes`` is public in ebflow.mcmc.schedules: a bad first step size is a ConfigError,
    not a complex number (negative ** fraction) or a ZeroDivisionError from the geometric decay."""
    for bad in (-0.1, 0.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="step size must be finite and > 0"):
            step_sizes(bad, 0.01, "geometric", 5)
    for schedule in ("linear", "geometric", "cosine"):
        with pytest.raises(ConfigError, match="needs final_step_size"):
            step_sizes(0.1, None, schedule, 5)
        sizes = step_sizes(0.1, 0.01, schedule, 5)
        assert sizes[0] == pytest.approx(0.1) and sizes[-1] == pytest.approx(0.01)
    assert step_sizes(0.1, None, "constant", 3) == [0.1, 0.1, 0.1]


def test_divergence_is_reported_by_ula_and_rejected_by_mala():
    model, _, _ = gaussian_flow(3)
    x0 = torch.zeros(8, 3, dtype=torch.float64)
    with pytest.raises(EBFlowError, match="diverged"):
        ula(model, x0, 2000, 50.0, generator=torch.Generator().manual_seed(0))
    res = mala(model, x0, 50, 50.0, generator=torch.Generator().manual_seed(0))  # absurd step
    assert torch.isfinite(res.samples).all() and res.acceptance_rate < 0.2


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.7])
def test_gaussian_blur_has_torchvision_kernel_with_replicate_padding(sigma):
    """Our blur is torchvision's gaussian_blur (kernel size 2 ceil(2 sigma) + 1) of the
    replicate-padded image: the same kernel; only the border rule differs (torchvision reflects,
    and cannot pad an image smaller than the kernel radius), which is why ours is kept."""
    tv = pytest.importorskip("torchvision.transforms.v2.functional")
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    r = max(1, math.ceil(2 * sigma))
    k = [2 * r + 1] * 2
    ours = gaussian_blur(x, sigma)
    padded = torch.nn.functional.pad(x, (r, r, r, r), mode="replicate")
    torch.testing.assert_close(
        ours, tv.gaussian_blur(padded, k, [sigma, sigma])[..., r:-r, r:-r], atol=1e-12, rtol=0
    )
    interior = (..., slice(r, -r), slice(r, -r))
    torch.testing.assert_close(
        ours[interior], tv.gaussian_blur(x, k, [sigma, sigma])[interior], atol=1e-12, rtol=0
    )
    assert gaussian_blur(torch.randn(1, 1, 2, 2), 2.0).shape == (1, 1, 2, 2)  # tiny images work


@pytest.mark.parametrize("method", ["mala", "ula"])
def test_chains_do_not_read_the_device_every_step(monkeypatch, method):
    """MALA reads nothing per step (non-finite proposals are rejected on the device; the model's
    input check is skipped for states already checked); ULA checks for divergence once per 10
    steps. So 40 steps cost a handful of reads, not one or more per step."""
    model = dense_flow((1, 4, 4)).double()
    x0 = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    count = count_host_reads(monkeypatch)
    run = mala if method == "mala" else ula
    run(model, x0, 40, 0.01, generator=torch.Generator().manual_seed(0))
    assert count[0] <= (2 if method == "mala" else 5), f"{method}: {count[0]} reads in 40 steps"
    assert method == "mala" or count[0] >= 4  # ULA's checks after steps 10, 20, 30, 40 are counted


def test_ula_reports_its_first_non_finite_iteration_even_in_the_last_block():
    """The divergence check runs every 10 steps and after the last one: a chain that blows up in
    a 3-step run still raises, naming the first iteration whose state or energy was non-finite."""
    model, _, _ = gaussian_flow(3)
    x0 = torch.zeros(8, 3, dtype=torch.float64)
    seen = []

    def watch(i, x, g):
        if not torch.isfinite(x).all() and not seen:
            seen.append(i)

    for steps in (3, 25):
        seen.clear()
        with pytest.raises(EBFlowError, match=r"diverged at iteration (\d+)") as err:
            ula(model, x0, steps, 1e200, generator=torch.Generator().manual_seed(0), callback=watch)
        first = int(re.search(r"iteration (\d+)", str(err.value)).group(1))
        assert seen and first <= seen[0] < steps
