"""The ``llmarch`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import LlmarchError
from .generate import add_parser as add_generate_parser


def _cmd_params(args: argparse.Namespace) -> None:
    from ..analysis.params import count_params, human
    from ..families import get_config

    rows = [count_params(get_config(n)).to_dict() for n in args.names]
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Parameters", caption="counted from the module tree on the meta device; active = per token; --json for exact counts")
    effective = any(r.get("effective") is not None for r in rows)
    cols = ("model", "total", "active", "embedding", "non-emb.") + (("effective",) if effective else ())
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for r in rows:
        cells = [
            r["name"],
            human(r["total"]),
            human(r["active"]),
            human(r["embedding"]),
            human(r["non_embedding"]),
        ]
        if effective:  # without the per-layer embedding table (can stay on CPU / disk)
            cells.append(human(r["effective"]) if r.get("effective") is not None else "-")
        table.add_row(*cells)
    Console().print(table)


def _cmd_slice(args: argparse.Namespace) -> None:
    from ..analysis.params import count_model, human
    from ..checkpoints.matformer import slice_checkpoint

    sliced = slice_checkpoint(args.src, args.out, args.ffn_widths, args.skip_layers)
    n = count_model(sliced)
    print(f"wrote {args.out}: {sliced.config.num_layers} layers, {human(n.total)} parameters")


def _cmd_presets(args: argparse.Namespace) -> None:
    from ..families import preset_names

    print("\n".join(preset_names()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmarch", description="Build, load, run, compare and train LLM architectures.")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("params", help="count total / active / embedding parameters of presets")
    sp.add_argument("names", nargs="+", help="preset names (see `llmarch presets`)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=_cmd_params)

    sp = sub.add_parser("slice", help="cut a MatFormer sub-network (narrower FFNs, fewer layers) out of a checkpoint")
    sp.add_argument("src", help="Hugging Face checkpoint directory")
    sp.add_argument("--ffn-widths", help="one FFN width for every layer, or one per source layer (comma-separated)")
    sp.add_argument("--skip-layers", help="source layers to drop, e.g. 20-24,28")
    sp.add_argument("--out", required=True, help="output directory (Hugging Face format)")
    sp.set_defaults(func=_cmd_slice)

    sp = sub.add_parser("presets", help="list preset names")
    sp.set_defaults(func=_cmd_presets)

    from .compare import register as register_compare

    register_compare(sub)

    add_generate_parser(sub)

    from .train import register as register_training

    register_training(sub)
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

