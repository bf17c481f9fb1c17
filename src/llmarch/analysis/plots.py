"""Figures computed from the models: KV-cache memory against context length, total vs active
parameters, and the parameter breakdown per component (matplotlib, PNG and SVG)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

from ..errors import ConfigError
from . import modules as an
from .compare import Profile, profiles

KINDS = ("kv", "params", "breakdown")
COMPONENT_COLORS = {
    "embedding": "#8dd3c7", "attention": "#80b1d3", "dense FFN": "#fdb462", "experts": "#fb8072",
    "shared expert": "#e5c494", "router": "#bebada", "norms": "#b3de69", "head": "#fccde5", "other": "#d9d9d9",
}


def contexts_up_to(longest: int) -> list[int]:
    out, c = [], 256
    while c < longest:
        out.append(c)
        c *= 2
    return out + [longest]


def kv_figure(profs: list[Profile], longest: int = 131072, dtype: str = "bf16") -> Figure:
    """KV-cache GiB per sequence against context; dotted beyond a model's maximum context."""
    bpe = an.dtype_bytes(dtype)
    ctx = contexts_up_to(longest)
    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab20"]
    for i, p in enumerate(profs):
        gib = [p.summary.kv_cache_bytes(c, bpe) / 2**30 for c in ctx]
        limit = p.summary.max_context
        inside = [j for j, c in enumerate(ctx) if c <= limit]
        color = cmap(i % 20)
        ax.plot([ctx[j] for j in inside], [gib[j] for j in inside], "-o", ms=3, color=color, label=p.name)
        beyond = [j for j in range(len(ctx)) if j >= (inside[-1] if inside else 0)]
        if len(beyond) > 1:
            ax.plot([ctx[j] for j in beyond], [gib[j] for j in beyond], ":", color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"KV cache per sequence (GiB, {dtype})")
    ax.set_title("KV-cache memory vs context (sliding layers hold their window; dotted: beyond the model's max context)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def params_figure(profs: list[Profile]) -> Figure:
    fig = Figure(figsize=(max(6, 0.55 * len(profs) + 2), 4.5))
    ax = fig.subplots()
    xs = range(len(profs))
    total = [p.summary.params.total / 1e9 for p in profs]
    active = [p.summary.params.active / 1e9 for p in profs]
    ax.bar([x - 0.2 for x in xs], total, 0.4, label="total", color="#80b1d3")
    ax.bar([x + 0.2 for x in xs], active, 0.4, label="active per token", color="#fb8072")
    ax.set_xticks(list(xs), [p.name for p in profs], rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("parameters (billions)")
    ax.set_title("Total vs active parameters")
    ax.legend(frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def breakdown_figure(profs: list[Profile]) -> Figure:
    """Share of each component in each model (100% bars), total annotated."""
    fig = Figure(figsize=(9, 0.38 * len(profs) + 1.6))
    ax = fig.subplots()
    names = [p.name for p in profs]
    left = [0.0] * len(profs)
    extra = sorted({c for p in profs for c in p.summary.breakdown} - set(an.COMPONENTS))
    spare = iter(matplotlib.colormaps["Pastel2"].colors)
    for comp in [*an.COMPONENTS, *extra]:
        share = [p.summary.breakdown.get(comp, 0) / p.summary.params.total * 100 for p in profs]
        if any(share):
            ax.barh(names, share, left=left, color=COMPONENT_COLORS.get(comp) or next(spare), label=comp)
            left = [a + b for a, b in zip(left, share)]
    for i, p in enumerate(profs):
        ax.text(101, i, f"{p.summary.params.total / 1e9:.2f}B", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 112)
    ax.set_xlabel("share of parameters (%)")
    ax.set_title("Parameter breakdown by component (from the module tree)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def figure(kind: str, profs: list[Profile], context: int = 131072, dtype: str = "bf16") -> Figure:
    if kind == "kv":
        return kv_figure(profs, max(context, 1024), dtype)
    if kind == "params":
        return params_figure(profs)
    if kind == "breakdown":
        return breakdown_figure(profs)
    raise ConfigError(f"unknown plot {kind!r}; expected one of {', '.join(KINDS)}")


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def plot(kind: str, specs: list[str], out: str | Path, context: int = 131072, dtype: str = "bf16",
         sets: list[str] | None = None) -> list[Path]:
    """Write ``OUT/{kind}.png`` and ``OUT/{kind}.svg``; returns their paths."""
    profs = profiles(specs, context, dtype, sets)
    fig = figure(kind, profs, context, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{kind}.png", out / f"{kind}.svg"]
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    with matplotlib.rc_context({"svg.fonttype": "path"}):  # text as paths: the SVG needs no fonts
        fig.savefig(paths[1], bbox_inches="tight")
    return paths
