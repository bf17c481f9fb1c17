"""``llmarch diagram``: an architecture diagram of one model, or two side by side (SVG + PNG)."""

from __future__ import annotations

import argparse

from .options import add_set


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("diagram", help="architecture diagram of one or two models (SVG + PNG)")
    sp.add_argument("models", nargs="+", help="one or two models")
    sp.add_argument("--out", required=True, help="output .svg file (a .png is written beside it)")
    add_set(sp)
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..atomic import check_writable_dir
    from ..errors import ConfigError

    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give the .svg file to write (a .png is written beside it)")
    check_writable_dir(Path(args.out).parent)
    from ..analysis import diagram

    for path in diagram.write(args.models, args.out, args.sets):
        print(path)
