"""``llmarch ablate``: train a set of variants under one budget and tabulate / plot them."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("ablate", help="train a set of variants under one budget and tabulate/plot them")
    sp.add_argument("spec", help="ablation spec (YAML)")
    sp.add_argument("--out", default=None, help="results folder (default: the spec's out)")
    sp.add_argument("--only", action="append", help="run only these variant names")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..training.ablate import run_spec

    run_spec(args.spec, out=args.out, only=args.only)
