"""Arguments that several commands share."""

from __future__ import annotations

import argparse
import sys

from ..analysis.modules import DTYPES


def add_context(sp: argparse.ArgumentParser, default: int = 8192) -> None:
    """``--context`` and ``--dtype``: the context length and element type a KV-cache is sized for."""
    sp.add_argument("--context", type=int, default=default, help=f"context length for KV-cache and FLOPs (default {default})")
    sp.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="KV-cache element type (default bf16)")


MODEL_DTYPES = ("auto", "float32", "bfloat16")


QUANTS = ("auto", "none", "int8", "int4")  # llmarch.inference.quant.QUANT_CHOICES (not imported: no torch here)


def usage_error(message: str) -> None:
    """A bad option value as one ``llmarch: error:`` line (exit 2), like every other error."""
    print(f"llmarch: error: {message}", file=sys.stderr)
    sys.exit(2)


def add_runtime(sp: argparse.ArgumentParser) -> None:
    """``--dtype``, ``--quant``, ``--group-size`` and ``--threads`` of the commands that run a
    model; their bad values are reported as one error line."""
    sp.add_argument("--dtype", choices=MODEL_DTYPES, default="auto",
                    help="compute dtype (auto: bfloat16 where the CPU computes it natively, else float32)")
    sp.add_argument("--quant", choices=QUANTS, default="auto",
                    help="weights: auto (a GGUF file's quantised tensors stay quantised, int4 for its 4-bit types "
                    "and int8 for wider ones; float checkpoints in float), none (dequantise to float), "
                    "int8 / int4 (quantise at load)")
    sp.add_argument("--group-size", type=int, default=32,
                    help="inputs per int4 scale: 32 (default), 64, 128 or 256; it must divide every layer's width")
    sp.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: the physical cores; on a busy machine fewer avoids threads waiting on each other)")
    sp.error = usage_error


def apply_runtime(args: argparse.Namespace):
    """Check ``--threads`` and ``--quant`` / ``--group-size`` (before any model loads), set torch's
    thread count; return (torch dtype, a few words on the choices)."""
    import torch

    from ..errors import GenerationError
    from ..inference.device import auto_dtype, physical_cores
    from ..inference.quant import MODES, check_mode

    threads = physical_cores() if args.threads is None else args.threads
    if threads < 1:
        raise GenerationError(f"--threads must be at least 1, got {threads}")
    if args.quant in MODES:
        check_mode(args.quant, args.group_size)
    torch.set_num_threads(threads)
    if args.dtype == "auto":
        dtype, why = auto_dtype("cpu")
    else:
        dtype, why = getattr(torch, args.dtype), args.dtype
    group = f", group {args.group_size}" if args.quant == "int4" else ""
    return dtype, f"{why}; quant {args.quant}{group}; {threads} thread{'s' if threads > 1 else ''}"
