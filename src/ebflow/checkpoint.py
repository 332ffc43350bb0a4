"""Checkpoints written atomically and read safely.

A checkpoint is a plain dictionary of tensors, numbers, strings, lists and dicts, saved with
``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over the
target (``os.replace`` is atomic), so a crash never leaves a half-written checkpoint behind.
It carries a SHA-256 digest of its own content, checked on load: ``torch.load`` alone does not
notice flipped bytes inside a tensor. Loading uses ``torch.load(..., weights_only=True)``, which
never runs code from the file. Every failure is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import EBFlowError

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "state_digest", "FORMAT", "VERSION"]

FORMAT = "ebflow-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "config", "model", "ema", "step")


class CheckpointError(EBFlowError):
    """A checkpoint is missing, truncated, corrupted or does not match the run."""


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"V{obj!r}".encode())


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 over every key and value of ``state`` except ``"digest"`` (tensor bytes included)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "digest"})
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` (plus format tag, version and digest) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**state, "format": FORMAT, "version": VERSION}
    payload["digest"] = state_digest(payload)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint; raises :class:`CheckpointError` with the reason."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (an interrupted copy?)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            pickle.UnpicklingError, KeyError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read: it is truncated, corrupted or not an ebflow "
            f"checkpoint ({first[:300]})"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an ebflow checkpoint (no {FORMAT!r} tag)")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {state.get('version')!r}; this ebflow "
            f"reads version {VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the entries {missing}")
    if state.get("digest") != state_digest(state):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupted: its content does not match its SHA-256 digest"
        )
    return state
