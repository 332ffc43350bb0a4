"""``ebflow configs``: list the presets, the config keys, or a resolved preset."""

from __future__ import annotations

import argparse
import shutil

from ..experiment.config.resolve import dump_config, list_presets, resolve_config
from ..experiment.config.schema import FIELDS

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "configs",
        help="list the presets (one line each; --show NAME for one in full)",
        description="List the presets, one line each (descriptions cut to the terminal's "
        "width, at most 120 characters); --show NAME prints one in full.",
    )
    p.add_argument("--keys", action="store_true", help="list every config key with its meaning")
    p.add_argument(
        "--show",
        metavar="NAME",
        default=None,
        help="print a resolved preset as YAML (its full description included)",
    )
    p.add_argument(
        "--loss",
        default=None,
        metavar="LOSS",
        help="with --show: resolve the preset's recipe for this objective",
    )
    p.set_defaults(handler=_configs)


def _configs(args: argparse.Namespace) -> int:
    if args.show:
        print(dump_config(resolve_config(args.show, {"loss": args.loss} if args.loss else None)), end="")
        return 0
    if args.keys:
        for key, f in FIELDS.items():
            rule = f" ({f.rule})" if f.rule else ""
            print(f"{key:18s} default {f.default!r:14s} {f.help}{rule}")
        return 0
    presets = list_presets()
    width = max(map(len, presets))
    columns = min(max(shutil.get_terminal_size((100, 24)).columns, 60), 120)
    for name, desc in presets.items():
        print(_cut(f"{name:{width}s}  {' '.join(desc.split())}", columns - 1))
    return 0


def _cut(line: str, limit: int) -> str:
    """``line`` cut to ``limit`` characters at a word boundary, ending in '...' when cut."""
    if len(line) <= limit:
        return line
    head = line[: limit - 3]
    if " " in head[limit // 2 :]:
        head = head[: head.rindex(" ")]
    return head.rstrip(" ,;:(") + "..."
