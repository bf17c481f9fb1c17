"""Resident memory saved by offloading Gemma 3n's per-layer embedding (PLE) table to disk.

Builds a Gemma 3n E2B-shaped model with fewer layers (the per-layer table keeps its real
262144-row vocabulary and 256 dims per layer) in bfloat16, runs a forward, then moves the
table to a memory-mapped file with ``offload_ple`` and runs again. Reports the process RSS
(from /proc/self/status) and the table's bytes before and after, and checks the logits are
unchanged.

    PYTHONPATH=src python benchmarks/ple_offload_memory.py --layers 10 [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

from llmarch import build_model, get_config
from llmarch.inference.offload import offload_ple


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def tensor_mib(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="where the rest of the model runs")
    args = ap.parse_args()

    n = args.layers
    cfg = get_config("gemma3n-e2b").replace(
        name=f"gemma3n-e2b-{n}-layers", num_layers=n, num_kv_shared_layers=min(5, n - 5),
        layer_types=get_config("gemma3n-e2b").layer_types[:n], activation_sparsity=[0.95] * (n // 2) + [0.0] * (n - n // 2),
    )
    torch.manual_seed(0)
    model = build_model(cfg, device="meta").to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    table_mib = model.ple.table.weight.numel() * 2 / 2**20

    def run() -> tuple[torch.Tensor, float]:
        model.to(args.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(ids.to(args.device)).float().cpu()
        return out, time.perf_counter() - t0

    ref, t_before = run()
    gc.collect()
    rss_before, params_before = rss_mib(), tensor_mib(model)

    with tempfile.TemporaryDirectory() as tmp:
        offload_ple(model, Path(tmp) / "ple.bin")
        gc.collect()
        out, t_after = run()
        rss_after, params_after = rss_mib(), tensor_mib(model)
        same = torch.equal(out, ref)

    print(f"config: {cfg.name}, bf16; per-layer table {cfg.vocab_size_per_layer_input} x {n}*{cfg.hidden_size_per_layer_input}"
          f" = {table_mib:.0f} MiB")
    print(f"model tensors on {args.device}: {params_before:.0f} MiB -> {params_after:.0f} MiB")
    print(f"process RSS:     {rss_before:.0f} MiB -> {rss_after:.0f} MiB  (saved {rss_before - rss_after:.0f} MiB)")
    print(f"forward of {args.tokens} tokens: {t_before * 1000:.0f} ms -> {t_after * 1000:.0f} ms")
    print(f"logits identical: {same}")


if __name__ == "__main__":
    main()
