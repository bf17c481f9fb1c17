"""GPT-2: the article's starting point. Learned absolute positions, LayerNorm with bias,
biases on every linear, a plain tanh-GELU MLP, multi-head attention, tied head.

HF stores GPT-2's linears as ``Conv1D`` with (in, out) weights and a fused ``c_attn``; the
transforms below split and transpose them on load and fuse them back on export. Old
checkpoints also store attention-mask buffers, skipped. llama.cpp names its byte-level BPE
tokenizer kind ``gpt2``.
"""

from __future__ import annotations

import re

import torch

from ..errors import ConfigError
from ..model.config import ModelConfig
from .base import (
    BYTE_LEVEL,
    Family,
    KeyMap,
    Stream,
    TokenizerQuirks,
    check_exportable,
    drop,
    rename,
    require,
)

GPT2_KEYS = KeyMap(
    [
        ("transformer.wte.", "embed."),
        ("transformer.wpe.", "pos_embed."),
        ("transformer.h.{i}.ln_1.", "layers.{i}.attn_norm."),
        ("transformer.h.{i}.ln_2.", "layers.{i}.mlp_norm."),
        ("transformer.ln_f.", "norm."),
        ("lm_head.", "lm_head."),
    ]
)
_CONV = {
    "attn.c_proj": "attn.o_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
_LAYER = re.compile(r"^(?:transformer\.)?h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)$")


def gpt2_config(**kw) -> ModelConfig:
    base = dict(
        position="learned", norm_kind="layernorm", norm_eps=1e-5, ffn_kind="mlp", activation="gelu_tanh",
        ffn_bias=True, qkv_bias=True, attn_out_bias=True, tie_embeddings=True, hf_model_type="gpt2",
    )
    base.update(kw)
    return ModelConfig(**base)


PRESETS = {
    "gpt2": lambda: gpt2_config(
        name="gpt2", vocab_size=50257, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
        num_kv_heads=12, head_dim=64, max_position_embeddings=1024, bos_token_id=50256, eos_token_id=50256,
    ),
}

_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def from_hf(d: dict) -> ModelConfig:
    require(d, "vocab_size", "n_embd", "n_layer", "n_head")
    act = d.get("activation_function", "gelu_new")
    if act not in _ACTS:
        raise ConfigError(f"gpt2 activation_function {act!r} is not supported; expected one of {sorted(_ACTS)}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if d.get(flag):
            raise ConfigError(f"gpt2 option {flag} is not supported")
    if d.get("scale_attn_weights", True) is False:
        raise ConfigError("gpt2 option scale_attn_weights=false is not supported")
    h, heads = int(d["n_embd"]), int(d["n_head"])
    return gpt2_config(
        vocab_size=int(d["vocab_size"]), hidden_size=h, num_layers=int(d["n_layer"]), num_heads=heads,
        num_kv_heads=heads, head_dim=h // heads, intermediate_size=int(d.get("n_inner") or 4 * h),
        max_position_embeddings=int(d.get("n_positions", 1024)), norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        activation=_ACTS[act], tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
    )


def to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "gpt2", attn_logit_softcap=None, position="learned", norm_kind="layernorm", norm_placement="pre", ffn_kind="mlp",
                     qkv_bias=True, attn_out_bias=True, ffn_bias=True, qk_norm="none", num_kv_heads=cfg.num_heads,
                     head_dim=cfg.hidden_size // cfg.num_heads, embed_scale=None, final_logit_softcap=None,
                     layer_types=["full"] * cfg.num_layers)
    inv = {v: k for k, v in _ACTS.items() if k != "gelu_pytorch_tanh"}
    return dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
        n_positions=cfg.max_position_embeddings, layer_norm_epsilon=cfg.norm_eps,
        activation_function=inv[cfg.activation], tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
    )


def _split_conv1d(name: str, t: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    if not name.startswith(("transformer.", "lm_head.")):
        name = "transformer." + name  # the original checkpoint has no "transformer." prefix
    m = _LAYER.match(name)
    if m is None:
        return list(rename(iter([(name, t)]), GPT2_KEYS, "gpt2"))
    i, mod, kind = m.groups()
    w = t.t() if kind == "weight" else t  # Conv1D stores (in, out)
    if mod == "attn.c_attn":
        q, k, v = w.split(cfg.hidden_size, dim=0)
        return [(f"layers.{i}.attn.{p}_proj.{kind}", x.contiguous()) for p, x in zip("qkv", (q, k, v))]
    return [(f"layers.{i}.{_CONV[mod]}.{kind}", w.contiguous())]


def sanitize(tensors: Stream, cfg: ModelConfig, fmt: str) -> Stream:
    """Attention-mask buffers skipped; Conv1D weights transposed, c_attn split into q, k, v."""
    for name, t in drop(tensors, r"\.attn\.(masked_)?bias$"):
        yield from _split_conv1d(name, t, cfg)


def save_transform(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    inv_conv = {v: k for k, v in _CONV.items()}
    for i in range(cfg.num_layers):
        p = f"layers.{i}.attn."
        for kind in ("weight", "bias"):
            fused = torch.cat([state[f"{p}{x}_proj.{kind}"] for x in "qkv"], dim=0)
            out[f"transformer.h.{i}.attn.c_attn.{kind}"] = fused.t().contiguous() if kind == "weight" else fused
    for k, v in state.items():
        m = re.match(r"^layers\.(\d+)\.(attn\.o_proj|mlp\.up_proj|mlp\.down_proj)\.(weight|bias)$", k)
        if m:
            i, mod, kind = m.groups()
            out[f"transformer.h.{i}.{inv_conv[mod]}.{kind}"] = v.t().contiguous() if kind == "weight" else v
        elif re.match(r"^layers\.\d+\.attn\.[qkv]_proj\.", k):
            continue
        else:
            out[GPT2_KEYS.to_hf(k)] = v
    return out


FAMILY = Family(
    "gpt2", ("gpt2",), PRESETS, from_hf, to_hf, keys=GPT2_KEYS, sanitize=sanitize, save_transform=save_transform,
    tokenizer=TokenizerQuirks(models={"gpt2": BYTE_LEVEL}),
)
