"""``llmarch presets``: the preset names."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("presets", help="list preset names")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..families import preset_names

    print("\n".join(preset_names()))
