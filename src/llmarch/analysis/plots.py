"""Figures computed from the models: KV-cache memory against context length, total vs active
parameters, and the parameter breakdown per component (matplotlib, PNG and SVG)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import matplotlib.ticker
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

from ..errors import ConfigError
from . import modules as an
from .compare import Profile, profiles
from .params import human

KINDS = ("kv", "params", "breakdown")
COMPONENT_COLORS = {
    "embedding": "#8dd3c7", an.PLE_TABLE: "#1b9e77", "attention": "#80b1d3", "dense FFN": "#fdb462",
    "experts": "#fb8072", "shared expert": "#e5c494", "router": "#bebada", "norms": "#b3de69", "head": "#fccde5",
    "other": "#d9d9d9",
}
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def series_styles(n: int) -> list[dict]:
    """A colour per series that never repeats within a figure (tab10, then tab20's and tab20b's
    other shades), with line style and marker cycling too, so neighbours differ in more than hue."""
    colors = list(dict.fromkeys(matplotlib.colors.to_hex(c) for name in ("tab10", "tab20", "tab20b", "tab20c", "Dark2")
                                for c in matplotlib.colormaps[name].colors))
    if n > len(colors):
        raise ConfigError(f"a figure draws at most {len(colors)} models, each in its own colour; got {n}")
    return [{"color": colors[i], "ls": LINE_STYLES[i % len(LINE_STYLES)], "marker": MARKERS[i % len(MARKERS)]}
            for i in range(n)]


def contexts_up_to(longest: int) -> list[int]:
    out, c = [], 256
    while c < longest:
        out.append(c)
        c *= 2
    return out + [longest]


def _gib(n: float) -> str:
    return f"{n:.3g} GiB" if n >= 0.01 else f"{n * 1024:.3g} MiB"


def kv_figure(profs: list[Profile], longest: int = 131072, dtype: str = "bf16", log: bool = True,
              title: str | None = None, labels: list[str] | None = None) -> Figure:
    """KV-cache GiB per sequence against context; dotted beyond a model's maximum context. Each
    legend entry (``labels``, default the model names) ends with the cache at the longest context."""
    bpe = an.dtype_bytes(dtype)
    ctx = contexts_up_to(longest) if log else sorted({*range(0, longest + 1, max(1, longest // 256))[1:], longest})
    fig = Figure(figsize=(10, 5.5))
    ax = fig.subplots()
    for p, name, style in zip(profs, labels or [p.name for p in profs], series_styles(len(profs)), strict=True):
        gib = [p.summary.kv_cache_bytes(c, bpe) / 2**30 for c in ctx]
        limit = p.summary.max_context
        inside = [j for j, c in enumerate(ctx) if c <= limit]
        label = f"{name}: {_gib(gib[-1])} @ {longest:,}"
        ax.plot([ctx[j] for j in inside], [gib[j] for j in inside], color=style["color"], ls=style["ls"],
                marker=style["marker"] if log else None, ms=3.5, lw=1.8, label=label, gid=f"kv-{p.name}")
        beyond = [j for j in range(len(ctx)) if j >= (inside[-1] if inside else 0)]
        if len(beyond) > 1:
            ax.plot([ctx[j] for j in beyond], [gib[j] for j in beyond], ":", color=style["color"], lw=1.2)
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    else:
        ax.set_xlim(0, longest)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(matplotlib.ticker.MultipleLocator(max(1024, longest // 8 // 1024 * 1024)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1024:g}k"))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"KV cache per sequence (GiB, {dtype})")
    ax.set_title(title or "KV-cache memory vs context\n(sliding layers hold their window; dotted: beyond the "
                 "model's max context)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    outside = len(profs) > 8
    ax.legend(loc="center left" if outside else "upper left" if log else "lower right", bbox_to_anchor=(1.01, 0.5) if outside else None,
              fontsize=8, frameon=not outside)
    fig.tight_layout()
    return fig


def params_figure(profs: list[Profile]) -> Figure:
    """Active share of each model's parameters on a linear 0-100% scale, with both counts written
    inside the axes: the ratio is the message (DeepSeek-V3 uses 1/18 of its weights per token)."""
    fig = Figure(figsize=(9, 0.36 * len(profs) + 1.4))
    ax = fig.subplots()
    names = [p.name for p in profs]
    share = [p.summary.params.active / p.summary.params.total * 100 for p in profs]
    ax.barh(names, [100] * len(profs), color="#dbe9f7", edgecolor="#80b1d3", label="total")
    ax.barh(names, share, color="#d6604d", label="active per token")
    for i, p in enumerate(profs):
        c = p.summary.params
        text = f"{human(c.active)} of {human(c.total)} ({share[i]:.1f}%)" if c.active != c.total else human(c.total)
        ax.text(99, i, text, va="center", ha="right", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("parameters active per token (% of total)")
    ax.set_title("Total vs active parameters")
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.04), ncol=2, frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def breakdown_figure(profs: list[Profile]) -> Figure:
    """Share of each component in each model (100% bars), total annotated inside the axes; the
    per-layer embedding table (Gemma 3n) is its own component."""
    fig = Figure(figsize=(10, 0.38 * len(profs) + 1.6))
    ax = fig.subplots()
    names = [p.name for p in profs]
    left = [0.0] * len(profs)
    extra = sorted({c for p in profs for c in p.summary.breakdown} - set(an.COMPONENTS))
    spare = iter(matplotlib.colormaps["Pastel2"].colors)
    for comp in [*an.COMPONENTS, *extra]:
        share = [p.summary.breakdown.get(comp, 0) / p.summary.params.total * 100 for p in profs]
        if any(share):
            ax.barh(names, share, left=left, color=COMPONENT_COLORS.get(comp) or next(spare), label=comp)
            left = [a + b for a, b in zip(left, share, strict=True)]
    for i, p in enumerate(profs):
        ax.text(101, i, human(p.summary.params.total), va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 114)
    ax.set_xticks(range(0, 101, 20))
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
