"""Gemma 3 (text): 5 sliding-window layers to 1 global, pre+post ("sandwich") RMSNorm of the
(1 + weight) form, per-head QK-norm, GeGLU, embeddings scaled by sqrt(hidden), separate RoPE
bases for local and global layers.

Checkpoints: the multimodal ``gemma3`` ones (4B and up) keep the text weights under
``language_model.``; llmarch loads those and drops the vision tower. llama.cpp's converter
stores every RMSNorm weight as ``1 + w`` (its norm multiplies by the weight alone) and the
sandwich norms under names of their own; GGUF files carry no chat template. SentencePiece
vocabulary with real spaces in multi-space tokens and merges ranked by position, no prefix space.
"""

from __future__ import annotations

import math

from ..checkpoints.gguf import GGUFFile
from ..errors import ConfigError
from ..model.config import FULL, SLIDING, ModelConfig, RopeConfig
from .base import (
    GGUF,
    GGUF_KEYS,
    NATIVE_TO_HF_LAYER_TYPES,
    Family,
    KeyMap,
    Stream,
    TokenizerQuirks,
    check_exportable,
    common_from_hf,
    common_to_hf,
    gguf_config,
    layer_types_to_hf,
    parse_layer_types,
    rename,
    rename_gguf,
    text_only,
    unwrap_text_config,
)

GEMMA3_KEYS = KeyMap(
    [
        ("model.embed_tokens.", "embed."),
        ("model.layers.{i}.input_layernorm.", "layers.{i}.attn_norm."),
        ("model.layers.{i}.self_attn.", "layers.{i}.attn."),
        ("model.layers.{i}.post_attention_layernorm.", "layers.{i}.attn_post_norm."),
        ("model.layers.{i}.pre_feedforward_layernorm.", "layers.{i}.mlp_norm."),
        ("model.layers.{i}.mlp.", "layers.{i}.mlp."),
        ("model.layers.{i}.post_feedforward_layernorm.", "layers.{i}.mlp_post_norm."),
        ("model.norm.", "norm."),
        ("lm_head.", "lm_head."),
    ]
)


# llama.cpp's names for the sandwich norms: four per block
GGUF_GEMMA3_KEYS = GGUF_KEYS.updated(
    [
        ("blk.{i}.ffn_norm.", "model.layers.{i}.pre_feedforward_layernorm."),
        ("blk.{i}.post_attention_norm.", "model.layers.{i}.post_attention_layernorm."),
        ("blk.{i}.post_ffw_norm.", "model.layers.{i}.post_feedforward_layernorm."),
    ]
)
TOWERS = ("vision_tower", "multi_modal_projector")

#: one global layer in every SLIDING_PATTERN
SLIDING_PATTERN = 6


def gemma3_layer_types(n: int, pattern: int = SLIDING_PATTERN) -> list[str]:
    """Layer i is global when (i + 1) % pattern == 0: five sliding layers, then one full."""
    return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]


def gemma3_config(**kw) -> ModelConfig:
    base = dict(
        ffn_kind="glu", activation="gelu_tanh", norm_kind="rmsnorm", norm_eps=1e-6, norm_placement="sandwich",
        norm_unit_offset=True, norm_weight_fp32=True, qk_norm="head", tie_embeddings=True,
        hf_model_type="gemma3_text", bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    base.update(kw)
    n = base["num_layers"]
    base.setdefault("layer_types", gemma3_layer_types(n))
    base.setdefault("embed_scale", math.sqrt(base["hidden_size"]))
    return ModelConfig(**base)


def _preset(name, vocab, hidden, ffn, layers, heads, kv, head_dim, qpas, window, max_pos, scaling=None):
    return lambda: gemma3_config(
        name=name, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers, num_heads=heads,
        num_kv_heads=kv, head_dim=head_dim, query_pre_attn_scalar=qpas, sliding_window=window,
        max_position_embeddings=max_pos, rope=RopeConfig(1e6, scaling), rope_local=RopeConfig(10000.0),
    )


LINEAR8 = {"rope_type": "linear", "factor": 8.0}
PRESETS = {
    "gemma3-270m": _preset("gemma3-270m", 262144, 640, 2048, 18, 4, 1, 256, 256, 512, 32768),
    "gemma3-1b": _preset("gemma3-1b", 262144, 1152, 6912, 26, 4, 1, 256, 256, 512, 32768),
    "gemma3-4b": _preset("gemma3-4b", 262208, 2560, 10240, 34, 8, 4, 256, 256, 1024, 131072, LINEAR8),
    "gemma3-12b": _preset("gemma3-12b", 262208, 3840, 15360, 48, 16, 8, 256, 256, 1024, 131072, LINEAR8),
    "gemma3-27b": _preset("gemma3-27b", 262208, 5376, 21504, 62, 32, 16, 128, 168, 1024, 131072, LINEAR8),
}


def from_hf(d: dict) -> ModelConfig:
    d = unwrap_text_config(d, "gemma3", "gemma3_text")
    kw = common_from_hf(d, tie_default=True)
    n = kw["num_layers"]
    if d.get("layer_types"):
        kw["layer_types"] = parse_layer_types(d, n)
    else:
        kw["layer_types"] = gemma3_layer_types(n, int(d.get("sliding_window_pattern", SLIDING_PATTERN)))
    kw["sliding_window"] = int(d.get("sliding_window") or 4096)
    if kw["rope_local"] is None:
        kw["rope_local"] = RopeConfig(10000.0)
    kw["query_pre_attn_scalar"] = float(d.get("query_pre_attn_scalar") or 256)
    kw["final_logit_softcap"] = d.get("final_logit_softcapping")
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    kw["activation"] = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act, act)
    if d.get("attn_logit_softcapping"):
        raise ConfigError("attn_logit_softcapping is not used by Gemma 3 and is not supported")
    return gemma3_config(**kw)


