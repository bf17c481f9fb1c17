"""Side-by-side comparison of architectures, in the article's vocabulary.

``llmarch compare A B ...`` builds each model on the meta device (presets, Hugging Face
checkpoint directories or .gguf files: only the config is read), reads it into a typed
:class:`~llmarch.analysis.summary.Summary` and renders that: parameters, shapes, the per-layer
attention schedule, positions, norms, FFN/MoE, KV-cache memory and FLOPs per token (see
:mod:`llmarch.analysis.modules` for what is counted). ``llmarch diff A B`` prints only the rows
that differ, in short form. The diagrams reuse the phrases rendered here.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..model.config import ModelConfig, RopeConfig
from ..model.decoder import Decoder
from . import modules as an
from .modules import AttentionLayer, Norm
from .params import human
from .summary import Summary, summarize_model

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
# the summary in words: each function renders typed fields of a Summary
# ----------------------------------------------------------------------------------------


def span_label(a: AttentionLayer) -> str:
    if a.window:
        return f"sliding({a.window})"
    if a.chunk:
        return f"chunked({a.chunk})"
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


def rope_text(s: Summary) -> str:
    """The rotary bases: "θ=500,000, llama3 scaling x8"; Gemma's sliding layers have their own."""
    text = _rope_text(s.rope)
    if s.rope_local is not None and any(a.window for a in s.attention):
        text += f"; sliding layers {_rope_text(s.rope_local)}"
    return text


def positions_short(s: Summary) -> str:
    if s.position == "learned":
        return "learned absolute"
    flags = ["RoPE" if a.rope else "NoPE" for a in s.attention]
    if "RoPE" not in flags:
        return "NoPE every layer"
    if "NoPE" not in flags:
        return "RoPE every layer"
    every = _every(flags, "NoPE")
    return f"NoPE {every}" if every else an.summarize(flags)


def positions(s: Summary) -> str:
    short = positions_short(s)
    if s.position == "learned" or not any(a.rope for a in s.attention):
        return short
    return f"{short}; RoPE {rope_text(s)}"


def attention_kinds(s: Summary) -> str:
    return " / ".join(sorted({a.label for a in s.attention}))


def attention_shape(s: Summary) -> str:
    a = s.attention[0]
    return f"{a.heads} / {a.kv_heads} / {a.head_dim}"


def attention_pattern(s: Summary) -> str:
    """Each layer's span (and kind, RoPE, where they vary), as a repeated schedule."""
    vary_rope = len({a.rope for a in s.attention}) > 1
    vary_kind = len({a.label for a in s.attention}) > 1
    labels = []
    for a in s.attention:
        lab = span_label(a)
        if vary_rope:
            lab += "/RoPE" if a.rope else "/NoPE"
        if vary_kind:
            lab = f"{a.label} {lab}"
        labels.append(lab)
    return an.summarize(labels)


def all_global(s: Summary) -> bool:
    return all(a.span is None for a in s.attention)


def attention_pattern_short(s: Summary) -> str:
    """"global", "sliding(4096) every layer" or the article's "5:1 sliding(1024):global"."""
    spans = [span_label(a) for a in s.attention]
    if all_global(s):
        return "global"
    if len(set(spans)) == 1:
        return f"{spans[0]} every layer"
    return an.ratio(spans, {"full": "global"}) or an.summarize(spans)


def cache_text(s: Summary) -> str:
    idle = s.kv_sharing_layers
    return s.attention[0].cache + (f"; {idle} layers cache nothing (they reuse another layer's K and V)" if idle else "")


_QK_NORMS = {"none": "none", "head": "RMSNorm per head", "proj": "RMSNorm over the q/k projections",
             "l2": "L2 norm without weight"}
PLACEMENTS = {"pre": "pre", "post": "post inside residual", "sandwich": "pre+post (sandwich)"}


def norm_name(norm: Norm) -> str:
    """"RMSNorm", "LayerNorm", "RMSNorm (1 + w)" (Gemma's offset weight)."""
    return norm.name + (" (1 + w)" if norm.unit_offset else "")


def qk_norm_text(s: Summary) -> str:
    qk = [a.qk_norm for a in s.attention]
    used = sorted(set(qk) - {"none"})
    if not used:
        return "none"
    text = " / ".join(_QK_NORMS.get(q, q) for q in used)
    normed = sum(q != "none" for q in qk)
    return text + (f" on {normed} of {len(qk)} layers" if normed < len(qk) else "")


def ffn_kind(s: Summary) -> str:
    return " / ".join(sorted({f.kind for f in s.ffn}))


