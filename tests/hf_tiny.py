"""Tiny random Hugging Face models (the reference oracle) for every supported architecture.

Each config exercises the odd cases: head_dim != hidden/heads, more than one KV group, sliding
windows shorter than the test input, NoPE layers, tied and untied heads, RoPE scaling kinds.
"""

import torch
from conftest import perturb_

VOCAB = 211
SEQ = 19
TOK = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # longer than every sliding window below


def hf_configs():
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
        "smollm3": T.SmolLM3Config(vocab_size=VOCAB, **TOK, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   no_rope_layers=[1, 0, 1, 0]),
    }


def make_hf_model(arch: str, seed: int = 0):
    import transformers as T

    cfg = hf_configs()[arch]
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    if arch == "gemma3_text":
        model = T.Gemma3ForCausalLM(cfg)
    else:
        model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    perturb_(model, seed)
    return model.float().eval()
