"""The ``llmarch`` command line.

One module per command; each exposes ``register(subparsers)``, which adds the command's parser
and sets its ``func`` (a function of the parsed arguments). :data:`COMMANDS` lists the modules in
the order ``llmarch --help`` shows them. A command imports what it needs (torch models,
matplotlib) inside its function, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LlmarchError
from . import (
    ablate,
    bench,
    compare,
    data,
    diagram,
    diff,
    generate,
    params,
    perplexity,
    plot,
    presets,
    report,
    train,
)
from . import slice as slice_

COMMANDS = (params, slice_, presets, compare, diff, plot, diagram, report, bench, generate, perplexity, data, train, ablate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmarch", description="Build, load, run, compare and train LLM architectures.")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
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
