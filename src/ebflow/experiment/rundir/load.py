"""Finished (or running) training runs: load a run's EMA model, evaluate it, sample and plot.

``load_run(path)`` accepts a run directory (it picks ``checkpoints/best.pt``, else ``last.pt``)
or a checkpoint file, and rebuilds the model from the config stored in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ...ema import EMA
from ...errors import ConfigError
from ...flow import EBFlow
from ...image_flow import ImageFlow
from ...mcmc import refine_samples
from ...preprocessing import ImagePreprocessing
from ..config.builders import build_model, build_preprocessing
from ..config.schema import RunConfig, validate_config
from ..data.datasets import load_data
from ..data.splits import DataSplits
from ..evaluation.nll import EVAL_SEED_OFFSET, evaluate_nll
from ..evaluation.toy_metrics import toy_metrics
from ..parallel.devices import resolve_device
from .checkpoint import CheckpointError, load_checkpoint
from .files import first_line

__all__ = [
    "LoadedRun",
    "load_run",
    "load_run_and_raw_weights",
    "swap_weights",
    "find_checkpoint",
    "draw_samples",
    "samples_to_pixels",
]


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint meant by ``path``: a file, or a run dir's best.pt (else last.pt)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (
            path / "checkpoints" / "best.pt",
            path / "checkpoints" / "last.pt",
            path / "best.pt",
            path / "last.pt",
        ):
            if candidate.is_file():
                return candidate
        raise CheckpointError(
            f"{str(path)!r} holds no checkpoints/best.pt or checkpoints/last.pt; is it a run directory?"
        )
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
    config: RunConfig
    run_dir: Path
    checkpoint: Path
    step: int
    _splits: DataSplits | None = field(default=None, repr=False)

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The model's event shape (one example's shape, in the model's input space)."""
        return tuple(self.model.event_shape)

    @property
    def is_image(self) -> bool:
        """True for image data (the run has an :class:`~ebflow.ImagePreprocessing`)."""
        return self.preprocessing is not None

    def splits(self) -> DataSplits:
        """The run's data splits (train, val, test), loaded on first use and kept."""
        if self._splits is None:
            self._splits = load_data(self.config.data, num_bins=self.config.preprocessing.num_bins)
        return self._splits

    def data(self, split: str) -> Tensor:
        """Raw data of a split: pixel levels (0..255 floats, digits 0..16) or points."""
        return self.splits().split(split)

    @property
    def image_flow(self) -> ImageFlow | None:
        """The model with its preprocessing (likelihood and samples in pixel space), or ``None``
        for data that are not images."""
        if self.preprocessing is None:
            return None
        return ImageFlow(self.model, self.preprocessing, use_map=self.map)

    @property
    def eval_seed(self) -> int:
        """The seed of the dequantisation noise used by :meth:`evaluate` (and ``ebflow eval``):
        ``image_flow.nll(run.data(split), seed=run.eval_seed, batch_size=...)`` gives its number."""
        return self.config.runtime.seed + EVAL_SEED_OFFSET

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Exact NLL (nats per example, bits/dim; for images in pixel space, as
        :meth:`ebflow.ImageFlow.nll`); for 2-D toys also KL and Fisher divergence."""
        splits = self.splits()
        x = splits.split(split)
        batch_size = self.config.bookkeeping.eval_batch_size
        out = evaluate_nll(self.model, x, self.preprocessing, self.map, batch_size, seed=self.eval_seed)
        if splits.mixture is not None:
            out.update(toy_metrics(self.model, splits.mixture, x, batch_size))
        return out


def load_run(
    path: str | Path,
    device: str | torch.device | None = None,
    *,
    splits: DataSplits | None = None,
    weights: str = "ema",
) -> LoadedRun:
    """Load a run dir or checkpoint: the model with EMA weights (``weights="raw"``: the
    optimiser's own weights), in eval mode, on ``device`` (default: cpu). ``splits`` may pass
    already loaded data. Also available as ``ebflow.load_run``::

        run = ebflow.load_run("runs/digits-fc-ssm-20250101-120000")  # or .../checkpoints/last.pt
        metrics = run.evaluate("test")   # exact NLL: {'nll': nats per example, 'bpd': bits/dim, ...}
        x = run.model.sample(16)         # exact samples; run.model.log_prob(x), run.config, run.step
    """
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights must be 'ema' or 'raw', got {weights!r}")
    return _load(path, device, splits, weights)[0]


def load_run_and_raw_weights(
    path: str | Path, device: str | torch.device | None = None, *, splits: DataSplits | None = None
) -> tuple[LoadedRun, dict[str, Tensor]]:
    """:func:`load_run`'s EMA model and the checkpoint's raw weights (the optimiser's own, as a
    state dict on the CPU), from one read of the checkpoint. The final test evaluates both by
    swapping them (:func:`swap_weights`): keeping them costs one copy of the model's state, where
    a second :func:`load_run` would read the whole checkpoint again (optimiser state included)."""
    return _load(path, device, splits, "ema")


@torch.no_grad()
def swap_weights(model: torch.nn.Module, weights: dict[str, Tensor]) -> None:
    """Exchange ``model``'s state with ``weights`` in place, tensor by tensor: afterwards the
    model holds ``weights`` and ``weights`` the model's former values (a second call undoes it).
    ``weights`` must be a state dict of the same model (same keys and shapes)."""
    state = model.state_dict(keep_vars=True)
    if state.keys() != weights.keys():
        missing, extra = sorted(state.keys() - weights.keys()), sorted(weights.keys() - state.keys())
        raise CheckpointError(f"the weights do not fit the model (missing {missing}, unexpected {extra})")
    for key, live in state.items():
        other = weights[key]
        if live.shape != other.shape:
            raise CheckpointError(
                f"the weights do not fit the model: {key} has shape {tuple(other.shape)}, "
                f"the model's {tuple(live.shape)}"
            )
    swapped: set[int] = set()
    for key, live in state.items():
        if live.data_ptr() in swapped:  # a tensor shared by two keys is swapped once
            continue
        swapped.add(live.data_ptr())
        held = live.detach().clone()
        live.copy_(weights[key])
        weights[key].copy_(held)


def _load(
    path: str | Path, device: str | torch.device | None, splits: DataSplits | None, weights: str
) -> tuple[LoadedRun, dict[str, Tensor]]:
    """The run of :func:`load_run` and its checkpoint's raw weights (``state["model"]``)."""
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    ckpt = find_checkpoint(path)
    state = load_checkpoint(ckpt)
    try:
        config = validate_config(state["config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} holds an invalid config: {err}") from err
    if not state.get("event_shape"):
        raise CheckpointError(f"checkpoint {str(ckpt)!r} does not record the data's event shape")
    try:
        event_shape = tuple(int(s) for s in state["event_shape"])
        pre = build_preprocessing(config.preprocessing, state.get("num_bins"))
        model = build_model(
            config.model, event_shape, pre, use_map=config.preprocessing.map, for_loading=True
        )
        model.load_state_dict(state["model"])
        ema = EMA(model, config.optim.ema_decay)
        ema.load_state_dict(state["ema"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, ConfigError) as err:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} does not match the model of its own config: "
            f"its tensors do not fit ({first_line(err)})"
        ) from err
    if weights == "ema":
        ema.copy_to_model()
    model.to(dev).eval()
    run = LoadedRun(
        model,
        pre,
        config.preprocessing.map and pre is not None,
        config,
        _run_dir_of(ckpt),
        ckpt,
        int(state["step"]),
        splits,
    )
    return run, state["model"]


# -- sampling ----------------------------------------------------------------------------------
@torch.no_grad()
def draw_samples(run: LoadedRun, n: int, *, seed: int = 0, refine: int = 0) -> Tensor:
    """``n`` exact samples in the model's input space (optionally refined by ``refine`` MCMC
    steps of :func:`ebflow.mcmc.refine_samples`)."""
    g = torch.Generator(device=run.model.device).manual_seed(seed)
    x = run.model.sample(n, generator=g)
    if refine:
        # MaP models refine in their own (preprocessed) input space; models with the
        # preprocessing inside refine on its logit-space image and return model-space values.
        pre = run.preprocessing if run.is_image and not run.map else None
        if pre is not None:
            # dequantised pixels must lie strictly inside (0, num_bins) for the logit
            top = float(pre.num_bins)
            margin = 1e-3 * top
            x = torch.nan_to_num(x, nan=top / 2).clamp(margin, top - margin)
        model = run.model
        if pre is not None:
            # The chain's logit-space states pass through the model's own sigmoid/logit pair;
            # float64 keeps them away from sigmoid's saturation at 0 and 1.
            import copy

            model, x = copy.deepcopy(run.model).double(), x.double()
        with torch.enable_grad():
            x = refine_samples(model, x, steps=refine, generator=g, preprocessing=pre).to(run.model.dtype)
    return x


def samples_to_pixels(run: LoadedRun, x: Tensor) -> Tensor:
    """Model-space image samples -> pixel levels in ``[0, num_bins - 1]`` (non-finite -> 0)."""
    images = run.image_flow
    assert images is not None
    return images.to_pixels(x)
