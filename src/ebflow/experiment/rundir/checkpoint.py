"""Checkpoints written atomically and read safely.

A checkpoint is a plain dictionary of tensors, numbers, strings, lists and dicts, saved with
``torch.save`` atomically (:func:`~ebflow.experiment.rundir.files.write_atomic`), so a crash never
leaves a half-written checkpoint behind. It carries a SHA-256 digest of its own content, checked
on load: ``torch.load`` alone does not notice flipped bytes inside a tensor. Loading uses
``torch.load(..., weights_only=True)``, which never runs code from the file. Every failure to
read one is a :class:`CheckpointError` naming the file; every failure to write one is an
:class:`~ebflow.experiment.rundir.files.OutputError` naming it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...errors import EBFlowError
from .files import first_line, os_reason, write_atomic

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "state_digest", "FORMAT", "VERSION"]

FORMAT = "ebflow-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "config", "model", "ema", "step")


class CheckpointError(EBFlowError):
    """A checkpoint is missing, truncated, corrupted or does not belong to the run."""


def _feed(h: hashlib._Hash, obj: Any) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        if t.numel():  # the tensor's own bytes, not a copy of them (200 MB at D = 7,056)
            h.update(t.view(torch.uint8).numpy().data)
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
    """Write ``state`` (plus format tag, version and digest) atomically to ``path``; an
    :class:`~ebflow.experiment.rundir.files.OutputError` (disk full, read-only folder) leaves the
    previous file intact."""
    payload = {**state, "format": FORMAT, "version": VERSION}
    payload["digest"] = state_digest(payload)
    return write_atomic(Path(path), lambda f: torch.save(payload, f), "checkpoint")


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    text = str(err).strip()
    if "weights only load failed" in text.lower():
        # torch's refusal of a pickle that would run code; drop its advice to load it unsafely
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        why = next(
            (
                ln
                for ln in lines[1:]
                if "weights_only" not in ln and "trusted" not in ln and "documentation" not in ln
            ),
            "it asks to construct objects",
        )
        return CheckpointError(
            f"checkpoint {str(path)!r} was refused: it is not a plain checkpoint "
            f"of tensors and values ({why[:200]}); ebflow never runs code from a file"
        )
    return CheckpointError(
        f"checkpoint {str(path)!r} cannot be read: it is truncated, corrupted or "
        f"not an ebflow checkpoint ({type(err).__name__}: {first_line(err, 200)})"
    )


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
        f = open(path, "rb")  # noqa: SIM115 - apart from the load, to tell an OSError; closed below
    except OSError as err:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {os_reason(err)}") from err
    try:
        with f:
            state = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as err:  # a damaged file makes the unpickler raise anything
        raise _unreadable(path, err) from err
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
    try:
        intact = state.get("digest") == state_digest(state)
    except Exception:  # noqa: BLE001 - values a damaged file produced may not even hash
        intact = False
    if not intact:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupted: its content does not match its SHA-256 digest"
        )
    return state
