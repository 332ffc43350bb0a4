"""One training process per run directory: ``train.lock``, created exclusively (``O_EXCL``),
holds the holder's PID, host and start time, and goes when the run ends (also on an error or
a stopping signal, which the command line turns into an exception).

A second process that wants to train the same run refuses in one line naming the holder. A lock
left behind by a process that was killed (``SIGKILL``, power loss) is *stale* when it names
this host and a PID that no longer runs: it is taken over, with a note. A lock of another host
cannot be checked from here, so it is refused (the message says which file to delete once that
host no longer trains the run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path

from ...errors import ConfigError
from .files import OutputError, os_reason

logger = logging.getLogger(__name__)

__all__ = ["LOCK_FILE", "RunLockedError", "RunLock"]

LOCK_FILE = "train.lock"


class RunLockedError(ConfigError):
    """Another process trains this run directory."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


class RunLock:
    """The lock of ``run_dir``: :meth:`acquire` (refuses when held), :meth:`release` (only a
    lock this object took)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.token: str | None = None

    def _read(self) -> dict:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Take the lock; raises :class:`RunLockedError` when a live process holds it."""
        token = secrets.token_hex(8)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": token,
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                self._recover_or_refuse()
                continue
            except OSError as err:
                raise OutputError(f"could not create the lock {str(self.path)!r}: {os_reason(err)}") from err
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(info) + "\n")
            self.token = token
            return
        raise RunLockedError(f"could not take the lock {str(self.path)!r}: other processes keep taking it")

    def _recover_or_refuse(self) -> None:
        holder = self._read()
        pid, host = holder.get("pid"), holder.get("host")
        here = socket.gethostname()
        if not isinstance(pid, int) or not isinstance(host, str):
            if time.time() - self._mtime() < 5:  # being written by its holder right now
                time.sleep(0.2)
                return
            what = "a damaged lock"
        elif host == here and not _pid_alive(pid):
            what = f"a stale lock of process {pid} (no longer running)"
        else:
            where = "this host" if host == here else f"host {host!r}"
            raise RunLockedError(
                f"{str(self.path.parent)!r} is being trained by process {pid} on {where} (since "
                f"{holder.get('started', '?')}); wait for it to end, or stop it. If it no longer "
                f"runs, delete {str(self.path)!r}"
            )
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        logger.warning("note: removed %s: %s", what, self.path)

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def release(self) -> None:
        """Remove the lock if this object holds it (a lock taken over by another process
        after ours was removed by hand stays)."""
        if self.token is None:
            return
        if self._read().get("token") == self.token:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.token = None

    @property
    def held(self) -> bool:
        return self.token is not None
