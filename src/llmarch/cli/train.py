"""``llmarch train``: train a (scaled-down) architecture under a fixed token budget, or resume a run."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("train", help="train a (scaled-down) architecture under a fixed token budget")
    sp.add_argument("--arch", help="preset name or config.json")
    sp.add_argument("--scale", default="tiny", choices=["tiny", "small", "none"], help="scale-down rule (none: as given)")
    sp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field (JSON value)")
    sp.add_argument("--data", default="data/shakespeare", help="folder written by `llmarch data prepare`")
    sp.add_argument("--tokens", type=int, default=1_000_000, help="training budget in tokens")
    sp.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process")
    sp.add_argument("--seq-len", type=int, default=128)
    sp.add_argument("--grad-accum", type=int, default=1)
    sp.add_argument("--lr", type=float, default=3e-3)
    sp.add_argument("--min-lr-ratio", type=float, default=0.1)
    sp.add_argument("--schedule", default="cosine", choices=["cosine", "wsd"])
    sp.add_argument("--warmup", type=int, default=20, help="warmup steps")
    sp.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    sp.add_argument("--weight-decay", type=float, default=0.1)
    sp.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient L2 norm (0: off)")
    sp.add_argument("--qk-clip", type=float, default=None, metavar="TAU", help="MuonClip QK-clip threshold")
    sp.add_argument("--aux-loss", type=float, default=0.0, help="MoE load-balancing loss coefficient")
    sp.add_argument("--bias-update", type=float, default=0.0, help="MoE aux-loss-free bias step gamma")
    sp.add_argument("--eval-every", type=int, default=50)
    sp.add_argument("--eval-batches", type=int, default=8)
    sp.add_argument("--length-multiples", default="1,2,4", metavar="M,M,...",
                    help="after the last step, validation loss at these multiples of --seq-len ('' for none)")
    sp.add_argument("--save-every", type=int, default=0)
    sp.add_argument("--stop-at", type=int, default=None, help="stop (and checkpoint) at this step")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bf16"])
    sp.add_argument("--dist", default="ddp", choices=["ddp", "fsdp"], help="data parallelism under torchrun")
    sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    sp.add_argument("--device", default=None)
    sp.add_argument("--out", default=None, help="run folder (metrics.jsonl, checkpoint.safetensors, summary.json)")
    sp.add_argument("--resume", default=None, metavar="DIR", help="continue the run saved in DIR")
    sp.add_argument("--force", action="store_true", help="replace a run that --out already holds")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=run)


def _multiples(text: str) -> list[int]:
    """``--length-multiples 1,2,4`` -> [1, 2, 4] (empty: no length evaluation)."""
    from ..errors import ConfigError

    try:
        return [int(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise ConfigError(f"--length-multiples must be comma-separated positive integers such as 1,2,4, got {text!r}") from None


def run(args: argparse.Namespace) -> None:
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
            length_multiples=_multiples(args.length_multiples),
        )
    summary = train(cfg, resume=args.resume, device=args.device, force=args.force)
    if summary:
        print(json.dumps(summary, indent=2))
