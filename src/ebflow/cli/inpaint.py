"""``ebflow inpaint RUN_DIR``: mask images of a run's data, fill them by Langevin MCMC on the
energy (:mod:`ebflow.inpainting`), save a grid and print the masked-region errors."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from ..experiment.config.resolve import parse_overrides
from ..experiment.config.schema import RunConfig
from ..experiment.images.inpainting import mask_from_spec, save_inpainting_grid
from ..experiment.images.plots import prepare_output
from ..experiment.parallel.devices import resolve_device
from ..experiment.rundir.files import OutputError, os_reason
from ..experiment.rundir.load import load_run
from ..flow import EBFlow
from ..inpainting import inpaint_images
from ..mcmc import SCHEDULES, check_energy_model
from .common import seed_argument

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``ebflow inpaint``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory")
    parser.add_argument(
        "--mask",
        default="center",
        help="center|left|right|top|bottom|random:P|FILE.png (white = fill); default center",
    )
    parser.add_argument("--steps", type=int, default=500, help="MCMC iterations (default 500)")
    parser.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="Langevin step size (default: chosen from the score, then adapted for MALA)",
    )
    parser.add_argument(
        "--ula", action="store_true", help="unadjusted Langevin instead of MALA (no accept/reject)"
    )
    parser.add_argument(
        "--target-acceptance",
        type=float,
        default=0.574,
        help="MALA step-size adaptation target; 0 turns adaptation off (default 0.574)",
    )
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant", help="step-size schedule")
    parser.add_argument(
        "--final-step-size", type=float, default=None, help="last step size of a decaying schedule"
    )
    parser.add_argument(
        "--smoothness",
        type=float,
        default=0.0,
        help="weight of the pull toward the blurred image (default 0: off)",
    )
    parser.add_argument("--blur-sigma", type=float, default=1.0, help="blur width in pixels (default 1)")
    parser.add_argument(
        "--denoise-sigma",
        default="auto",
        help="finish with one Tweedie denoising step y + s^2 * score(y): a number s, "
        "0 (off), or auto (the run's DSM sigma for DSM-trained runs, else off)",
    )
    parser.add_argument(
        "--average",
        type=int,
        default=0,
        metavar="K",
        help="fill with the average of the chain's last K states (posterior-mean "
        "estimate: lower MSE, blurrier) instead of its last state (default 0)",
    )
    parser.add_argument("--num-images", type=int, default=8, help="test images to inpaint (default 8)")
    parser.add_argument("--split", default="test", help="data split to take images from (default test)")
    parser.add_argument("--seed", type=seed_argument, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--out", default=None, help="output PNG (default RUN_DIR/inpaint.png)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data keys of the run to change here: data_dir, download",
    )
    return parser


def _denoise_sigma(value: str, config: RunConfig | None) -> float:
    """``--denoise-sigma``: a number, or ``auto``: the DSM sigma of a run trained with DSM in
    the chain's (MaP) space, else 0. ``config`` None: only check an explicit value."""
    if str(value).lower() == "auto":
        # The chain runs in the MaP space; a run without MaP learnt its DSM sigma in pixel
        # units, which does not carry over, so it gets no automatic step.
        if config is None or config.objective.loss != "dsm" or not config.preprocessing.map:
            return 0.0
        return config.objective.sigma
    try:
        sigma = float(value)
    except ValueError:
        raise ConfigError(f"--denoise-sigma must be a number >= 0 or auto, got {value!r}") from None
    if not sigma >= 0:
        raise ConfigError(f"--denoise-sigma must be >= 0, got {value!r}")
    return sigma


def _as_image_tensor(data) -> Tensor:
    """Pixels from what a run's ``data(split)`` returns (a tensor, a pair, or a dataset)."""
    if isinstance(data, Tensor):
        return data
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
        return data[0]
    tensors = getattr(data, "tensors", None)  # TensorDataset
    if tensors:
        return tensors[0]
    raise ConfigError(f"cannot read images from the run's data (got {type(data).__name__})")


