"""The paper's recipes: gradient clipping that clips, the reference's loss scales, the no-MaP
ablation's dropped examples, initialisation, augmentation, and raw-vs-EMA results."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from ebflow import EBFlow, make_objective
from ebflow.errors import ConfigError, InputError
from ebflow.experiment.config.builders import build_model
from ebflow.experiment.config.resolve import resolve_config
from ebflow.experiment.data.batches import augment_images
from ebflow.experiment.training.run import train
from ebflow.experiment.training.step import optimization_step
from ebflow.layers import Conv2d, Dense, SmoothLeakyReLU, Squeeze
from ebflow.objectives import dsm_loss, fdssm_loss, ssm_loss
from ebflow.preprocessing import ImagePreprocessing

QUIET = dict(tensorboard=False, progress=False, num_threads=1)


def _mlp(d: int = 5) -> EBFlow:
    torch.manual_seed(0)
    model = EBFlow([Dense(d), SmoothLeakyReLU(0.3), Dense(d)], (d,)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


# -- gradient clipping ------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [0.5, 2.0])
def test_clipped_step_moves_the_parameters_by_exactly_the_threshold(clip):
    """SGD with lr = 1 moves the parameters by minus the (clipped) gradient: the step's norm is
    the threshold when the gradient is larger, and the reported norm is the unclipped one."""
    model = _mlp()
    x = 5 * torch.randn(64, 5, dtype=torch.float64)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    out = optimization_step(model, make_objective("ml"), optimizer, x, grad_clip=clip)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert out.finite and out.grad_norm > clip
    assert float((after - before).norm()) == pytest.approx(clip, rel=1e-6)  # torch adds 1e-6 to the norm


def test_unclipped_step_is_the_plain_gradient_step():
    model = _mlp()
    x = torch.randn(64, 5, dtype=torch.float64)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    out = optimization_step(model, make_objective("ml"), optimizer, x, grad_clip=1e9)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) == pytest.approx(out.grad_norm, rel=1e-9)


def test_a_run_with_clipping_differs_from_one_without(tmp_path):
    """The CLI-level check the issue asked for: grad_clip changes the trained model."""
    base = dict(
        QUIET,
        max_iters=15,
        epochs=None,
        eval_every=100,
        checkpoint_every=100,
        num_samples=4,
        loss="fdssm",
        eps=0.5,
        lr=1e-2,
        optimizer="sgd",
    )
    finals = []
    for clip in (None, 1e-3):
        config = resolve_config("digits-fc", {**base, "grad_clip": clip})
        result = train(config, tmp_path / str(clip), final_outputs=False)
        state = torch.load(tmp_path / str(clip) / "checkpoints" / "last.pt", weights_only=False)
        finals.append(state["model"])
        assert result.step == 15
    assert not all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


# -- loss scales ------------------------------------------------------------------------------------
def test_score_matching_losses_are_per_dimension():
    model, d = _mlp(), 5
    x = torch.randn(7, d, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.energy(xr).sum(), xr, create_graph=True)
    # SSM: textbook per-example sum / D
    v = torch.randn(1, 7, d, dtype=torch.float64).sign()
    (hv,) = torch.autograd.grad((g * v[0]).sum(), xr, retain_graph=True)
    textbook = (-(hv * v[0]).sum(1) + 0.5 * g.pow(2).sum(1)) / d
    torch.testing.assert_close(ssm_loss(model, x, noise=v).loss, textbook.detach())
    # DSM: 1/(2D) |grad E(x + sigma eps) - eps / sigma|^2
    eps, sigma = torch.randn(7, d, dtype=torch.float64), 0.3
    xt = (x + sigma * eps).requires_grad_(True)
    (gt,) = torch.autograd.grad(model.energy(xt).sum(), xt)
    torch.testing.assert_close(
        dsm_loss(model, x, sigma, noise=eps).loss, 0.5 * (gt - eps / sigma).pow(2).sum(1) / d
    )
    # FDSSM: the finite-difference sum divided by eps^2 only (|v| = eps)
    raw = torch.randn(7, d, dtype=torch.float64)
    step = 0.2
    vv = raw / raw.norm(dim=1, keepdim=True) * step
    with torch.no_grad():
        e, ep, em = model.energy(x), model.energy(x + vv), model.energy(x - vv)
        expected = ((ep - em).pow(2) / 8 + 2 * e - ep - em) / step**2
    torch.testing.assert_close(fdssm_loss(model, x, step, noise=raw).loss.detach(), expected)


@pytest.mark.parametrize("name, options", [("ssm", {}), ("dsm", {"sigma": 0.3}), ("fdssm", {"eps": 0.3})])
def test_energy_regulariser_adds_lambda_energy_per_dimension(name, options):
    model, x = _mlp(), torch.randn(9, 5, dtype=torch.float64)
    plain, reg = make_objective(name, **options), make_objective(name, energy_reg=0.7, **options)
    noise = plain.draw_noise(tuple(x.shape), dtype=x.dtype, device=x.device)
    diff = reg(model, x, noise=noise) - plain(model, x, noise=noise)
    # the reference regularises DSM at the perturbed input x + sigma eps, the others at x
    at = x + options["sigma"] * noise if name == "dsm" else x
    torch.testing.assert_close(diff.detach(), 0.7 * model.energy(at).mean().detach() / 5)


@pytest.mark.parametrize("preset", ["cifar-fc", "cifar-cnn"])
def test_cifar_energy_weight_is_the_references_lambda_on_ebflows_scale(preset):
    """The reference adds lambda * mean(E) to each of the H*W per-pixel SSM/DSM terms of a
    (B, C, H, W) batch, then divides by B*D: lambda * mean(E) / C, i.e. lambda * H * W on
    ebflow's scale (lambda E / D); FDSSM adds it once per example, divided by eps^2 only."""
    lam, (c, h, w) = 0.001, (3, 32, 32)
    expected = {
        "ml": 0.0,
        "sml": 0.0,
        "ssm": lam * h * w,
        "dsm": lam * h * w,
        "fdssm": lam * c * h * w / 0.1**2,
    }
    for loss, weight in expected.items():
        assert resolve_config(preset, {"loss": loss}).objective.energy_reg == pytest.approx(weight)


