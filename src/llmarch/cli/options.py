"""Arguments that several commands share."""

from __future__ import annotations

import argparse
import sys


def add_context(sp: argparse.ArgumentParser, default: int = 8192) -> None:
    """``--context`` and ``--dtype``: the context length and element type a KV-cache is sized for."""
    # imported here, not at ``import llmarch.cli``: it imports torch
    from ..analysis.modules import DTYPES

    sp.add_argument("--context", type=int, default=default, help=f"context length for KV-cache and FLOPs (default {default})")
    sp.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="KV-cache element type (default bf16)")


def add_set(sp: argparse.ArgumentParser) -> None:
    """``--set field=value`` (repeatable): a what-if on the last model named."""
    sp.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                    help="change a config field of the last model named (repeatable; dotted for moe.*, mla.*, rope.*; "
                         "value as JSON: 4096, null, [\"full\"]; a short per-layer list repeats); name a model twice "
                         "to see it beside its variant")


MODEL_DTYPES = ("auto", "float32", "bfloat16")


QUANTS = ("auto", "none", "int8", "int4", "compact")  # llmarch.inference.quant.QUANT_CHOICES (not imported: no torch here)


def usage_error(message: str) -> None:
    """A bad option value as one ``llmarch: error:`` line (exit 2), like every other error."""
    print(f"llmarch: error: {message}", file=sys.stderr)
    sys.exit(2)


def add_runtime(sp: argparse.ArgumentParser) -> None:
    """``--dtype``, ``--quant``, ``--group-size``, ``--threads`` and ``--no-native-step`` of the commands that run a
    model; their bad values are reported as one error line."""
    sp.add_argument("--dtype", choices=MODEL_DTYPES, default="auto",
                    help="compute dtype (auto: bfloat16 where the CPU computes it natively, else float32)")
    sp.add_argument("--quant", choices=QUANTS, default="auto",
                    help="weights: auto (a GGUF file's quantised tensors stay quantised, int4 for its 4-bit types "
                    "and int8 for wider ones; float checkpoints in float), none (dequantise to float), "
                    "int8 / int4 (quantise at load), compact (as auto, Q5_0 matrices in their 5-bit codes: "
                    "smaller, slower to decode on some CPUs)")
    sp.add_argument("--group-size", type=int, default=32,
                    help="inputs per int4 scale: 32 (default), 64, 128 or 256; it must divide every layer's width")
    sp.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: the physical cores; on a busy machine fewer avoids threads waiting on each other)")
    sp.add_argument("--no-native-step", action="store_true",
                    help="run each decoding step's layers module by module, not in one native call "
                    "(llmarch.inference.step: int8/int4 models on a CPU with a C compiler)")
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
    if getattr(args, "no_native_step", False):
        from ..inference import step

        step.enabled = False
    if args.dtype == "auto":
        dtype, why = auto_dtype("cpu")
    else:
        dtype, why = getattr(torch, args.dtype), args.dtype
    group = f", group {args.group_size}" if args.quant == "int4" else ""
    return dtype, f"{why}; quant {args.quant}{group}; {threads} thread{'s' if threads > 1 else ''}"


DEVICES = ("cpu", "cuda", "mps", "auto")


def add_device(sp: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs."""
    sp.add_argument("--device", choices=DEVICES, default="cpu",
                    help="cpu (default), cuda, mps, or auto (the first of cuda, mps, cpu that is available)")


def runtime_choice(args: argparse.Namespace):
    """Check ``--threads/--dtype/--quant/--device`` before any slow work: (device, dtype, a few
    words on the choice). On an accelerator ``--dtype auto`` is bfloat16 and the int kernels
    (CPU only) are refused."""
    import torch

    from ..errors import GenerationError

    dtype, why = apply_runtime(args)
    device = getattr(args, "device", "cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[device]:
        raise GenerationError(f"--device {device}: no {device} device is available to this torch build; use --device cpu")
    if device != "cpu":
        if args.quant in ("int8", "int4", "compact"):
            raise GenerationError(f"--quant {args.quant}: the int8/int4/Q5_0 kernels are CPU kernels; use --quant none on {device}")
        if args.dtype == "auto":
            dtype = torch.bfloat16
            why = why.replace(why.split(";")[0], f"bfloat16 on {device}", 1)
    if device == "cpu" and args.quant != "none":
        from ..inference import native

        why = f"{why}; int8 kernels {native.status()}"
    return device, dtype, f"{why}; {device}"


def load_on_device(args: argparse.Namespace, name: str | None, device: str, dtype, decoding: bool = False):
    """Model and tokenizer of ``name`` on ``device`` (see :func:`runtime_choice`); ``decoding``:
    long one-token-at-a-time decoding (``chat``, ``generate --fast-kernels``), which int8
    layers' packed kernels speed up (:func:`llmarch.inference.quant.fast_kernels`)."""
    from ..inference.generate import load

    if device == "cpu":
        return load(name, dtype, quant=args.quant, group_size=args.group_size, fast=decoding)
    model, tokenizer = load(name, dtype, pack=False, quant="none")  # oneDNN packing and int kernels are for CPUs
    return model.to(device), tokenizer
