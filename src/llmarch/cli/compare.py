"""``llmarch compare``: a side-by-side architecture table."""

from __future__ import annotations

import argparse
import sys

from .options import add_context, add_set


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("compare", help="side-by-side architecture table (presets, HF dirs or .gguf files)")
    sp.add_argument("models", nargs="+", help="presets, Hugging Face checkpoint directories or .gguf files")
    add_context(sp)
    add_set(sp)
    fmt = sp.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print a Markdown table")
    fmt.add_argument("--csv", action="store_true", help="print CSV, one row per model")
    fmt.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..analysis import compare

    profs = compare.profiles(args.models, args.context, args.dtype, args.sets)
    if args.json:
        print(compare.to_json(profs))
    elif args.csv:
        sys.stdout.write(compare.to_csv(profs))
    elif args.markdown:
        sys.stdout.write(compare.markdown(profs))
    else:
        from rich.console import Console

        Console().print(compare.rich_table(profs))
