"""Helpers shared by the commands."""

from __future__ import annotations

import argparse

__all__ = ["format_metrics", "seed_argument"]


def format_metrics(split: str, m: dict) -> str:
    """One line: NLL in nats per example and bits/dim (and the toy metrics when present)."""
    text = f"{split} NLL: {m['nll']:.3f} nats per example, {m['bpd']:.4f} bits/dim (n={m['n']})"
    if "raw_nll" in m:
        text += f"; raw (non-EMA) weights {m['raw_nll']:.3f} nats"
    if "kl" in m:
        text += f"; KL(data||model) {m['kl']:.4f}, Fisher divergence {m['fisher']:.4f}"
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
