"""Low-precision compute order and parity on randomly drawn configurations."""

import random

import pytest
import torch
from oracle import perturb_

import llmarch
from llmarch.model.layers import RMSNorm


@pytest.mark.parametrize(
    "hf_cls,kwargs",
    [
        ("transformers.models.llama.modeling_llama.LlamaRMSNorm", dict(unit_offset=False, weight_fp32=False)),
        ("transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm", dict(unit_offset=False, weight_fp32=False)),
        ("transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm", dict(unit_offset=False, weight_fp32=True)),
        ("transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm", dict(unit_offset=True, weight_fp32=True)),
    ],
)
def test_rmsnorm_bf16_bit_exact(hf_cls, kwargs):
    """Each family's float32 compute order reproduces the reference bit for bit in bfloat16."""
    import importlib

    mod, cls = hf_cls.rsplit(".", 1)
    ref = getattr(importlib.import_module(mod), cls)(96, eps=1e-6)
    ours = RMSNorm(96, eps=1e-6, **kwargs)
    w = torch.randn(96) * 0.5 + (0.0 if kwargs["unit_offset"] else 1.0)
    with torch.no_grad():
        ref.weight.copy_(w)
        ours.weight.copy_(w)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    x = (torch.randn(4, 7, 96) * 3).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    # and the other compute order is not bit exact: the test can tell them apart
    other = RMSNorm(96, eps=1e-6, unit_offset=kwargs["unit_offset"], weight_fp32=not kwargs["weight_fp32"])
    with torch.no_grad():
        other.weight.copy_(w)
    other = other.to(torch.bfloat16)
    with torch.no_grad():
        assert not torch.equal(other(x), ref(x))


def _random_hf_config(arch: str, rnd: random.Random):
    import transformers as T

    kv = rnd.choice([1, 2, 4])
    heads = kv * rnd.choice([1, 2, 3])
    head_dim = rnd.choice([8, 16, 24])
    layers = rnd.randint(1, 4)
    common = dict(vocab_size=rnd.randint(50, 300), hidden_size=heads * rnd.choice([8, 12, 16]),
                  intermediate_size=rnd.choice([40, 64, 136]), num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, head_dim=head_dim, rms_norm_eps=rnd.choice([1e-5, 1e-6]),
                  tie_word_embeddings=rnd.random() < 0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  max_position_embeddings=128)
    theta = rnd.choice([10000.0, 1e6])
    if arch == "qwen3":
        return T.Qwen3Config(**common, rope_theta=theta)
    if arch == "llama":
        return T.LlamaConfig(**common, rope_theta=theta, attention_bias=rnd.random() < 0.5)
    if arch == "gemma3_text":
        n = rnd.randint(2, 8)
        types = [rnd.choice(["sliding_attention", "full_attention"]) for _ in range(n)]
        common.update(num_hidden_layers=n)
        return T.Gemma3TextConfig(**common, layer_types=types, sliding_window=rnd.randint(2, 9),
                                  query_pre_attn_scalar=rnd.choice([head_dim, 20]),
                                  final_logit_softcapping=rnd.choice([None, 20.0]))
    if arch == "smollm3":
        return T.SmolLM3Config(**{k: v for k, v in common.items() if k != "head_dim"}, rope_theta=theta,
                               no_rope_layers=[rnd.randint(0, 1) for _ in range(layers)])
    if arch == "olmo2":
        return T.Olmo2Config(**{k: v for k, v in common.items() if k != "head_dim"}, rope_theta=theta)
    raise ValueError(arch)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "smollm3", "olmo2"])
def test_parity_on_random_configs(arch, seed, tmp_path):
    """Configurations drawn at random (not tuned to pass): logits and cached decoding."""
    import transformers as T

    rnd = random.Random(f"{arch}-{seed}")
    cfg = _random_hf_config(arch, rnd)
    torch.manual_seed(seed)
    cls = T.Gemma3ForCausalLM if arch == "gemma3_text" else T.AutoModelForCausalLM.from_config
    hf = cls(cfg) if arch == "gemma3_text" else T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    hf.config._attn_implementation = "eager"
    perturb_(hf, seed).eval()
    hf.save_pretrained(tmp_path)
    model = llmarch.from_pretrained(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, rnd.randint(5, 24)), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
        cache = model.new_cache(2, ids.shape[1])
        split = rnd.randint(1, ids.shape[1] - 1)
        inc = [model(ids[:, :split], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(split, ids.shape[1])]
    assert (out - ref).abs().max() < 1e-4
    assert (torch.cat(inc, 1) - out).abs().max() < 1e-4


def test_interleaved_rope_equals_complex_rotation():
    """The interleaved layout (Meta's / DeepSeek's original weights) rotates pairs (x0, x1) as a
    complex number; llmarch permutes to halves, which preserves every q.k dot product."""
    from llmarch.model.config import RopeConfig
    from llmarch.model.layers import Rotary, apply_rope

    d, t = 16, 9
    rot = Rotary(RopeConfig(10000.0), d, 64)
    pos = torch.arange(t)[None]
    cos, sin = rot(pos, torch.float32)
    q, k = torch.randn(1, 2, t, d), torch.randn(1, 2, t, d)
    ours_q, ours_k = apply_rope(q, cos, sin, interleaved=True), apply_rope(k, cos, sin, interleaved=True)

    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.polar(torch.ones(t, d // 2), pos[0, :, None].float() * inv)

    def complex_rope(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2))
        return torch.view_as_real(xc * freqs).flatten(-2)

    ref_scores = complex_rope(q) @ complex_rope(k).transpose(-1, -2)
    ours_scores = ours_q @ ours_k.transpose(-1, -2)
    assert torch.allclose(ours_scores, ref_scores, atol=1e-5)
    # the halves layout applied to interleaved weights gives different scores
    halves = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)
    assert not torch.allclose(halves, ref_scores, atol=1e-3)


def test_inference_rms_normalize_is_f_rms_norm_to_the_bit():
    """The inference norm's four operations are F.rms_norm's own arithmetic (its CPU composite),
    so decoding gives the bits training and the parity tests see."""
    import torch.nn.functional as F

    from llmarch.model.layers import rms_normalize

    g = torch.Generator().manual_seed(0)
    for shape, scale in [((1, 1, 640), 1.0), ((2, 5, 64), 1e-3), ((3, 4, 1, 256), 300.0), ((7, 96), 1.0)]:
        x = torch.randn(shape, generator=g) * scale
        ref = F.rms_norm(x, x.shape[-1:], eps=1e-6)
        with torch.no_grad():
            assert torch.equal(rms_normalize(x, 1e-6), ref)
        with torch.enable_grad():  # the training path is F.rms_norm itself
            assert torch.equal(rms_normalize(x, 1e-6), ref)
