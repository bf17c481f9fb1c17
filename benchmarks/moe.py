"""One MoE layer with Qwen3-30B-A3B expert shapes: llmarch vs transformers' Qwen3MoeSparseMoeBlock.

hidden 2048, 128 experts, top 8, expert width 768; forward tokens/s for 1 token (decoding)
and 512 tokens (prefill), in float32 and bfloat16 on this CPU, same weights, alternating
repetitions in one process.

transformers runs its two CPU expert implementations: "eager" (the loop in the modeling
file) and "grouped_mm" (its default in 5.x: torch's grouped GEMM). Its third, "batched_mm",
gathers a weight copy per (token, expert) pair and runs out of memory at 512 tokens here. The
ratio is taken against the faster of the two, per row. llmarch runs as ``llmarch generate``
does, with its experts pre-packed for oneDNN (``llmarch.inference.packed``).

The outputs are checked before timing: float32 within 1e-5; bfloat16 equal to the last bit
to transformers' eager path (grouped_mm sums the k expert outputs in float32, so it differs
in the last bits; its difference is printed).

With ``--quant int8 int4`` (the default) it also times llmarch's layer with quantised experts
(as ``--quant int8|int4`` loads a float checkpoint) against transformers in float32, printing
the relative error of its output against the float32 layer.

    PYTHONPATH=src python benchmarks/moe.py [--reps 5] [--threads 2] [--dtypes float32 bfloat16] [--quant int8 int4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from llmarch.inference.packed import pack_linears
from llmarch.model.config import ModelConfig, MoEConfig
from llmarch.model.moe import MoE

HIDDEN, EXPERTS, TOP_K, WIDTH = 2048, 128, 8, 768
HF_IMPLEMENTATIONS = ("eager", "grouped_mm")


def build_pair(seed: int = 0):
    import transformers as T
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_cfg = T.Qwen3MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                              moe_intermediate_size=WIDTH, norm_topk_prob=True)
    hf_cfg._experts_implementation = "eager"
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
    return ours, hf


def hf_runner(hf, implementation: str):
    def run(x):
        hf.experts.config._experts_implementation = implementation
        return hf(x)

    return run


def timed(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def tokens_per_s(runners: dict, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median tokens/s of each runner on x, over ``reps`` rounds that alternate the runners, so
    all see the same machine state."""
    times: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(reps):
        for label, fn in runners.items():
            times[label].append(timed(fn, x))
    return {label: x.shape[1] / statistics.median(t) for label, t in times.items()}


def dense_ceiling(tokens: int, dtype: torch.dtype, reps: int) -> float:
    """Tokens/s of the experts' multiply-adds done as two large dense GEMMs: all tokens x top-k
    rows through one (hidden -> 2 x width) and one (width -> hidden) matrix. No routing, no
    gathers, no small matrices: what this CPU's GEMM reaches on the same work, a ceiling for
    any implementation of the layer (the router's product is left out; it is 1% of the work)."""
    g = torch.Generator().manual_seed(1)
    rows = tokens * TOP_K
    x = torch.randn(rows, HIDDEN, generator=g).to(dtype)
    up = torch.randn(HIDDEN, 2 * WIDTH, generator=g).to(dtype)
    h = torch.randn(rows, WIDTH, generator=g).to(dtype)
    down = torch.randn(WIDTH, HIDDEN, generator=g).to(dtype)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        torch.mm(x, up)
        torch.mm(h, down)
        times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times[1:])


def bench(dtype: torch.dtype, args, base) -> None:
    ours, hf = (copy.deepcopy(m).to(dtype) for m in base)
    pack_linears(ours)  # llmarch's inference path (what llmarch.inference.generate.load does)
    runners = {"llmarch": ours} | {f"HF {impl}": hf_runner(hf, impl) for impl in HF_IMPLEMENTATIONS}
    name = str(dtype).replace("torch.", "")
    with torch.inference_mode():
        for tokens in (1, 512):
            x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens)).to(dtype)
            ref = ours(x)
            diffs = {}
            for label, fn in runners.items():
                if label == "llmarch":
                    continue
                diffs[label] = (ref.float() - fn(x).float()).abs().max().item()
            if dtype == torch.float32:
                assert max(diffs.values()) < 1e-5, f"outputs differ: {diffs}"
            else:
                assert diffs["HF eager"] == 0.0, f"bfloat16 output differs from transformers' eager path: {diffs}"
            reps = args.reps * (20 if tokens == 1 else 1)
            tps = tokens_per_s(runners, x, reps)
            best_hf = max(v for k, v in tps.items() if k != "llmarch")
            cols = "   ".join(f"{label} {v:8.1f}" for label, v in tps.items())
            diff = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
            print(f"{name:<9} {tokens:4d} tokens (tok/s):  {cols}   ratio to the faster HF {tps['llmarch'] / best_hf:5.2f}x"
                  f"   (max abs diff: {diff}; median of {reps})", flush=True)
            if tokens > 1:
                ceiling = dense_ceiling(tokens, dtype, max(3, reps))
                print(f"{'':<9} {tokens:4d} tokens: the same multiply-adds as two dense GEMMs run at {ceiling:8.1f} tok/s; "
                      f"llmarch reaches {tps['llmarch'] / ceiling:.0%} of that, the faster HF {best_hf / ceiling:.0%}: "
                      f"no implementation of the layer can be more than {ceiling / best_hf:.2f}x the faster HF on this CPU",
                      flush=True)


def bench_quant(mode: str, args, base) -> None:
    """llmarch's layer with int8 / int4 experts (``llmarch.inference.quant.quantize``, as
    ``--quant int8|int4`` loads a float checkpoint) against transformers in float32; the
    output's difference from the float32 layer is printed (quantisation error, not a bug)."""
    from llmarch.inference.quant import quantize

    ours, hf = (copy.deepcopy(m).float() for m in base)
    exact = copy.deepcopy(ours)
    quantize(ours, mode, group_size=32)
    pack_linears(ours)  # what stays float (the router), as load() does
    runners = {f"llmarch {mode}": ours} | {f"HF {impl}": hf_runner(hf, impl) for impl in HF_IMPLEMENTATIONS}
    with torch.inference_mode():
        for tokens in (1, 512):
            x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
            ref = exact(x)
            err = ((ours(x) - ref).norm() / ref.norm()).item()
            reps = args.reps * (20 if tokens == 1 else 1)
            tps = tokens_per_s(runners, x, reps)
            best_hf = max(v for k, v in tps.items() if not k.startswith("llmarch"))
            cols = "   ".join(f"{label} {v:8.1f}" for label, v in tps.items())
            print(f"{mode + ' exp.':<9} {tokens:4d} tokens (tok/s):  {cols}   ratio to the faster HF (float32) "
                  f"{tps[f'llmarch {mode}'] / best_hf:5.2f}x   (relative error vs float32 {err:.1e}; median of {reps})",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--quant", nargs="*", default=["int8", "int4"], choices=["int8", "int4"],
                    help="also time llmarch with quantised experts against transformers in float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    print(f"MoE layer: hidden {HIDDEN}, {EXPERTS} experts, top {TOP_K}, width {WIDTH}; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    base = build_pair()
    for name in args.dtypes:
        bench(getattr(torch, name), args, base)
    for mode in args.quant:
        bench_quant(mode, args, base)


if __name__ == "__main__":
    main()
