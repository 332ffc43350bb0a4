"""Pictures of a run: a grid of image samples, or samples and the density of 2-D data."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..._optional import require
from ...errors import ConfigError
from ...images import image_grid
from ..evaluation.toy_metrics import mixture_log_prob
from ..rundir.files import OutputError, os_reason
from ..rundir.load import LoadedRun, draw_samples, samples_to_pixels
from .picture import write_picture

__all__ = ["IMAGE_SUFFIXES", "prepare_output", "pyplot", "save_samples", "save_density_plot", "save_curves"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def pyplot(purpose: str) -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), or a one-line
    :class:`~ebflow.errors.MissingDependencyError` naming ``ebflow[plots]``: ``"{purpose} needs
    matplotlib: ..."``."""
    require("matplotlib", purpose=purpose).use("Agg")
    return require("matplotlib.pyplot", purpose=purpose)


def prepare_output(out: str | Path) -> Path:
    """Check an output picture's path before any work is done: a .png/.jpg file name whose
    folder exists (it is created) and is not a file."""
    out = Path(out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(f"the output {str(out)!r} must be a file name ending in .png or .jpg")
    if out.is_dir():
        raise ConfigError(f"the output {str(out)!r} is a folder; give a file name ending in .png")
    for folder in (out.parent, *out.parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise OutputError(f"cannot write {str(out)!r}: {str(folder)!r} is a file, not a folder")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"cannot create the folder {str(out.parent)!r} for {str(out)!r}: {os_reason(err)}"
        ) from err
    return out


@contextmanager
def _writing(out: Path) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        raise OutputError(f"could not write {str(out)!r}: {os_reason(err)}") from err


def save_samples(run: LoadedRun, out: str | Path, n: int, *, seed: int = 0, refine: int = 0) -> Path:
    """An image grid (image data) or a scatter plot over the
    learned density (point data; needs matplotlib, the ``plots`` extra)."""
    out = prepare_output(out)
    x = draw_samples(run, n, seed=seed, refine=refine).cpu()
    if run.is_image:
        pixels = samples_to_pixels(run, x) / (run.preprocessing.num_bins - 1)  # type: ignore[union-attr]
        if pixels.shape[-1] < 32:  # enlarge tiny images (8x8 digits) so the grid is readable
            factor = math.ceil(32 / pixels.shape[-1])
            pixels = torch.nn.functional.interpolate(pixels, scale_factor=factor, mode="nearest")
        grid = image_grid(
            pixels.float(), max(1, math.ceil(math.sqrt(n))), padding=2, pad_value=0.5
        )  # grey gaps: black-background digits stay apart
        return write_picture(out, grid, "sample picture")
    _scatter_plot(run, x, out)
    return out


def _grid(run: LoadedRun, lo: Tensor, hi: Tensor, size: int = 200) -> tuple[Tensor, Tensor, Tensor]:
    xs = torch.linspace(float(lo[0]), float(hi[0]), size, dtype=torch.float64)
    ys = torch.linspace(float(lo[1]), float(hi[1]), size, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    with torch.no_grad():
        logp = torch.cat(
            [
                run.model.log_prob(p.to(run.model.device, run.model.dtype)).double().cpu()
                for p in pts.split(10000)
            ]
        )
    return gx, gy, logp.reshape(size, size)


def _bounds(x: Tensor) -> tuple[Tensor, Tensor]:
    lo, hi = x.min(0).values, x.max(0).values
    pad = 0.1 * (hi - lo)
    return lo - pad, hi + pad


def _scatter_plot(run: LoadedRun, x: Tensor, out: Path) -> None:
    plt = pyplot(f"the plot {out.name}")

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
        ax.set_title(
            f"{run.config.runtime.name} ({run.config.objective.loss}): samples over the model density"
        )
    else:
        ax.scatter(ref[:, 0].numpy(), ref[:, 1].numpy(), s=2, alpha=0.3, label="test data")
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, alpha=0.3, label="samples")
        ax.legend()
        ax.set_title(f"{run.config.runtime.name}: dimensions 1 and 2")
    _save(fig, out)


def _save(fig, out: Path) -> None:
    """Write a figure and close it; a failed write is an ``OutputError``."""
    plt = pyplot(out.name)
    fig.tight_layout()
    try:
        with _writing(out):
            fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)


def save_density_plot(run: LoadedRun, out: str | Path) -> Path:
    """2-D data: the data density (when known) next to the model density (needs matplotlib)."""
    plt = pyplot(f"the plot {Path(out).name}")

    out = Path(out)
    splits = run.splits()
    lo, hi = _bounds(splits.test.double())
    gx, gy, logp = _grid(run, lo, hi)
    panels = [("model", logp.exp())]
    if splits.mixture is not None:
        pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
        panels.insert(
            0, ("data (smoothed points)", mixture_log_prob(splits.mixture, pts).reshape(gx.shape).exp())
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (title, dens) in zip(axes[0], panels, strict=True):
        ax.pcolormesh(gx.numpy(), gy.numpy(), dens.numpy(), shading="auto", cmap="viridis")
        ax.set_title(title)
        ax.set_aspect("equal")
    _save(fig, out)
    return out


def save_curves(metrics_csv: str | Path, out: str | Path, title: str = "") -> Path:
    """``curves.png`` of a run: the training loss and the validation NLL of ``metrics.csv``
    against steps (left) and against training time (right); written atomically. Needs
    matplotlib (the ``plots`` extra)."""
    import csv
    import io

    plt = pyplot(Path(out).name)

    from ..rundir.files import write_atomic

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))

    def series(column: str, x: str) -> tuple[list[float], list[float]]:
        pts = [(float(r[x]), float(r[column])) for r in rows if r.get(column) and r.get(x)]
        pts = [(a, b) for a, b in pts if math.isfinite(a) and math.isfinite(b)]
        return [a for a, _ in pts], [b for _, b in pts]

    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex="col", squeeze=False)
    for col, (x, xlabel) in enumerate((("step", "step"), ("train_s", "training time (s)"))):
        for row, (column, label) in enumerate(
            (("loss", "training loss"), ("val_nll", "validation NLL (nats)"))
        ):
            ax = axes[row][col]
            xs, ys = series(column, x)
            ax.plot(xs, ys, marker="." if column == "val_nll" else None, lw=1)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[1][col].set_xlabel(xlabel)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=80)
    finally:
        plt.close(fig)
    return write_atomic(Path(out), lambda f: f.write(buf.getvalue()), "curves")
