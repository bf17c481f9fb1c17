"""The training subcommands of the ``llmarch`` CLI: ``data prepare``, ``train``, ``ablate``."""

from __future__ import annotations

import argparse
import json


def _cmd_data_prepare(args: argparse.Namespace) -> None:
    from ..training.data import prepare

    meta = prepare(args.corpus, args.out, args.tokenizer, args.vocab_size, args.val_fraction, progress=True)
    print(json.dumps(meta, indent=2))


def _cmd_train(args: argparse.Namespace) -> None:
    from ..errors import ConfigError
    from ..training.checkpointing import resume_config
    from ..training.config import TrainConfig
    from ..training.loop import train
    from ..training.scale import parse_overrides

    if args.resume:
        cfg = resume_config(args.resume, args.arch)
        cfg.out = args.out or args.resume
        cfg.stop_at = args.stop_at
        cfg.progress = not args.no_progress
    else:
        if not args.arch:
            raise ConfigError("--arch is required (a preset name or a config.json), unless --resume is given")
        cfg = TrainConfig(
            arch=args.arch, data=args.data, out=args.out or "runs/train", scale=None if args.scale == "none" else args.scale,
            overrides=parse_overrides(args.set), tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len,
            grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio, schedule=args.schedule,
            warmup=args.warmup, optimizer=args.optimizer, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
            qk_clip=args.qk_clip, aux_loss=args.aux_loss, bias_update=args.bias_update, eval_every=args.eval_every,
            eval_batches=args.eval_batches, save_every=args.save_every, stop_at=args.stop_at, seed=args.seed,
            dtype=args.dtype, dist=args.dist, threads=args.threads, progress=not args.no_progress,
        )
    summary = train(cfg, resume=args.resume, device=args.device)
    if summary:
        print(json.dumps(summary, indent=2))


def _cmd_ablate(args: argparse.Namespace) -> None:
    from ..training.ablate import run_spec

    run_spec(args.spec, out=args.out, only=args.only)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``data``, ``train`` and ``ablate`` to the ``llmarch`` parser."""
    sp = sub.add_parser("data", help="prepare training data")
    dsub = sp.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="tokenise a corpus into memory-mapped train/val token files")
    dp.add_argument("--corpus", default="default", help="text file, folder of .txt/.txt.gz, or 'default' (bundled Shakespeare)")
    dp.add_argument("--tokenizer", default="bpe", help="'bpe' (train a byte-level BPE) or a tokenizer.json")
    dp.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (with --tokenizer bpe)")
    dp.add_argument("--val-fraction", type=float, default=0.05)
    dp.add_argument("--out", default="data/shakespeare")
    dp.set_defaults(func=_cmd_data_prepare)

    tp = sub.add_parser("train", help="train a (scaled-down) architecture under a fixed token budget")
    tp.add_argument("--arch", help="preset name or config.json")
    tp.add_argument("--scale", default="tiny", choices=["tiny", "small", "none"], help="scale-down rule (none: as given)")
    tp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field (JSON value)")
    tp.add_argument("--data", default="data/shakespeare", help="folder written by `llmarch data prepare`")
    tp.add_argument("--tokens", type=int, default=1_000_000, help="training budget in tokens")
    tp.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process")
    tp.add_argument("--seq-len", type=int, default=128)
    tp.add_argument("--grad-accum", type=int, default=1)
    tp.add_argument("--lr", type=float, default=3e-3)
    tp.add_argument("--min-lr-ratio", type=float, default=0.1)
    tp.add_argument("--schedule", default="cosine", choices=["cosine", "wsd"])
    tp.add_argument("--warmup", type=int, default=20, help="warmup steps")
    tp.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    tp.add_argument("--weight-decay", type=float, default=0.1)
    tp.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient L2 norm (0: off)")
    tp.add_argument("--qk-clip", type=float, default=None, metavar="TAU", help="MuonClip QK-clip threshold")
    tp.add_argument("--aux-loss", type=float, default=0.0, help="MoE load-balancing loss coefficient")
    tp.add_argument("--bias-update", type=float, default=0.0, help="MoE aux-loss-free bias step gamma")
    tp.add_argument("--eval-every", type=int, default=50)
    tp.add_argument("--eval-batches", type=int, default=8)
    tp.add_argument("--save-every", type=int, default=0)
    tp.add_argument("--stop-at", type=int, default=None, help="stop (and checkpoint) at this step")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bf16"])
    tp.add_argument("--dist", default="ddp", choices=["ddp", "fsdp"], help="data parallelism under torchrun")
    tp.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    tp.add_argument("--device", default=None)
    tp.add_argument("--out", default=None, help="run folder (metrics.jsonl, checkpoint.pt, summary.json)")
    tp.add_argument("--resume", default=None, metavar="DIR", help="continue the run saved in DIR")
    tp.add_argument("--no-progress", action="store_true")
    tp.set_defaults(func=_cmd_train)

    ap = sub.add_parser("ablate", help="train a set of variants under one budget and tabulate/plot them")
    ap.add_argument("spec", help="ablation spec (YAML)")
    ap.add_argument("--out", default=None, help="results folder (default: the spec's out)")
    ap.add_argument("--only", action="append", help="run only these variant names")
    ap.set_defaults(func=_cmd_ablate)