def run(args: argparse.Namespace) -> int:
    """``ebflow inpaint``: mask test images, fill them by MCMC, save a grid, print the MSEs."""
    if args.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {args.steps}")
    if args.step_size is not None and not args.step_size > 0:
        raise ConfigError(f"--step-size must be > 0, got {args.step_size}")
    if args.num_images < 1:
        raise ConfigError(f"--num-images must be >= 1, got {args.num_images}")
    if not 0 <= args.target_acceptance < 1:
        raise ConfigError(f"--target-acceptance must be in [0, 1), got {args.target_acceptance}")
    if not 0 <= args.average <= args.steps:
        raise ConfigError(f"--average must be between 0 and --steps ({args.steps}), got {args.average}")
    if str(args.denoise_sigma).lower() != "auto":
        _denoise_sigma(args.denoise_sigma, None)
    if args.out is not None and Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ConfigError(f"--out must name a .png (or .jpg) file, got {args.out!r}")
    device = resolve_device(args.device or "auto")
    if args.out is not None:
        prepare_output(args.out)
    loaded = load_run(args.run_dir, device=device)
    overrides = parse_overrides(args.overrides)
    bad = sorted(set(overrides) - {"data_dir", "download"})
    if bad:
        raise ConfigError(f"only data_dir and download may be set here, not {', '.join(bad)}")
    loaded.config = loaded.config.updated(overrides)
    denoise = _denoise_sigma(args.denoise_sigma, loaded.config)
    model = loaded.model
    if not isinstance(model, EBFlow):
        check_energy_model(model)
    images = _as_image_tensor(loaded.data(args.split))[: args.num_images]
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    event_shape = tuple(model.event_shape)
    if tuple(images.shape[1:]) != event_shape:
        if images[0].numel() != math.prod(event_shape):
            raise InputError(
                f"the run's {args.split} data have shape {tuple(images.shape[1:])}, the "
                f"model's events {event_shape}"
            )
        images = images.reshape(images.shape[0], *event_shape)
    mask = mask_from_spec(args.mask, event_shape, batch=images.shape[0], generator=generator)
    model.eval()
    result = inpaint_images(
        model,
        loaded.preprocessing,
        images,
        mask,
        steps=args.steps,
        step_size=args.step_size,
        metropolis=not args.ula,
        target_acceptance=args.target_acceptance or None,
        schedule=args.schedule,
        final_step_size=args.final_step_size,
        smoothness=args.smoothness,
        blur_sigma=args.blur_sigma,
        map_space=bool(getattr(loaded, "map", True)),
        denoise_sigma=denoise,
        average_last=args.average,
        generator=generator,
        progress=True,
    )
    out = Path(args.out) if args.out else Path(loaded.run_dir) / "inpaint.png"
    if loaded.preprocessing is not None:
        try:
            save_inpainting_grid(result, out, max_value=float(loaded.preprocessing.num_bins - 1))
        except OSError as err:
            raise OutputError(f"could not write {str(out)!r}: {os_reason(err)}") from err
        print(f"wrote {out} (rows: original / masked / filled)")
    else:
        print("data are not images: no grid written")
    acc = "" if result.acceptance_rate is None else f", MALA acceptance {result.acceptance_rate:.3f}"
    print(
        f"masked pixels: {int(result.mask.sum())} over {images.shape[0]} images ({args.mask}), "
        f"{args.steps} steps, final step size {result.step_size:.3g}{acc}"
    )
    after = f"after {result.mse_after:.4f}"
    if args.average:
        after += f" (average of the last {args.average} states; the last state alone {result.mse_chain:.4f})"
    elif denoise > 0:
        after += f" (chain's last state {result.mse_chain:.4f}, then a denoising step at sigma {denoise:g})"
    print(f"masked-region MSE (pixels in [0, 1]): before {result.mse_before:.4f} (noise start), {after}")
    return 0
