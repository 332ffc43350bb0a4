"""The run directory: created with ``run.json`` holding a random run id; its checkpoints carry
that id, and a run resumes only from checkpoints that carry it (:func:`check_owner`). A new run
never goes over another run's files (:func:`check_new_run_dir`). One process at a time trains a
run directory: :mod:`ebflow.experiment.rundir.lock` (``train.lock``).
"""

from __future__ import annotations

import json
import secrets
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ..config.resolve import load_config
from ..config.schema import FIELDS, RESUMABLE_KEYS, validate_config
from .checkpoint import CheckpointError
from .files import OutputError, os_reason

__all__ = [
    "RUN_FILE",
    "RUN_FILES",
    "resume_command",
    "check_new_run_dir",
    "claim_run_dir",
    "read_run_id",
    "check_owner",
    "remove_temp_files",
]

RUN_FILE = "run.json"
#: What ebflow writes into a run directory (a folder holding any of them is a run's).
RUN_FILES = (
    RUN_FILE,
    "config.yaml",
    "metrics.csv",
    "results.json",
    "checkpoints",
    "tensorboard",
    "samples.png",
    "density.png",
    "train.lock",
)
_WRITTEN = ("last.pt", "best.pt", RUN_FILE, "config.yaml", "results.json")  # via temporary files


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
        raise ConfigError(
            f"{where!r} already holds a run (checkpoints/{held[0]}); use --resume {where} "
            "to continue it, or choose another --out"
        )
    ours = [n for n in RUN_FILES if (run_dir / n).exists()]
    if ours:
        raise ConfigError(
            f"{where!r} holds files of an ebflow run ({', '.join(ours)}) but no checkpoint "
            "to resume; ebflow never overwrites them: choose another --out or delete them"
        )
    if any(run_dir.iterdir()):
        raise ConfigError(
            f"{where!r} is not empty and not an ebflow run; choose a new or empty folder for --out"
        )


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
    raise CheckpointError(
        f"{str(path)!r} is damaged; it names the run that owns {str(run_dir)!r}, "
        "so ebflow does not resume there"
    )


def check_owner(run_dir: Path, ckpt: Path, state: Mapping[str, Any]) -> None:
    """Refuse a checkpoint that does not belong to the run in ``run_dir``: its run id must be
    the one in ``run.json`` (a run made before run ids: none), and its config must be the
    run's ``config.yaml`` except for the keys a resume may change."""
    own, theirs = read_run_id(run_dir), state.get("run_id")
    refuse = (
        f"checkpoint {str(ckpt)!r} does not belong to the run in {str(run_dir)!r}"
        if own is not None or theirs is not None
        else ""
    )
    if own != theirs:
        raise CheckpointError(
            f"{refuse}: it was written by run {theirs or '(no id)'}, this folder's "
            f"run is {own or '(no id)'}; ebflow does not resume it here"
        )
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        if own is None:
            raise CheckpointError(
                f"cannot tell whether {str(ckpt)!r} belongs to {str(run_dir)!r}: "
                f"the folder has neither {RUN_FILE} nor config.yaml"
            )
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
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} does not belong to the run in {str(run_dir)!r}: "
            f"it was trained with {shown}; ebflow does not resume it here"
        )


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
