"""The comparison subcommands: ``compare``, ``diff``, ``plot``, ``diagram`` and ``report``."""

from __future__ import annotations

import argparse
import sys

from ..analysis.modules import DTYPES


def _add_context(sp: argparse.ArgumentParser, default: int = 8192) -> None:
    sp.add_argument("--context", type=int, default=default, help=f"context length for KV-cache and FLOPs (default {default})")
    sp.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="KV-cache element type (default bf16)")


def _cmd_compare(args: argparse.Namespace) -> None:
    from ..analysis import compare

    profs = compare.profiles(args.models, args.context, args.dtype)
    if args.json:
        print(compare.to_json(profs))
    elif args.csv:
        sys.stdout.write(compare.to_csv(profs))
    elif args.markdown:
        sys.stdout.write(compare.markdown(profs))
    else:
        from rich.console import Console

        Console().print(compare.rich_table(profs))


def _cmd_diff(args: argparse.Namespace) -> None:
    from ..analysis import compare

    a, b = compare.profiles([args.a, args.b], args.context, args.dtype)
    lines = compare.diff(a, b)
    print(f"{a.name} -> {b.name}")
    print("\n".join(f"  {line}" for line in lines) if lines else "  (no architectural difference)")


def _cmd_plot(args: argparse.Namespace) -> None:
    from ..analysis import plots

    for path in plots.plot(args.kind, args.models, args.out, context=args.context, dtype=args.dtype):
        print(path)


def _cmd_diagram(args: argparse.Namespace) -> None:
    from ..analysis import diagram

    for path in diagram.write(args.models, args.out):
        print(path)


def _cmd_report(args: argparse.Namespace) -> None:
    from ..analysis import report

    print(report.write_report(args.out, args.models or None, context=args.context, dtype=args.dtype))


def register(sub) -> None:
    """Add the comparison subcommands to the ``llmarch`` parser."""
    sp = sub.add_parser("compare", help="side-by-side architecture table (presets, HF dirs or .gguf files)")
    sp.add_argument("models", nargs="+", help="presets, Hugging Face checkpoint directories or .gguf files")
    _add_context(sp)
    fmt = sp.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print a Markdown table")
    fmt.add_argument("--csv", action="store_true", help="print CSV, one row per model")
    fmt.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=_cmd_compare)

    sp = sub.add_parser("diff", help="only what differs between two architectures")
    sp.add_argument("a")
    sp.add_argument("b")
    _add_context(sp)
    sp.set_defaults(func=_cmd_diff)

    sp = sub.add_parser("plot", help="KV-cache vs context, total vs active params, or parameter breakdown (PNG + SVG)")
    sp.add_argument("kind", choices=["kv", "params", "breakdown"])
    sp.add_argument("models", nargs="+")
    sp.add_argument("--out", required=True, help="output directory")
    _add_context(sp, default=131072)
    sp.set_defaults(func=_cmd_plot)

    sp = sub.add_parser("diagram", help="architecture diagram of one or two models (SVG + PNG)")
    sp.add_argument("models", nargs="+", help="one or two models")
    sp.add_argument("--out", required=True, help="output .svg file (a .png is written beside it)")
    sp.set_defaults(func=_cmd_diagram)

    sp = sub.add_parser("report", help="one self-contained HTML page: table, plots and diagrams")
    sp.add_argument("models", nargs="*", help="models to include (default: every preset)")
    sp.add_argument("--out", required=True, help="output directory")
    _add_context(sp)
    sp.set_defaults(func=_cmd_report)
