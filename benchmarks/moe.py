"""One MoE layer with Qwen3-30B-A3B expert shapes: llmarch vs transformers' Qwen3MoeSparseMoeBlock.

hidden 2048, 128 experts, top 8, expert width 768; forward tokens/s for 1 token (decoding)
and 512 tokens (prefill), float32 on this CPU, same weights, alternating repetitions.

    PYTHONPATH=src python benchmarks/moe.py [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmarch.config import ModelConfig, MoEConfig
from llmarch.moe import MoE

HIDDEN, EXPERTS, TOP_K, WIDTH = 2048, 128, 8, 768


def build_pair(seed: int = 0):
    import transformers as T
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_cfg = T.Qwen3MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                              moe_intermediate_size=WIDTH, norm_topk_prob=True)
    hf_cfg._experts_implementation = "eager"  # what transformers picks on CPU (grouped_mm needs a GPU)
    torch.manual_seed(seed)
    hf = Qwen3MoeSparseMoeBlock(hf_cfg).eval()
    with torch.no_grad():
        hf.gate.weight.normal_(0, 0.02)
        hf.experts.gate_up_proj.normal_(0, 0.02)
        hf.experts.down_proj.normal_(0, 0.02)
    cfg = ModelConfig(hidden_size=HIDDEN, num_heads=16, num_kv_heads=16, intermediate_size=6144,
                      moe=MoEConfig(num_experts=EXPERTS, top_k=TOP_K, expert_size=WIDTH, score="softmax",
                                    norm_topk_prob=True))
    ours = MoE(cfg).eval()
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf.experts.down_proj)
    from llmarch.packed import pack_linears

    pack_linears(ours)  # llmarch's inference path (what llmarch.generate.load does)
    return ours, hf


def timed(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ours, hf = build_pair()
    print(f"MoE layer: hidden {HIDDEN}, {EXPERTS} experts, top {TOP_K}, width {WIDTH}; float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    with torch.inference_mode():
        for tokens in (1, 512):
            x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
            err = (ours(x) - hf(x)).abs().max().item()
            assert err < 1e-5, f"outputs differ by {err}"
            reps = args.reps * (20 if tokens == 1 else 1)
            t_ours, t_hf = [], []
            for _ in range(reps):  # alternate so both see the same machine state
                t_ours.append(timed(ours, x))
                t_hf.append(timed(hf, x))
            a, b = statistics.median(t_ours), statistics.median(t_hf)
            print(f"{tokens:4d} tokens: llmarch {tokens / a:10.1f} tok/s   transformers {tokens / b:10.1f} tok/s   "
                  f"ratio {b / a:5.2f}x   (max abs diff {err:.1e}, median of {reps})")


if __name__ == "__main__":
    main()
