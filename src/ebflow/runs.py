"""Finished (or running) training runs: load a run's EMA model, evaluate it, sample and plot.

``load_run(path)`` accepts a run directory (it picks ``checkpoints/best.pt``, else ``last.pt``)
or a checkpoint file, and rebuilds the model from the config stored in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CheckpointError, load_checkpoint
from .config import validate_config
from .data import DataSplits, load_data
from .ema import EMA
from .errors import ConfigError, EBFlowError
from .flow import EBFlow
from .preprocessing import ImagePreprocessing

__all__ = ["LoadedRun", "load_run", "find_checkpoint", "save_samples", "save_density_plot",
           "draw_samples", "samples_to_pixels"]


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint meant by ``path``: a file, or a run dir's best.pt (else last.pt)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt",
                          path / "best.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{str(path)!r} holds no checkpoints/best.pt or checkpoints/last.pt; "
                              "is it a run directory?")
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist (give a run directory or a .pt checkpoint)")
    return path


def _run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


@dataclass
class LoadedRun:
    """A trained model with EMA weights (eval mode) and everything needed to use it."""

    model: EBFlow
    preprocessing: ImagePreprocessing | None
    map: bool
    config: dict[str, Any]
    run_dir: Path
    checkpoint: Path
    step: int
    _splits: DataSplits | None = field(default=None, repr=False)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.model.event_shape)

    @property
    def is_image(self) -> bool:
        return self.preprocessing is not None

    def splits(self) -> DataSplits:
        if self._splits is None:
            self._splits = load_data(self.config)
        return self._splits

    def data(self, split: str) -> Tensor:
        """Raw data of a split: pixel levels (0..255 floats, digits 0..16) or points."""
        return self.splits().split(split)

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Exact NLL (nats per example, bits/dim); for 2-D toys also KL and Fisher divergence."""
        from .training import EVAL_SEED_OFFSET, evaluate_nll

        splits = self.splits()
        x = splits.split(split)
        out = evaluate_nll(self.model, x, self.preprocessing, self.map,
                           self.config["eval_batch_size"],
                           seed=self.config["seed"] + EVAL_SEED_OFFSET)
        if splits.mixture is not None:
            from .toy_metrics import toy_metrics

            out.update(toy_metrics(self.model, splits.mixture, x, self.config["eval_batch_size"]))
        return out


def load_run(
    path: str | Path, device: str | torch.device | None = None, *, splits: DataSplits | None = None,
    weights: str = "ema",
) -> LoadedRun:
    """Load a run dir or checkpoint: the model with EMA weights (``weights="raw"``: the
    optimiser's own weights), in eval mode, on ``device`` (default: cpu). ``splits`` may pass
    already loaded data."""
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights must be 'ema' or 'raw', got {weights!r}")
    from .training import build_model, build_preprocessing

    ckpt = find_checkpoint(path)
    state = load_checkpoint(ckpt)
    try:
        config = validate_config(state["config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} holds an invalid config: {err}") from err
    dev = torch.device(device) if device is not None else torch.device("cpu")
    event_shape = tuple(int(s) for s in state.get("event_shape", ()))
    if not event_shape:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} does not record the data's event shape")
    pre = build_preprocessing(config, state.get("num_bins"))
    model = build_model(config, event_shape, pre, for_loading=True)
    try:
        model.load_state_dict(state["model"])
        ema = EMA(model, config["ema_decay"])
        ema.load_state_dict(state["ema"])
    except (RuntimeError, KeyError, ValueError, TypeError, ConfigError) as err:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} does not match the model described by its config: "
            f"{str(err).splitlines()[0][:400]}"
        ) from err
    if weights == "ema":
        ema.copy_to_model()
    model.to(dev).eval()
    return LoadedRun(model, pre, bool(config["map"]) and pre is not None, config,
                     _run_dir_of(ckpt), ckpt, int(state["step"]), splits)


# -- sampling ----------------------------------------------------------------------------------
@torch.no_grad()
def draw_samples(run: LoadedRun, n: int, *, seed: int = 0, refine: int = 0) -> Tensor:
    """``n`` exact samples in the model's input space (optionally refined by ``refine`` MCMC
    steps of :func:`ebflow.mcmc.refine_samples`)."""
    g = torch.Generator(device=run.model.device).manual_seed(seed)
    x = run.model.sample(n, generator=g)
    if refine:
        try:
            from .mcmc import refine_samples
        except ImportError as err:
            raise EBFlowError(f"--refine needs the ebflow.mcmc module, which is unavailable: {err}") from err
        # MaP models refine in their own (preprocessed) input space; models with the
        # preprocessing inside refine on its logit-space image and return model-space values.
        extra = {}
        if run.is_image and not run.map:
            # dequantised pixels must lie strictly inside (0, num_bins) for the logit
            extra = {"preprocessing": run.preprocessing}
            top = float(run.preprocessing.num_bins)  # type: ignore[union-attr]
            margin = 1e-3 * top
            x = torch.nan_to_num(x, nan=top / 2).clamp(margin, top - margin)
        model = run.model
        if extra:
            # The chain's logit-space states pass through the model's own sigmoid/logit pair;
            # float64 keeps them away from sigmoid's saturation at 0 and 1.
            import copy

            model, x = copy.deepcopy(run.model).double(), x.double()
        with torch.enable_grad():
            x = refine_samples(model, x, steps=refine, generator=g, **extra).to(run.model.dtype)
    return x


