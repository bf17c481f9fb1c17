"""``llmarch plot``: KV-cache vs context, total vs active parameters, or parameter breakdown (PNG + SVG)."""

from __future__ import annotations

import argparse

from .options import add_context, add_set


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("plot", help="KV-cache vs context, total vs active params, or parameter breakdown (PNG + SVG)")
    sp.add_argument("kind", choices=["kv", "params", "breakdown"])
    sp.add_argument("models", nargs="+")
    sp.add_argument("--out", required=True, help="output directory")
    add_context(sp, default=131072)
    add_set(sp)
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..atomic import check_writable_dir

    check_writable_dir(args.out)
    from ..analysis import plots

    for path in plots.plot(args.kind, args.models, args.out, context=args.context, dtype=args.dtype, sets=args.sets):
        print(path)
