"""What an architecture is and what it costs, read from its built module tree (on the meta device).

Everything here reads the modules, never a model's name. The modules declare what they are
through a few protocols (llmarch.model implements them; a new attention or FFN kind plugs in by
implementing them):

* ``param_component`` (a module's parameters belong to that component) and
  ``child_components`` (a parent names the components of some of its children);
* ``attn.describe()``: a dict with ``kind, label, heads, kv_heads, head_dim, window, chunk, rope,
  qk_norm, flops_per_key, cache`` (and ``decode_flops_per_key`` where decoding differs), and
  ``attn.kv_bytes_per_token(bytes_per_element)``;
* ``mlp.describe()``: a dict with ``kind, width, moe`` (MoE layers add ``experts, active,
  shared, shared_width``);
* ``inactive_params_per_token()`` (routed experts a token skips) and ``offloadable_params()``
  (tables that can live off the accelerator);
* a block's children ``attn``, ``mlp`` and the norms ``attn_norm``, ``attn_post_norm``,
  ``mlp_norm``, ``mlp_post_norm`` (None where the block has none); any other child is an extra
  per-layer module.

They are read once into typed records (:class:`AttentionLayer`, :class:`FFNLayer`,
:class:`BlockNorms`), which :mod:`llmarch.analysis.summary` gathers for the renderers.

FLOPs are forward FLOPs per token, counting 2 per multiply-add of:

* every weight matrix a token passes through (projections, FFN or active experts, router,
  output head; embedding *lookups* are free), i.e. 2 x matmul parameters;
* attention scores q.k and the weighted sum of values, over the keys the token sees
  (``keys="visible"``: causal, windowed, chunked) or over the keys the engine's dense SDPA
  multiplies, masked ones included (``keys="computed"``).

Not counted: norms, softmax, RoPE, activations, residual adds, biases (a few per mille).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model.config import ModelConfig
from ..model.decoder import Decoder, build_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}

# torch's own modules cannot carry a ``param_component`` attribute; llmarch's modules do
BUILTIN_COMPONENTS: dict[type, str] = {nn.Embedding: "embedding", nn.LayerNorm: "norms"}
PLE_TABLE = "per-layer embedding table"  # a token-indexed table that can live off the accelerator (Gemma 3n)
COMPONENTS = ("embedding", PLE_TABLE, "attention", "dense FFN", "experts", "shared expert", "router", "norms", "head", "other")


def dtype_bytes(name: str) -> int:
    """Bytes per element of a cache dtype name (bf16, fp16, fp32, fp8)."""
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return torch.empty(0, dtype=DTYPES[name]).element_size()


def meta_model(cfg: ModelConfig) -> Decoder:
    return build_model(cfg, device="meta")


# ----------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------


def param_breakdown(model: Decoder) -> dict[str, int]:
    """Parameters per component; a parameter belongs to the innermost module that names one
    (``param_component``, or its parent's ``child_components[name]``); the embedding table of a
    module with ``offloadable_params`` is the per-layer embedding table.

    Sums to the model's parameter count (a tied head is counted once, as the embedding).
    """
    found: dict[int, str] = {}
    sizes: dict[int, int] = {}

    def visit(mod: nn.Module, inherited: str | None, named: str | None = None, offloaded: bool = False) -> None:
        own = PLE_TABLE if offloaded and isinstance(mod, nn.Embedding) else None
        comp = own or named or getattr(mod, "param_component", None) or BUILTIN_COMPONENTS.get(type(mod)) or inherited
        for p in mod.parameters(recurse=False):
            if id(p) not in found:
                found[id(p)] = comp or ("head" if p is model.head_weight else "other")
                sizes[id(p)] = p.numel()
        names = getattr(mod, "child_components", {})
        for name, child in mod.named_children():
            visit(child, comp, names.get(name), hasattr(mod, "offloadable_params"))

    visit(model, None)
    out = dict.fromkeys(COMPONENTS, 0)
    for pid, comp in found.items():
        out[comp] = out.get(comp, 0) + sizes[pid]
    return {k: v for k, v in out.items() if v}


def module_sum(model: Decoder, method: str) -> int:
    """Sum of ``method()`` over the modules that declare it (``inactive_params_per_token``, ...)."""
    return sum(fn() for m in model.modules() if (fn := getattr(m, method, None)) is not None)


def inactive_params(model: Decoder) -> int:
    return module_sum(model, "inactive_params_per_token")


def matmul_params(model: Decoder) -> int:
    """Weight-matrix parameters one token multiplies with: every >= 2-D parameter except
    embedding tables (looked up, not multiplied), plus the head, minus inactive experts."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    n = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in tables)
    if id(model.head_weight) in tables:  # tied head: the embedding matrix is multiplied once
        n += model.head_weight.numel()
    return n - inactive_params(model)


# ----------------------------------------------------------------------------------------
# one layer's attention: kind, shape, span, cache and visible keys
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionLayer:
    """One layer's attention, as its module describes itself."""

    kind: str  # MHA, GQA, MQA or MLA
    label: str  # the module's short name: "GQA 8 KV heads", "MLA latent 512" (shown, never parsed)
    heads: int
    kv_heads: int
    head_dim: int
    window: int | None  # sliding window in tokens; None when the layer does not slide
    chunk: int | None  # attention chunk in tokens; None when the layer is not chunked
    rope: bool  # False: a NoPE layer
    qk_norm: str  # none, head (per head), proj (over the q/k projections), l2 (without weight)
    cache: str  # what the layer's cache holds, in the module's words (shown, never parsed)
    kv_elements_per_token: int  # numbers cached per token; 0 when the layer reuses another's K and V
    flops_per_key: int  # 2 x multiply-adds of one query against one key: scores and values
    decode_flops_per_key: int  # the same for a decoding step (MLA attends over its latents)

    @classmethod
    def of(cls, attn: nn.Module) -> AttentionLayer:
        d = attn.describe()
        return cls(
            kind=d["kind"], label=d["label"], heads=d["heads"], kv_heads=d["kv_heads"], head_dim=d["head_dim"],
            window=d["window"], chunk=d["chunk"], rope=d["rope"], qk_norm=d["qk_norm"], cache=d["cache"],
            kv_elements_per_token=attn.kv_bytes_per_token(1), flops_per_key=d["flops_per_key"],
            decode_flops_per_key=d.get("decode_flops_per_key", d["flops_per_key"]),
        )

    @property
    def span(self) -> int | None:
        """Tokens the layer can look back over (sliding window or chunk), None for global layers."""
        return self.window or self.chunk

    def cached_tokens(self, context: int) -> int:
        """Tokens the cache holds for a context: a sliding or chunked layer keeps a ring of
        min(span, context) tokens; a global layer keeps all of them (NoPE layers too)."""
        return min(self.span, context) if self.span else context

    def kv_bytes(self, context: int, bytes_per_element: int) -> int:
        return self.kv_elements_per_token * bytes_per_element * self.cached_tokens(context)

    def visible_keys(self, pos: int) -> int:
        """Keys the query at (0-based) position ``pos`` attends to."""
        if self.window:
            return min(pos + 1, self.window)
        if self.chunk:
            return pos % self.chunk + 1
        return pos + 1

    def visible_keys_sum(self, tokens: int) -> int:
        """Sum of visible keys over the queries at positions 0 .. tokens-1 (a causal prefill)."""
        t = tokens
        if self.window:
            w = self.window
            return t * (t + 1) // 2 if t <= w else w * (w + 1) // 2 + (t - w) * w
        if self.chunk:
            c = self.chunk
            q, r = divmod(t, c)
            return q * c * (c + 1) // 2 + r * (r + 1) // 2
        return t * (t + 1) // 2

    def computed_decode_keys(self, context: int) -> int:
        """Keys a decoding step multiplies when the cache was allocated for ``context`` tokens:
        a ring (span < context) is multiplied whole, masked slots included."""
        return self.span if self.span and self.span < context else context


def attention_layers(model: Decoder) -> list[AttentionLayer]:
    return [AttentionLayer.of(blk.attn) for blk in model.layers]


def cache_bytes(layers: list[AttentionLayer], context: int, bytes_per_element: int) -> int:
    """KV-cache bytes of one sequence of ``context`` tokens."""
    return sum(layer.kv_bytes(context, bytes_per_element) for layer in layers)


def kv_cache_bytes(model: Decoder, context: int, bytes_per_element: int, batch: int = 1) -> int:
    return batch * cache_bytes(attention_layers(model), context, bytes_per_element)


@dataclass(frozen=True)
class Flops:
    matmul: int
    attention: int

    @property
    def total(self) -> int:
        return self.matmul + self.attention


def prefill_flops_per_token(model: Decoder, tokens: int, keys: str = "visible") -> Flops:
    """Forward FLOPs per token, averaged over a prompt of ``tokens`` tokens (logits for each)."""
    attn = sum(
        layer.flops_per_key * (tokens * tokens if keys == "computed" else layer.visible_keys_sum(tokens))
        for layer in attention_layers(model)
    )
    return Flops(2 * matmul_params(model), round(attn / tokens))


def decode_flops_per_token(model: Decoder, context: int, keys: str = "visible") -> Flops:
    """Forward FLOPs of the token at position context-1, attending over a cache of the rest."""
    attn = sum(
        layer.decode_flops_per_key
        * (layer.computed_decode_keys(context) if keys == "computed" else layer.visible_keys(context - 1))
        for layer in attention_layers(model)
    )
    return Flops(2 * matmul_params(model), attn)


# ----------------------------------------------------------------------------------------
# one layer's FFN, the block's norms and extra modules
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FFNLayer:
    """One layer's feed-forward network, as its module describes itself."""

    kind: str  # the module's name for its shape and activation: SwiGLU, GeGLU, "GELU MLP"
    width: int  # hidden width; of each routed expert in an MoE layer
    moe: bool
    experts: int = 0  # routed experts
    active: int = 0  # routed experts per token
    shared: int = 0  # shared experts every token passes through
    shared_width: int = 0  # their hidden width, all together

    @classmethod
    def of(cls, mlp: nn.Module) -> FFNLayer:
        d = mlp.describe()
        return cls(kind=d["kind"], width=d["width"], moe=d["moe"], experts=d.get("experts", 0),
                   active=d.get("active", 0), shared=d.get("shared", 0), shared_width=d.get("shared_width", 0))


def ffn_layers(model: Decoder) -> list[FFNLayer]:
    return [FFNLayer.of(blk.mlp) for blk in model.layers]


@dataclass(frozen=True)
class Norm:
    name: str  # the norm module's class: RMSNorm, LayerNorm
    unit_offset: bool  # weight stored as w, applied as (1 + w) (Gemma)

    @classmethod
    def of(cls, norm: nn.Module | None) -> Norm | None:
        return None if norm is None else cls(type(norm).__name__, bool(getattr(norm, "unit_offset", False)))


@dataclass(frozen=True)
class BlockNorms:
    """The norms of a decoder block (the first; all blocks have the same), None where it has none."""

    attn: Norm | None  # before attention (pre-norm)
    attn_post: Norm | None  # after attention, inside the residual branch
    mlp: Norm | None
    mlp_post: Norm | None
    final: Norm  # after the last block

    @classmethod
    def of(cls, model: Decoder) -> BlockNorms:
        blk = model.layers[0]
        return cls(Norm.of(blk.attn_norm), Norm.of(blk.attn_post_norm), Norm.of(blk.mlp_norm),
                   Norm.of(blk.mlp_post_norm), Norm.of(model.norm))

    @property
    def placement(self) -> str:
        """pre, post or sandwich (pre and post), in the terms of ``ModelConfig.norm_placement``."""
        pre, post = self.attn is not None, self.attn_post is not None
        return "sandwich" if pre and post else ("post" if post else "pre")

    @property
    def form(self) -> Norm:
        """The block's norm (the final norm when the block has none)."""
        return next(n for n in (self.attn, self.attn_post, self.final) if n is not None)


_STANDARD_BLOCK = frozenset({"attn", "mlp", "attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm"})


def block_extras(model: Decoder) -> list[str]:
    """Modules a block has beyond attention, FFN and norms (Gemma 3n: AltUp, Laurel, ...), by class."""
    seen: dict[str, None] = {}
    for blk in model.layers:
        for name, child in blk.named_children():
            if name not in _STANDARD_BLOCK:
                seen[type(child).__name__] = None
    return list(seen)


# ----------------------------------------------------------------------------------------
# per-layer schedules in words
# ----------------------------------------------------------------------------------------


def runs(labels: list[str]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for lab in labels:
        if out and out[-1][1] == lab:
            out[-1] = (out[-1][0] + 1, lab)
        else:
            out.append((1, lab))
    return out


def period(labels: list[str]) -> int | None:
    """Shortest p such that the schedule is one block of p layers repeated (at least twice,
    possibly cut short at the end); None when there is no such repetition."""
    n = len(labels)
    for p in range(1, n // 2 + 1):
        if all(labels[i] == labels[i % p] for i in range(n)):
            return p
    return None


def _join(rs: list[tuple[int, str]]) -> str:
    return " + ".join(f"{c}x {lab}" for c, lab in rs)


def summarize(labels: list[str]) -> str:
    """``["sliding(512)"]*5 + ["full"]`` repeated -> "5x sliding(512) + 1x full, repeated 3x"."""
    n = len(labels)
    if len(set(labels)) == 1:
        return f"{labels[0]} (all {n} layers)"
    p = period(labels)
    if p is None:
        return _join(runs(labels))
    reps, rem = divmod(n, p)
    text = f"{_join(runs(labels[:p]))}, repeated {reps}x"
    return text + (f" + {_join(runs(labels[reps * p:]))}" if rem else "")


def ratio(labels: list[str], names: dict[str, str] | None = None) -> str | None:
    """A repeated a..ab block as "5:1 a:b" (the article's "5:1 sliding:global"); else None."""
    p = period(labels)
    if p is None:
        return None
    rs = runs(labels[:p])
    if len(rs) != 2:
        return None
    names = names or {}
    (ca, a), (cb, b) = rs
    return f"{ca}:{cb} {names.get(a, a)}:{names.get(b, b)}"
