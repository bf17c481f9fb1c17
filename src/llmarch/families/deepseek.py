"""DeepSeek-V3 and Kimi K2: multi-head latent attention + fine-grained MoE.

* MLA: queries through a 1536-dim bottleneck; keys/values compressed to a 512-dim latent
  plus one 64-dim RoPE key shared by all heads (576 cached numbers per token per layer).
* MoE: 256 (Kimi K2: 384) routed experts of width 2048, 8 per token, chosen by sigmoid
  scores plus a selection-only bias, group-limited (DeepSeek: best 4 of 8 groups), weights
  renormalised and scaled (2.5; Kimi K2 2.827); plus 1 shared expert.
* The first 3 layers (Kimi K2: 1) are dense FFNs of width 18432.
* YaRN RoPE (factor 40 from 4096) whose mscale also rescales the softmax; DeepSeek's
  interleaved RoPE layout.
* Checkpoints: FP8 e4m3 weights with 128x128 block scales (dequantised on load); one
  multi-token-prediction layer (index num_hidden_layers) that is skipped.
"""

from __future__ import annotations

from ..checkpoints.fp8 import dequantize_stream
from ..errors import ConfigError
from ..model.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig
from .base import (
    LLAMA_KEYS,
    Family,
    KeyMap,
    Stream,
    check_exportable,
    common_from_hf,
    common_to_hf,
    rename,
    require,
)
from .experts import skip_layers_from, stack_experts, unstack_experts

KEYS = KeyMap(
    LLAMA_KEYS.pairs
    + [
        ("model.layers.{i}.mlp.gate.", "layers.{i}.mlp.router."),
        ("model.layers.{i}.mlp.shared_experts.", "layers.{i}.mlp.shared_expert."),
    ]
)


def deepseek_config(**kw) -> ModelConfig:
    base = dict(
        attention_kind="mla", ffn_kind="glu", activation="silu", norm_kind="rmsnorm", norm_eps=1e-6,
        norm_placement="pre", rope_interleaved=True, hf_model_type="deepseek_v3", tie_embeddings=False,
    )
    base.update(kw)
    mla = base["mla"]
    base.setdefault("head_dim", mla.qk_rope_head_dim)  # what HF reports; MLA's dims are in ``mla``
    base.setdefault("num_kv_heads", base["num_heads"])
    return ModelConfig(**base)


def _preset(name: str, vocab: int, heads: int, experts: int, dense: int, n_group: int, topk_group: int,
            scaling: float, rope: RopeConfig, max_pos: int, model_type: str, **tokens) -> ModelConfig:
    layers = 61
    return deepseek_config(
        name=name, hf_model_type=model_type, vocab_size=vocab, hidden_size=7168, num_layers=layers,
        num_heads=heads, intermediate_size=18432, max_position_embeddings=max_pos, rope=rope,
        mla=MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        moe=MoEConfig(num_experts=experts, top_k=8, expert_size=2048, score="sigmoid", norm_topk_prob=True,
                      n_group=n_group, topk_group=topk_group, routed_scaling_factor=scaling,
                      score_correction_bias=True, shared_expert_size=2048, router_fp32=True,
                      topk_sorted=False),
        moe_layers=[i >= dense for i in range(layers)], **tokens,
    )


