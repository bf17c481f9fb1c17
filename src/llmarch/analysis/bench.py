"""Random-weight speed and memory of presets: the tool behind the article's Qwen3 0.6B vs
Llama 3.2 1B figure (Qwen3 is smaller but deeper, so it decodes more slowly).

``bench(cfg)`` builds the model with random weights on a device, times a prefill of ``context``
tokens and ``steps`` cached decoding steps (batch 1), and reports tokens per second and memory:
the peak CUDA allocation on a GPU; on a CPU, the weights plus the allocated KV cache (the two
buffers that dominate). A preset that does not fit is benchmarked at ``scale``: that fraction of
its layers, each at full width (per-layer speed is what deepening changes).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..model.config import ModelConfig
from ..model.decoder import build_model
from .modules import kv_cache_bytes
from .overrides import apply


@dataclass(frozen=True)
class BenchResult:
    name: str
    layers: int  # benchmarked (after --scale)
    params: int
    device: str
    dtype: str
    context: int
    prefill_tok_s: float
    decode_tok_s: float
    memory_bytes: int  # peak CUDA allocation, or weights + KV cache on a CPU
    memory_kind: str

    def to_dict(self) -> dict:
        return asdict(self)


def scaled(cfg: ModelConfig, scale: float) -> ModelConfig:
    """``cfg`` with round(scale x num_layers) layers (at least 1), per-layer schedules cut to fit."""
    if scale >= 1:
        return cfg
    out = apply(cfg, [f"num_layers={max(1, round(cfg.num_layers * scale))}"])
    out.name = cfg.name  # the result says how many layers ran
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def bench(cfg: ModelConfig, context: int = 512, steps: int = 32, scale: float = 1.0, device: str = "cpu",
          dtype: torch.dtype = torch.float32, seed: int = 0) -> BenchResult:
    cfg = scaled(cfg, scale)
    torch.manual_seed(seed)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(cfg, device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, context), device=device)
    model(ids[:, :8])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    model(ids)
    _sync(device)
    prefill = time.perf_counter() - t0
    cache = model.new_cache(batch=1, max_len=context + steps)
    logits = model(ids, cache=cache)
    token = logits[:, -1:].argmax(-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        token = model(token, cache=cache)[:, -1:].argmax(-1)
    _sync(device)
    decode = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    if cuda:
        memory, kind = torch.cuda.max_memory_allocated(device), "peak CUDA allocation"
    else:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        cached = kv_cache_bytes(model, context + steps, torch.empty(0, dtype=dtype).element_size())
        memory, kind = weights + cached, "weights + KV cache"
    return BenchResult(cfg.name or "model", cfg.num_layers, params, device, str(dtype).removeprefix("torch."),
                       context, context / prefill, steps / decode, memory, kind)


def figure(results: list[BenchResult]):
    """Decode tokens/s and memory side by side, values written on the bars (linear scales)."""
    from matplotlib.figure import Figure

    from .plots import series_styles

    fig = Figure(figsize=(10, 0.5 * len(results) + 1.8))
    axes = fig.subplots(1, 2, sharey=True)
    names = [f"{r.name} ({r.layers} layers)" for r in results]
    for ax, values, label, fmt in (
        (axes[0], [r.decode_tok_s for r in results], f"decode tokens/s ({results[0].device})", "{:.1f}"),
        (axes[1], [r.memory_bytes / 2**30 for r in results], f"GiB ({results[0].memory_kind})", "{:.2f}"),
    ):
        bars = ax.barh(names, values, color=[st["color"] for st in series_styles(len(values))])
        ax.bar_label(bars, [fmt.format(v) for v in values], padding=3, fontsize=8)
        ax.set_xlim(0, max(values) * 1.25)
        ax.set_xlabel(label)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    fig.suptitle(f"Random weights, batch 1, {results[0].context:,}-token prompt ({results[0].dtype})", fontsize=10)
    fig.tight_layout()
    return fig
