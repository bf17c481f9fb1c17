"""The same llmarch measurement on two source trees (e.g. two commits checked out with
``git worktree add``), alternating rounds in fresh processes, medians and the ratio.

    git worktree add --detach /tmp/before <commit>
    python benchmarks/commits.py /tmp/before/src src --rounds 5

Measures, for each tree, what ``llmarch generate`` does on the default model (Gemma 3 270M, or
``--model``; bfloat16, linear layers packed for oneDNN): decode tokens/s of 64 greedy tokens with
float weights (``decode``, no weight-only quantisation) or the file's own quantised ones
(``decode-gguf``, generate's default); and one
Qwen3-30B-A3B-shaped MoE layer (128 experts, top 8, width 768, packed experts), forward
tokens/s at 1 and 512 tokens in float32. The snippet finds the modules under either layout
(``llmarch.inference.packed`` or the older ``llmarch.packed``), so trees from before and after
a reorganisation can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SNIPPET = r"""
import importlib, json, statistics, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))

def mod(*names):
    for n in names:
        try:
            return importlib.import_module(n)
        except ImportError:
            pass
    raise ImportError(names)

what = sys.argv[1]
alias = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
out = {}
if what in ("decode", "decode-gguf"):
    gen = mod("llmarch.inference.generate", "llmarch.generate")
    if what == "decode-gguf":  # as the file is (generate's --quant auto): the quantised kernels
        model, tok = gen.load(alias, torch.bfloat16)
    else:
        try:  # the same float weights on both sides; trees with weight-only quantisation skip it
            model, tok = gen.load(alias, torch.bfloat16, quant="none")
        except TypeError:
            model, tok = gen.load(alias, torch.bfloat16)
    ids = tok.encode("The history of the printing press begins in the fifteenth century, when")
    cfg = gen.GenerationConfig(max_new_tokens=64, ignore_eos=True)
    gen.generate(model, tok, ids, gen.GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    res = gen.generate(model, tok, ids, cfg)
    tag = "" if what == "decode" else "_gguf"
    out = {f"decode{tag}_tps": res.stats.decode_tps, f"prefill{tag}_tps": res.stats.prefill_tps}
else:
    config = mod("llmarch.model.config", "llmarch.config")
    moe = mod("llmarch.model.moe", "llmarch.moe")
    packed = mod("llmarch.inference.packed", "llmarch.packed")
    cfg = config.ModelConfig(hidden_size=2048, num_layers=1, num_heads=32, num_kv_heads=4, head_dim=128,
                             intermediate_size=6144, moe=config.MoEConfig(num_experts=128, top_k=8, expert_size=768,
                             norm_topk_prob=True))
    torch.manual_seed(0)
    layer = moe.MoE(cfg).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    holder = torch.nn.Sequential(layer)
    packed.pack_linears(holder)
    layer = holder[0]
    for n in (1, 512):
        x = torch.randn(1, n, 2048)
        with torch.no_grad():
            layer(x)
            times = []
            for _ in range(5 if n == 512 else 50):
                t = time.perf_counter(); layer(x); times.append(time.perf_counter() - t)
        out[f"moe_{n}_tps"] = n / statistics.median(times)
print(json.dumps(out))
"""


def run(src: str, what: str, threads: int, model: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": src}
    r = subprocess.run([sys.executable, "-c", SNIPPET, what, str(threads), model or "-"], capture_output=True, text=True, env=env,
                       timeout=900, check=False)
    if r.returncode:
        raise SystemExit(f"{src}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", help="src folder of the first tree")
    p.add_argument("after", help="src folder of the second tree")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--what", nargs="+", default=["decode", "moe"], choices=["decode", "decode-gguf", "moe"],
                   help="decode: float bfloat16 weights (--quant none); decode-gguf: the GGUF file's own quantised "
                        "weights (generate's default, --quant auto); moe: one MoE layer")
    p.add_argument("--model", default=None, help="the decode measures' model alias or path (default: Gemma 3 270M)")
    args = p.parse_args()
    results: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for r in range(args.rounds):
        for what in args.what:
            for name, src in (("before", args.before), ("after", args.after)) if r % 2 == 0 else (
                    ("after", args.after), ("before", args.before)):
                for k, v in run(src, what, args.threads, args.model).items():
                    results[name].setdefault(k, []).append(v)
        print(f"round {r + 1}/{args.rounds}: " + json.dumps({n: {k: round(v[-1], 1) for k, v in d.items()}
                                                                for n, d in results.items()}), flush=True)
    print(f"\nmedians over {args.rounds} alternating rounds, {args.threads} threads")
    print(f"{'measure':<16} {'before':>10} {'after':>10} {'after/before':>13}")
    for k in results["before"]:
        b, a = statistics.median(results["before"][k]), statistics.median(results["after"][k])
        print(f"{k:<16} {b:>10.1f} {a:>10.1f} {a / b:>12.2f}x")


if __name__ == "__main__":
    main()
