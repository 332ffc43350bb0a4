"""What the command line shows: the ``ebflow`` logger's messages on stdout, one plain line
each (written through tqdm, so that they do not tear a progress bar on stderr), at the level of
``-q`` (warnings only) / default (INFO) / ``-v`` (DEBUG). Python warnings keep going to stderr.

The library itself stays silent: ``ebflow`` has a ``NullHandler`` and no other handler until the
command line (or the user) installs one."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable

__all__ = ["setup_logging", "ConsoleHandler", "format_warning"]


class ConsoleHandler(logging.Handler):
    """Each record as one line on the current ``sys.stdout`` (read at every message, so a
    redirected stdout is followed), via ``tqdm.write`` so that an open bar is redrawn below."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:
            raise  # the reader has gone (`ebflow ... | head`): the command line ends quietly
        except Exception:  # noqa: BLE001 - logging must never raise (a closed pipe, ...)
            self.handleError(record)


def format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A Python warning as one ``warning: ...`` line (no source file, no code line)."""
    return f"warning: {message}\n"


def setup_logging(quiet: bool = False, verbose: bool = False) -> Callable[[], None]:
    """Show the ``ebflow`` logger's messages on stdout: WARNING and above with ``quiet``,
    DEBUG with ``verbose``, else INFO. Calling it again replaces the previous handler. Python
    warnings are shown as ``warning: ...`` lines on stderr (:func:`format_warning`). Returns a
    function that undoes all of it (the command line calls it when it returns, so that a
    notebook calling ``main`` finds the library silent again)."""
    logger = logging.getLogger("ebflow")
    for old in list(logger.handlers):
        if isinstance(old, ConsoleHandler):
            logger.removeHandler(old)
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, format_before = logger.level, warnings.formatwarning
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    warnings.formatwarning = format_warning

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)
        warnings.formatwarning = format_before

    return restore
