"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): the Qwen MoE line before Qwen3, the one the
article contrasts Qwen3 with. GQA with q/k/v biases, no QK-norm; every FFN is a softmax top-k
MoE of small experts *plus a shared expert* whose output a per-token sigmoid gate scales
(``shared_expert_gate``); Qwen3-MoE dropped the shared expert.
"""

from __future__ import annotations

from ..model.config import FULL, ModelConfig, MoEConfig, RopeConfig
from .base import Family, Stream, check_exportable, common_from_hf, common_to_hf, rename
from .experts import stack_experts, unstack_experts
from .llama import llama_config
from .qwen import _sliding
from .qwen3_moe import KEYS


def qwen2_moe(name: str, hidden: int, dense: int, layers: int, heads: int, kv: int, experts: int, top_k: int,
              expert: int, shared: int, max_pos: int) -> ModelConfig:
    # Qwen/Qwen1.5-MoE-A2.7B and Qwen/Qwen2-57B-A14B config.json
    return llama_config(
        name=name, hf_model_type="qwen2_moe", vocab_size=151936, hidden_size=hidden, intermediate_size=dense,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, tie_embeddings=False, qkv_bias=True,
        max_position_embeddings=max_pos, rope=RopeConfig(1e6), norm_eps=1e-6,
        moe=MoEConfig(num_experts=experts, top_k=top_k, expert_size=expert, score="softmax", norm_topk_prob=False,
                      shared_expert_size=shared, shared_expert_gate=True),
        bos_token_id=151643, eos_token_id=151643,
    )


PRESETS = {
    "qwen1.5-moe-a2.7b": lambda: qwen2_moe("qwen1.5-moe-a2.7b", 2048, 5632, 24, 16, 16, 60, 4, 1408, 5632, 8192),
    "qwen2-57b-a14b": lambda: qwen2_moe("qwen2-57b-a14b", 3584, 18944, 28, 28, 4, 64, 8, 2560, 20480, 32768),
}


def from_hf(d: dict) -> ModelConfig:
    kw = common_from_hf(d)
    kw.pop("rope_local")
    kw["qkv_bias"] = bool(d.get("qkv_bias", True))
    kw["attn_out_bias"] = False
    _sliding(d, kw)
    n = kw["num_layers"]
    kw["moe"] = MoEConfig(num_experts=int(d["num_experts"]), top_k=int(d["num_experts_per_tok"]),
                          expert_size=int(d["moe_intermediate_size"]), score="softmax",
                          norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                          shared_expert_size=int(d.get("shared_expert_intermediate_size") or 0),
                          shared_expert_gate=bool(d.get("shared_expert_intermediate_size")))
    dense, step = set(d.get("mlp_only_layers") or []), int(d.get("decoder_sparse_step", 1))
    kw["moe_layers"] = [i not in dense and (i + 1) % step == 0 for i in range(n)]
    return llama_config(**kw)


def to_hf(cfg: ModelConfig) -> dict:
    m = cfg.moe
    check_exportable(cfg, "qwen2_moe", attn_logit_softcap=None, ffn_kind="glu", activation="silu", norm_kind="rmsnorm", norm_placement="pre",
                     position="rope", attn_out_bias=False, embed_scale=None, norm_unit_offset=False, qk_norm="none",
                     final_logit_softcap=None, rope_layers=None, rope_interleaved=False, attention_kind="mha",
                     layer_types=[FULL] * cfg.num_layers)
    check_exportable(cfg, "qwen2_moe", attn_logit_softcap=None, moe=MoEConfig(
        num_experts=m.num_experts, top_k=m.top_k, expert_size=m.expert_size, score="softmax",
        norm_topk_prob=m.norm_topk_prob, shared_expert_size=m.shared_expert_size, shared_expert_gate=True))
    d = common_to_hf(cfg, "qwen2_moe", "Qwen2MoeForCausalLM")
    layers = cfg.moe_layers or [True] * cfg.num_layers
    d.update(hidden_act="silu", qkv_bias=cfg.qkv_bias, use_sliding_window=False, sliding_window=None,
             decoder_sparse_step=1, num_experts=m.num_experts, num_experts_per_tok=m.top_k,
             moe_intermediate_size=m.expert_size, shared_expert_intermediate_size=m.shared_expert_size,
             norm_topk_prob=m.norm_topk_prob, mlp_only_layers=[i for i, x in enumerate(layers) if not x])
    return d


def sanitize(tensors: Stream, cfg: ModelConfig, fmt: str) -> Stream:
    return rename(stack_experts(tensors, cfg.moe.num_experts), KEYS, "qwen2_moe")


FAMILY = Family(
    "qwen2_moe", ("qwen2_moe",), PRESETS, from_hf, to_hf, keys=KEYS, sanitize=sanitize,
    save_transform=lambda state, cfg: unstack_experts(state, KEYS),
)
