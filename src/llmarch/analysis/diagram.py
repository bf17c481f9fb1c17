"""Architecture diagrams drawn from the typed summary of the built model, like the article's figures.

Each model is a vertical stack, read bottom to top: token embedding, the repeated decoder
block (its norms where the block actually has them, the attention box with its kind, heads,
per-layer pattern and KV bytes per token, the FFN or MoE box, the residual adds), the final norm
and the output head, with the repeat count ("x 26") beside the block. The concepts are boxes of
their own: MoE as router, routed-expert stack (n, k active) and shared expert; MLA as
down-projection, cached latent and up-projections; Gemma 3n's AltUp, LAuReL and per-layer
inputs, and its per-layer embedding table beside the token embedding. Strips above the stack
show the per-layer schedules (sliding vs global attention, dense vs MoE FFN) where they vary.
Two models are drawn side by side, their rows aligned.

One layout (boxes, texts, arrows, circles) is written two ways: as plain SVG by hand (no
external fonts or resources) and as a PNG through matplotlib.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from xml.sax.saxutils import escape

from ..errors import ConfigError
from . import compare
from . import modules as an
from .compare import Profile
from .modules import dtype_bytes
from .params import human
from .summary import Summary

COL_W = 400  # one model's column
BOX_W = 250
LINE_H = 15
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
WRAP = 40  # characters per line in a box

FILLS = {
    "embedding": "#e8f4ea", "head": "#e8f4ea", "norm": "#fff3c4", "attention": "#dbe9f7",
    "ffn": "#fbe3cf", "moe": "#f7d4d4", "block": "#fafafa", "router": "#e4dcf5", "experts": "#f4b6b0",
    "experts-behind": "#f7d4d4", "shared-expert": "#f9e4b7", "latent": "#c7e9c0", "down-projection": "#dbe9f7",
    "extra": "#eeeeee", "ple-table": "#b7e0d2",
}
# the per-layer schedule strips: one cell per layer
CELL_FILLS = {"global": "#08519c", "sliding": "#9ecae1", "chunked": "#4292c6", "shared K/V": "#d9d9d9",
              "dense FFN": "#fdb462", "MoE": "#d6604d"}
STRIP_W = 300
EXTRA_TEXT = {  # what the article says each small-device component is (Gemma 3n)
    "AltUp": "AltUp: wider residual, one stream through the layer",
    "LAuReL": "LAuReL: low-rank residual beside attention",
    "per-layer inputs": "Per-layer input: this layer's slice of the PLE table",
}
ATTENTION_TITLES = {
    "MHA": "Multi-head attention", "GQA": "Grouped-query attention", "MQA": "Multi-query attention",
    "MLA": "Multi-head latent attention",
}


@dataclass
class Box:
    x: float
    y: float
    w: float
    h: float
    lines: list[str]
    role: str
    dashed: bool = False
    name: str = ""  # what the box is, for a reader of the SVG (data-name)


@dataclass
class Strip:
    """A per-layer schedule: one cell per layer, filled by its kind, with a legend below."""

    x: float
    y: float
    w: float
    h: float
    kind: str  # "attention" or "ffn"
    cells: list[str]  # each layer's kind (a key of CELL_FILLS)
    label: str


@dataclass
class Text:
    x: float
    y: float
    text: str
    role: str
    size: float = 11
    anchor: str = "middle"
    bold: bool = False


@dataclass
class Arrow:
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass
class Plus:
    cx: float
    cy: float
    r: float = 9


@dataclass
class Column:
    model: str
    items: list = field(default_factory=list)
    height: float = 0
    caption_h: float = 0  # title to the output head, the block's top and height: aligned across columns
    block_top: float = 0
    block_h: float = 0


@dataclass
class Layout:
    columns: list[Column]
    width: float
    height: float


# ----------------------------------------------------------------------------------------
# what the boxes say (from the typed summary)
# ----------------------------------------------------------------------------------------


def _wrap(lines: list[str], width: int = WRAP) -> list[str]:
    return [w for line in lines for w in textwrap.wrap(line, width) or [""]]


def _layer_kv(s: Summary) -> str:
    """The KV cache of one caching layer per token, in the summary's dtype."""
    a = next((a for a in s.attention if a.kv_elements_per_token), s.attention[0])
    return compare._bytes(a.kv_elements_per_token * dtype_bytes(s.dtype))


