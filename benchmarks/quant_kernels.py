"""One decoding token through one linear layer, per weight layout: float32 and bfloat16
``F.linear``, oneDNN-packed (llmarch.inference.packed), int8 and int4 (llmarch.inference.quant).

For the shapes of Gemma 3 270M and Qwen2.5-0.5B (the head is the tied vocab matrix). Prints
us per call and the rate the weight bytes are read at (GB/s): decoding is bound by that.

    python benchmarks/quant_kernels.py [--threads 2] [--min-time 0.5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from llmarch.inference.packed import PackedLinear
from llmarch.inference.quant import Int4Linear, Int8Linear

SHAPES = {  # (in, out)
    "gemma3-270m": [(640, 2048), (2048, 640), (640, 1024), (1024, 640), (640, 262144)],
    "qwen2.5-0.5b": [(896, 4864), (4864, 896), (896, 151936)],
}


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def layouts(w: torch.Tensor) -> dict:
    """name -> (callable on x, activation dtype, bytes of weight read per call)."""
    out = {}
    for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        wd = w.to(dtype)
        out[f"F.linear {tag}"] = (lambda x, wd=wd: F.linear(x, wd), dtype, wd.numel() * wd.element_size())
        packed = PackedLinear(wd)
        packed.packed_weight()
        out[f"packed {tag}"] = (packed, dtype, wd.numel() * wd.element_size())
    int8 = Int8Linear.from_float(w)
    out["int8"] = (int8, torch.bfloat16, weight_bytes(int8))
    for g in (32, 128, 256):
        if w.shape[1] % g == 0:
            int4 = Int4Linear.from_float(w, group_size=g)
            out[f"int4 g{g}"] = (int4, torch.bfloat16, weight_bytes(int4))
    int4 = Int4Linear.from_float(w, group_size=32)
    out["int4 g32 f32-in"] = (int4, torch.float32, weight_bytes(int4))  # cast to bf16 inside the layer
    return out


def time_call(fn, x, min_time: float) -> tuple[float, float]:
    """Seconds per call timed one call at a time for at least ``min_time`` seconds: (fastest,
    median). On a shared machine the fastest call is the kernel's speed; the median shows the
    contention."""
    fn(x)
    times = []
    end = time.perf_counter() + min_time
    while len(times) < 3 or time.perf_counter() < end:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[0], times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of calls per layout")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'model':14} {'in -> out':>16} {'layout':18} {'MB':>8} {'us best':>9} {'us median':>10} {'GB/s best':>10}")
    with torch.no_grad():
        for model, shapes in SHAPES.items():
            for k, n in shapes:
                w = torch.randn(n, k) * k**-0.5
                for name, (fn, dtype, nbytes) in layouts(w).items():
                    x = torch.randn(1, k, dtype=dtype)
                    best, median = time_call(fn, x, args.min_time)
                    print(
                        f"{model:14} {f'{k} -> {n}':>16} {name:18} {nbytes / 1e6:8.2f} "
                        f"{best * 1e6:9.1f} {median * 1e6:10.1f} {nbytes / best / 1e9:10.2f}"
                    )


if __name__ == "__main__":
    main()
