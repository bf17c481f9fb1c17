"""``llmarch report``: one self-contained HTML page with the table, plots and diagrams."""

from __future__ import annotations

import argparse

from .options import add_context


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("report", help="one self-contained HTML page: table, plots and diagrams")
    sp.add_argument("models", nargs="*", help="models to include (default: every preset)")
    sp.add_argument("--out", required=True, help="output directory")
    add_context(sp)
    sp.add_argument("--article", action=argparse.BooleanOptionalAction, default=None,
                    help="open with the article section by section and its what-ifs (default: on without models)")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..analysis import report
    from ..atomic import check_writable_dir

    check_writable_dir(args.out)

    print(report.write_report(args.out, args.models or None, context=args.context, dtype=args.dtype,
                                   with_article=args.article))
