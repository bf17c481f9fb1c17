"""The article, section by section: each side-by-side it draws, the claim it makes, and the
figure llmarch computes for it; and the what-ifs behind its arguments.

A :class:`Section` names the two models the article's figure pairs (in the article's order) and
the claim in one sentence; its ``check`` reads the two profiles and returns a :class:`Finding`:
llmarch's figure in words, whether it agrees with the article's text and, where not, why. A
:class:`WhatIf` is one model and its ``--set`` variants (see :mod:`llmarch.analysis.overrides`)
with the figure the argument turns on (KV bytes against context, per token, or parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..model.config import ModelConfig
from .compare import (
    Profile,
    _bytes,
    diff,
    load_config,
    moe_shape,
    moe_where,
    positions_short,
    profile,
)
from .modules import dtype_bytes
from .overrides import apply
from .params import human

# a model of the report: a preset (or checkpoint) and the --set assignments that make a variant
Model = tuple[str, tuple[str, ...]]


def m(spec: str, *sets: str) -> Model:
    return spec, sets


@dataclass(frozen=True)
class Finding:
    text: str  # llmarch's figure, in words
    agrees: bool  # with the article's text
    reason: str = ""  # why llmarch's figure differs, where it does


@dataclass(frozen=True)
class Section:
    key: str  # the HTML id
    title: str  # the article's section
    figure: str  # the article's figure that draws the pair
    pair: tuple[Model, Model]
    claim: str  # the article's claim, in one sentence
    check: Callable[[Profile, Profile], Finding]


class Profiles:
    """Each model of the report built once (on the meta device), at one context and dtype."""

    def __init__(self, context: int, dtype: str):
        self.context, self.dtype = context, dtype
        self._cache: dict[Model, Profile] = {}

    def config(self, model: Model) -> ModelConfig:
        spec, sets = model
        return apply(load_config(spec), list(sets))

    def __call__(self, model: Model) -> Profile:
        if model not in self._cache:
            self._cache[model] = profile(self.config(model), self.context, self.dtype)
        return self._cache[model]


def near(n: int, billions: float, rel: float = 0.02) -> bool:
    """``n`` parameters is the article's rounded figure of ``billions`` (within ``rel``)."""
    return abs(n / 1e9 - billions) <= rel * billions


def kv_at(p: Profile, context: int) -> int:
    """KV-cache bytes of one sequence of ``context`` tokens, in the profile's dtype."""
    return p.summary.kv_cache_bytes(context, dtype_bytes(p.summary.dtype))


def crossover(a: Profile, b: Profile, longest: int = 1 << 20) -> int | None:
    """The shortest context from which ``b``'s KV cache is larger than ``a``'s, when ``a``'s is the
    larger at one token and ``b``'s at ``longest`` tokens (bisection); None when they do not cross."""

    def b_larger(c: int) -> bool:
        return kv_at(b, c) > kv_at(a, c)

    if b_larger(1) or not b_larger(longest):
        return None
    lo, hi = 1, longest  # b_larger(lo) is False, b_larger(hi) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if b_larger(mid) else (mid, hi)
    return hi


# ----------------------------------------------------------------------------------------
# the sections, in the article's order
# ----------------------------------------------------------------------------------------

MHA_128 = ("attention_kind=mha", "num_kv_heads=128", "head_dim=128")  # DeepSeek-V3's 128 heads as plain MHA


def _deepseek(a: Profile, b: Profile) -> Finding:
    s, c = a.summary, a.summary.params
    ratio = b.summary.kv_bytes_per_token / s.kv_bytes_per_token
    text = (f"{human(c.total)} total, {human(c.active)} active per token ({moe_shape(s)}); MLA caches "
            f"{_bytes(s.kv_bytes_per_token)} per token, 128-head MHA would cache {_bytes(b.summary.kv_bytes_per_token)} "
            f"(x{ratio:.0f})")
    return Finding(text, near(c.total, 671) and near(c.active, 37))


def _olmo2(a: Profile, b: Profile) -> Finding:
    lines = diff(a, b)
    text = "; ".join(ln for ln in lines if ln.startswith(("norm:", "QK-norm", "attention:")))
    sa, sb = a.summary, b.summary
    ok = sb.norms.placement == "post" and sa.norms.placement == "pre" and sb.attention[0].qk_norm != "none" \
        and sb.attention[0].kind == "MHA" and sa.attention[0].kind == "GQA"
    return Finding(text, ok)


