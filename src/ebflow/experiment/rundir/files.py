"""Files of the application written atomically, and the messages of failed reads and writes.

A file is written to a temporary file in the same folder, flushed to disk, then renamed over the
target (``os.replace`` is atomic), so a crash never leaves a half-written file behind. Every
failure to write one is an :class:`OutputError` naming it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

from ...errors import EBFlowError

__all__ = ["OutputError", "os_reason", "first_line", "write_atomic", "write_text_atomic"]


class OutputError(EBFlowError):
    """A file or folder could not be written; the message says which and why."""


def os_reason(err: OSError) -> str:
    """``No space left on device``, ``Permission denied``, ...: the reason of an OSError."""
    return err.strerror or str(err) or type(err).__name__


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def write_atomic(path: Path, write: Any, what: str) -> Path:
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
            with contextlib.suppress(OSError):  # else removed at the run's next start (remove_temp_files)
                os.unlink(tmp)
        if isinstance(err, OSError):
            raise OutputError(f"could not write {what} {str(path)!r}: {os_reason(err)}") from err
        raise
    return path


def write_text_atomic(path: str | Path, text: str, what: str = "file") -> Path:
    """Write ``text`` (UTF-8) atomically: readers see the old file or the new one, never a part."""
    return write_atomic(Path(path), lambda f: f.write(text.encode("utf-8")), what)
