"""Every public entry point of the library refuses bad input with an ``InputError`` or a
``ConfigError`` that names the problem -- never a raw ``RuntimeError``, ``AttributeError``,
``TypeError`` or ``NotImplementedError`` from deeper down (issue 13, library part)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from ebflow import EBFlow, ImagePreprocessing, conv_flow, make_objective
from ebflow.errors import ConfigError, InputError
from ebflow.inpainting import inpaint_images, inpainting_grid, make_mask
from ebflow.layers import Dense, SmoothLeakyReLU
from ebflow.mcmc import (
    PreprocessedSpaceEnergy,
    default_step_size,
    gaussian_blur,
    langevin,
    mala,
    refine_samples,
    ula,
)
from ebflow.objectives import dsm_loss, esm_loss, fdssm_loss, ml_loss, sml_loss, ssm_loss

pytestmark = pytest.mark.usefixtures("one_thread")

D = 3
VEC = EBFlow([Dense(D), SmoothLeakyReLU(0.3), Dense(D)], (D,)).double()
IMG = conv_flow((1, 4, 4), blocks=1, convs_per_block=2, kernel_size=3).double()
PRE = ImagePreprocessing(0.5)
GOOD = torch.rand(4, D, dtype=torch.float64)
GOOD_IMG = torch.randn(2, 1, 4, 4, dtype=torch.float64)
PIXELS = torch.randint(0, 256, (2, 1, 4, 4)).double()


def _nan(shape: tuple[int, ...]) -> torch.Tensor:
    t = torch.rand(shape, dtype=torch.float64)
    t.view(-1)[1] = float("nan")
    return t


def bad_inputs(shape: tuple[int, ...]) -> dict[str, tuple[object, str]]:
    """Bad versions of a batch of shape ``shape`` and a word their error must contain."""
    wrong = (shape[0], *(s + 1 for s in shape[1:]))
    return {
        "int tensor": (torch.ones(shape, dtype=torch.int64), "floating tensor"),
        "bool tensor": (torch.ones(shape, dtype=torch.bool), "floating tensor"),
        "list": (torch.rand(shape, dtype=torch.float64).tolist(), "torch.Tensor, got list"),
        "numpy array": (np.random.rand(*shape), "torch.Tensor, got ndarray"),
        "wrong shape": (torch.rand(wrong, dtype=torch.float64), "shape"),
        "NaN": (_nan(shape), "non-finite"),
        "float32 for a float64 model": (torch.rand(shape, dtype=torch.float32), "dtype"),
        "None": (None, "torch.Tensor, got NoneType"),
    }


def _expect_named_error(call: Callable[[], object], word: str) -> None:
    with pytest.raises((InputError, ConfigError)) as info:
        call()
    assert word.lower() in str(info.value).lower(), str(info.value)


# -- entry points that take a batch: name -> (function of the bad batch, its good shape, the kinds
# of "bad" input that are valid there)
def _noise_free(fn):
    return lambda x: fn(VEC, x)


BATCH_ENTRY_POINTS: dict[str, tuple[Callable[[object], object], tuple[int, ...], set[str]]] = {
    "EBFlow.energy": (lambda x: VEC.energy(x), (4, D), set()),
    "EBFlow.score": (lambda x: VEC.score(x), (4, D), set()),
    "EBFlow.score(create_graph)": (lambda x: VEC.score(x, create_graph=True), (4, D), set()),
    "EBFlow.energy_and_grad": (lambda x: VEC.energy_and_grad(x), (4, D), set()),
    "EBFlow.log_prob": (lambda x: VEC.log_prob(x), (4, D), set()),
    "EBFlow.forward": (lambda x: VEC(x), (4, D), set()),
    "EBFlow.forward_with_log_det": (lambda x: VEC.forward_with_log_det(x), (4, D), set()),
    "EBFlow.inverse": (lambda z: VEC.inverse(z), (4, D), set()),
    "EBFlow.initialize": (lambda x: VEC.initialize(x), (4, D), set()),
    "EBFlow.in_domain": (lambda x: VEC.in_domain(x), (4, D), set()),
    "EBFlow.linear_prefix(x)": (lambda x: VEC.linear_prefix(x, GOOD), (4, D), set()),
    "EBFlow.linear_prefix(direction)": (lambda v: VEC.linear_prefix(GOOD, v), (4, D), set()),
    "EBFlow.tail_energy": (lambda h: VEC.tail_energy(h), (4, D), set()),
    "ml_loss": (_noise_free(ml_loss), (4, D), set()),
    "sml_loss": (_noise_free(sml_loss), (4, D), set()),
    "ssm_loss": (_noise_free(ssm_loss), (4, D), set()),
    "dsm_loss": (lambda x: dsm_loss(VEC, x, 0.1), (4, D), set()),
    "fdssm_loss": (lambda x: fdssm_loss(VEC, x, 0.1), (4, D), set()),
    "esm_loss": (_noise_free(esm_loss), (4, D), set()),
    **{
        f"Objective[{name}]": (lambda x, name=name: make_objective(name)(VEC, x), (4, D), set())
        for name in ("ml", "sml", "ssm", "dsm", "fdssm", "esm")
    },
    "Objective[dsm] with energy_reg": (
        lambda x: make_objective("dsm", energy_reg=0.1)(VEC, x),
        (4, D),
        set(),
    ),
    "ImagePreprocessing.dequantize": (
        lambda p: PRE.dequantize(p),
        (2, 1, 4, 4),
        {"int tensor", "wrong shape", "float32 for a float64 model"},
    ),
    "ImagePreprocessing.forward": (
        lambda x: PRE(x),
        (2, 1, 4, 4),
        {"wrong shape", "float32 for a float64 model"},
    ),
    "ImagePreprocessing.inverse": (
        lambda y: PRE.inverse(y),
        (2, 1, 4, 4),
        {"wrong shape", "float32 for a float64 model", "NaN"},
    ),
    "ImagePreprocessing.inverse_and_log_det": (
        lambda y: PRE.inverse_and_log_det(y),
        (2, 1, 4, 4),
        {"wrong shape", "float32 for a float64 model", "NaN"},
    ),
    "ImagePreprocessing.to_pixels": (
        lambda y: PRE.to_pixels(y),
        (2, 1, 4, 4),
        {"wrong shape", "float32 for a float64 model", "NaN"},
    ),
    "mcmc.langevin": (lambda x: langevin(VEC, x, 1, 0.1), (4, D), set()),
    "mcmc.ula": (lambda x: ula(VEC, x, 1, 0.1), (4, D), set()),
    "mcmc.mala": (lambda x: mala(VEC, x, 1, 0.1), (4, D), set()),
    "mcmc.default_step_size": (lambda x: default_step_size(VEC, x), (4, D), set()),
    "mcmc.refine_samples": (lambda x: refine_samples(VEC, x, 1, 0.1), (4, D), set()),
    "mcmc.refine_samples(0 steps)": (lambda x: refine_samples(VEC, x, 0), (4, D), set()),
    "mcmc.gaussian_blur": (
        lambda x: gaussian_blur(x),
        (2, 1, 4, 4),
        {"NaN", "float32 for a float64 model", "wrong shape"},
    ),
    "mcmc.PreprocessedSpaceEnergy.energy": (
        lambda y: PreprocessedSpaceEnergy(IMG, PRE).energy(y),
        (2, 1, 4, 4),
        {"NaN"},
    ),
    "inpainting.inpaint_images": (
        lambda im: inpaint_images(IMG, PRE, im, make_mask("center", (1, 4, 4)), steps=1),
        (2, 1, 4, 4),
        {"int tensor", "float32 for a float64 model"},
    ),
}

CASES = [
    (entry, kind)
    for entry, (_, shape, ok) in BATCH_ENTRY_POINTS.items()
    for kind in bad_inputs(shape)
    if kind not in ok
]


@pytest.mark.parametrize("entry, kind", CASES, ids=[f"{e}-{k}" for e, k in CASES])
def test_every_batch_entry_point_names_a_bad_batch(entry, kind):
    call, shape, _ = BATCH_ENTRY_POINTS[entry]
    bad, word = bad_inputs(shape)[kind]
    _expect_named_error(lambda: call(bad), word)


def test_the_dtype_message_says_how_to_convert():
    with pytest.raises(InputError) as info:
        VEC.score(torch.ones(4, D, dtype=torch.int64))
    assert str(info.value) == (
        "input x: expected a floating tensor of dtype float64, got int64; convert with x.to(model.dtype)"
    )
    with pytest.raises(InputError, match=r"convert with torch.as_tensor\(x, dtype=model.dtype\)"):
        VEC.score([[0.0] * D])


# -- entry points that take counts, numbers, options, generators --------------------------------
BAD_CALLS: dict[str, tuple[Callable[[], object], str]] = {
    "sample(True)": (lambda: VEC.sample(True), "positive integer"),
    "sample(False)": (lambda: VEC.sample(False), "positive integer"),
    "sample(0)": (lambda: VEC.sample(0), "positive integer"),
    "sample(2.0)": (lambda: VEC.sample(2.0), "positive integer"),
    "sample('3')": (lambda: VEC.sample("3"), "positive integer"),
    "sample(tensor)": (lambda: VEC.sample(torch.tensor(3)), "positive integer"),
    "sample(generator=int)": (lambda: VEC.sample(2, generator=0), "torch.Generator"),
    "objective with a non-EBFlow model": (lambda: ml_loss(torch.nn.Linear(D, D), GOOD), "EBFlow"),
    "Objective with a non-EBFlow model": (
        lambda: make_objective("dsm")(torch.nn.Linear(D, D), GOOD),
        "EBFlow",
    ),
    "dsm_loss(sigma='a')": (lambda: dsm_loss(VEC, GOOD, "a"), "sigma"),
    "dsm_loss(sigma=nan)": (lambda: dsm_loss(VEC, GOOD, float("nan")), "sigma"),
    "fdssm_loss(eps=None)": (lambda: fdssm_loss(VEC, GOOD, None), "eps"),
    "ssm_loss(slices=True)": (lambda: ssm_loss(VEC, GOOD, slices=True), "slices"),
    "ssm_loss(slices=1.5)": (lambda: ssm_loss(VEC, GOOD, slices=1.5), "slices"),
    "ssm_loss(projection='x')": (lambda: ssm_loss(VEC, GOOD, projection="x"), "projection"),
    "sml_loss(num_samples=True)": (lambda: sml_loss(VEC, GOOD, num_samples=True), "num_samples"),
    "dsm_loss(drop_out_of_domain='yes')": (
        lambda: dsm_loss(VEC, GOOD, 0.1, drop_out_of_domain="yes"),
        "drop_out_of_domain",
    ),
    "dsm_loss(noise=list)": (lambda: dsm_loss(VEC, GOOD, 0.1, noise=GOOD.tolist()), "torch.Tensor"),
    "dsm_loss(noise=int)": (
        lambda: dsm_loss(VEC, GOOD, 0.1, noise=torch.ones(4, D, dtype=torch.int64)),
        "floating",
    ),
    "ssm_loss(noise=NaN)": (lambda: ssm_loss(VEC, GOOD, noise=_nan((1, 4, D))), "non-finite"),
    "fdssm_loss(noise=ndarray)": (lambda: fdssm_loss(VEC, GOOD, 0.1, noise=np.zeros((4, D))), "ndarray"),
    "sml_loss(noise=int)": (
        lambda: sml_loss(VEC, GOOD, noise=torch.ones(4, D, dtype=torch.int64)),
        "floating",
    ),
    "make_objective(sigma='a')": (lambda: make_objective("dsm", sigma="a"), "sigma"),
    "make_objective(slices=True)": (lambda: make_objective("ssm", slices=True), "slices"),
    "make_objective(energy_reg='x')": (lambda: make_objective("dsm", energy_reg="x"), "energy_reg"),
    "Objective.draw_noise(int shape)": (
        lambda: make_objective("dsm").draw_noise(4, dtype=torch.float64, device=torch.device("cpu")),
        "batch_shape",
    ),
    "Objective.draw_noise(int dtype)": (
        lambda: make_objective("dsm").draw_noise((4, D), dtype=torch.int64, device=torch.device("cpu")),
        "dtype",
    ),
    "ImagePreprocessing(smoothness='a')": (lambda: ImagePreprocessing("a"), "smoothness"),
    "ImagePreprocessing(num_bins=2.5)": (lambda: ImagePreprocessing(num_bins=2.5), "num_bins"),
    "dequantize(generator=1)": (lambda: PRE.dequantize(PIXELS, generator=1), "torch.Generator"),
    "langevin(steps=True)": (lambda: langevin(VEC, GOOD, True, 0.1), "steps"),
    "langevin(steps=-1)": (lambda: langevin(VEC, GOOD, -1, 0.1), "steps"),
    "langevin(step_size='x')": (lambda: langevin(VEC, GOOD, 1, "x"), "step size"),
    "langevin(smoothness='x')": (lambda: langevin(VEC, GOOD, 1, 0.1, smoothness="x"), "smoothness"),
    "langevin(target_acceptance=2)": (
        lambda: mala(VEC, GOOD, 1, 0.1, target_acceptance=2.0),
        "target_acceptance",
    ),
    "langevin(generator='g')": (lambda: ula(VEC, GOOD, 1, 0.1, generator="g"), "torch.Generator"),
    "langevin(mask=list)": (lambda: ula(VEC, GOOD, 1, 0.1, mask=[True] * D), "mask"),
    "langevin(model=Linear)": (lambda: ula(torch.nn.Linear(D, D), GOOD, 1, 0.1), "energy"),
    "refine_samples(steps='2')": (lambda: refine_samples(VEC, GOOD, "2"), "steps"),
    "refine_samples(preprocessing=1)": (
        lambda: refine_samples(IMG, PIXELS, 1, 0.1, preprocessing=1),
        "ImagePreprocessing",
    ),
    "gaussian_blur(sigma='x')": (lambda: gaussian_blur(GOOD_IMG, "x"), "sigma"),
    "gaussian_blur(3-d)": (lambda: gaussian_blur(GOOD_IMG[0]), "(batch, C, H, W)"),
    "PreprocessedSpaceEnergy(preprocessing=None)": (
        lambda: PreprocessedSpaceEnergy(IMG, None),
        "ImagePreprocessing",
    ),
    "make_mask(spec=3)": (lambda: make_mask(3, (1, 4, 4)), "mask spec"),
    "make_mask(event_shape=4)": (lambda: make_mask("center", 4), "event_shape"),
    "make_mask(batch=True)": (lambda: make_mask("random:0.5", (1, 4, 4), batch=True), "batch"),
    "make_mask(unknown)": (lambda: make_mask("middle", (1, 4, 4)), "unknown mask"),
    "inpaint_images(steps='5')": (
        lambda: inpaint_images(IMG, PRE, PIXELS, make_mask("center", (1, 4, 4)), steps="5"),
        "steps",
    ),
    "inpaint_images(mask=list)": (lambda: inpaint_images(IMG, PRE, PIXELS, [[True]], steps=1), "mask"),
    "inpaint_images(preprocessing=str)": (
        lambda: inpaint_images(IMG, "logit", PIXELS, make_mask("center", (1, 4, 4)), steps=1),
        "ImagePreprocessing",
    ),
    "inpaint_images(denoise_sigma=None)": (
        lambda: inpaint_images(IMG, PRE, PIXELS, make_mask("center", (1, 4, 4)), steps=1, denoise_sigma=None),
        "denoise_sigma",
    ),
    "inpainting_grid(dict)": (lambda: inpainting_grid({}), "InpaintResult"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_every_option_and_count_is_checked(name):
    call, word = BAD_CALLS[name]
    _expect_named_error(call, word)


def test_valid_calls_still_work():
    """The checks refuse nothing valid: NumPy integers as counts, integer pixels, a model in
    float64 with float64 input, and the objectives inside torch.no_grad()."""
    assert VEC.sample(np.int64(2)).shape == (2, D)
    assert (
        PRE.dequantize(torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)).dtype
        == torch.get_default_dtype()
    )
    with torch.no_grad():
        for name in ("ml", "ssm", "dsm", "fdssm", "esm"):
            assert torch.isfinite(make_objective(name)(VEC, GOOD))
    assert make_mask("random:0.5", (1, 4, 4), batch=np.int64(2)).shape == (2, 1, 4, 4)