def dense_widths(s: Summary) -> str:
    return " / ".join(map(str, sorted({f.width for f in s.dense})))


def moe_shape(s: Summary) -> str:
    """"256 experts, 8 active + 1 shared" (the first MoE layer's)."""
    m = s.moe[0]
    return f"{m.experts} experts, {m.active} active" + (f" + {m.shared} shared" if m.shared else "")


def moe_where(s: Summary) -> str:
    """Which layers are MoE: "every layer", "first 3 layers dense", "MoE every 2nd layer"."""
    layers = ["MoE" if f.moe else "dense" for f in s.ffn]
    rs = an.runs(layers)
    if not s.dense:
        return "every layer"
    if rs[0][1] == "dense" and len(rs) == 2:
        return f"first {rs[0][0]} layer{'s' if rs[0][0] > 1 else ''} dense"
    every = _every(layers, "MoE")
    return f"MoE {every}" if every else an.summarize(layers)


def moe_text(s: Summary) -> str:
    if not s.moe:
        return "—"
    dense = f"; dense FFN width {s.dense[0].width}" if s.dense else ""
    return f"{moe_shape(s)}, expert width {s.moe[0].width}{dense}; {moe_where(s)}"


def extras_text(s: Summary, none: str) -> str:
    return ", ".join(s.extras) or none


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


@dataclass
class Row:
    label: str
    text: str
    value: Any = None  # the raw number behind the text, for CSV / JSON


def table_rows(s: Summary) -> list[Row]:
    """The rows of ``compare``, in order."""
    c = s.params
    ctx = f"{s.context:,}"
    return [
        Row("total params", f"{human(c.total)} ({c.total:,})", c.total),
        Row("active params", human(c.active), c.active),
        Row("effective params (without offloadable tables)", human(c.effective) if c.effective else "—", c.effective),
        Row("embedding params", human(c.embedding), c.embedding),
        Row("non-embedding params", human(c.non_embedding), c.non_embedding),
        Row("layers", str(s.num_layers), s.num_layers),
        Row("hidden size", str(s.hidden_size), s.hidden_size),
        Row("heads / KV heads / head_dim", attention_shape(s)),
        Row("attention", attention_kinds(s)),
        Row("KV cache holds", cache_text(s)),
        Row("attention pattern", attention_pattern(s)),
        Row("positions", positions(s)),
        Row("norm", f"{norm_name(s.norms.form)}, {PLACEMENTS[s.norms.placement]}"),
        Row("QK-norm", qk_norm_text(s)),
        Row("FFN", ffn_kind(s) if s.moe else f"{ffn_kind(s)}, width {dense_widths(s)}"),
        Row("MoE", moe_text(s)),
        Row("other per-layer modules", extras_text(s, "—")),
        Row("vocabulary", f"{s.vocab_size:,}", s.vocab_size),
        Row("tied head", "yes" if s.tied_head else "no"),
        Row("KV cache / token", _bytes(s.kv_bytes_per_token), s.kv_bytes_per_token),
        Row(f"KV cache @ {ctx} ({s.dtype})", _bytes(s.kv_bytes), s.kv_bytes),
        Row(f"prefill FLOPs/token @ {ctx}", _flops(s.prefill_flops.total), s.prefill_flops.total),
        Row(f"decode FLOPs/token @ {ctx}", _flops(s.decode_flops.total), s.decode_flops.total),
    ]


def diff_terms(s: Summary) -> dict[str, str]:
    """The architecture in short form, the vocabulary of ``diff``."""
    terms = {
        "attention": attention_kinds(s),
        "attention pattern": attention_pattern_short(s),
        "positions": positions_short(s),
        "norm": PLACEMENTS[s.norms.placement],
        "norm form": norm_name(s.norms.form),
        "QK-norm": qk_norm_text(s),
        "FFN": f"MoE {moe_shape(s)}, {moe_where(s)}" if s.moe else "dense",
        "FFN kind": ffn_kind(s),
        "other per-layer modules": extras_text(s, "none"),
        "KV cache holds": cache_text(s),
        "layers": str(s.num_layers),
        "hidden size": str(s.hidden_size),
        "heads / KV heads / head_dim": attention_shape(s),
        "vocabulary": f"{s.vocab_size:,}",
        "tied head": "yes" if s.tied_head else "no",
        "embedding scale": "none" if s.embed_scale is None else f"x{s.embed_scale:.4g}",
        "logit soft-cap": "none" if not s.logit_softcap else f"{s.logit_softcap:g}",
    }
    if s.position == "rope":
        terms["RoPE"] = rope_text(s)
    if not s.moe:
        terms["FFN width"] = dense_widths(s)
    return terms


