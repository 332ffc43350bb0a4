"""Inpainting with the energy (ebflow.inpainting, ebflow inpaint): masks, the MCMC fill, the grid and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebflow import EBFlow, ImagePreprocessing, dense_flow, make_objective
from ebflow.datasets import load_digits
from ebflow.errors import ConfigError, InputError
from ebflow.experiment.images.inpainting import mask_from_spec, save_inpainting_grid
from ebflow.inpainting import PreprocessedSpaceEnergy, inpaint_images, inpainting_grid, make_mask

DIGITS_BINS = 17  # the digits shipped with ebflow: 8x8, pixel levels 0..16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, _ = load_digits()
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    images = images[perm]
    return images[300:], images[:300]  # train, test


@pytest.fixture(scope="module")
def digits_model(digits) -> tuple[EBFlow, ImagePreprocessing]:
    """FC EBFlow (2 dense 64x64 layers) trained by DSM in the MaP space for a few seconds."""
    train, _ = digits
    torch.manual_seed(0)
    pre = ImagePreprocessing(smoothness=0.5, num_bins=DIGITS_BINS)
    model = dense_flow((1, 8, 8))
    objective = make_objective("dsm", sigma=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(300):
        batch = train[torch.randint(0, train.shape[0], (100,))]
        y, _ = pre.forward(pre.dequantize(batch))
        loss = objective(model, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, pre


# -- masks ---------------------------------------------------------------------------------------
def test_named_masks_cover_the_named_region():
    shape = (3, 8, 6)
    center = make_mask("center", shape)
    assert center.shape == shape and center.dtype == torch.bool
    assert center[:, 2:6, 1:5].all() and int(center.sum()) == 3 * 4 * 4
    assert make_mask("left", shape)[:, :, :3].all() and not make_mask("left", shape)[:, :, 3:].any()
    assert make_mask("right", shape)[:, :, 3:].all() and not make_mask("right", shape)[:, :, :3].any()
    assert make_mask("top", shape)[:, :4].all() and not make_mask("top", shape)[:, 4:].any()
    assert make_mask("bottom", shape)[:, 4:].all() and not make_mask("bottom", shape)[:, :4].any()


def test_random_mask_has_the_requested_fraction_and_covers_channels():
    mask = make_mask("random:0.3", (2, 32, 32), batch=10, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (10, 2, 32, 32)
    assert torch.equal(mask[:, 0], mask[:, 1])  # a pixel is missing in every channel
    assert abs(float(mask.float().mean()) - 0.3) < 0.02


def test_mask_from_png(tmp_path):
    from PIL import Image

    plane = np.zeros((8, 6), dtype=np.uint8)
    plane[1:3, 2:5] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(plane).save(path)
    mask = mask_from_spec(str(path), (1, 8, 6))
    assert torch.equal(mask[0], torch.from_numpy(plane > 127))
    with pytest.raises(InputError, match="8x6"):
        mask_from_spec(str(path), (1, 8, 8))
    with pytest.raises(InputError, match="does not exist"):
        mask_from_spec(str(tmp_path / "missing.png"), (1, 8, 6))
    with pytest.raises(ConfigError, match="unknown mask"):
        make_mask(str(path), (1, 8, 6))  # the library opens no file


def test_mask_from_an_array():
    plane = np.zeros((8, 6), dtype=bool)
    plane[1:3, 2:5] = True
    for given in (plane, torch.from_numpy(plane), plane.astype(np.uint8) * 255):
        mask = make_mask(given, (2, 8, 6))
        assert mask.shape == (2, 8, 6) and mask.dtype == torch.bool
        assert torch.equal(mask[0], torch.from_numpy(plane)) and torch.equal(mask[1], mask[0])
    with pytest.raises(InputError, match="8x8"):
        make_mask(plane, (1, 8, 8))
    with pytest.raises(InputError, match="no pixel"):
        make_mask(np.zeros((8, 6)), (1, 8, 6))


@pytest.mark.parametrize("spec", ["middle", "random:x", "random:0", "random:1.5"])
def test_bad_mask_specifications_are_rejected(spec):
    with pytest.raises(ConfigError):
        make_mask(spec, (1, 8, 8))


def test_spatial_mask_needs_image_events():
    with pytest.raises(InputError, match="image events"):
        make_mask("center", (64,))


# -- the MCMC fill -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["center", "random:0.5"])
def test_inpainting_lowers_masked_mse_below_the_noise_start(digits, digits_model, spec):
    _, test = digits
    model, pre = digits_model
    images = test[:32]
    g = torch.Generator().manual_seed(1)
    mask = make_mask(spec, (1, 8, 8), batch=32, generator=g)
    result = inpaint_images(model, pre, images, mask, steps=200, generator=g)
    # The noise start is uniform over the 17 levels; the fill must be clearly closer to the truth.
    assert result.mse_after < 0.8 * result.mse_before, (result.mse_before, result.mse_after)
    assert 0.3 < result.acceptance_rate < 0.9
    observed = ~result.mask
    assert torch.equal(result.filled[observed], images[observed])  # observed pixels untouched
    assert torch.equal(result.start[observed], images[observed])
    assert result.filled.min() >= 0 and result.filled.max() <= DIGITS_BINS - 1
    assert torch.equal(result.filled, result.filled.floor())  # integer pixel levels


def test_inpainting_with_ula_smoothness_and_schedule_runs(digits, digits_model):
    _, test = digits
    model, pre = digits_model
    g = torch.Generator().manual_seed(2)
    result = inpaint_images(
        model,
        pre,
        test[:8],
        make_mask("left", (1, 8, 8)),
        steps=30,
        step_size=0.05,
        metropolis=False,
        schedule="geometric",
        final_step_size=0.005,
        smoothness=1.0,
        denoise_sigma=0.5,
        generator=g,
    )
    assert result.acceptance_rate is None
    assert result.mse_after < result.mse_before
    assert result.step_size == pytest.approx(0.005)


def test_grid_has_three_rows_of_enlarged_images(tmp_path, digits, digits_model):
    from PIL import Image

    _, test = digits
    model, pre = digits_model
    result = inpaint_images(
        model, pre, test[:5], make_mask("top", (1, 8, 8)), steps=5, generator=torch.Generator().manual_seed(3)
    )
    out = save_inpainting_grid(result, tmp_path / "sub" / "grid.png", max_value=DIGITS_BINS - 1)
    with Image.open(out) as img:
        width, height = img.size
        pixels = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    cell = 64 + 2  # 8x8 images enlarged x8, plus padding
    assert (width, height) == (5 * cell + 2, 3 * cell + 2)
    grid = inpainting_grid(result, max_value=DIGITS_BINS - 1)  # the library's picture, no file
    assert torch.equal(pixels, grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8))


def test_no_map_model_energy_equals_map_energy_up_to_a_constant():
    # A model with the preprocessing inside (no MaP) and the same model on preprocessed data
    # (MaP) define the same density of y = P(x~); their energies in y differ by a constant.
    torch.manual_seed(0)
    pre = ImagePreprocessing(smoothness=0.5, num_bins=DIGITS_BINS)
    map_model = dense_flow((1, 2, 2)).double()
    with torch.no_grad():
        for p in map_model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    inner = EBFlow([*pre.as_layers(), *map_model.layers], (1, 2, 2)).double()
    wrapped = PreprocessedSpaceEnergy(inner, pre)
    y = torch.randn(6, 1, 2, 2, dtype=torch.float64) * 2
    diff = wrapped.energy(y) - map_model.energy(y)
    assert torch.allclose(diff, diff[0].expand_as(diff), atol=1e-8)


def test_inpainting_rejects_mismatched_inputs(digits, digits_model):
    _, test = digits
    model, pre = digits_model
    with pytest.raises(InputError, match="mask of shape"):
        inpaint_images(model, pre, test[:4], torch.ones(1, 4, 4, dtype=torch.bool), steps=1)
    with pytest.raises(InputError, match="images must have shape"):
        inpaint_images(model, pre, test[:4, :, :4, :4], make_mask("center", (1, 8, 8)), steps=1)
    with pytest.raises(InputError, match="pixels in"):
        inpaint_images(model, pre, test[:4] * 100, make_mask("center", (1, 8, 8)), steps=1)
    with pytest.raises(ConfigError, match="step size"):
        inpaint_images(model, pre, test[:4], make_mask("center", (1, 8, 8)), steps=1, step_size=0.0)
    with pytest.raises(ConfigError, match="energy"):
        inpaint_images(torch.nn.Linear(64, 64), pre, test[:4], make_mask("center", (1, 8, 8)))


# -- command line ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A run of the embedded default (digits-fc, DSM) trained for a few iterations by the CLI."""
    from ebflow.cli import main

    run_dir = tmp_path_factory.mktemp("runs") / "digits"
    code = main(
        [
            "train",
            "--out",
            str(run_dir),
            "--device",
            "cpu",
            "--set",
            "max_iters=60",
            "--set",
            "progress=false",
            "--set",
            "tensorboard=false",
        ]
    )
    assert code == 0
    return run_dir