def attention_lines(s: Summary) -> list[str]:
    a = s.attention[0]
    title = ATTENTION_TITLES.get(a.kind, a.kind)
    heads = f"{a.label}, {a.heads} query heads, head_dim {a.head_dim}"
    pattern = "global attention in every layer" if compare.all_global(s) else compare.attention_pattern_short(s)
    qk = compare.qk_norm_text(s)
    tail = [compare.positions_short(s)] + ([f"QK-norm: {qk}"] if qk != "none" else [])
    if a.kind == "MLA":  # the latent's own boxes say what is cached
        return [title, heads, "up-projections: latent -> each head's K and V", pattern, *tail]
    kv = f"caches {_layer_kv(s)}/token per layer ({compare._bytes(s.kv_bytes_per_token)} all layers)"
    return [title, heads, pattern, *tail, kv]


def ffn_lines(s: Summary) -> tuple[list[str], str]:
    if not s.moe:
        f = s.ffn[0]
        return [f"Feed forward ({f.kind})", f"hidden {f.width:,}"], "ffn"
    m = s.moe[0]
    lines = [f"Mixture of experts ({m.kind})", f"{compare.moe_shape(s)}, {compare.moe_where(s)}",
             f"expert width {m.width:,}"]
    if s.dense:
        lines.append(f"{len(s.dense)} dense layers: FFN width {compare.dense_widths(s)}")
    return lines, "moe"


def attention_cells(s: Summary) -> list[str]:
    return ["shared K/V" if not a.kv_elements_per_token else "sliding" if a.window else "chunked" if a.chunk
            else "global" for a in s.attention]


def strips(s: Summary) -> list[tuple[str, list[str], str]]:
    """(kind, cells, legend) of the schedules worth drawing: attention when its span varies by
    layer, the FFN when dense and MoE layers mix."""
    out = []
    cells = attention_cells(s)
    if len(set(cells)) > 1:
        span = next((a.span for a in s.attention if a.span), None)
        legend = ", ".join(f"{cells.count(k)} {k}" + (f"({span})" if k in ("sliding", "chunked") else "")
                           for k in CELL_FILLS if k in cells)
        out.append(("attention", cells, f"attention per layer: {legend}"))
    if s.moe and s.dense:
        ffn = ["MoE" if f.moe else "dense FFN" for f in s.ffn]
        out.append(("ffn", ffn, f"FFN per layer: {ffn.count('dense FFN')} dense, {ffn.count('MoE')} MoE"))
    return out


# ----------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------


def _box(col: Column, y: float, lines: list[str], role: str, cx: float, w: float = BOX_W, name: str = "",
         dashed: bool = False) -> Box:
    lines = _wrap(lines, int(w / 6.4))
    b = Box(cx - w / 2, y, w, 10 + LINE_H * len(lines), lines, role, dashed, name)
    col.items.append(b)
    return b


def _arrow_up(col: Column, lower: Box, upper: Box, x: float) -> None:
    col.items.append(Arrow(x, lower.y, x, upper.y + upper.h))


def _moe(col: Column, s: Summary, y: float, cx: float, lines: list[str]) -> tuple[list[Box], float]:
    """The MoE stage, top to bottom: the combining box, the routed-expert stack (n, k active) with
    the shared expert beside it, the router. Returns the boxes on the main path and the next y."""
    m = s.moe[0]
    top = _box(col, y, lines, "moe", cx)
    y = top.y + top.h + 22
    shared_w = 86
    stack_w = BOX_W - shared_w - 8 if m.shared else BOX_W
    scx = cx - BOX_W / 2 + stack_w / 2
    for k in (2, 1):  # the experts behind, offset: a stack
        col.items.append(Box(scx - stack_w / 2 + 4 * k, y - 4 * k, stack_w, 10 + 3 * LINE_H, [], "experts-behind"))
    stack = _box(col, y, [f"{m.experts} routed experts", f"{m.active} active per token", f"width {m.width:,} each"],
                 "experts", scx, stack_w, name=f"{m.experts} routed, {m.active} active")
    if m.shared:
        shared = _box(col, y, ["Shared expert" + ("s" if m.shared > 1 else ""), "every token",
                               f"width {m.shared_width:,}"], "shared-expert", cx + BOX_W / 2 - shared_w / 2, shared_w,
                      name=f"{m.shared} shared")
        _arrow_up(col, shared, top, shared.x + shared.w / 2)
    _arrow_up(col, stack, top, scx)
    y = stack.y + stack.h + 22
    router = _box(col, y, [f"Router: top-{m.active} of {m.experts}"], "router", scx, min(stack_w, 200))
    _arrow_up(col, router, stack, scx)
    return [top, router], router.y + router.h + 18


