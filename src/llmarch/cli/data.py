"""``llmarch data prepare``: tokenise a corpus into memory-mapped train/val token files."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("data", help="prepare training data")
    dsub = sp.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="tokenise a corpus into memory-mapped train/val token files")
    dp.add_argument("--corpus", default="default", help="text file, folder of .txt/.txt.gz, or 'default' (bundled Shakespeare)")
    dp.add_argument("--tokenizer", default="bpe", help="'bpe' (train a byte-level BPE) or a tokenizer.json")
    dp.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (with --tokenizer bpe)")
    dp.add_argument("--val-fraction", type=float, default=0.05)
    dp.add_argument("--out", default="data/shakespeare")
    dp.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..training.data import prepare

    meta = prepare(args.corpus, args.out, args.tokenizer, args.vocab_size, args.val_fraction, progress=True)
    print(json.dumps(meta, indent=2))
