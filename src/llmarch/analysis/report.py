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

from . import diagram, plots
from .compare import Profile, diff, load_config, profile

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


def render(profs: list[Profile], context: int = 8192, dtype: str = "bf16") -> str:
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
        '<h2 id="table">Comparison</h2>', _table(profs),
        '<h2 id="plots">Plots</h2>', _plot_section(profs, context, dtype),
        '<h2 id="diagrams">Architectures</h2>', _diagram_section(profs),
        '<h2 id="diffs">What changes from one model to the next</h2>', _diff_section(profs),
        "</body></html>",
    ]) + "\n"


def write_report(out: str | Path, specs: list[str] | None = None, context: int = 8192, dtype: str = "bf16") -> Path:
    """Write ``OUT/index.html``; ``specs`` defaults to every preset."""
    from ..families import preset_names

    specs = specs or preset_names()
    profs = [profile(load_config(s), context, dtype) for s in tqdm(specs, desc="building models (meta)", unit="model")]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(render(profs, context, dtype), encoding="utf-8")
    return path
