"""Qwen3-MoE (30B-A3B, 235B-A22B): the Qwen3 decoder (GQA, per-head QK-norm) with every FFN
replaced by 128 routed experts, 8 per token, softmax router renormalised over the chosen 8,
no shared expert."""

from __future__ import annotations

from ..model.config import FULL, ModelConfig, MoEConfig, RopeConfig
from .base import (
    LLAMA_KEYS,
    Family,
    KeyMap,
    Stream,
    check_exportable,
    common_from_hf,
    common_to_hf,
    rename,
)
from .experts import stack_experts, unstack_experts
from .llama import llama_config
from .qwen import _sliding

KEYS = KeyMap(LLAMA_KEYS.pairs + [("model.layers.{i}.mlp.gate.", "layers.{i}.mlp.router.")])


def qwen3_moe(name: str, hidden: int, layers: int, heads: int, expert: int) -> ModelConfig:
    # Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B config.json
    return llama_config(
        name=name, hf_model_type="qwen3_moe", vocab_size=151936, hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=4, head_dim=128, intermediate_size=hidden * 3, tie_embeddings=False,
        max_position_embeddings=40960, rope=RopeConfig(1e6), norm_eps=1e-6, qk_norm="head",
        moe=MoEConfig(num_experts=128, top_k=8, expert_size=expert, score="softmax", norm_topk_prob=True),
        bos_token_id=151643, eos_token_id=151645,
    )


PRESETS = {
    "qwen3-30b-a3b": lambda: qwen3_moe("qwen3-30b-a3b", 2048, 48, 32, 768),
    "qwen3-235b-a22b": lambda: qwen3_moe("qwen3-235b-a22b", 4096, 94, 64, 1536),
}


def from_hf(d: dict) -> ModelConfig:
    kw = common_from_hf(d)
    kw.pop("rope_local")
    kw["attn_out_bias"] = False
    kw["qk_norm"] = "head"
    _sliding(d, kw)
    n, experts = kw["num_layers"], int(d.get("num_experts") or d.get("num_local_experts") or 0)
    if experts:
        kw["moe"] = MoEConfig(num_experts=experts, top_k=int(d["num_experts_per_tok"]),
                              expert_size=int(d["moe_intermediate_size"]), score="softmax",
                              norm_topk_prob=bool(d.get("norm_topk_prob", False)))
        dense, step = set(d.get("mlp_only_layers") or []), int(d.get("decoder_sparse_step", 1))
        kw["moe_layers"] = [i not in dense and (i + 1) % step == 0 for i in range(n)]
    return llama_config(**kw)


def to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "qwen3_moe", attn_logit_softcap=None, ffn_kind="glu", activation="silu", norm_kind="rmsnorm", norm_placement="pre",
                     position="rope", attn_out_bias=False, embed_scale=None, norm_unit_offset=False,
                     final_logit_softcap=None, rope_layers=None, rope_interleaved=False, qk_norm="head",
                     attention_kind="mha", layer_types=[FULL] * cfg.num_layers)
    d = common_to_hf(cfg, "qwen3_moe", "Qwen3MoeForCausalLM")
    d.update(hidden_act="silu", attention_bias=cfg.qkv_bias, use_sliding_window=False, sliding_window=None,
             decoder_sparse_step=1)
    m = cfg.moe
    if m is None:
        d.update(num_experts=0, mlp_only_layers=list(range(cfg.num_layers)))
        return d
    check_exportable(cfg, "qwen3_moe", attn_logit_softcap=None, moe=MoEConfig(num_experts=m.num_experts, top_k=m.top_k, expert_size=m.expert_size,
                                                     score="softmax", norm_topk_prob=m.norm_topk_prob))
    layers = cfg.moe_layers or [True] * cfg.num_layers
    d.update(num_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=m.expert_size,
             norm_topk_prob=m.norm_topk_prob, mlp_only_layers=[i for i, x in enumerate(layers) if not x])
    return d


def sanitize(tensors: Stream, cfg: ModelConfig, fmt: str) -> Stream:
    if cfg.moe is not None:
        tensors = stack_experts(tensors, cfg.moe.num_experts)
    return rename(tensors, KEYS, "qwen3_moe")


FAMILY = Family(
    "qwen3_moe", ("qwen3_moe",), PRESETS, from_hf, to_hf, keys=KEYS, sanitize=sanitize,
    save_transform=lambda state, cfg: unstack_experts(state, KEYS),
)
