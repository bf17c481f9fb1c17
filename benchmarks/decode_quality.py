"""Quality of the decoding path: teacher-forced perplexity one token at a time, through the KV cache.

``llmarch perplexity`` scores windows in one forward each (many rows per product), so it never
runs the one-row kernels that decoding uses: the weight-only int8/int4 kernels and the int8
layers' native kernel (llmarch.inference.native) or torch's, and fbgemm's (``--fast-kernels``,
where the native kernels are not built). This script feeds a text one token at a time, as
decoding does, and scores each next token, for the same GGUF file loaded as float32 (``--quant
none``), as the file is (``--quant auto``, the CLI's dtype; the native kernels and the native
decoding step), with the step's layers run module by module (``--no-native-step``), and as the
file is on torch's int8 kernels, without and with the fast kernels.

    PYTHONPATH=src python benchmarks/decode_quality.py                 # both packaged models, 400 tokens
    PYTHONPATH=src python benchmarks/decode_quality.py --tokens 1000 --models gemma-3-270m
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import math
import time
from importlib import resources

import torch

from llmarch.checkpoints.assets import resolve_model
from llmarch.checkpoints.formats import open_checkpoint
from llmarch.checkpoints.tokenizer import Tokenizer
from llmarch.inference import native, step
from llmarch.inference.device import auto_dtype
from llmarch.inference.generate import load_model


def decode_perplexity(model, ids: list[int], dtype: torch.dtype) -> tuple[float, float]:
    """exp(mean NLL) of ids[1:] given the tokens before, one forward per token; ms per step."""
    cache = model.new_cache(batch=1, max_len=len(ids) + 1, dtype=dtype)
    nll = 0.0
    with torch.inference_mode():
        logits = model(torch.tensor([ids[:1]]), cache=cache)
        t0 = time.perf_counter()
        for i in range(1, len(ids)):
            nll -= torch.log_softmax(logits[0, -1].float(), -1)[ids[i]].item()
            logits = model(torch.tensor([[ids[i]]]), cache=cache)
        ms = (time.perf_counter() - t0) / (len(ids) - 1) * 1000
    return math.exp(nll / (len(ids) - 1)), ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["gemma-3-270m", "qwen2.5-coder-0.5b"])
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--start", type=int, default=200_000, help="character offset into the bundled Shakespeare")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="compute dtype of the quantised variants (auto: as the CLI picks, bfloat16 where the CPU has it natively)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with resources.files("llmarch.data").joinpath("shakespeare.txt.gz").open("rb") as fh:
        text = gzip.decompress(fh.read()).decode("utf-8")[args.start : args.start + 40 * args.tokens]
    dtype = auto_dtype("cpu")[0] if args.dtype == "auto" else getattr(torch, args.dtype)
    # (label, --quant, dtype, fast kernels, native kernels, native step)
    variants = [("float32 (--quant none)", "none", torch.float32, False, True, True),
                ("as the file (--quant auto)", "auto", dtype, False, True, True),
                ("auto, --no-native-step", "auto", dtype, False, True, False),
                ("auto, torch's int8 kernel", "auto", dtype, False, False, False),
                ("auto, torch's + fast kernels", "auto", dtype, True, False, False)]
    print(f"int8 kernels: {native.status()}; quantised variants in {str(dtype).replace('torch.', '')}")
    print(f"teacher-forced decoding, {args.tokens} tokens of Shakespeare from character {args.start}, "
          f"{args.threads} thread(s)")
    for alias in args.models:
        path = resolve_model(alias)
        ids = Tokenizer.from_gguf(path).encode(text)[: args.tokens]
        base = None
        for label, quant, dtype, head, own, native_step in variants:
            with contextlib.nullcontext() if own else native.disabled(), \
                    contextlib.nullcontext() if native_step else step.disabled():
                model = load_model(open_checkpoint(path), dtype, quant=quant, fast=head)
                ppl, ms = decode_perplexity(model, ids, dtype)
            base = base or ppl
            print(f"{alias:<20} {label:<28} perplexity {ppl:8.3f} ({(ppl / base - 1) * 100:+.2f}% vs float32)  "
                  f"{ms:6.1f} ms/token", flush=True)
            del model


if __name__ == "__main__":
    main()
