"""One self-contained HTML page: the comparison table, the diffs, the plots and the diagrams.

Everything is inline (CSS, SVG diagrams, PNG plots as data: URIs); the page loads nothing and
runs no script, so it opens the same from a disk, a mail attachment or a CI artifact.
"""

from __future__ import annotations

import base64
from html import escape
from itertools import pairwise
from pathlib import Path

from tqdm import tqdm

from . import article, diagram, plots
from .compare import Profile, deltas, diff, load_config, profile

CSS = """
body { font-family: DejaVu Sans, Helvetica, Arial, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 24px; } h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #ccc; }
.scroll { overflow-x: auto; }
table.compare { border-collapse: collapse; font-size: 12px; }
table.compare th, table.compare td { border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; min-width: 7em; }
table.compare th { background: #eef2f7; position: sticky; top: 0; }
table.compare td.model { font-weight: bold; white-space: nowrap; }
figure { margin: 16px 0; } figcaption { font-size: 12px; color: #555; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.diagrams { display: flex; flex-wrap: wrap; gap: 24px; }
.diagrams svg { border: 1px solid #eee; }
ul.diff { font-size: 13px; } p.note { font-size: 13px; color: #444; max-width: 70em; }
section.article { border-left: 4px solid #80b1d3; padding-left: 14px; margin: 24px 0; }
p.claim { font-style: italic; max-width: 70em; } p.finding { max-width: 70em; }
.agrees { color: #1b7837; font-weight: bold; } .disagrees { color: #b2182b; font-weight: bold; }
table.whatif { border-collapse: collapse; font-size: 13px; }
table.whatif th, table.whatif td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
table.whatif td:first-child { text-align: left; }
"""


def _table(profs: list[Profile]) -> str:
    labels = [r.label for r in profs[0].rows]
    head = "<tr><th>model</th>" + "".join(f"<th>{escape(lab)}</th>" for lab in labels) + "</tr>"
    body = []
    for p in profs:
        cells = "".join(f"<td>{escape(r.text)}</td>" for r in p.rows)
        body.append(f'<tr data-model="{escape(p.name)}"><td class="model">{escape(p.name)}</td>{cells}</tr>')
    rows = "\n".join(body)
    return f'<div class="scroll"><table class="compare">\n<thead>{head}</thead>\n<tbody>\n{rows}\n</tbody></table></div>'