def _mla(col: Column, s: Summary, y: float, cx: float, lines: list[str]) -> tuple[list[Box], float]:
    """MLA, top to bottom: attention with its up-projections, the cached latent, the down-projection."""
    a = s.attention[0]
    attn = _box(col, y, lines, "attention", cx)
    latent = _box(col, attn.y + attn.h + 18, ["Cached latent (the whole KV cache)", a.cache,
                                              f"{_layer_kv(s)}/token per layer"], "latent", cx, 220)
    down_text = f"Down-projection: hidden {s.hidden_size:,} -> {a.kv_elements_per_token} cached numbers"
    down = _box(col, latent.y + latent.h + 18, [down_text], "down-projection", cx, 220)
    return [attn, latent, down], down.y + down.h + 18


def _extras(col: Column, s: Summary, y: float, cx: float) -> tuple[list[Box], float]:
    """Gemma 3n's per-layer components (AltUp, LAuReL, per-layer inputs), each a labelled box on
    the block's path, with its parameters."""
    boxes = []
    for k in (k for k in s.breakdown if k not in an.COMPONENTS):
        boxes.append(_box(col, y, [EXTRA_TEXT.get(k, k), f"{human(s.breakdown[k])} parameters"], "extra", cx, name=k))
        y = boxes[-1].y + boxes[-1].h + 14
    return boxes, y


def column(p: Profile, x0: float, caption_h: float = 0, block_top: float = 0, block_h: float = 0) -> Column:
    """One model, laid out top (output) to bottom (tokens); arrows point up. ``caption_h``,
    ``block_top`` and ``block_h`` are the largest of the columns drawn together, so that their
    rows line up."""
    s = p.summary
    col = Column(s.name)
    cx = x0 + COL_W / 2
    y = 20.0
    col.items.append(Text(cx, y, s.name, "title", size=15 if len(s.name) < 40 else 11, bold=True))
    total, active = s.params.total, s.params.active
    sub = f"{human(total)} parameters" + (f", {human(active)} active per token" if active != total else "")
    col.items.append(Text(cx, y + 18, sub, "subtitle", size=11))
    y += 36
    # the per-layer schedule, as a caption (an arrow would cross it anywhere below)
    caption = [f"layers: {compare.attention_pattern(s)}"]
    if s.moe:
        caption.append(f"FFN: {compare.moe_where(s)}")
    if s.extras:
        caption.append(f"each layer also has: {compare.extras_text(s, '—')}")
    for line in textwrap.wrap("; ".join(caption), 60):
        col.items.append(Text(cx, y, line, "pattern", size=10))
        y += 13
    for kind, cells, legend in strips(s):
        y += 4
        col.items.append(Strip(cx - STRIP_W / 2, y, STRIP_W, 10, kind, cells, legend))
        col.items.append(Text(cx, y + 22, legend, "strip-legend", size=9))
        y += 30
    y = max(y + 10, caption_h)
    col.caption_h = y
    flow: list[Box | Plus] = []  # the main path, top to bottom

    head = ["Linear output layer", f"vocab {s.vocab_size:,}" + (", tied to embedding" if s.tied_head else "")]
    if s.logit_softcap:
        head.append(f"logit soft-cap {s.logit_softcap:g}")
    flow.append(_box(col, y, head, "head", cx))
    y = flow[-1].y + flow[-1].h + 22
    flow.append(_box(col, y, [f"Final {compare.norm_name(s.norms.form)}"], "norm", cx, 170))
    y = flow[-1].y + flow[-1].h + 26

    norms = s.norms
    y = block_top = max(y, block_top)
    col.block_top = block_top
    block_items: list[Box | Plus] = []
    ffn, ffn_role = ffn_lines(s)
    stages = [
        ("plus", None),
        ("norm", norms.mlp_post),
        (ffn_role, ffn),
        ("norm", norms.mlp),
        ("plus", None),
        ("norm", norms.attn_post),
        ("attention", attention_lines(s)),
        ("norm", norms.attn),
    ]
    y += 14
    for role, what in stages:
        if role == "plus":
            block_items.append(Plus(cx, y + 9))
            y += 18 + 18
        elif role == "norm":
            if what is None:
                continue  # this block has no norm here (the placement is in the module tree)
            block_items.append(_box(col, y, [compare.norm_name(what)], "norm", cx, 170))
            y = block_items[-1].y + block_items[-1].h + 18
        elif role == "moe":
            boxes, y = _moe(col, s, y, cx, what)
            block_items.extend(boxes)
        elif role == "attention" and s.attention[0].kind == "MLA":
            boxes, y = _mla(col, s, y, cx, what)
            block_items.extend(boxes)
        else:
            block_items.append(_box(col, y, what, role, cx))
            y = block_items[-1].y + block_items[-1].h + 18
    extras, y = _extras(col, s, y, cx)
    block_items.extend(extras)
    block_bottom = max(y + 2, block_top + block_h)
    col.block_h = block_bottom - block_top
    container = Box(x0 + 14, block_top, COL_W - 28, block_bottom - block_top, [], "block", dashed=True)
    col.items.insert(0, container)
    col.items.append(Text(x0 + COL_W - 22, block_top + 22, f"x {s.num_layers}", "repeat", size=16,
                          anchor="end", bold=True))
    col.items.extend(b for b in block_items if isinstance(b, Plus))
    # residual connections: block input -> first add, first add -> second add (on the left)
    adds = [b for b in block_items if isinstance(b, Plus)]
    rx = cx - BOX_W / 2 - 12
    col.items.append(Arrow(rx, block_bottom - 6, rx, adds[1].cy))
    col.items.append(Arrow(rx, adds[1].cy, adds[1].cx - adds[1].r, adds[1].cy))
    col.items.append(Arrow(rx, adds[1].cy - 6, rx, adds[0].cy))
    col.items.append(Arrow(rx, adds[0].cy, adds[0].cx - adds[0].r, adds[0].cy))
    flow.extend(block_items)

    y = block_bottom + 24
    emb = ["Token embedding layer", f"{s.vocab_size:,} x {s.hidden_size:,}"]
    if s.embed_scale:
        emb[1] += f", scaled x{s.embed_scale:.4g}"
    if s.position == "learned":
        emb.append("+ learned absolute positions")
    flow.append(_box(col, y, emb, "embedding", cx))
    y = flow[-1].y + flow[-1].h + 26
    col.items.append(Text(cx, y, "Tokenized text", "input", size=11))
    flow.append(Plus(cx, y - 12, 0))  # the arrow from the input text
    if s.breakdown.get(an.PLE_TABLE):
        table = f"{human(s.breakdown[an.PLE_TABLE])} parameters, looked up per token: can stay off the accelerator"
        ple = _box(col, y + 14, ["Per-layer embedding table", table + " (CPU / SSD)"], "ple-table", cx,
                   name=an.PLE_TABLE)
        y = ple.y + ple.h + 8

    for upper, lower in pairwise(flow):
        if isinstance(lower, Box) and lower.role == "router":
            continue  # the router feeds the experts, drawn with them
        top = lower.y if isinstance(lower, Box) else lower.cy - lower.r
        bottom = upper.y + upper.h if isinstance(upper, Box) else upper.cy + upper.r
        col.items.append(Arrow(cx, top, cx, bottom))
    col.height = y + 16
    return col