def _int_if_whole(x: float):
    return int(x) if float(x).is_integer() else x


def to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "gemma3_text", attn_logit_softcap=None, ffn_kind="glu", norm_kind="rmsnorm", norm_placement="sandwich",
                     qk_norm="head", position="rope", norm_unit_offset=True, rope_layers=None,
                     rope_interleaved=False, embed_scale=math.sqrt(cfg.hidden_size), attn_out_bias=cfg.qkv_bias)
    d = common_to_hf(cfg, "gemma3_text", "Gemma3ForCausalLM")
    local = cfg.rope_local or cfg.rope
    d.update(
        hidden_activation={"gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.activation, cfg.activation),
        query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
        sliding_window=cfg.sliding_window or 4096,
        layer_types=layer_types_to_hf(cfg),
        rope_local_base_freq=local.theta,
        final_logit_softcapping=cfg.final_logit_softcap,
        attn_logit_softcapping=None,
        attention_bias=cfg.qkv_bias,
    )
    return d


def from_gguf(f: GGUFFile) -> dict:
    d = gguf_config(f, "gemma3_text", "Gemma3ForCausalLM")
    n = d["num_hidden_layers"]
    scalar = f.value("attention.query_pre_attn_scalar")
    d.update(
        hidden_activation="gelu_pytorch_tanh",
        rope_local_base_freq=10000.0,
        sliding_window=int(f.value("attention.sliding_window", 4096)),
        sliding_window_pattern=SLIDING_PATTERN,
        layer_types=[NATIVE_TO_HF_LAYER_TYPES[t] for t in gemma3_layer_types(n)],
        query_pre_attn_scalar=int(scalar) if scalar else d["head_dim"],
        final_logit_softcapping=f.float_value("final_logit_softcapping"),
        attn_logit_softcapping=f.float_value("attn_logit_softcapping"),
        attention_bias=False,
    )
    return d


def sanitize(tensors: Stream, cfg: ModelConfig, fmt: str) -> Stream:
    if fmt == GGUF:  # llama.cpp stores 1 + w: its RMSNorm multiplies by the weight alone
        tensors = ((n, t - 1.0 if n.endswith("norm.weight") else t) for n, t in rename_gguf(tensors, GGUF_GEMMA3_KEYS))
    return rename(text_only(tensors, TOWERS), GEMMA3_KEYS, "gemma3")


#: the instruction template of google/gemma-3-* tokenizer_config.json
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""


FAMILY = Family(
    "gemma3", ("gemma3_text", "gemma3"), PRESETS, from_hf, to_hf, keys=GEMMA3_KEYS, sanitize=sanitize,
    gguf_architectures=("gemma3",), from_gguf=from_gguf, gguf_keys=GGUF_GEMMA3_KEYS,
    tokenizer=TokenizerQuirks(spaces_in_vocab=True, merges_by_position=True, add_space_prefix=False,
                              chat_template=GEMMA3_CHAT_TEMPLATE),
)
