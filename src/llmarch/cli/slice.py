"""``llmarch slice``: cut a MatFormer sub-network out of a checkpoint."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("slice", help="cut a MatFormer sub-network (narrower FFNs, fewer layers) out of a checkpoint")
    sp.add_argument("src", help="Hugging Face checkpoint directory")
    sp.add_argument("--ffn-widths", help="one FFN width for every layer, or one per source layer (comma-separated)")
    sp.add_argument("--skip-layers", help="source layers to drop, e.g. 20-24,28")
    sp.add_argument("--out", required=True, help="output directory (Hugging Face format)")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..analysis.params import count_model, human
    from ..checkpoints.matformer import slice_checkpoint

    sliced = slice_checkpoint(args.src, args.out, args.ffn_widths, args.skip_layers)
    n = count_model(sliced)
    print(f"wrote {args.out}: {sliced.config.num_layers} layers, {human(n.total)} parameters")
