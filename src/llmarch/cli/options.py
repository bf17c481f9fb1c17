"""Arguments that several commands share."""

from __future__ import annotations

import argparse

from ..analysis.modules import DTYPES


def add_context(sp: argparse.ArgumentParser, default: int = 8192) -> None:
    """``--context`` and ``--dtype``: the context length and element type a KV-cache is sized for."""
    sp.add_argument("--context", type=int, default=default, help=f"context length for KV-cache and FLOPs (default {default})")
    sp.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="KV-cache element type (default bf16)")
