"""KL and Fisher divergence against the Gaussian-smoothed training points."""

from __future__ import annotations

import math

import pytest
import torch

from ebflow import EBFlow
from ebflow.experiment.data.splits import ToyMixture
from ebflow.experiment.evaluation.toy_metrics import (
    fisher_divergence,
    fisher_terms,
    kl_divergence,
    mixture_log_prob,
    mixture_score,
    reference_kl_offset,
    toy_metrics,
)
from ebflow.layers import FixedAffine


def _gaussian_model(scale: float = 1.0) -> EBFlow:
    """x -> x / scale: the density N(0, scale^2 I) in 2-D, float64."""
    return EBFlow([FixedAffine(1.0 / scale)], (2,)).double()


def test_mixture_density_integrates_to_one_and_matches_brute_force():
    centres = torch.tensor([[0.0, 0.0], [1.0, -1.0], [2.5, 0.5]], dtype=torch.float64)
    mix = ToyMixture(centres, 0.4)
    g = torch.linspace(-3, 5.5, 400, dtype=torch.float64)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    dens = mixture_log_prob(mix, pts, chunk=1000).exp()
    cell = float(g[1] - g[0]) ** 2
    assert float(dens.sum()) * cell == pytest.approx(1.0, abs=1e-3)
    x = torch.randn(5, 2, dtype=torch.float64)
    brute = (
        torch.stack(
            [
                torch.distributions.MultivariateNormal(c, 0.16 * torch.eye(2, dtype=torch.float64)).log_prob(
                    x
                )
                for c in centres
            ]
        )
        .exp()
        .mean(0)
        .log()
    )
    torch.testing.assert_close(mixture_log_prob(mix, x), brute)


def test_mixture_score_is_the_gradient_of_the_log_density():
    mix = ToyMixture(torch.randn(20, 2, dtype=torch.float64), 0.375)
    x = torch.randn(30, 2, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(mixture_log_prob(mix, x).sum(), x)
    torch.testing.assert_close(mixture_score(mix, x.detach(), chunk=7), grad)


def test_divergences_vanish_when_the_model_is_the_data_density():
    mix = ToyMixture(torch.zeros(1, 2, dtype=torch.float64), 1.0)  # N(0, I)
    x = torch.randn(500, 2, dtype=torch.float64)
    model = _gaussian_model(1.0)
    assert kl_divergence(model, mix, x) == pytest.approx(0.0, abs=1e-12)
    assert fisher_divergence(model, mix, x) == pytest.approx(0.0, abs=1e-12)


def test_divergences_match_closed_forms_for_gaussians():
    # data N(0, 4I), model N(0, I): KL = 0.5 * D * (4 - 1 - ln 4); Fisher = 0.5 * (3/4)^2 * E|x|^2
    mix = ToyMixture(torch.zeros(1, 2, dtype=torch.float64), 2.0)
    x = 2.0 * torch.randn(40000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = _gaussian_model(1.0)
    assert kl_divergence(model, mix, x, batch_size=50000) == pytest.approx(3 - math.log(4), rel=0.03)
    assert fisher_divergence(model, mix, x, batch_size=50000) == pytest.approx(0.5 * 9 / 16 * 8, rel=0.03)


def test_reference_kl_is_the_reference_codes_p_log_p_formula_and_differs_from_the_kl():
    """``kl_reference`` = mean(p·log p − log q) (the paper's code), written out here from the
    model's and the data's densities; fails if it is the true KL, drops the −log q term, or
    uses log p where the reference used p·log p."""
    mix = ToyMixture(torch.tensor([[0.0, 0.0], [1.5, -0.5]], dtype=torch.float64), 0.6)
    x = torch.randn(300, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model = _gaussian_model(1.3)
    log_p = mixture_log_prob(mix, x)
    log_q = model.log_prob(x).detach()
    metrics = toy_metrics(model, mix, x)
    expected = float((log_p.exp() * log_p - log_q).mean())
    assert metrics["kl_reference"] == pytest.approx(expected, rel=1e-12)
    assert metrics["kl"] == pytest.approx(float((log_p - log_q).mean()), rel=1e-12)
    assert abs(metrics["kl_reference"] - metrics["kl"]) > 0.5  # the two formulas differ here
    # the offset depends on the data points only: the same for another model
    other = toy_metrics(_gaussian_model(0.7), mix, x)
    assert other["kl_reference"] - other["kl"] == pytest.approx(reference_kl_offset(mix, x), rel=1e-12)
    assert metrics["kl_reference"] - metrics["kl"] == pytest.approx(reference_kl_offset(mix, x), rel=1e-12)


def test_median_fisher_term_matches_its_closed_form_and_ignores_one_outlier():
    """Data N(0, 4I), model N(0, I): each point's term is ½ (3/4)² |x|², and |x|²/4 is
    exponential with mean 2, so the median term is 0.5 · 9/16 · 8 ln 2 (the mean: 2.25).
    Fails if ``fisher_median`` is the mean, or a median of something other than the terms."""
    mix = ToyMixture(torch.zeros(1, 2, dtype=torch.float64), 2.0)
    x = 2.0 * torch.randn(40000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = _gaussian_model(1.0)
    metrics = toy_metrics(model, mix, x, batch_size=7000)
    assert metrics["fisher_median"] == pytest.approx(0.5 * 9 / 16 * 8 * math.log(2), rel=0.03)
    assert metrics["fisher"] == pytest.approx(0.5 * 9 / 16 * 8, rel=0.03)
    terms = fisher_terms(model, mix, x, batch_size=7000)
    torch.testing.assert_close(terms, 0.5 * (9 / 16) * x.pow(2).sum(1))
    assert metrics["fisher"] == pytest.approx(float(terms.mean()), rel=1e-12)
    # one far point moves the mean by its term / K, the median by almost nothing
    far = torch.cat([x, torch.tensor([[400.0, 0.0]], dtype=torch.float64)])
    with_far = toy_metrics(model, mix, far, batch_size=7000)
    assert with_far["fisher"] - metrics["fisher"] > 0.5 * 9 / 16 * 400.0**2 / 40001 * 0.99
    assert with_far["fisher_median"] == pytest.approx(metrics["fisher_median"], rel=1e-3)
