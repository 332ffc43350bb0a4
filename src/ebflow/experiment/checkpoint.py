"""Checkpoints written atomically and read safely, and the run directory that owns them.

A checkpoint is a plain dictionary of tensors, numbers, strings, lists and dicts, saved with
``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over the
target (``os.replace`` is atomic), so a crash never leaves a half-written checkpoint behind.
It carries a SHA-256 digest of its own content, checked on load: ``torch.load`` alone does not
notice flipped bytes inside a tensor. Loading uses ``torch.load(..., weights_only=True)``, which
never runs code from the file. Every failure to read one is a :class:`CheckpointError` naming
the file; every failure to write one is an :class:`OutputError` naming it.

A run directory is created with ``run.json`` holding a random run id; its checkpoints carry
that id, and a run resumes only from checkpoints that carry it (:func:`check_owner`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, EBFlowError
from .config import FIELDS, RESUMABLE_KEYS, load_config, validate_config

__all__ = ["CheckpointError", "OutputError", "save_checkpoint", "load_checkpoint", "state_digest",
           "write_text_atomic", "os_reason", "first_line", "check_new_run_dir", "claim_run_dir", "read_run_id",
           "check_owner", "remove_temp_files", "resume_command", "FORMAT", "VERSION", "RUN_FILE"]

FORMAT = "ebflow-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "config", "model", "ema", "step")
RUN_FILE = "run.json"
#: What ebflow writes into a run directory (a folder holding any of them is a run's).
RUN_FILES = (RUN_FILE, "config.yaml", "metrics.csv", "results.json", "checkpoints", "tensorboard",
             "samples.png", "density.png")
_WRITTEN = ("last.pt", "best.pt", RUN_FILE, "config.yaml", "results.json")  # via temporary files


class CheckpointError(EBFlowError):
    """A checkpoint is missing, truncated, corrupted or does not belong to the run."""


class OutputError(EBFlowError):
    """A file or folder could not be written; the message says which and why."""


def os_reason(err: OSError) -> str:
    """``No space left on device``, ``Permission denied``, ...: the reason of an OSError."""
    return err.strerror or str(err) or type(err).__name__


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


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


def _write_atomic(path: Path, write: Any, what: str) -> Path:
    """``write(f)`` into a temporary file next to ``path``, flushed, then renamed over it."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        name = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        tmp = name
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass  # removed at the run's next start (remove_temp_files)
        if isinstance(err, OSError):
            raise OutputError(f"could not write {what} {str(path)!r}: {os_reason(err)}") from err
        raise
    return path