def _gemma3(a: Profile, b: Profile) -> Finding:
    sb = b.summary
    ctx = sb.context
    glob = sb.kv_bytes_per_token * ctx  # every layer caching every token
    text = (f"norms: {a.short['norm']} -> {b.short['norm']}; KV cache at {ctx:,} tokens: {_bytes(sb.kv_bytes)} with "
            f"{b.short['attention pattern']}, {_bytes(glob)} if every layer were global ({sb.kv_bytes / glob:.0%})")
    return Finding(text, sb.norms.placement == "sandwich" and sb.kv_bytes < glob)


def _gemma3n(a: Profile, b: Profile) -> Finding:
    c = b.summary.params
    ple = c.total - (c.effective or c.total)
    text = (f"{b.name} text decoder: {human(c.total)} with its per-layer embedding table ({human(ple)}), "
            f"{human(c.effective or c.total)} without it (the part that must sit in accelerator memory); "
            f"{a.name}: {human(a.summary.params.total)}")
    reason = ("llmarch counts the text decoder only. Without the per-layer table it is the article's ~4B; with it, "
              f"{human(c.total)}, not 5.44B: Google's figure counts the released checkpoint's own selection of "
              "tensors (the release adds vision and audio encoders, which llmarch does not build), so the two "
              "totals do not describe the same set of weights.")
    return Finding(text, False, reason)


def _mistral(a: Profile, b: Profile) -> Finding:
    sa, sb = a.summary, b.summary
    cross = crossover(a, b)
    text = (f"layers {sa.num_layers} -> {sb.num_layers}; KV per token of full attention {_bytes(sa.kv_bytes_per_token)}"
            f" -> {_bytes(sb.kv_bytes_per_token)}; at {sa.context:,} tokens {_bytes(sa.kv_bytes)} -> "
            f"{_bytes(sb.kv_bytes)}; Mistral's cache is the smaller one only below {cross:,} tokens")
    ok = sb.num_layers < sa.num_layers and sb.kv_bytes < sa.kv_bytes
    reason = "" if ok else (
        f"{sum(x.window is not None for x in sa.attention)} of Gemma 3's {sa.num_layers} layers hold only their "
        f"{sa.attention[0].window}-token window, so from {cross:,} tokens on Mistral's all-global cache is the "
        "larger: it has fewer layers, not a smaller cache at long context.")
    return Finding(text, ok, reason)


def _llama4(a: Profile, b: Profile) -> Finding:
    ca, cb = a.summary.params, b.summary.params
    ma, mb = a.summary.moe[0], b.summary.moe[0]
    text = (f"total {human(ca.total)} vs {human(cb.total)} (+{ca.total / cb.total - 1:.1%}); active {human(ca.active)} "
            f"vs {human(cb.active)} (x{ca.active / cb.active:.2f}); per token {ma.shared} shared + {ma.active} routed "
            f"experts of width {ma.width} vs {mb.shared} shared + {mb.active} routed of width {mb.width}; "
            f"MoE: {moe_where(a.summary)} vs {moe_where(b.summary)}")
    # the article's 68% is 671B / 400B rounded: within a point of llmarch's exact ratio
    ok = abs(ca.total / cb.total - 1.68) < 0.01 and ca.active > 2 * cb.active and near(cb.active, 17)
    reason = "" if ok else f"the totals' ratio is {ca.total / cb.total - 1:.1%}, not the article's 68%"
    return Finding(text, ok, reason)


def _qwen3_dense(a: Profile, b: Profile) -> Finding:
    sa, sb = a.summary, b.summary
    text = (f"layers {sa.num_layers} vs {sb.num_layers}; hidden {sa.hidden_size} vs {sb.hidden_size}; heads "
            f"{sa.attention[0].heads} vs {sb.attention[0].heads}; parameters {human(sa.params.total)} vs "
            f"{human(sb.params.total)}; KV per token {_bytes(sa.kv_bytes_per_token)} vs {_bytes(sb.kv_bytes_per_token)}")
    ok = sa.num_layers > sb.num_layers and sa.hidden_size < sb.hidden_size \
        and sa.attention[0].heads < sb.attention[0].heads and sa.params.total < sb.params.total
    return Finding(text, ok)


