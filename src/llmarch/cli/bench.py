"""``llmarch bench``: random-weight prefill / decode tokens per second and memory of presets."""

from __future__ import annotations

import argparse
import json

from .options import add_set


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("bench", help="random-weight prefill/decode tokens/s and memory of presets (+ a plot)")
    sp.add_argument("models", nargs="+", help="presets, Hugging Face checkpoint directories or .gguf files")
    sp.add_argument("--scale", type=float, default=1.0, help="benchmark this fraction of each model's layers (0-1]")
    sp.add_argument("--context", type=int, default=512, help="prompt length in tokens (default 512)")
    sp.add_argument("--steps", type=int, default=32, help="cached decoding steps timed (default 32)")
    sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    sp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    sp.add_argument("--out", default=None, help="folder for bench.png and bench.json")
    sp.add_argument("--json", action="store_true", help="print JSON")
    add_set(sp)
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:

    import torch

    from ..analysis.bench import bench, figure
    from ..analysis.compare import configs
    from ..errors import ConfigError

    if not 0 < args.scale <= 1 or args.context < 1 or args.steps < 1:
        raise ConfigError(f"--scale must be in (0, 1], --context and --steps positive; got {args.scale}, "
                          f"{args.context}, {args.steps}")
    out = None
    if args.out:
        from ..atomic import check_writable_dir

        out = check_writable_dir(args.out)  # before the slow work
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = [bench(cfg, args.context, args.steps, args.scale, device, getattr(torch, args.dtype))
               for cfg in configs(args.models, args.sets)]
    rows = [r.to_dict() for r in results]
    if out is not None:
        figure(results).savefig(out / "bench.png", dpi=110, bbox_inches="tight")
        (out / "bench.json").write_text(json.dumps(rows, indent=2))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in results:
        print(f"{r.name}: {r.layers} layers, prefill {r.prefill_tok_s:,.0f} tok/s, decode {r.decode_tok_s:,.1f} tok/s, "
              f"{r.memory_bytes / 2**30:.2f} GiB ({r.memory_kind}, {r.device}, {r.dtype})")
