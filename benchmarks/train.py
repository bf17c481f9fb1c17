"""Training throughput: llmarch vs transformers on the same ~10M-parameter Llama-style model.

Both models hold the same weights (llmarch's init, exported with ``save_pretrained`` and read by
``LlamaForCausalLM.from_pretrained``), see the same batches from the prepared data, run in the
same dtype with the same AdamW and a plain PyTorch loop (forward, cross-entropy, backward,
clip, step). Steps alternate between the two in one process, so machine load hits both alike.
Also times llmarch with Muon (+ AdamW for embeddings/head/norms) against AdamW, in the same
alternation.

    PYTHONPATH=src python benchmarks/train.py [--data data/shakespeare] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from llmarch.analysis.params import count_model
from llmarch.checkpoints.hf import save_pretrained
from llmarch.errors import DataError
from llmarch.families.llama import llama_config
from llmarch.model.decoder import build_model
from llmarch.training.data import TokenData, prepare
from llmarch.training.loop import init_weights
from llmarch.training.optim import build_optimizer


def make_config(vocab: int, seq_len: int):
    return llama_config(
        name="bench-10m", vocab_size=vocab, hidden_size=256, intermediate_size=688, num_layers=8, num_heads=8,
        num_kv_heads=2, head_dim=32, tie_embeddings=False, max_position_embeddings=seq_len,
    )


def timed_step(model, opt, x, y, hf: bool) -> tuple[float, float, float]:
    """(step seconds, optimizer-step seconds, loss)"""
    t0 = time.perf_counter()
    logits = model(x).logits if hf else model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad()
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1, float(loss.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shakespeare")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    try:
        data = TokenData.open(args.data)
    except DataError:
        prepare("default", args.data, "bpe", 8192)
        data = TokenData.open(args.data)
    cfg = make_config(data.vocab_size, args.seq_len)
    torch.manual_seed(0)
    ours = init_weights(build_model(cfg, device="cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", torch_dtype=torch.float32)
    hf.train()
    n = count_model(ours)
    print(f"model: llama-style, {n.total / 1e6:.2f}M parameters ({n.non_embedding / 1e6:.2f}M non-embedding), "
          f"vocab {cfg.vocab_size}, batch {args.batch_size} x {args.seq_len}, float32, {args.threads} threads")

    runs = {
        "llmarch AdamW": (ours, build_optimizer(ours, "adamw", lr=1e-3), False),
        "transformers AdamW": (hf, build_optimizer(hf, "adamw", lr=1e-3), True),
    }
    muon_model = init_weights(build_model(cfg, device="cpu"))
    runs["llmarch Muon"] = (muon_model, build_optimizer(muon_model, "muon", lr=1e-3), False)
    times = {k: [] for k in runs}
    opt_times = {k: [] for k in runs}
    first_loss = {}
    for step in range(args.warmup + args.steps):
        x, y = data.train_batch(0, step, 0, 0, 1, args.batch_size, 1, args.seq_len)
        for name, (model, opt, is_hf) in runs.items():
            dt, dt_opt, loss = timed_step(model, opt, x, y, is_hf)
            first_loss.setdefault(name, loss)
            if step >= args.warmup:
                times[name].append(dt)
                opt_times[name].append(dt_opt)
    tokens = args.batch_size * args.seq_len
    print(f"first-step loss: llmarch {first_loss['llmarch AdamW']:.6f}, transformers {first_loss['transformers AdamW']:.6f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    med_opt = {k: statistics.median(v) for k, v in opt_times.items()}
    for name in runs:
        print(f"{name:20s} {tokens / med[name]:9.0f} tokens/s   step {med[name] * 1e3:7.1f} ms   "
              f"optimizer.step {med_opt[name] * 1e3:6.1f} ms   (median of {args.steps})")
    print(f"throughput ratio llmarch / transformers (AdamW): {med['transformers AdamW'] / med['llmarch AdamW']:.3f}x")
    print(f"Muon full step / AdamW full step: {med['llmarch Muon'] / med['llmarch AdamW']:.3f}x "
          f"(optimizer.step alone {med_opt['llmarch Muon'] / med_opt['llmarch AdamW']:.3f}x)")


if __name__ == "__main__":
    main()