PRESETS = {
    # deepseek-ai/DeepSeek-V3 config.json
    "deepseek-v3": lambda: _preset(
        "deepseek-v3", 129280, 128, 256, 3, 8, 4, 2.5,
        RopeConfig(10000.0, {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
        163840, "deepseek_v3", bos_token_id=0, eos_token_id=1,
    ),
    # moonshotai/Kimi-K2-Instruct config.json (DeepSeek-V3 form); the RoPE values are unconfirmed here
    "kimi-k2": lambda: _preset(
        "kimi-k2", 163840, 64, 384, 1, 1, 1, 2.827,
        RopeConfig(50000.0, {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                             "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
        131072, "kimi_k2", bos_token_id=163584, eos_token_id=163585,
    ),
}


def from_hf(d: dict) -> ModelConfig:
    require(d, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    kw = common_from_hf(d)
    kw.pop("rope_local")
    kw.pop("head_dim")
    kw["num_kv_heads"] = kw["num_heads"]  # MLA has no KV heads; HF's num_key_value_heads is unused
    n = kw["num_layers"]
    kw["mla"] = MLAConfig(q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=int(d["kv_lora_rank"]),
                          qk_nope_head_dim=int(d["qk_nope_head_dim"]), qk_rope_head_dim=int(d["qk_rope_head_dim"]),
                          v_head_dim=int(d["v_head_dim"]))
    kw["rope_interleaved"] = bool(d.get("rope_interleave", True))
    kw["norm_eps"] = float(d.get("rms_norm_eps", 1e-6))
    if d.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"DeepSeek-V3 routing with scoring_func {d['scoring_func']!r} is not supported (expected sigmoid)")
    if d.get("n_routed_experts"):
        expert = int(d["moe_intermediate_size"])
        kw["moe"] = MoEConfig(
            num_experts=int(d["n_routed_experts"]), top_k=int(d["num_experts_per_tok"]), expert_size=expert,
            score="sigmoid", norm_topk_prob=bool(d.get("norm_topk_prob", True)), n_group=int(d.get("n_group") or 1),
            topk_group=int(d.get("topk_group") or 1), routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            score_correction_bias=True, shared_expert_size=expert * int(d.get("n_shared_experts") or 0),
            router_fp32=True, topk_sorted=False,
        )
        first, freq = int(d.get("first_k_dense_replace", 0)), int(d.get("moe_layer_freq", 1))
        kw["moe_layers"] = [i >= first and i % freq == 0 for i in range(n)]
    return deepseek_config(**kw)


def to_hf(cfg: ModelConfig) -> dict:
    check_exportable(cfg, "deepseek_v3", attn_logit_softcap=None, attention_kind="mla", ffn_kind="glu", activation="silu", norm_kind="rmsnorm",
                     norm_placement="pre", qk_norm="none", position="rope", norm_unit_offset=False, embed_scale=None,
                     final_logit_softcap=None, rope_layers=None, qkv_bias=cfg.attn_out_bias)
    d = common_to_hf(cfg, "deepseek_v3", "DeepseekV3ForCausalLM")
    m = cfg.mla
    d.update(q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
             qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, head_dim=m.qk_rope_head_dim,
             rope_interleave=cfg.rope_interleaved, attention_bias=cfg.qkv_bias, hidden_act="silu",
             num_nextn_predict_layers=0)
    moe, layers = cfg.moe, cfg.moe_layers or [cfg.moe is not None] * cfg.num_layers
    if moe is None:
        d.update(n_routed_experts=None, first_k_dense_replace=cfg.num_layers)
        return d
    first = layers.index(True) if True in layers else cfg.num_layers
    if layers != [False] * first + [True] * (cfg.num_layers - first) or moe.score != "sigmoid" or moe.scale_input \
            or not moe.score_correction_bias or moe.shared_expert_size % moe.expert_size:
        raise ConfigError("cannot export as deepseek_v3: it needs dense-first MoE layers, sigmoid routing with the "
                          "correction bias, output-scaled experts and shared experts a multiple of the expert width")
    d.update(n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_size,
             n_shared_experts=moe.shared_expert_size // moe.expert_size, routed_scaling_factor=moe.routed_scaling_factor,
             n_group=moe.n_group, topk_group=moe.topk_group, norm_topk_prob=moe.norm_topk_prob,
             first_k_dense_replace=first)
    return d


def sanitize(tensors: Stream, cfg: ModelConfig, fmt: str) -> Stream:
    tensors = skip_layers_from(tensors, cfg.num_layers, "DeepSeek's multi-token-prediction module")
    tensors = dequantize_stream(tensors)
    if cfg.moe is not None:
        tensors = stack_experts(tensors, cfg.moe.num_experts)
    return rename(tensors, KEYS, "deepseek")


FAMILY = Family(
    "deepseek", ("deepseek_v3", "kimi_k2"), PRESETS, from_hf, to_hf, keys=KEYS, sanitize=sanitize,
    save_transform=lambda state, cfg: unstack_experts(state, KEYS),
    notes=["FP8 block-quantised weights are dequantised on load; the multi-token-prediction layer is skipped"],
)
