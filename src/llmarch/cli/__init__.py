"""The ``llmarch`` command line.

One module per command; each exposes ``register(subparsers)``, which adds the command's parser
and sets its ``func`` (a function of the parsed arguments). :data:`COMMANDS` lists the modules in
the order ``llmarch --help`` shows them. A command imports what it needs (torch models,
matplotlib) inside its function, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from ..errors import LlmarchError
from . import (
    ablate,
    bench,
    chat,
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
    serve,
    train,
)
from . import slice as slice_

COMMANDS = (params, slice_, presets, compare, diff, plot, diagram, report, bench, generate, chat, serve, perplexity, data,
            train, ablate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmarch", description="Build, load, run, compare and train LLM architectures.")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an expected error (a bad file or argument) instead of one line")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    for parser in (p, *sub.choices.values()):
        parser.error = _usage_error  # a bad option is one `llmarch: error:` line too, not usage + error
    return p


def _usage_error(message: str) -> NoReturn:
    print(f"llmarch: error: {message} (see llmarch --help)", file=sys.stderr)
    sys.exit(2)


def entry() -> NoReturn:
    """The ``llmarch`` console script (and ``python -m llmarch.cli``): :func:`main`, then, after a
    command that only reads a model (``generate``, ``chat``, ``perplexity``: ``quick_exit`` in its
    defaults) succeeded, the process ends without tearing the interpreter down: freeing a
    262k-entry tokenizer and torch's state took 0.7 s after the last token was out. Everything
    they write is flushed first; commands that write files exit the ordinary way."""
    code = main(quick_exit=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None, quick_exit: bool = False) -> int:
    """Run one command. An expected failure (:class:`LlmarchError`) is one ``llmarch: error:`` line and
    exit status 2 (its traceback with ``--debug``); any other exception is a bug and shows its traceback.
    ``quick_exit`` (the console script only, never a caller in-process): see :func:`entry`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
        if quick_exit and getattr(args, "quick_exit", False):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except LlmarchError as e:
        if args.debug:
            raise
        print(f"llmarch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
