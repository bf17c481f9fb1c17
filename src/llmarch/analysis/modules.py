"""What an architecture costs, computed from its built module tree (on the meta device).

Everything here reads the modules, never a model's name: parameters are classified by the
``param_component`` of the module that owns them, attention layers report their kind, span,
KV-cache bytes and FLOPs per visible key through ``attn.describe()`` and
``attn.kv_bytes_per_token()``, FFN layers through ``mlp.describe()``, and MoE layers their
inactive parameters through ``inactive_params_per_token()``. A new attention or FFN kind plugs
in by implementing those methods.

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
COMPONENTS = ("embedding", "attention", "dense FFN", "experts", "shared expert", "router", "norms", "head", "other")


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
    (``param_component``, or its parent's ``child_components[name]``).

    Sums to the model's parameter count (a tied head is counted once, as the embedding).
    """
    found: dict[int, str] = {}
    sizes: dict[int, int] = {}

    def visit(mod: nn.Module, inherited: str | None, named: str | None = None) -> None:
        comp = named or getattr(mod, "param_component", None) or BUILTIN_COMPONENTS.get(type(mod)) or inherited
        for p in mod.parameters(recurse=False):
            if id(p) not in found:
                found[id(p)] = comp or ("head" if p is model.head_weight else "other")
                sizes[id(p)] = p.numel()
        names = getattr(mod, "child_components", {})
        for name, child in mod.named_children():
            visit(child, comp, names.get(name))

    visit(model, None)
    out = dict.fromkeys(COMPONENTS, 0)
    for pid, comp in found.items():
        out[comp] = out.get(comp, 0) + sizes[pid]
    return {k: v for k, v in out.items() if v}


def inactive_params(model: Decoder) -> int:
    return sum(fn() for m in model.modules() if (fn := getattr(m, "inactive_params_per_token", None)) is not None)


def matmul_params(model: Decoder) -> int:
    """Weight-matrix parameters one token multiplies with: every >= 2-D parameter except
    embedding tables (looked up, not multiplied), plus the head, minus inactive experts."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    n = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in tables)
    if id(model.head_weight) in tables:  # tied head: the embedding matrix is multiplied once
        n += model.head_weight.numel()
    return n - inactive_params(model)


# ----------------------------------------------------------------------------------------
# attention: cache and visible keys
# ----------------------------------------------------------------------------------------


def span_of(desc: dict) -> int | None:
    """Tokens a layer can look back over (sliding window or chunk), None for global layers."""
    return desc.get("window") or desc.get("chunk")


def cached_tokens(desc: dict, context: int) -> int:
    """Tokens a layer's cache holds for a context: a sliding or chunked layer keeps a ring of
    min(span, context) tokens; a global layer keeps all of them (NoPE layers too)."""
    span = span_of(desc)
    return min(span, context) if span else context


def kv_cache_bytes(model: Decoder, context: int, bytes_per_element: int, batch: int = 1) -> int:
    return batch * sum(
        blk.attn.kv_bytes_per_token(bytes_per_element) * cached_tokens(blk.attn.describe(), context)
        for blk in model.layers
    )


def visible_keys(desc: dict, pos: int) -> int:
    """Keys the query at (0-based) position ``pos`` attends to."""
    if desc.get("window"):
        return min(pos + 1, desc["window"])
    if desc.get("chunk"):
        return pos % desc["chunk"] + 1
    return pos + 1


def visible_keys_sum(desc: dict, tokens: int) -> int:
    """Sum of visible keys over the queries at positions 0 .. tokens-1 (a causal prefill)."""
    t = tokens
    if desc.get("window"):
        w = desc["window"]
        return t * (t + 1) // 2 if t <= w else w * (w + 1) // 2 + (t - w) * w
    if desc.get("chunk"):
        c = desc["chunk"]
        q, r = divmod(t, c)
        return q * c * (c + 1) // 2 + r * (r + 1) // 2
    return t * (t + 1) // 2


def _computed_decode_keys(desc: dict, context: int) -> int:
    # the cache was allocated for `context` tokens: a ring (span < context) is multiplied whole
    span = span_of(desc)
    return span if span and span < context else context


@dataclass
class Flops:
    matmul: int
    attention: int

    @property
    def total(self) -> int:
        return self.matmul + self.attention


def prefill_flops_per_token(model: Decoder, tokens: int, keys: str = "visible") -> Flops:
    """Forward FLOPs per token, averaged over a prompt of ``tokens`` tokens (logits for each)."""
    attn = 0
    for blk in model.layers:
        d = blk.attn.describe()
        n_keys = tokens * tokens if keys == "computed" else visible_keys_sum(d, tokens)
        attn += d["flops_per_key"] * n_keys
    return Flops(2 * matmul_params(model), round(attn / tokens))


def decode_flops_per_token(model: Decoder, context: int, keys: str = "visible") -> Flops:
    """Forward FLOPs of the token at position context-1, attending over a cache of the rest.

    An attention kind whose decoding differs from its prefill (MLA's absorbed path) reports
    ``decode_flops_per_key``."""
    attn = 0
    for blk in model.layers:
        d = blk.attn.describe()
        n_keys = _computed_decode_keys(d, context) if keys == "computed" else visible_keys(d, context - 1)
        attn += d.get("decode_flops_per_key", d["flops_per_key"]) * n_keys
    return Flops(2 * matmul_params(model), attn)


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