def test_cli_inpaint_runs_end_to_end_on_the_digits_default(digits_run, tmp_path, capsys):
    from PIL import Image

    from ebflow.cli import main

    out = tmp_path / "inpaint.png"
    code = main(
        [
            "inpaint",
            str(digits_run),
            "--mask",
            "bottom",
            "--steps",
            "20",
            "--num-images",
            "4",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "masked-region MSE" in text and "before" in text and "after" in text
    assert "MALA acceptance" in text
    with Image.open(out) as img:
        assert img.size == (4 * 66 + 2, 3 * 66 + 2)
    code = main(
        [
            "inpaint",
            str(digits_run),
            "--mask",
            "random:0.3",
            "--steps",
            "5",
            "--ula",
            "--step-size",
            "0.01",
            "--num-images",
            "2",
            "--device",
            "cpu",
            "--denoise-sigma",
            "0",
            "--out",
            str(tmp_path / "ula.png"),
        ]
    )
    assert code == 0 and (tmp_path / "ula.png").is_file()


def test_cli_inpaint_reports_bad_masks_and_step_sizes(digits_run, tmp_path, capsys):
    from PIL import Image

    from ebflow.cli import main

    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.full((5, 5), 255, dtype=np.uint8)).save(wrong)
    assert (
        main(
            [
                "inpaint",
                str(digits_run),
                "--mask",
                str(wrong),
                "--steps",
                "2",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "5x5" in capsys.readouterr().err
    assert (
        main(
            [
                "inpaint",
                str(digits_run),
                "--step-size",
                "0",
                "--steps",
                "2",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "step-size" in capsys.readouterr().err
    assert (
        main(
            [
                "inpaint",
                str(digits_run),
                "--mask",
                "diagonal",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "unknown mask" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_sample_refine_applies_langevin_steps(digits_run, tmp_path, capsys):
    from ebflow.cli import main

    out = tmp_path / "refined.png"
    assert (
        main(["sample", str(digits_run), "-n", "4", "--refine", "10", "--device", "cpu", "--out", str(out)])
        == 0
    )
    assert out.is_file()


def test_averaging_the_last_states_estimates_the_posterior_mean(digits, digits_model):
    # The posterior mean minimises the expected squared error; one sample has about twice its
    # error, so averaging the chain's last states must give a lower masked MSE than its last state.
    _, test = digits
    model, pre = digits_model
    g = torch.Generator().manual_seed(5)
    mask = make_mask("center", (1, 8, 8))
    result = inpaint_images(model, pre, test[:64], mask, steps=300, average_last=150, generator=g)
    assert result.mse_after < 0.85 * result.mse_chain, (result.mse_after, result.mse_chain)
    assert torch.equal(result.filled, result.filled.floor())
    with pytest.raises(ConfigError, match="average_last"):
        inpaint_images(model, pre, test[:4], mask, steps=10, average_last=11)


def test_cli_inpaint_checks_options_before_loading(tmp_path, capsys):
    from ebflow.cli import main

    missing = str(tmp_path / "no-run")
    for extra, message in (
        (["--average", "5", "--steps", "2"], "--average"),
        (["--denoise-sigma", "-1"], "denoise"),
        (["--out", str(tmp_path / "grid.txt")], ".png"),
        (["--steps", "-1"], "--steps"),
    ):
        assert main(["inpaint", missing, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["inpaint", missing, "--device", "cpu"]) == 2
    assert "no-run" in capsys.readouterr().err