def numbers(s: Summary) -> dict[str, Any]:
    """The raw figures of ``compare --json``."""
    c = s.params
    return {
        "total_params": c.total, "active_params": c.active, "embedding_params": c.embedding,
        "non_embedding_params": c.non_embedding, "effective_params": c.effective, "context": s.context,
        "dtype": s.dtype, "kv_bytes_per_token": s.kv_bytes_per_token, "kv_bytes": s.kv_bytes,
        "prefill_flops_per_token": s.prefill_flops.total, "decode_flops_per_token": s.decode_flops.total,
        "matmul_flops_per_token": s.prefill_flops.matmul,
    }


# ----------------------------------------------------------------------------------------
# the profile of one model
# ----------------------------------------------------------------------------------------


@dataclass
class Profile:
    """One model as ``compare`` sees it: its typed summary (what every renderer reads) and the
    meta-device model it was read from."""

    summary: Summary
    model: Decoder = field(repr=False)

    @property
    def name(self) -> str:
        return self.summary.name

    @cached_property
    def rows(self) -> list[Row]:
        return table_rows(self.summary)

    @cached_property
    def short(self) -> dict[str, str]:
        return diff_terms(self.summary)

    @property
    def numbers(self) -> dict[str, Any]:
        return numbers(self.summary)

    @property
    def breakdown(self) -> dict[str, int]:
        return self.summary.breakdown

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)

    def to_dict(self) -> dict[str, Any]:
        return dict(name=self.name, **self.numbers, breakdown=self.breakdown,
                    description={r.label: r.text for r in self.rows if r.value is None})


def profile(cfg: ModelConfig, context: int = 8192, dtype: str = "bf16", name: str | None = None) -> Profile:
    """Build ``cfg`` on the meta device and summarise it; KV and FLOPs at ``context`` tokens."""
    model = an.meta_model(cfg)
    return Profile(summarize_model(model, context, dtype, name), model)


def configs(specs: list[str], sets: list[str] | None = None) -> list[ModelConfig]:
    """The configurations of ``specs``; ``sets`` (``field=value`` what-ifs) change the last one, so
    that ``A A --set ...`` sets a model beside its variant."""
    from .overrides import apply

    if not specs:
        raise ConfigError("name at least one model: a preset (see `llmarch presets`), a checkpoint directory or a .gguf file")
    cfgs = [load_config(s) for s in specs]
    cfgs[-1] = apply(cfgs[-1], sets or [])
    return cfgs


def profiles(specs: list[str], context: int = 8192, dtype: str = "bf16", sets: list[str] | None = None) -> list[Profile]:
    cfgs = configs(specs, sets)
    check_context(cfgs, context)
    return [profile(cfg, context, dtype) for cfg in cfgs]


def check_context(cfgs: list[ModelConfig], context: int) -> None:
    """A context longer than every model's maximum describes none of them: refuse it."""
    longest = max(cfg.max_position_embeddings for cfg in cfgs)
    if context > longest:
        raise ConfigError(f"--context {context:,} is beyond every model's maximum context (the longest is {longest:,} "
                          "tokens); give a context at most that long")


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


def _signed(n: int, fmt) -> str:
    return ("+" if n > 0 else "-" if n < 0 else "±") + fmt(abs(n))


def deltas(a: Profile, b: Profile) -> list[str]:
    """Parameters, active parameters and KV cache (at the profiles' context and dtype), A -> B."""
    sa, sb = a.summary, b.summary
    rows = [
        ("total params", sa.params.total, sb.params.total, human),
        ("active params", sa.params.active, sb.params.active, human),
        (f"KV cache / token ({sa.dtype})", sa.kv_bytes_per_token, sb.kv_bytes_per_token, _bytes),
        (f"KV cache @ {sa.context:,} tokens ({sa.dtype})", sa.kv_bytes, sb.kv_bytes, _bytes),
    ]
    out = []
    for label, x, y, fmt in rows:
        ratio = f", x{y / x:.3g}" if x and x != y else ""
        out.append(f"{label}: {fmt(x)} -> {fmt(y)} ({_signed(y - x, fmt)}{ratio})")
    return out


def diff(a: Profile, b: Profile) -> list[str]:
    """The rows that differ, one ``"field: A -> B"`` line each, in the article's words."""
    return [f"{k}: {a.short[k]} -> {b.short.get(k, '—')}" for k in a.short if a.short[k] != b.short.get(k, "—")] + [
        f"{k}: — -> {b.short[k]}" for k in b.short if k not in a.short
    ]
