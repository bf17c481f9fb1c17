"""The reference oracle: tiny random Hugging Face transformers models of every supported family,
and the measurements that compare an llmarch model with them (or with itself, cached).

Each config exercises the odd cases. Dense: head_dim != hidden/heads, more than one KV group,
sliding windows shorter than the test input, NoPE layers, tied and untied heads, RoPE scaling
kinds. Sparse and latent: group-limited routing with fewer kept groups than groups,
renormalisation on and off, shared and non-shared experts, dense-first and interleaved MoE
layers, YaRN with mscale_all_dim, interleaved and half-split RoPE, Llama 4 NoPE + chunked layers
with inputs longer than the chunk, L2 QK-norm and attention-temperature tuning with a small floor
so it varies here. Gemma 3n: KV sharing, per-layer inputs from a smaller vocabulary, LAuReL,
AltUp, activation sparsity and per-layer FFN widths.

conftest.py builds and saves each model once per session (the ``tiny_reference`` fixture).
"""

from __future__ import annotations

import itertools

import torch

VOCAB = 211
SEQ = 19  # longer than every sliding window and attention chunk below
TOK = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
PLE_VOCAB = 150  # Gemma 3n's per-layer table: smaller than VOCAB, ids >= 150 read row 0
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
S, F = "sliding_attention", "full_attention"


def dense_configs() -> dict:
    import transformers as T

    return {
        "gpt2": T.GPT2Config(vocab_size=VOCAB, **TOK, n_embd=48, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0),
        "llama": T.LlamaConfig(vocab_size=VOCAB, **TOK, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                               attention_bias=True, mlp_bias=True, max_position_embeddings=256,
                               rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 16}),
        "mistral": T.MistralConfig(vocab_size=VOCAB, **TOK, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=5,
                                   tie_word_embeddings=False, rope_theta=1e6),
        "qwen2": T.Qwen2Config(vocab_size=VOCAB, **TOK, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                               use_sliding_window=True, sliding_window=6, max_window_layers=1),
        "qwen3": T.Qwen3Config(vocab_size=VOCAB, **TOK, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                               max_position_embeddings=64,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                "original_max_position_embeddings": 16}),
        "olmo2": T.Olmo2Config(vocab_size=VOCAB, **TOK, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                               rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        "gemma3_text": T.Gemma3TextConfig(vocab_size=VOCAB, **TOK, hidden_size=64, intermediate_size=96,
                                          num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=32, query_pre_attn_scalar=24, sliding_window=4,
                                          final_logit_softcapping=30.0, max_position_embeddings=128,
                                          rope_parameters={
                                              "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        # 1:1 sliding / global with a window shorter than the input, both soft-caps
        "gemma2": T.Gemma2Config(vocab_size=VOCAB, **TOK, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                                 sliding_window=5, attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                                 max_position_embeddings=128),
        "smollm3": T.SmolLM3Config(vocab_size=VOCAB, **TOK, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   no_rope_layers=[1, 0, 1, 0]),
    }


def moe_configs() -> dict:
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
        # a shared expert behind a sigmoid gate, one dense layer, no renormalisation, q/k/v biases
        "qwen2_moe": T.Qwen2MoeConfig(vocab_size=VOCAB, **TOK, hidden_size=64, intermediate_size=96,
                                      moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                      num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, num_experts=8,
                                      num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1],
                                      tie_word_embeddings=False),
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


def gemma3n_config(**kw):
    """Gemma 3n's text decoder with every component switched on; kw overrides fields (slicing tests)."""
    import transformers as T

    base = dict(
        vocab_size=VOCAB, vocab_size_per_layer_input=PLE_VOCAB, **TOK,
        hidden_size=64, intermediate_size=[96, 128, 96, 64, 96, 128, 64], num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4, layer_types=[S, S, F, S, F, S, F],
        # layers 4-6 reuse K/V: the full ones (4, 6) from layer 2, the sliding one (5) from layer 3
        num_kv_shared_layers=3, hidden_size_per_layer_input=8, laurel_rank=8, altup_num_inputs=4,
        activation_sparsity_pattern=[0.95, 0.9, 0.0, 0.5, 0.0, 0.95, 0.0], max_position_embeddings=128,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    )
    base.update(kw)
    cfg = T.Gemma3nTextConfig(**base)
    cfg._attn_implementation = "eager"
    return cfg


def hf_configs() -> dict:
    """Every tiny family's transformers config, with eager attention (the reference)."""
    configs = {**dense_configs(), **moe_configs(), "gemma3n": gemma3n_config()}
    for cfg in configs.values():
        cfg._attn_implementation = "eager"
    return configs


DENSE, SPARSE = list(dense_configs()), list(moe_configs())
ARCHS = list(hf_configs())


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter away from its init (norm weights away from 1/0, biases away from 0)
    so that a wrong norm form, a missing bias or a swapped tensor shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _spread_routing_(model: torch.nn.Module, seed: int) -> None:
    """Random correction biases (routing must depend on them too) and router logits scaled up,
    so that tokens pick different experts."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.3)
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "router.weight")):
                p.mul_(5)


def make_hf_model(arch: str, seed: int = 0):
    """The tiny random transformers model of one family, in float32."""
    import transformers as T

    cfg = hf_configs()[arch]
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    perturb_(model, seed)
    if arch in SPARSE:
        _spread_routing_(model, seed)
    return model.float().eval()


def random_ids(vocab: int = VOCAB, batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(model, hf, ids) -> float:
    """Max abs difference between an llmarch model's logits and a transformers model's."""
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == ref.shape
    # the comparison is only meaningful if logits vary: guard against degenerate models
    assert ref.std() > 0.05
    return (out - ref).abs().max().item()


def cached_vs_full_diff(model, ids, splits) -> float:
    """Feed ids through a KV cache in pieces ending at each split (then one token at a time)
    and return the max abs difference with the uncached full forward."""
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch=ids.shape[0], max_len=ids.shape[1])
        bounds = [0, *splits, *range(splits[-1] + 1, ids.shape[1] + 1)]
        outs = [model(ids[:, a:b], cache=cache) for a, b in itertools.pairwise(bounds)]
    return (torch.cat(outs, dim=1) - full).abs().max().item()


def export_round_trip(model, out_dir, ids):
    """save_pretrained, load the result in transformers: (that model, its max abs logit difference)."""
    import transformers as T

    import llmarch

    llmarch.save_pretrained(model, out_dir)
    back = T.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return back, (back(ids).logits - model(ids)).abs().max().item()