def layout(profs: list[Profile]) -> Layout:
    if not 1 <= len(profs) <= 2:
        raise ConfigError(f"a diagram shows one or two models, got {len(profs)}")
    first = [column(p, i * COL_W) for i, p in enumerate(profs)]
    tallest = [max(getattr(c, k) for c in first) for k in ("caption_h", "block_top", "block_h")]
    cols = [column(p, i * COL_W, *tallest) for i, p in enumerate(profs)]
    return Layout(cols, COL_W * len(cols), max(c.height for c in cols))


# ----------------------------------------------------------------------------------------
# SVG (by hand) and PNG (matplotlib)
# ----------------------------------------------------------------------------------------


def _svg_item(it, uid: str) -> str:
    if isinstance(it, Box):
        dash = ' stroke-dasharray="6 4"' if it.dashed else ""
        rect = (f'<rect x="{it.x:.1f}" y="{it.y:.1f}" width="{it.w:.1f}" height="{it.h:.1f}" rx="8" '
                f'fill="{FILLS[it.role]}" stroke="#555"{dash}/>')
        name = f' data-name="{escape(it.name)}"' if it.name else ""
        out = [f'<g class="box" data-role="{it.role}"{name}>', rect]
        if it.lines:
            out.append(f'<text x="{it.x + it.w / 2:.1f}" y="{it.y + 5:.1f}" text-anchor="middle" font-size="11">')
            for i, line in enumerate(it.lines):
                weight = ' font-weight="bold"' if i == 0 else ""
                out.append(f'<tspan x="{it.x + it.w / 2:.1f}" dy="{LINE_H}"{weight}>{escape(line)}</tspan>')
            out.append("</text>")
        return "\n".join(out + ["</g>"])
    if isinstance(it, Strip):
        cw = it.w / len(it.cells)
        cells = "".join(f'<rect data-layer="{i}" data-kind="{escape(c)}" x="{it.x + i * cw:.2f}" y="{it.y:.1f}" '
                        f'width="{cw:.2f}" height="{it.h}" fill="{CELL_FILLS[c]}"/>' for i, c in enumerate(it.cells))
        return (f'<g class="strip" data-kind="{it.kind}"><title>{escape(it.label)}</title>{cells}'
                f'<rect x="{it.x:.1f}" y="{it.y:.1f}" width="{it.w}" height="{it.h}" fill="none" stroke="#555"/></g>')
    if isinstance(it, Text):
        weight = ' font-weight="bold"' if it.bold else ""
        return (f'<text class="{it.role}" x="{it.x:.1f}" y="{it.y:.1f}" text-anchor="{it.anchor}" '
                f'font-size="{it.size}"{weight}>{escape(it.text)}</text>')
    if isinstance(it, Arrow):
        return (f'<line x1="{it.x1:.1f}" y1="{it.y1:.1f}" x2="{it.x2:.1f}" y2="{it.y2:.1f}" stroke="#333" '
                f'stroke-width="1.3" marker-end="url(#{uid}-arrow)"/>')
    if isinstance(it, Plus) and it.r:
        return (f'<g class="add"><circle cx="{it.cx:.1f}" cy="{it.cy:.1f}" r="{it.r}" fill="white" stroke="#333"/>'
                f'<text x="{it.cx:.1f}" y="{it.cy + 4.5:.1f}" text-anchor="middle" font-size="13">+</text></g>')
    return ""


