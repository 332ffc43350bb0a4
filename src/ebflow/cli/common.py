"""Helpers shared by the commands."""

from __future__ import annotations

import argparse
import difflib
import re
from typing import NoReturn

__all__ = ["HelpFormatter", "Parser", "format_metrics", "seed_argument"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default as ``(default: ...)``, except where the help text
    already says it or there is none to show (``None``, a flag's ``False``, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or default == []
            or not action.option_strings
        ):
            return text
        return super()._get_help_string(action) or text


class Parser(argparse.ArgumentParser):
    """An argument parser whose "invalid choice" errors suggest the closest choice."""

    def error(self, message: str) -> NoReturn:
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            close = difflib.get_close_matches(m.group(1), re.findall(r"'([^']*)'", m.group(2)), n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)


def format_metrics(split: str, m: dict) -> str:
    """One line: NLL in nats per example and bits/dim (and the toy metrics when present)."""
    text = f"{split} NLL: {m['nll']:.3f} nats per example, {m['bpd']:.4f} bits/dim (n={m['n']})"
    if "raw_nll" in m:
        text += f"; raw (non-EMA) weights {m['raw_nll']:.3f} nats"
    if "kl" in m:
        text += f"; KL(data||model) {m['kl']:.4f}, Fisher divergence {m['fisher']:.4f}"
        if "fisher_median" in m:
            text += f" (median per point {m['fisher_median']:.4f})"
    return text


def seed_argument(text: str) -> int:
    """``--seed`` of the commands that draw random numbers: an integer in [0, 2**63 - 1]
    (``train`` checks its own, tighter, range with the config)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, {2**63 - 1}], got {seed}")
    return seed
