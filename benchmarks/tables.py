"""Shared pieces of the report: targets, number formatting, Markdown tables and row look-ups.

Kept apart from :mod:`benchmarks.report` so that each section module (:mod:`benchmarks.compiled`,
:mod:`benchmarks.peers`, :mod:`benchmarks.small`) can build its own table and targets.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .sections import Row

__all__ = ["INFO", "OPS", "Target", "find_row", "fmt", "markdown_table", "row_value"]

#: The ``op`` of a :class:`Target` that reports a figure without a bound (a headline figure).
INFO = "info"
#: The comparisons a :class:`Target` can ask for.
OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt,
}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """A speed target: ``measured`` compared (``<=``, ``<``, ``>=`` or ``>``) with ``bound``;
    with ``op`` = :data:`INFO` a figure reported next to the targets, without a bound."""

    name: str
    measured: float
    op: str
    bound: float = math.nan

    @property
    def status(self) -> str:
        if math.isnan(self.measured):
            return "not measured"
        if self.op == INFO:
            return "reported"
        return "met" if OPS[self.op](self.measured, self.bound) else "MISSED"

    @property
    def required(self) -> str:
        """The bound as the targets table shows it (``–`` for a reported figure)."""
        return "–" if self.op == INFO else f"{self.op} {self.bound:g}"


def find_row(
    rows: Sequence[Row],
    section: str,
    model: str,
    method: str,
    metric: str | None = None,
    *,
    user_loop: bool = False,
) -> Row | None:
    """The first row of ``section`` for ``model`` and ``method`` (and ``metric`` when given)."""
    for r in rows:
        if (
            r.section == section
            and r.model == model
            and r.method == method
            and (metric is None or r.metric == metric)
            and r.user_loop == user_loop
        ):
            return r
    return None


def row_value(row: Row | None, attr: str = "value") -> float:
    """``row.attr`` as a float; NaN for a missing row."""
    return math.nan if row is None else float(getattr(row, attr))


def fmt(v: float, digits: int = 1) -> str:
    """A figure with thousands separators; ``–`` for NaN (not measured)."""
    if math.isnan(v):
        return "–"
    return f"{v:,.{digits}f}"


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A Markdown table of ``header`` and the rows of ``body``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)