def write_text_atomic(path: str | Path, text: str, what: str = "file") -> Path:
    """Write ``text`` (UTF-8) atomically: readers see the old file or the new one, never a part."""
    return _write_atomic(Path(path), lambda f: f.write(text.encode("utf-8")), what)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` (plus format tag, version and digest) atomically to ``path``; an
    :class:`OutputError` (disk full, read-only folder) leaves the previous file intact."""
    payload = {**state, "format": FORMAT, "version": VERSION}
    payload["digest"] = state_digest(payload)
    return _write_atomic(Path(path), lambda f: torch.save(payload, f), "checkpoint")


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    text = str(err).strip()
    if "weights only load failed" in text.lower():
        # torch's refusal of a pickle that would run code; drop its advice to load it unsafely
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        why = next((ln for ln in lines[1:] if "weights_only" not in ln and "trusted" not in ln
                    and "documentation" not in ln), "it asks to construct objects")
        return CheckpointError(f"checkpoint {str(path)!r} was refused: it is not a plain checkpoint "
                               f"of tensors and values ({why[:200]}); ebflow never runs code from a file")
    return CheckpointError(f"checkpoint {str(path)!r} cannot be read: it is truncated, corrupted or "
                           f"not an ebflow checkpoint ({type(err).__name__}: {first_line(err, 200)})")


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
        f = open(path, "rb")
    except OSError as err:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {os_reason(err)}") from err
    try:
        with f:
            state = torch.load(f, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file makes the unpickler raise anything
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


# -- the run directory ----------------------------------------------------------------------------
def resume_command(run_dir: str | Path) -> str:
    """The command that continues the run in ``run_dir``."""
    return f"ebflow train --resume {shlex.quote(str(run_dir))}"


def check_new_run_dir(run_dir: Path) -> None:
    """A new run goes into a new or empty folder only: never over another run's files (or
    anybody's). Raises :class:`~ebflow.errors.ConfigError` saying why not."""
    if not run_dir.exists():
        return
    where = str(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{where!r} is an existing file; --out must name a new or empty folder")
    held = [n for n in ("last.pt", "best.pt") if (run_dir / "checkpoints" / n).is_file()]
    if held:
        raise ConfigError(f"{where!r} already holds a run (checkpoints/{held[0]}); use --resume {where} "
                          "to continue it, or choose another --out")
    ours = [n for n in RUN_FILES if (run_dir / n).exists()]
    if ours:
        raise ConfigError(f"{where!r} holds files of an ebflow run ({', '.join(ours)}) but no checkpoint "
                          "to resume; ebflow never overwrites them: choose another --out or delete them")
    if any(run_dir.iterdir()):
        raise ConfigError(f"{where!r} is not empty and not an ebflow run; choose a new or empty "
                          "folder for --out")


def claim_run_dir(run_dir: Path) -> str:
    """Create the run directory of a new run and its ``run.json``; returns the new run id."""
    check_new_run_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"could not create the run directory {str(run_dir)!r}: {os_reason(err)}") from err
    run_id = secrets.token_hex(8)
    info = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:  # exclusive: of two runs started into the same folder at once, one wins
        with open(run_dir / RUN_FILE, "x", encoding="utf-8") as f:
            f.write(json.dumps(info) + "\n")
    except FileExistsError:
        raise ConfigError(f"{str(run_dir)!r} was taken by another run started at the same time") from None
    except OSError as err:
        raise OutputError(f"could not write {str(run_dir / RUN_FILE)!r}: {os_reason(err)}") from err
    return run_id


def read_run_id(run_dir: Path) -> str | None:
    """The id in ``run_dir/run.json`` (None for runs made before run ids existed)."""
    path = run_dir / RUN_FILE
    if not path.exists():
        return None
    try:
        run_id = json.loads(path.read_text(encoding="utf-8"))["run_id"]
        if isinstance(run_id, str) and run_id:
            return run_id
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise CheckpointError(f"{str(path)!r} is damaged; it names the run that owns {str(run_dir)!r}, "
                          "so ebflow does not resume there")


def check_owner(run_dir: Path, ckpt: Path, state: Mapping[str, Any]) -> None:
    """Refuse a checkpoint that does not belong to the run in ``run_dir``: its run id must be
    the one in ``run.json`` (a run made before run ids: none), and its config must be the
    run's ``config.yaml`` except for the keys a resume may change."""
    own, theirs = read_run_id(run_dir), state.get("run_id")
    refuse = (f"checkpoint {str(ckpt)!r} does not belong to the run in {str(run_dir)!r}"
              if own is not None or theirs is not None else "")
    if own != theirs:
        raise CheckpointError(f"{refuse}: it was written by run {theirs or '(no id)'}, this folder's "
                              f"run is {own or '(no id)'}; ebflow does not resume it here")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        if own is None:
            raise CheckpointError(f"cannot tell whether {str(ckpt)!r} belongs to {str(run_dir)!r}: "
                                  f"the folder has neither {RUN_FILE} nor config.yaml")
        return
    try:
        run_config = validate_config(load_config(str(saved))).to_dict()
    except ConfigError as err:
        raise ConfigError(f"{str(saved)!r}: {err}") from err
    try:
        ckpt_config = validate_config(state["config"]).to_dict()
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} holds an invalid config: {err}") from err
    diff = [k for k in FIELDS if k not in RESUMABLE_KEYS and run_config[k] != ckpt_config[k]]
    if diff:
        shown = ", ".join(f"{k}={ckpt_config[k]!r} (run: {run_config[k]!r})" for k in diff[:3])
        raise CheckpointError(f"checkpoint {str(ckpt)!r} does not belong to the run in {str(run_dir)!r}: "
                              f"it was trained with {shown}; ebflow does not resume it here")


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files of writes that a crash interrupted; returns them."""
    gone = []
    for folder in (run_dir, run_dir / "checkpoints"):
        for name in _WRITTEN:
            for tmp in folder.glob(f".{name}.*.tmp"):
                try:
                    tmp.unlink()
                    gone.append(tmp)
                except OSError:
                    pass
    return gone