def test_energy_weight_reproduces_the_references_image_loss_arithmetic():
    """On a (B, C, H, W) batch: ebflow's DSM with energy_reg = lambda H W equals the
    reference's sum over pixels of [per-pixel DSM term + lambda mean(E(x~))] / (B D)."""
    torch.manual_seed(0)
    shape, lam, sigma = (3, 4, 4), 0.001, 0.3
    model = EBFlow([Conv2d(3, 3), SmoothLeakyReLU(0.3), Squeeze(), Conv2d(12, 1)], shape).double()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, eps = torch.randn(5, *shape, dtype=torch.float64), torch.randn(5, *shape, dtype=torch.float64)
    ours = make_objective("dsm", sigma=sigma, energy_reg=lam * 16)(model, x, noise=eps)
    xt = (x + sigma * eps).requires_grad_(True)
    e = model.energy(xt)
    (score,) = torch.autograd.grad(-e.sum(), xt)
    per_pixel = 0.5 * (score + eps / sigma).pow(2).sum(dim=1) + lam * e.mean()  # (B, H, W)
    reference = per_pixel.sum() / x.shape[0] / x[0].numel()
    torch.testing.assert_close(ours.detach(), reference.detach())


# -- the no-MaP ablation: examples outside the logit's domain ----------------------------------------
def _no_map_model() -> tuple[EBFlow, ImagePreprocessing]:
    pre = ImagePreprocessing(0.5, 1e-6, 256)
    torch.manual_seed(0)
    model = EBFlow([*pre.as_layers(), Dense(4), SmoothLeakyReLU(0.3), Dense(4)], (4,)).double()
    return model, pre


def test_in_domain_marks_examples_the_logit_accepts():
    model, _ = _no_map_model()
    x = torch.tensor([[1.0, 2, 3, 4], [-0.5, 2, 3, 4], [1, 2, 3, 256.5], [128, 1, 1, 1]], dtype=torch.float64)
    assert model.in_domain(x).tolist() == [True, False, False, True]
    assert _mlp().in_domain(torch.randn(3, 5, dtype=torch.float64)).tolist() == [True] * 3


@pytest.mark.parametrize("name, options", [("dsm", {"sigma": 2.0}), ("fdssm", {"eps": 6.0})])
def test_out_of_domain_examples_are_dropped_and_counted(name, options):
    model, _ = _no_map_model()
    x = torch.rand(32, 4, dtype=torch.float64) * 254 + 1
    x[:8, 0] = 0.05  # near the edge of (0, 256): their perturbations leave the domain
    strict = make_objective(name, **options)
    noise = strict.draw_noise(tuple(x.shape), dtype=x.dtype, device=x.device)
    with pytest.raises(InputError, match=r"\(0, 1\)"):
        strict(model, x, noise=noise)
    dropping = make_objective(name, drop_out_of_domain=True, **options)
    loss = dropping(model, x, noise=noise)
    assert 0 < dropping.dropped_examples < 32 and dropping.seen_examples == 32
    # the loss is the zero-filled mean: kept examples' losses summed over the whole batch
    keep = dropping.fn(model, x, noise=noise, **dropping.options).kept
    per_kept = strict.fn(model, x[keep], noise=noise[keep], **strict.options).loss
    torch.testing.assert_close(loss.detach(), per_kept.sum().detach() / 32)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_all_dropped_batch_gives_a_zero_gradient_not_an_error():
    model, _ = _no_map_model()
    x = torch.full((4, 4), 0.01, dtype=torch.float64)
    objective = make_objective("dsm", sigma=5.0, drop_out_of_domain=True)
    loss = objective(model, x, noise=-torch.ones(4, 4, dtype=torch.float64))
    loss.backward()
    assert float(loss.detach()) == 0.0 and objective.dropped_examples == 4
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())