def _qwen3_moe(a: Profile, b: Profile) -> Finding:
    ma, mb = a.summary.moe[0], b.summary.moe[0]
    text = (f"{moe_shape(a.summary)} vs {moe_shape(b.summary)}; attention {a.short['attention']} vs "
            f"{b.short['attention']}; active {human(a.summary.params.active)} vs {human(b.summary.params.active)}")
    return Finding(text, ma.shared == 1 and mb.shared == 0 and ma.active == mb.active == 8)


def _smollm3(a: Profile, b: Profile) -> Finding:
    text = f"{positions_short(a.summary)} vs {positions_short(b.summary)}"
    return Finding(text, positions_short(b.summary) == "NoPE every 4th layer")


def _kimi(a: Profile, b: Profile) -> Finding:
    ma, mb = a.summary.moe[0], b.summary.moe[0]
    ha, hb = a.summary.attention[0].heads, b.summary.attention[0].heads
    text = (f"experts {ma.experts} -> {mb.experts}; MLA heads {ha} -> {hb}; total {human(a.summary.params.total)} -> "
            f"{human(b.summary.params.total)}")
    return Finding(text, mb.experts == 384 and ma.experts == 256 and hb == 64 and ha == 128
                   and near(b.summary.params.total, 1000, rel=0.05))


SECTIONS: tuple[Section, ...] = (
    Section("deepseek-v3", "1. DeepSeek V3/R1", "Figures 3 and 5", (m("deepseek-v3"), m("deepseek-v3", *MHA_128)),
            "Of DeepSeek-V3's 671B parameters only 37B are used per token (1 shared + 8 of 256 routed experts), and "
            "MLA caches a compressed latent instead of every head's keys and values.", _deepseek),
    Section("olmo2", "2. OLMo 2", "Figure 10", (m("llama3-8b"), m("olmo2-7b")),
            "OLMo 2 is Llama 3 with its RMSNorms moved after attention and FFN (inside the residual) and QK-norm "
            "added; it keeps multi-head attention where Llama 3 uses GQA.", _olmo2),
    Section("gemma3", "3. Gemma 3", "Figures 11 and 14", (m("olmo2-7b"), m("gemma3-27b")),
            "Gemma 3 puts RMSNorms both before and after attention and FFN, and caches far less than global "
            "attention would with five 1024-token sliding layers per global one.", _gemma3),
    Section("gemma3n", "4. Gemma 3n", "Figure 15", (m("gemma3-4b"), m("gemma3n-e4b")),
            "Streaming the per-layer embeddings from CPU or SSD lets Gemma 3n E4B run with about 4B parameters in "
            "accelerator memory while its full count is 5.44B.", _gemma3n),
    Section("mistral", "5. Mistral Small 3.1", "Figure 16", (m("gemma3-27b"), m("mistral-small-3.1-24b")),
            "Mistral Small 3.1 is faster than Gemma 3 27B in part because it shrinks the KV cache and the layer "
            "count.", _mistral),
    Section("llama4", "6. Llama 4", "Figure 17", (m("deepseek-v3"), m("llama4-maverick")),
            "DeepSeek-V3 is about 68% larger than Llama 4 Maverick in total and has more than twice its 17B active "
            "parameters; Maverick uses fewer, larger experts and MoE in every other block.", _llama4),
    Section("qwen3-dense", "7. Qwen3 (dense)", "Figure 18", (m("qwen3-0.6b"), m("llama3.2-1b")),
            "Qwen3 0.6B is deeper (more layers) and Llama 3 1B wider (more heads), and Qwen3 has the smaller "
            "memory footprint.", _qwen3_dense),
    Section("qwen3-moe", "7. Qwen3 (MoE)", "Figure 19", (m("deepseek-v3"), m("qwen3-235b-a22b")),
            "Qwen3 235B-A22B is remarkably similar to DeepSeek-V3 but has no shared expert: 8 active experts, not "
            "8 + 1.", _qwen3_moe),
    Section("smollm3", "8. SmolLM3", "Figure 21", (m("qwen3-4b"), m("smollm3-3b")),
            "SmolLM3 is a standard architecture that leaves RoPE out of every 4th layer (NoPE).", _smollm3),
    Section("kimi-k2", "9. Kimi K2", "Figure 25", (m("deepseek-v3"), m("kimi-k2")),
            "Kimi K2 is DeepSeek-V3 scaled to 1 trillion parameters with more experts (384 instead of 256) and "
            "fewer MLA heads (64 instead of 128).", _kimi),
)


# ----------------------------------------------------------------------------------------
# the what-ifs
# ----------------------------------------------------------------------------------------

