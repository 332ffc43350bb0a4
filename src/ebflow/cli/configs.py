"""``ebflow configs``: list the presets, the config keys, or a resolved preset."""

from __future__ import annotations

import argparse

from ..experiment.config.resolve import dump_config, list_presets, resolve_config
from ..experiment.config.schema import FIELDS

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="list the presets (one line each)")
    p.add_argument("--keys", action="store_true", help="list every config key with its meaning")
    p.add_argument("--show", metavar="NAME", default=None, help="print a resolved preset as YAML")
    p.add_argument("--loss", default=None, metavar="LOSS",
                   help="with --show: resolve the preset's recipe for this objective")
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
    for name, desc in presets.items():
        print(f"{name:{width}s}  {desc}")
    return 0
