"""Arguments that several commands share."""

from __future__ import annotations

import argparse

from ..analysis.modules import DTYPES


def add_context(sp: argparse.ArgumentParser, default: int = 8192) -> None:
    """``--context`` and ``--dtype``: the context length and element type a KV-cache is sized for."""
    sp.add_argument("--context", type=int, default=default, help=f"context length for KV-cache and FLOPs (default {default})")
    sp.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="KV-cache element type (default bf16)")


def add_set(sp: argparse.ArgumentParser) -> None:
    """``--set field=value`` (repeatable): a what-if on the last model named."""
    sp.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                    help="change a config field of the last model named (repeatable; dotted for moe.*, mla.*, rope.*; "
                         "value as JSON: 4096, null, [\"full\"]; a short per-layer list repeats); name a model twice "
                         "to see it beside its variant")


MODEL_DTYPES = ("auto", "float32", "bfloat16")


def add_runtime(sp: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--threads`` of the commands that run a model."""
    sp.add_argument("--dtype", choices=MODEL_DTYPES, default="auto",
                    help="compute dtype (auto: bfloat16 where the CPU computes it natively, else float32)")
    sp.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: the physical cores; on a busy machine fewer avoids threads waiting on each other)")


def apply_runtime(args: argparse.Namespace):
    """Check ``--threads``, set torch's thread count; return (torch dtype, a few words on the choice)."""
    import torch

    from ..errors import GenerationError
    from ..inference.device import auto_dtype, physical_cores

    threads = physical_cores() if args.threads is None else args.threads
    if threads < 1:
        raise GenerationError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    if args.dtype == "auto":
        dtype, why = auto_dtype("cpu")
    else:
        dtype, why = getattr(torch, args.dtype), args.dtype
    return dtype, f"{why}; {threads} thread{'s' if threads > 1 else ''}"
