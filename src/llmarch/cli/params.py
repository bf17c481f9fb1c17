"""``llmarch params``: total / active / embedding parameter counts of presets."""

from __future__ import annotations

import argparse
import json

from .options import add_set


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("params", help="count total / active / embedding parameters of presets")
    sp.add_argument("names", nargs="+", help="presets (see `llmarch presets`), Hugging Face checkpoint directories or .gguf files")
    add_set(sp)
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..analysis.compare import configs
    from ..analysis.params import count_params, human

    rows = [count_params(cfg).to_dict() for cfg in configs(args.names, args.sets)]
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Parameters", caption="counted from the module tree on the meta device; active = per token; --json for exact counts")
    effective = any(r.get("effective") is not None for r in rows)
    cols = ("model", "total", "active", "embedding", "non-emb.") + (("effective",) if effective else ())
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col != "model")
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