def test_no_map_dsm_run_reports_dropped_examples(tmp_path):
    config = resolve_config(
        "digits-fc",
        dict(
            QUIET,
            loss="dsm",
            sigma=0.3,
            map=False,
            drop_out_of_domain=True,
            max_iters=6,
            epochs=None,
            eval_every=3,
            checkpoint_every=3,
            num_samples=4,
        ),
    )
    train(config, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dropped_examples"] > 0 and 0 < results["dropped_fraction"] <= 1
    assert results["map"] is False


@pytest.mark.parametrize("sigma, everything", [(0.02, False), (50.0, True)])
def test_train_command_says_how_many_examples_were_dropped(sigma, everything, tmp_path, capsys):
    from ebflow.cli import main

    sets = dict(
        QUIET,
        sigma=sigma,
        map="false",
        drop_out_of_domain="true",
        max_iters=4,
        epochs="null",
        eval_every=2,
        checkpoint_every=2,
        num_samples=4,
        tensorboard="false",
        progress="false",
    )
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (
            main(["train", "--config", "digits-fc", "--loss", "dsm", "--out", str(tmp_path / "run"), *args])
            == 0
        )
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    seen, dropped = 4 * resolve_config("digits-fc").training.batch_size, results["dropped_examples"]
    assert 0 < dropped <= seen and f"{dropped} of {seen} training examples" in out
    assert (dropped == seen) is everything
    # the warning goes through `warnings` (stderr on the command line), not the log
    warned = [str(w.message) for w in caught if "every training example was dropped" in str(w.message)]
    assert bool(warned) is everything and "every training example was dropped" not in out


# -- initialisation and augmentation ----------------------------------------------------------------
def test_negative_identity_initialisation():
    # the reference's FC recipe: W = -I and every bias exactly +1 (the bias is not negated)
    dense = Dense(6, init="negative_identity")
    assert torch.equal(dense.weight.detach(), -torch.eye(6)) and torch.equal(
        dense.bias.detach(), torch.ones(6)
    )
    conv = Conv2d(2, 3, init="negative_identity")
    w = conv.weight.detach()
    assert torch.equal(w[:, :, 1, 1], -torch.eye(2)) and float(w.abs().sum()) == 2.0
    # conv bias: std of the reference's Xavier-normal kernel noise of gain 0.01, 0.01 / (k sqrt C)
    torch.manual_seed(0)
    for channels, k in ((1, 7), (16, 7), (4, 3)):
        biases = torch.cat(
            [Conv2d(channels, k, init="negative_identity").bias.detach() for _ in range(4000 // channels)]
        )
        expected = 0.01 / (k * channels**0.5)
        assert abs(float(biases.std()) / expected - 1) < 0.08 and abs(float(biases.mean())) < 0.2 * expected
    config = resolve_config("mnist-fc")
    model = build_model(config.model, (1, 28, 28), ImagePreprocessing(0.5, 1e-6, 256), use_map=True)
    dense_layers = [l for l in model.layers if isinstance(l, Dense)]
    assert len(dense_layers) == 2
    assert all(torch.equal(l.weight.detach(), -torch.eye(784)) for l in dense_layers)
    assert all(torch.equal(l.bias.detach(), torch.ones(784)) for l in dense_layers)
    with pytest.raises(ConfigError, match="initialisation"):
        Dense(3, init="zeros")


def test_augmentation_flips_and_shifts_each_example():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float64).view(2, 3, 6, 6).repeat(50, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    out = augment_images(x, g)
    assert out.shape == x.shape
    again = augment_images(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # a function of the generator's state alone
    assert not torch.equal(out, x)
    # every output pixel is a pixel of the same example and channel
    for i in range(0, 100, 17):
        for c in range(3):
            assert set(out[i, c].flatten().tolist()) <= set(x[i, c].flatten().tolist())
    flipped = sum(
        bool(torch.equal(augment_images(x[:1], torch.Generator().manual_seed(s)), x[:1].flip(-1)))
        for s in range(200)
    )
    assert 0 < flipped < 100  # flips happen (with no shift: 1/25 of the flips)
    # rows [start, start + B) of a global batch draw that global batch's numbers
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    whole = augment_images(x[:8], g1)
    part = augment_images(x[4:8], g2, global_batch=8, start=4)
    assert torch.equal(whole[4:], part)


# -- results hold both EMA and raw weights ----------------------------------------------------------
def test_results_report_ema_and_raw_nll(tmp_path):
    config = resolve_config(
        "digits-fc", dict(QUIET, max_iters=30, epochs=None, eval_every=10, checkpoint_every=10, num_samples=4)
    )
    train(config, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert math.isfinite(results["test_nll"]) and math.isfinite(results["test_raw_nll"])
    assert results["test_nll"] != results["test_raw_nll"]
    assert results["ema_warmup"] is True