def samples_to_pixels(run: LoadedRun, x: Tensor) -> Tensor:
    """Model-space image samples -> pixel levels in ``[0, num_bins - 1]`` (non-finite -> 0)."""
    pre = run.preprocessing
    assert pre is not None
    x = torch.nan_to_num(x.double(), nan=0.0, posinf=1e6, neginf=-1e6)
    if run.map:
        return pre.to_pixels(x)
    return x.floor().clamp(0, pre.num_bins - 1)


def save_samples(run: LoadedRun, out: str | Path, n: int, *, seed: int = 0, refine: int = 0) -> Path:
    """An image grid (image data) or a scatter plot over the learned density (point data)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = draw_samples(run, n, seed=seed, refine=refine).cpu()
    if run.is_image:
        from torchvision.utils import save_image

        pixels = samples_to_pixels(run, x) / (run.preprocessing.num_bins - 1)  # type: ignore[union-attr]
        if pixels.shape[-1] < 32:  # enlarge tiny images (8x8 digits) so the grid is readable
            factor = math.ceil(32 / pixels.shape[-1])
            pixels = torch.nn.functional.interpolate(pixels, scale_factor=factor, mode="nearest")
        save_image(pixels.float(), str(out), nrow=max(1, int(math.ceil(math.sqrt(n)))), padding=1)
        return out
    _scatter_plot(run, x, out)
    return out


def _grid(run: LoadedRun, lo: Tensor, hi: Tensor, size: int = 200) -> tuple[Tensor, Tensor, Tensor]:
    xs = torch.linspace(float(lo[0]), float(hi[0]), size, dtype=torch.float64)
    ys = torch.linspace(float(lo[1]), float(hi[1]), size, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    with torch.no_grad():
        logp = torch.cat([run.model.log_prob(p.to(run.model.device, run.model.dtype)).double().cpu()
                          for p in pts.split(10000)])
    return gx, gy, logp.reshape(size, size)


def _bounds(x: Tensor) -> tuple[Tensor, Tensor]:
    lo, hi = x.min(0).values, x.max(0).values
    pad = 0.1 * (hi - lo)
    return lo - pad, hi + pad


def _scatter_plot(run: LoadedRun, x: Tensor, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = x.double()
    x = x[torch.isfinite(x).all(dim=1)]
    ref = run.data("test").double()
    fig, ax = plt.subplots(figsize=(6, 6))
    if run.event_shape == (2,):
        lo, hi = _bounds(ref)
        gx, gy, logp = _grid(run, lo, hi)
        ax.pcolormesh(gx.numpy(), gy.numpy(), logp.exp().numpy(), shading="auto", cmap="viridis")
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, c="white", alpha=0.5, label="samples")
        ax.set_xlim(float(lo[0]), float(hi[0]))
        ax.set_ylim(float(lo[1]), float(hi[1]))
        ax.set_title(f"{run.config['name']} ({run.config['loss']}): samples over the model density")
    else:
        ax.scatter(ref[:, 0].numpy(), ref[:, 1].numpy(), s=2, alpha=0.3, label="test data")
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, alpha=0.3, label="samples")
        ax.legend()
        ax.set_title(f"{run.config['name']}: dimensions 1 and 2")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def save_density_plot(run: LoadedRun, out: str | Path) -> Path:
    """2-D data: the data density (when known) next to the model density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    splits = run.splits()
    lo, hi = _bounds(splits.test.double())
    gx, gy, logp = _grid(run, lo, hi)
    panels = [("model", logp.exp())]
    if splits.mixture is not None:
        from .toy_metrics import mixture_log_prob

        pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
        panels.insert(0, ("data (smoothed points)", mixture_log_prob(splits.mixture, pts)
                          .reshape(gx.shape).exp()))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (title, dens) in zip(axes[0], panels):
        ax.pcolormesh(gx.numpy(), gy.numpy(), dens.numpy(), shading="auto", cmap="viridis")
        ax.set_title(title)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def checkpoint_summary(state: Mapping[str, Any]) -> str:
    """One line about a checkpoint's progress."""
    return (f"step {state['step']}, epoch {state.get('epoch')}, best val NLL "
            f"{state.get('best_val_nll', float('nan')):.4f}")
