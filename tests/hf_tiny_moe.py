"""Tiny random transformers models for the sparse / latent families (the reference oracle).

Each config covers an odd case of the routing, attention or layer schedule: group-limited
routing with fewer kept groups than groups, renormalisation on and off, shared and
non-shared experts, dense-first and interleaved MoE layers, YaRN with mscale_all_dim,
interleaved and half-split RoPE, Llama 4 NoPE + chunked layers with inputs longer than the
chunk, L2 QK-norm and attention-temperature tuning with a small floor so it varies here.
"""

import torch
from conftest import perturb_
from hf_tiny import TOK, VOCAB

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}


def moe_configs():
    import transformers as T

    ds = dict(vocab_size=VOCAB, **TOK, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
              tie_word_embeddings=False, max_position_embeddings=64)
    qm = dict(vocab_size=VOCAB, **TOK, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    l4 = dict(vocab_size=VOCAB, **TOK, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_chunk_size=5,
              attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1, tie_word_embeddings=False)
    return {
        # DeepSeek-V3 shape: q bottleneck, group-limited routing (2 of 4 groups), 1 shared expert,
        # first layer dense, YaRN with the mscale softmax correction, interleaved RoPE
        "deepseek_v3": T.DeepseekV3Config(**ds, num_hidden_layers=3, q_lora_rank=24, n_routed_experts=8,
                                          n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
                                          first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                          rope_interleave=True, rope_parameters=dict(YARN)),
        # plain q_proj, no groups, no renormalisation, 2 shared experts, no dense layer, half-split RoPE
        "deepseek_v3_plain": T.DeepseekV3Config(**ds, num_hidden_layers=2, q_lora_rank=None, n_routed_experts=6,
                                                n_shared_experts=2, num_experts_per_tok=2, n_group=1, topk_group=1,
                                                first_k_dense_replace=0, routed_scaling_factor=1.7,
                                                norm_topk_prob=False, rope_interleave=False),
        "qwen3_moe": T.Qwen3MoeConfig(**qm, num_hidden_layers=3, num_experts=8, num_experts_per_tok=3,
                                      norm_topk_prob=True, mlp_only_layers=[1]),
        "qwen3_moe_sparse_step": T.Qwen3MoeConfig(**qm, num_hidden_layers=2, num_experts=6, num_experts_per_tok=2,
                                                  norm_topk_prob=False, decoder_sparse_step=2),
        # Maverick shape: alternating dense / MoE, no QK-norm; layer 3 NoPE
        "llama4_text": T.Llama4TextConfig(**l4, num_hidden_layers=4, num_local_experts=4, interleave_moe_layer_step=2,
                                          use_qk_norm=False),
        # Scout shape: MoE everywhere, L2 QK-norm, llama3 RoPE scaling
        "llama4_text_scout": T.Llama4TextConfig(**l4, num_hidden_layers=4, num_local_experts=3, interleave_moe_layer_step=1,
                                                use_qk_norm=True,
                                                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                                 "factor": 8.0, "low_freq_factor": 1.0,
                                                                 "high_freq_factor": 4.0,
                                                                 "original_max_position_embeddings": 16}),
    }


def make_moe_model(arch: str, seed: int = 0):
    import transformers as T

    cfg = moe_configs()[arch]
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    perturb_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # routing must depend on the bias too
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.3)
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "router.weight")):
                p.mul_(5)  # spread the router logits so tokens pick different experts
    return model.float().eval()
