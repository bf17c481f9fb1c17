"""The ``llmarch`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .cli_generate import add_parser as add_generate_parser
from .errors import LlmarchError


def _cmd_params(args: argparse.Namespace) -> None:
    from .families import get_config
    from .params import count_params, human

    rows = [count_params(get_config(n)).to_dict() for n in args.names]
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Parameters (counted from the module tree on the meta device)")
    for col in ("model", "total", "active / token", "embedding", "non-embedding"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(
            r["name"],
            f"{human(r['total'])} ({r['total']:,})",
            human(r["active"]),
            human(r["embedding"]),
            human(r["non_embedding"]),
        )
    Console().print(table)


def _cmd_presets(args: argparse.Namespace) -> None:
    from .families import preset_names

    print("\n".join(preset_names()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmarch", description="Build, load, run, compare and train LLM architectures.")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("params", help="count total / active / embedding parameters of presets")
    sp.add_argument("names", nargs="+", help="preset names (see `llmarch presets`)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=_cmd_params)

    sp = sub.add_parser("presets", help="list preset names")
    sp.set_defaults(func=_cmd_presets)
    add_generate_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LlmarchError as e:
        print(f"llmarch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