def to_svg(lay: Layout, uid: str = "llmarch") -> str:
    """Plain, readable SVG; ``uid`` prefixes the ids so several diagrams can share a page."""
    w, h = f"{lay.width:.0f}", f"{lay.height:.0f}"
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="{FONT}">'
    marker = (f'<defs><marker id="{uid}-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
              'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#333"/></marker></defs>')
    parts = [svg, marker, f'<rect width="{w}" height="{h}" fill="white"/>']
    for col in lay.columns:
        parts.append(f'<g class="model" data-model="{escape(col.model)}">')
        parts.extend(s for s in (_svg_item(it, uid) for it in col.items) if s)
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def to_png(lay: Layout, path: str | Path, dpi: int = 100) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, FancyBboxPatch, Rectangle

    fig = Figure(figsize=(lay.width / 72, lay.height / 72))  # 1 SVG unit = 1 point
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, lay.width)
    ax.set_ylim(lay.height, 0)
    ax.axis("off")
    for col in lay.columns:
        for it in col.items:
            if isinstance(it, Box):
                ax.add_patch(FancyBboxPatch((it.x, it.y), it.w, it.h, boxstyle="round,pad=0,rounding_size=8",
                                            fc=FILLS[it.role], ec="#555", ls="--" if it.dashed else "-", lw=1))
                for i, line in enumerate(it.lines):
                    ax.text(it.x + it.w / 2, it.y + 5 + LINE_H * (i + 1) - 3.5, line, ha="center", va="baseline",
                            fontsize=11, fontweight="bold" if i == 0 else "normal")
            elif isinstance(it, Strip):
                cw = it.w / len(it.cells)
                for i, c in enumerate(it.cells):
                    ax.add_patch(Rectangle((it.x + i * cw, it.y), cw, it.h, fc=CELL_FILLS[c], ec="none"))
                ax.add_patch(Rectangle((it.x, it.y), it.w, it.h, fc="none", ec="#555", lw=0.8))
            elif isinstance(it, Text):
                ha = {"middle": "center", "end": "right", "start": "left"}[it.anchor]
                ax.text(it.x, it.y, it.text, ha=ha, va="baseline", fontsize=it.size,
                        fontweight="bold" if it.bold else "normal")
            elif isinstance(it, Arrow):
                ax.annotate("", xy=(it.x2, it.y2), xytext=(it.x1, it.y1),
                            arrowprops=dict(arrowstyle="-|>", color="#333", lw=1.3, shrinkA=0, shrinkB=0))
            elif isinstance(it, Plus) and it.r:
                ax.add_patch(Circle((it.cx, it.cy), it.r, fc="white", ec="#333"))
                ax.text(it.cx, it.cy + 4.5, "+", ha="center", va="baseline", fontsize=13)
    fig.savefig(path, dpi=dpi)
    return Path(path)


def write(specs: list[str], out: str | Path, sets: list[str] | None = None) -> list[Path]:
    """Write the diagram of one or two models to ``out`` (.svg) and the same with .png."""
    out = Path(out)
    if out.suffix != ".svg":
        raise ConfigError(f"--out must name an .svg file (a .png is written beside it), got {out}")
    lay = layout(compare.profiles(specs, sets=sets))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_svg(lay))
    return [out, to_png(lay, out.with_suffix(".png"))]
