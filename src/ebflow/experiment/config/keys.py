"""How a config key is declared: :func:`key` (everything about a key in one place, as a section
attribute of :mod:`ebflow.experiment.config.sections`), range rules, and the immutable mapping
that holds mapping-valued keys (``per_loss``, ``extra``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import field
from typing import Any

__all__ = ["Choices", "FrozenMapping", "freeze", "in_range", "key", "thaw"]


class FrozenMapping(Mapping[str, Any]):
    """A read-only mapping (the value of ``per_loss``): equal to a dict with
    the same items, hashable and picklable."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        self._items = {k: freeze(v) for k, v in (items or {}).items()}

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMapping({self._items!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return FrozenMapping, (self._items,)


def freeze(value: Any) -> Any:
    """A mapping (nested ones too) as a :class:`FrozenMapping`; any other value as it is."""
    return (
        value if isinstance(value, FrozenMapping) or not isinstance(value, Mapping) else FrozenMapping(value)
    )


def thaw(value: Any) -> Any:
    """The plain-``dict`` form of :func:`freeze`'s result (for YAML and checkpoints)."""
    return {k: thaw(v) for k, v in value.items()} if isinstance(value, Mapping) else value


#: What ``choices`` may be: names (a registry's keys when it is a mapping), or a reference
#: ``"module:NAME"`` to such a registry above this module, read when the schema is derived.
Choices = Iterable[str] | str


def key(
    default: Any,
    help: str,
    *,
    check: Callable[[Any], bool] | None = None,
    rule: str = "",
    choices: Choices | None = None,
    pattern: str | None = None,
    name: str | None = None,
) -> Any:
    """A section attribute declared as a config key, everything about it in one place.

    ``default`` and ``help`` (``ebflow configs --keys``); the value's types come from the
    attribute's annotation (``int``, ``float``, ``str``, ``bool``, ``Mapping``; ``| None``:
    nullable). A range ``check`` with its ``rule`` text (``config key 'lr' must be > 0``);
    or ``choices`` (a registry: the value must be one of its names; rule ``a|b|c``); or
    ``pattern``, a ``"module:NAME"`` reference to a compiled regex the value must match in
    full. ``name``: the flat key when it differs from the attribute (``data``, ``model``).
    :data:`~ebflow.experiment.config.schema.FIELDS` is derived from these declarations."""
    return field(
        metadata={
            "key": name,
            "default": default,
            "help": help,
            "check": check,
            "rule": rule,
            "choices": choices,
            "pattern": pattern,
        }
    )


def in_range(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> dict[str, Any]:
    """``check`` and ``rule`` of ``lo <= v <= hi`` (``open_*``: strict), e.g. ``in [1, 256]``."""

    def check(v: Any) -> bool:
        return (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)

    return {"check": check, "rule": f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"}