def _png_img(png: bytes, alt: str, kind: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" data-plot="{kind}" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _plot_section(profs: list[Profile], context: int, dtype: str) -> str:
    captions = {
        "kv": f"KV-cache memory per sequence against context length ({dtype}); sliding-window layers hold "
              "only their window, chunked layers their chunk, MLA layers their latent.",
        "params": "Total parameters and parameters active per token (MoE models activate a few experts).",
        "breakdown": "Share of parameters by component, classified by the module that owns each parameter.",
    }
    out = []
    for kind in plots.KINDS:
        fig = plots.figure(kind, profs, max(context, 131072) if kind == "kv" else context, dtype)
        out.append(f"<figure>{_png_img(plots.png_bytes(fig), captions[kind], kind)}"
                   f"<figcaption>{escape(captions[kind])}</figcaption></figure>")
    return "\n".join(out)


def _pairs(profs: list[Profile]) -> list[list[Profile]]:
    return [profs[i : i + 2] for i in range(0, len(profs), 2)]


def _diagram_section(profs: list[Profile]) -> str:
    svgs = []
    for i, pair in enumerate(_pairs(profs)):
        svg = diagram.to_svg(diagram.layout(pair), uid=f"d{i}")
        svgs.append(f'<div class="diagram" data-models="{escape(" ".join(p.name for p in pair))}">{svg}</div>')
    return '<div class="diagrams">\n' + "\n".join(svgs) + "\n</div>"


def _diff_section(profs: list[Profile]) -> str:
    out = []
    for a, b in pairwise(profs):
        lines = diff(a, b) or ["(no architectural difference)"]
        items = "".join(f"<li>{escape(line)}</li>" for line in lines)
        out.append(f"<h3>{escape(a.name)} &rarr; {escape(b.name)}</h3><ul class=\"diff\">{items}</ul>")
    return "\n".join(out)


def _section(sec: article.Section, get: article.Profiles, i: int) -> str:
    a, b = (get(m) for m in sec.pair)
    f = sec.check(a, b)
    mark = ('<span class="agrees">llmarch agrees</span>' if f.agrees
            else '<span class="disagrees">llmarch disagrees</span>')
    reason = f" {escape(f.reason)}" if f.reason else ""
    items = "".join(f"<li>{escape(line)}</li>" for line in (diff(a, b) or ["(no architectural difference)"]))
    costs = "".join(f"<li>{escape(line)}</li>" for line in deltas(a, b))
    svg = diagram.to_svg(diagram.layout([a, b]), uid=f"s{i}")
    return (f'<section class="article" id="{sec.key}" data-pair="{escape(a.name)} | {escape(b.name)}">'
            f"<h3>{escape(sec.title)}: {escape(a.name)} vs {escape(b.name)} <small>(the article's "
            f"{escape(sec.figure)})</small></h3>"
            f'<p class="claim">The article: {escape(sec.claim)}</p>'
            f'<p class="finding" data-agrees="{str(f.agrees).lower()}">{mark}: {escape(f.text)}.{reason}</p>'
            f'<ul class="diff">{items}</ul><ul class="diff">{costs}</ul>'
            f'<div class="diagram" data-models="{escape(a.name)} {escape(b.name)}">{svg}</div></section>')


def _what_if(w: article.WhatIf, get: article.Profiles) -> str:
    cols = article.what_if_columns(w, get.dtype)
    head = "<tr><th>variant</th>" + "".join(f"<th>{escape(c)}</th>" for c in cols) + "</tr>"
    rows = "".join(f"<tr><td>{escape(label)}</td>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>"
                   for label, cells in article.what_if_rows(w, get))
    fig = ""
    if w.measure in ("kv-context", "crossover"):
        profs = [get(m) for _, m in w.variants]
        kv = plots.kv_figure(profs, article.CONTEXTS[1], get.dtype, log=False, title=w.title,
                             labels=[label for label, _ in w.variants])
        cross = article.crossover(*profs) if w.measure == "crossover" else None
        if cross:
            ax = kv.axes[0]
            ax.axvline(cross, color="#555", lw=1, ls=":")
            ax.text(cross, ax.get_ylim()[1] * 0.6, f" the caches cross at {cross:,} tokens", fontsize=9)
        fig = f"<figure>{_png_img(plots.png_bytes(kv), w.title, 'whatif-' + w.key)}</figure>"
    return (f'<section class="whatif" id="whatif-{w.key}"><h3>{escape(w.title)}</h3>'
            f'<p class="claim">{escape(w.question)}</p><table class="whatif">{head}{rows}</table>'
            f'<p class="finding">{escape(article.what_if_answer(w, get))}.</p>{fig}</section>')


def article_sections(context: int = 8192, dtype: str = "bf16") -> str:
    """The article section by section, then its what-ifs (HTML)."""
    get = article.Profiles(context, dtype)
    parts = ['<h2 id="article">The article, section by section</h2>',
             ('<p class="note">Each section: the two models the article draws side by side, its claim in one '
              f"sentence, and what llmarch computes (KV cache at {context:,} tokens, {dtype}).</p>")]
    parts += [_section(sec, get, i) for i, sec in enumerate(tqdm(article.SECTIONS, desc="article sections"))]
    parts.append('<h2 id="whatifs">What-ifs behind the article\'s arguments</h2>')
    parts += [_what_if(w, get) for w in article.WHAT_IFS]
    return "\n".join(parts)


def render(profs: list[Profile], context: int = 8192, dtype: str = "bf16", with_article: bool = False) -> str:
    title = "LLM architecture comparison"
    note = (f"Every number is computed from the model built on the meta device. KV cache and FLOPs at "
            f"{context:,} tokens, cache in {dtype}. FLOPs per token count 2 per multiply-add of the weight "
            "matrices a token uses (active experts only) and of attention scores and values over the keys "
            "the token sees; norms, softmax, RoPE and activations are not counted.")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{title}</title><style>{CSS}</style></head><body>",
        f"<h1>{title}</h1>",
        f'<p class="note">{escape(note)}</p>',
        article_sections(context, dtype) if with_article else "",
        '<h2 id="table">Comparison</h2>', _table(profs),
        '<h2 id="plots">Plots</h2>', _plot_section(profs, context, dtype),
        '<h2 id="diagrams">Architectures</h2>', _diagram_section(profs),
        '<h2 id="diffs">What changes from one model to the next</h2>', _diff_section(profs),
        "</body></html>",
    ]) + "\n"


def write_report(out: str | Path, specs: list[str] | None = None, context: int = 8192, dtype: str = "bf16",
                 with_article: bool | None = None) -> Path:
    """Write ``OUT/index.html``; ``specs`` defaults to every preset, and then the page opens with the
    article section by section (``with_article`` forces it on or off)."""
    from ..families import preset_names

    with_article = not specs if with_article is None else with_article
    specs = specs or preset_names()
    profs = [profile(load_config(s), context, dtype) for s in tqdm(specs, desc="building models (meta)", unit="model")]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(render(profs, context, dtype, with_article), encoding="utf-8")
    return path