GEMMA2_SCHEDULE = ('layer_types=["sliding","full"]', "sliding_window=4096")


@dataclass(frozen=True)
class WhatIf:
    key: str
    title: str
    question: str
    variants: tuple[tuple[str, Model], ...]  # (label, model)
    measure: str  # "kv-context" (KV bytes against context), "kv-token", "params" or "crossover"


WHAT_IFS: tuple[WhatIf, ...] = (
    WhatIf("gemma3-windows", "Gemma 3 27B: all global vs 5:1 / 1024 vs Gemma 2's 1:1 / 4096",
           "How much KV cache does Gemma 3's sliding-window schedule save, and how much did its change from "
           "Gemma 2's save on its own?",
           (("all global", m("gemma3-27b", 'layer_types=["full"]')),
            ("Gemma 2's 1:1, window 4096", m("gemma3-27b", *GEMMA2_SCHEDULE)),
            ("Gemma 3's 5:1, window 1024 (published)", m("gemma3-27b"))), "kv-context"),
    WhatIf("deepseek-attention", "DeepSeek-V3 with MHA or GQA instead of MLA",
           "What would DeepSeek-V3 cache per token with plain attention of the same 128 query heads (head_dim 128)?",
           (("MHA, 128 KV heads", m("deepseek-v3", *MHA_128)),
            ("GQA, 8 KV heads", m("deepseek-v3", "attention_kind=mha", "num_kv_heads=8", "head_dim=128")),
            ("MLA (published)", m("deepseek-v3"))), "kv-token"),
    WhatIf("maverick-all-moe", "Llama 4 Maverick with MoE in every block",
           "What would Maverick weigh if every block, not every other one, were an MoE block?",
           (("MoE every other block (published)", m("llama4-maverick")),
            ("MoE in every block", m("llama4-maverick", "moe_layers=[true]"))), "params"),
    WhatIf("mistral-gemma-crossover", "Mistral Small 3.1 vs Gemma 3 27B: where the KV caches cross",
           "From which context length on does Mistral's all-global cache outgrow Gemma 3's mostly sliding one?",
           (("Gemma 3 27B", m("gemma3-27b")), ("Mistral Small 3.1 24B", m("mistral-small-3.1-24b"))), "crossover"),
)

CONTEXTS = (4096, 32768, 131072)


def what_if_rows(w: WhatIf, get: Profiles) -> list[tuple[str, list[str]]]:
    """(label, cells) per variant; the columns are :func:`what_if_columns`."""
    rows = []
    for label, model in w.variants:
        s = get(model).summary
        if w.measure in ("kv-context", "crossover"):
            cells = [_bytes(kv_at(get(model), c)) for c in CONTEXTS]
        elif w.measure == "kv-token":
            cells = [_bytes(s.kv_bytes_per_token), f"{s.kv_bytes_per_token:,}"]
        else:
            cells = [human(s.params.total), human(s.params.active)]
        rows.append((label, cells))
    return rows


def what_if_columns(w: WhatIf, dtype: str) -> list[str]:
    if w.measure in ("kv-context", "crossover"):
        return [f"KV cache @ {c:,} ({dtype})" for c in CONTEXTS]
    if w.measure == "kv-token":
        return [f"KV cache / token ({dtype})", "bytes"]
    return ["total params", "active params"]


def what_if_answer(w: WhatIf, get: Profiles) -> str:
    """The what-if's answer in one sentence."""
    ps = [get(model) for _, model in w.variants]
    if w.measure == "crossover":
        cross = crossover(*ps)
        return (f"{w.variants[1][0]}'s cache is the larger from {cross:,} tokens on" if cross
                else "the caches do not cross")
    if w.measure == "kv-token":
        base = ps[-1].summary.kv_bytes_per_token
        return "; ".join(f"{label}: x{p.summary.kv_bytes_per_token / base:.1f} of MLA"
                         for (label, _), p in zip(w.variants[:-1], ps[:-1], strict=True))
    if w.measure == "params":
        a, b = ps[0].summary.params, ps[1].summary.params
        return f"total {human(a.total)} -> {human(b.total)}, active {human(a.active)} -> {human(b.active)}"
    ctx = CONTEXTS[1]
    full = kv_at(ps[0], ctx)
    return "; ".join(f"{label}: {kv_at(p, ctx) / full:.0%} of all-global at {ctx:,} tokens"
                     for (label, _), p in zip(w.variants[1:], ps[1:], strict=True))
