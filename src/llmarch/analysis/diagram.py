"""Architecture diagrams drawn from the typed summary of the built model, like the article's figures.

Each model is a vertical stack, read bottom to top: token embedding, the repeated decoder
block (its norms where the block actually has them, the attention box with its kind, heads and
per-layer pattern, the FFN or MoE box, the residual adds), the final norm and the output head,
with the repeat count ("x 26") beside the block. Two models are drawn side by side.

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
from .compare import Profile
from .summary import Summary

COL_W = 360  # one model's column
BOX_W = 250
LINE_H = 15
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
WRAP = 40  # characters per line in a box

FILLS = {
    "embedding": "#e8f4ea", "head": "#e8f4ea", "norm": "#fff3c4", "attention": "#dbe9f7",
    "ffn": "#fbe3cf", "moe": "#f7d4d4", "block": "#fafafa",
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


@dataclass
class Layout:
    columns: list[Column]
    width: float
    height: float


# ----------------------------------------------------------------------------------------
# what the boxes say (from the typed summary)
# ----------------------------------------------------------------------------------------


def _wrap(lines: list[str]) -> list[str]:
    return [w for line in lines for w in textwrap.wrap(line, WRAP) or [""]]


def attention_lines(s: Summary) -> list[str]:
    a = s.attention[0]
    title = ATTENTION_TITLES.get(a.kind, a.kind)
    heads = f"{a.label}, {a.heads} query heads, head_dim {a.head_dim}"
    pattern = "global attention in every layer" if compare.all_global(s) else compare.attention_pattern_short(s)
    qk = compare.qk_norm_text(s)
    tail = [compare.positions_short(s)] + ([f"QK-norm: {qk}"] if qk != "none" else [])
    return [title, heads, pattern, *tail]


def ffn_lines(s: Summary) -> tuple[list[str], str]:
    if not s.moe:
        f = s.ffn[0]
        return [f"Feed forward ({f.kind})", f"hidden {f.width:,}"], "ffn"
    m = s.moe[0]
    shape = f"{compare.moe_shape(s)}, {compare.moe_where(s)}"
    return [f"Mixture of experts ({m.kind})", shape, f"expert width {m.width:,}"], "moe"


# ----------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------


def _box(col: Column, y: float, lines: list[str], role: str, cx: float, w: float = BOX_W) -> Box:
    lines = _wrap(lines)
    b = Box(cx - w / 2, y, w, 10 + LINE_H * len(lines), lines, role)
    col.items.append(b)
    return b


def column(p: Profile, x0: float) -> Column:
    """One model, laid out top (output) to bottom (tokens); arrows point up."""
    s = p.summary
    col = Column(s.name)
    cx = x0 + COL_W / 2
    y = 20.0
    col.items.append(Text(cx, y, s.name, "title", size=15, bold=True))
    total, active = s.params.total, s.params.active
    sub = f"{total / 1e9:.2f}B parameters" + (f", {active / 1e9:.2f}B active" if active != total else "")
    col.items.append(Text(cx, y + 18, sub, "subtitle", size=11))
    y += 36
    # the per-layer schedule, as a caption (an arrow would cross it anywhere below)
    caption = [f"layers: {compare.attention_pattern(s)}"]
    if s.moe:
        caption.append(f"FFN: {compare.moe_where(s)}")
    if s.extras:
        caption.append(f"each layer also has: {compare.extras_text(s, '—')}")
    for line in textwrap.wrap("; ".join(caption), 56):
        col.items.append(Text(cx, y, line, "pattern", size=10))
        y += 13
    y += 10
    flow: list[Box | Plus] = []  # the main path, top to bottom

    head = ["Linear output layer", f"vocab {s.vocab_size:,}" + (", tied to embedding" if s.tied_head else "")]
    if s.logit_softcap:
        head.append(f"logit soft-cap {s.logit_softcap:g}")
    flow.append(_box(col, y, head, "head", cx))
    y = flow[-1].y + flow[-1].h + 22
    flow.append(_box(col, y, [f"Final {compare.norm_name(s.norms.form)}"], "norm", cx, 170))
    y = flow[-1].y + flow[-1].h + 26

    norms = s.norms
    block_top = y
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
        else:
            block_items.append(_box(col, y, what, role, cx))
            y = block_items[-1].y + block_items[-1].h + 18
    block_bottom = y + 2
    container = Box(x0 + 14, block_top, COL_W - 28, block_bottom - block_top, [], "block", dashed=True)
    col.items.insert(0, container)
    col.items.append(Text(x0 + COL_W - 22, (block_top + block_bottom) / 2, f"x {s.num_layers}", "repeat", size=16,
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

    for upper, lower in pairwise(flow):
        top = lower.y if isinstance(lower, Box) else lower.cy - lower.r
        bottom = upper.y + upper.h if isinstance(upper, Box) else upper.cy + upper.r
        col.items.append(Arrow(cx, top, cx, bottom))
    col.height = y + 16
    return col


def layout(profs: list[Profile]) -> Layout:
    if not 1 <= len(profs) <= 2:
        raise ConfigError(f"a diagram shows one or two models, got {len(profs)}")
    cols = [column(p, i * COL_W) for i, p in enumerate(profs)]
    return Layout(cols, COL_W * len(cols), max(c.height for c in cols))


# ----------------------------------------------------------------------------------------
# SVG (by hand) and PNG (matplotlib)
# ----------------------------------------------------------------------------------------


def _svg_item(it, uid: str) -> str:
    if isinstance(it, Box):
        dash = ' stroke-dasharray="6 4"' if it.dashed else ""
        rect = (f'<rect x="{it.x:.1f}" y="{it.y:.1f}" width="{it.w:.1f}" height="{it.h:.1f}" rx="8" '
                f'fill="{FILLS[it.role]}" stroke="#555"{dash}/>')
        out = [f'<g class="box" data-role="{it.role}">', rect]
        if it.lines:
            out.append(f'<text x="{it.x + it.w / 2:.1f}" y="{it.y + 5:.1f}" text-anchor="middle" font-size="11">')
            for i, line in enumerate(it.lines):
                weight = ' font-weight="bold"' if i == 0 else ""
                out.append(f'<tspan x="{it.x + it.w / 2:.1f}" dy="{LINE_H}"{weight}>{escape(line)}</tspan>')
            out.append("</text>")
        return "\n".join(out + ["</g>"])
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
    from matplotlib.patches import Circle, FancyBboxPatch

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
