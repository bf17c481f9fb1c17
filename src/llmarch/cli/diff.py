"""``llmarch diff``: only what differs between two architectures."""

from __future__ import annotations

import argparse

from .options import add_context, add_set


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("diff", help="only what differs between two architectures")
    sp.add_argument("a")
    sp.add_argument("b")
    add_context(sp)
    add_set(sp)
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..analysis import compare

    a, b = compare.profiles([args.a, args.b], args.context, args.dtype, args.sets)
    lines = compare.diff(a, b)
    print(f"{a.name} -> {b.name}")
    print("\n".join(f"  {line}" for line in lines) if lines else "  (no architectural difference)")
    print(f"costs at {args.context:,} tokens, cache in {args.dtype}:")
    print("\n".join(f"  {line}" for line in compare.deltas(a, b)))
