"""Side-by-side comparison of architectures, in the article's vocabulary.

``llmarch compare A B ...`` builds each model on the meta device (presets, Hugging Face
checkpoint directories or .gguf files: only the config is read) and reports, from the module
tree: parameters, shapes, the per-layer attention schedule, positions, norms, FFN/MoE, KV-cache
memory and FLOPs per token (see :mod:`llmarch.analysis.modules` for what is counted).
``llmarch diff A B`` prints only the rows that differ, in short form.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..model.config import ModelConfig, RopeConfig
from ..model.decoder import Decoder
from . import modules as an
from .params import count_model, human

# ----------------------------------------------------------------------------------------
# what to compare: presets or checkpoints (config only)
# ----------------------------------------------------------------------------------------


def load_config(spec: str) -> ModelConfig:
    """A preset name, a Hugging Face checkpoint directory or a .gguf file (config only)."""
    from ..checkpoints.formats import read_config
    from ..families import get_config, preset_names

    p = Path(spec)
    if spec in preset_names() or not p.exists():
        return get_config(spec)  # raises with the closest preset name when unknown
    cfg = read_config(p)
    return cfg.replace(name=cfg.name or p.name.removesuffix(".gguf"))


# ----------------------------------------------------------------------------------------
# the profile of one model
# ----------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    text: str
    value: Any = None  # the raw number behind the text, for CSV / JSON


@dataclass
class Profile:
    """Everything ``compare`` shows about one model; ``short`` is the vocabulary of ``diff``."""

    name: str
    rows: list[Row]
    short: dict[str, str]
    numbers: dict[str, Any]
    breakdown: dict[str, int]
    model: Decoder = field(repr=False)

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)

    def to_dict(self) -> dict[str, Any]:
        return dict(name=self.name, **self.numbers, breakdown=self.breakdown,
                    description={r.label: r.text for r in self.rows if r.value is None})


def _span_label(d: dict) -> str:
    if d.get("window"):
        return f"sliding({d['window']})"
    if d.get("chunk"):
        return f"chunked({d['chunk']})"
    return "full"


def _ordinal(n: int) -> str:
    return {1: "", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def _every(labels: list[str], odd: str) -> str | None:
    """"every 4th layer" when ``odd`` is the last layer of each repeated block."""
    p = an.period(labels)
    if p is None:
        return None
    rs = an.runs(labels[:p])
    if len(rs) == 2 and rs[1] == (1, odd):
        return f"every {_ordinal(p)} layer"
    return None


def _rope_text(rope: RopeConfig) -> str:
    text = f"θ={rope.theta:,.0f}"
    if rope.scaling:
        factor = rope.scaling.get("factor")
        text += f", {rope.rope_type} scaling" + (f" x{factor:g}" if factor else "")
    return text


def _positions(cfg: ModelConfig, attn: list[dict]) -> tuple[str, str]:
    """(table text, diff text)."""
    if cfg.position == "learned":
        return "learned absolute", "learned absolute"
    flags = ["RoPE" if d["rope"] else "NoPE" for d in attn]
    if "RoPE" not in flags:
        return "NoPE every layer", "NoPE every layer"
    if "NoPE" not in flags:
        short = "RoPE every layer"
    else:
        every = _every(flags, "NoPE")
        short = f"NoPE {every}" if every else an.summarize(flags)
    theta = f"RoPE {_rope_text(cfg.rope)}"
    if cfg.rope_local is not None and any(d.get("window") for d in attn):
        theta += f"; sliding layers {_rope_text(cfg.rope_local)}"
    return f"{short}; {theta}", short


def _attention_pattern(attn: list[dict]) -> tuple[str, str]:
    vary_rope = len({d["rope"] for d in attn}) > 1
    vary_kind = len({d["label"] for d in attn}) > 1
    labels = []
    for d in attn:
        lab = _span_label(d)
        if vary_rope:
            lab += "/RoPE" if d["rope"] else "/NoPE"
        if vary_kind:
            lab = f"{d['label']} {lab}"
        labels.append(lab)
    table = an.summarize(labels)
    spans = [_span_label(d) for d in attn]
    if set(spans) == {"full"}:
        short = "global"
    elif len(set(spans)) == 1:
        short = f"{spans[0]} every layer"
    else:
        short = an.ratio(spans, {"full": "global"}) or an.summarize(spans)
    return table, short


_QK_NORMS = {"none": "none", "head": "RMSNorm per head", "proj": "RMSNorm over the q/k projections",
             "l2": "L2 norm without weight"}


def norm_name(norm) -> str:
    """"RMSNorm", "LayerNorm", "RMSNorm (1 + w)" (Gemma's offset weight) from the module."""
    return type(norm).__name__ + (" (1 + w)" if getattr(norm, "unit_offset", False) else "")


def _norms(model: Decoder) -> tuple[str, str, str]:
    """(form, placement, qk-norm) from the first block's modules."""
    blk = model.layers[0]
    pre = blk.attn_norm is not None
    post = blk.attn_post_norm is not None
    placement = "pre+post (sandwich)" if pre and post else ("post inside residual" if post else "pre")
    norm = next(n for n in (blk.attn_norm, blk.attn_post_norm, model.norm) if n is not None)
    form = norm_name(norm)
    qk = [b.attn.describe()["qk_norm"] for b in model.layers]
    used = sorted(set(qk) - {"none"})
    if not used:
        return form, placement, "none"
    text = " / ".join(_QK_NORMS.get(q, q) for q in used)
    normed = sum(q != "none" for q in qk)
    return form, placement, text + (f" on {normed} of {len(qk)} layers" if normed < len(qk) else "")


def _ffn(model: Decoder) -> tuple[str, str, str, str]:
    """(table FFN text, MoE text, diff FFN structure, diff FFN kind)."""
    ffn = [b.mlp.describe() for b in model.layers]
    dense = [f for f in ffn if not f["moe"]]
    moe = [f for f in ffn if f["moe"]]
    kinds = sorted({f["kind"] for f in ffn})
    kind = " / ".join(kinds)
    if not moe:
        widths = sorted({f["width"] for f in dense})
        return f"{kind}, width {' / '.join(map(str, widths))}", "—", "dense", kind
    m = moe[0]
    shape = f"{m['experts']} experts, {m['active']} active" + (f" + {m['shared']} shared" if m.get("shared") else "")
    layers = ["MoE" if f["moe"] else "dense" for f in ffn]
    rs = an.runs(layers)
    if not dense:
        where = "every layer"
    elif rs[0][1] == "dense" and len(rs) == 2:
        where = f"first {rs[0][0]} layer{'s' if rs[0][0] > 1 else ''} dense"
    else:
        every = _every(layers, "MoE")
        where = f"MoE {every}" if every else an.summarize(layers)
    dense_w = f"; dense FFN width {dense[0]['width']}" if dense else ""
    moe_text = f"{shape}, expert width {m['expert_width']}{dense_w}; {where}"
    return f"{kind}", moe_text, f"MoE {shape}, {where}", kind


_STANDARD_BLOCK = {"attn", "mlp", "attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm"}


def block_extras(model: Decoder) -> list[str]:
    """Modules a block has beyond attention, FFN and norms (Gemma 3n: AltUp, Laurel, ...)."""
    seen: dict[str, None] = {}
    for blk in model.layers:
        for name, child in blk.named_children():
            if name not in _STANDARD_BLOCK:
                seen[type(child).__name__] = None
    return list(seen)


def _cache_text(model: Decoder, first: dict) -> str:
    idle = sum(1 for b in model.layers if b.attn.kv_bytes_per_token(1) == 0)
    return first["cache"] + (f"; {idle} layers cache nothing (they reuse another layer's K and V)" if idle else "")


def profile(cfg: ModelConfig, context: int = 8192, dtype: str = "bf16", name: str | None = None) -> Profile:
    """Build ``cfg`` on the meta device and describe it; KV and FLOPs at ``context`` tokens."""
    if context < 1:
        raise ConfigError(f"context must be a positive number of tokens, got {context}")
    model = an.meta_model(cfg)
    name = name or cfg.name or "model"
    counts = count_model(model, name)
    breakdown = an.param_breakdown(model)
    attn = [b.attn.describe() for b in model.layers]
    a0 = attn[0]
    bpe = an.dtype_bytes(dtype)
    kv = an.kv_cache_bytes(model, context, bpe)
    kv_tok = sum(b.attn.kv_bytes_per_token(bpe) for b in model.layers)
    pre = an.prefill_flops_per_token(model, context)
    dec = an.decode_flops_per_token(model, context)
    pattern, pattern_short = _attention_pattern(attn)
    positions, positions_short = _positions(cfg, attn)
    form, placement, qk = _norms(model)
    ffn_text, moe_text, ffn_short, ffn_kind = _ffn(model)
    kinds = sorted({d["label"] for d in attn})
    attn_text = " / ".join(kinds)
    shapes = f"{a0['heads']} / {a0['kv_heads']} / {a0['head_dim']}"

    rows = [
        Row("total params", f"{human(counts.total)} ({counts.total:,})", counts.total),
        Row("active params", human(counts.active), counts.active),
        Row("effective params (without offloadable tables)", human(counts.effective) if counts.effective else "—",
            counts.effective),
        Row("embedding params", human(counts.embedding), counts.embedding),
        Row("non-embedding params", human(counts.non_embedding), counts.non_embedding),
        Row("layers", str(cfg.num_layers), cfg.num_layers),
        Row("hidden size", str(cfg.hidden_size), cfg.hidden_size),
        Row("heads / KV heads / head_dim", shapes),
        Row("attention", attn_text),
        Row("KV cache holds", _cache_text(model, a0)),
        Row("attention pattern", pattern),
        Row("positions", positions),
        Row("norm", f"{form}, {placement}"),
        Row("QK-norm", qk),
        Row("FFN", ffn_text),
        Row("MoE", moe_text),
        Row("other per-layer modules", ", ".join(block_extras(model)) or "—"),
        Row("vocabulary", f"{cfg.vocab_size:,}", cfg.vocab_size),
        Row("tied head", "yes" if model.lm_head is None else "no"),
        Row("KV cache / token", _bytes(kv_tok), kv_tok),
        Row(f"KV cache @ {context:,} ({dtype})", _bytes(kv), kv),
        Row(f"prefill FLOPs/token @ {context:,}", _flops(pre.total), pre.total),
        Row(f"decode FLOPs/token @ {context:,}", _flops(dec.total), dec.total),
    ]
    short = {
        "attention": " / ".join(kinds),
        "attention pattern": pattern_short,
        "positions": positions_short,
        "norm": placement,
        "norm form": form,
        "QK-norm": qk,
        "FFN": ffn_short,
        "FFN kind": ffn_kind,
        "other per-layer modules": ", ".join(block_extras(model)) or "none",
        "KV cache holds": _cache_text(model, a0),
        "layers": str(cfg.num_layers),
        "hidden size": str(cfg.hidden_size),
        "heads / KV heads / head_dim": shapes,
        "vocabulary": f"{cfg.vocab_size:,}",
        "tied head": "yes" if model.lm_head is None else "no",
        "embedding scale": "none" if cfg.embed_scale is None else f"x{cfg.embed_scale:.4g}",
        "logit soft-cap": "none" if not cfg.final_logit_softcap else f"{cfg.final_logit_softcap:g}",
    }
    if cfg.position == "rope":
        short["RoPE"] = positions.split("; ", 1)[1].removeprefix("RoPE ")
    if not any(f["moe"] for f in (b.mlp.describe() for b in model.layers)):
        short["FFN width"] = ffn_text.split("width ")[-1]
    numbers = dict(
        total_params=counts.total, active_params=counts.active, embedding_params=counts.embedding,
        non_embedding_params=counts.non_embedding, effective_params=counts.effective, context=context, dtype=dtype,
        kv_bytes_per_token=kv_tok,
        kv_bytes=kv, prefill_flops_per_token=pre.total, decode_flops_per_token=dec.total,
        matmul_flops_per_token=pre.matmul,
    )
    return Profile(name, rows, short, numbers, breakdown, model)


def _bytes(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _flops(n: int) -> str:
    for unit, div in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} FLOP"


def profiles(specs: list[str], context: int = 8192, dtype: str = "bf16") -> list[Profile]:
    if not specs:
        raise ConfigError("name at least one model: a preset (see `llmarch presets`), a checkpoint directory or a .gguf file")
    return [profile(load_config(s), context, dtype) for s in specs]


# ----------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------


def rich_table(profs: list[Profile]):
    from rich.table import Table

    table = Table(title="Architecture comparison (computed from the module trees on the meta device)")
    table.add_column("", style="bold")
    for p in profs:
        table.add_column(p.name, overflow="fold")
    for i, r in enumerate(profs[0].rows):
        table.add_row(r.label, *(p.rows[i].text for p in profs))
    return table


def markdown(profs: list[Profile]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| | " + " | ".join(esc(p.name) for p in profs) + " |", "|---" * (len(profs) + 1) + "|"]
    for i, r in enumerate(profs[0].rows):
        lines.append(f"| {esc(r.label)} | " + " | ".join(esc(p.rows[i].text) for p in profs) + " |")
    return "\n".join(lines) + "\n"


def to_csv(profs: list[Profile]) -> str:
    """One row per model; numeric columns hold the raw numbers."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model"] + [r.label for r in profs[0].rows])
    for p in profs:
        w.writerow([p.name] + [r.text if r.value is None else r.value for r in p.rows])
    return buf.getvalue()


def to_json(profs: list[Profile]) -> str:
    return json.dumps([p.to_dict() for p in profs], indent=2, ensure_ascii=False)


def diff(a: Profile, b: Profile) -> list[str]:
    """The rows that differ, one ``"field: A -> B"`` line each, in the article's words."""
    return [f"{k}: {a.short[k]} -> {b.short.get(k, '—')}" for k in a.short if a.short[k] != b.short.get(k, "—")] + [
        f"{k}: — -> {b.short[k]}" for k in b.short if k not in a.short
    ]
