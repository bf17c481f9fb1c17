"""Gemma 3n's small-device components in a Llama-style decoder (pre-norm, SwiGLU, no Gemma fields):
each builds, decodes with a cache exactly as the uncached forward, and changes the logits."""

import pytest
import torch
from oracle import perturb_

import llmarch
from llmarch.checkpoints.matformer import slice_state
from llmarch.errors import ConfigError

VOCAB = 97
SEQ = 14  # longer than the sliding window (4)
TOL = 1e-5

LLAMA = dict(
    vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=48,
    max_position_embeddings=64, norm_eps=1e-6, layer_types=["sliding", "full", "sliding", "full"], sliding_window=4,
)

COMPONENTS = {
    "laurel": dict(laurel_rank=8),
    # layers 2 and 3 reuse the keys and values of layers 0 (sliding) and 1 (full)
    "kv_sharing": dict(num_kv_shared_layers=2),
    "altup_ple": dict(altup_num_inputs=3, altup_coef_clip=10.0, hidden_size_per_layer_input=8,
                      vocab_size_per_layer_input=50),
    "ffn_widths": dict(intermediate_sizes=[48, 16, 32, 8]),
    "activation_sparsity": dict(activation_sparsity=[0.9, 0.0, 0.5, 0.0]),
    "v_norm": dict(v_norm=True),
}
ALL = {k: v for fields in COMPONENTS.values() for k, v in fields.items()}


def _build(seed=0, **fields):
    torch.manual_seed(seed)
    return perturb_(llmarch.build_model(llmarch.ModelConfig(**LLAMA | fields)), seed).eval()


def _ids(batch=2, seq=SEQ, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _cached(model, ids, prefill):
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    outs = [model(ids[:, :prefill], cache=cache)]
    outs += [model(ids[:, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(outs, dim=1)


def _check_cached_decoding(model):
    ids = _ids()
    with torch.no_grad():
        full = model(ids)
        for prefill in (3, 6):  # shorter and longer than the window
            assert (_cached(model, ids, prefill) - full).abs().max().item() < TOL
    assert full.std() > 0.05


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_component_decodes_with_a_cache_like_the_full_forward(name):
    model = _build(**COMPONENTS[name])
    assert model.config.norm_placement == "pre" and model.config.ffn_kind == "glu"
    _check_cached_decoding(model)


@pytest.mark.parametrize("placement,ffn", [("pre", "glu"), ("post", "glu"), ("sandwich", "mlp")])
def test_every_component_at_once_with_any_norm_placement_and_ffn(placement, ffn):
    model = _build(norm_placement=placement, ffn_kind=ffn, activation="gelu" if ffn == "mlp" else "silu", **ALL)
    assert model.layers[3].attn.k_proj is None and model.layers[0].altup is not None
    _check_cached_decoding(model)


def _base_state_for(name, base, model):
    state = base.state_dict()
    if name == "ffn_widths":  # the first rows of gate/up, the first columns of down (MatFormer)
        return slice_state(state, base.config, model.config, list(range(base.config.num_layers)))
    return state


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_component_changes_the_logits(name):
    """The component model given every weight of the plain Llama-style model: only the
    component's own parameters are new (or, for KV sharing, gone), and the logits differ."""
    base = _build(seed=1)
    model = _build(seed=2, **COMPONENTS[name])
    missing, unexpected = model.load_state_dict(_base_state_for(name, base, model), strict=False)
    own = {
        "laurel": {"laurel"}, "altup_ple": {"altup", "ple", "altup_projections", "altup_unembed_projections"},
    }.get(name, set())
    assert {k for k in missing if not own & set(k.split("."))} == set()
    if name == "kv_sharing":
        assert {k.split(".attn.")[1] for k in unexpected} == {"k_proj.weight", "v_proj.weight"}
        assert {k.split(".")[1] for k in unexpected} == {"2", "3"}
    else:
        assert unexpected == []
    ids = _ids(seed=3)
    with torch.no_grad():
        assert (model(ids) - base(ids)).abs().max().item() > 1e-3


def test_kv_shared_layers_have_no_projections_and_no_cache():
    model = _build(**COMPONENTS["kv_sharing"])
    assert [blk.attn.kv_source for blk in model.layers] == [None, None, 0, 1]
    assert [c is None for c in model.new_cache(1, 8).layers] == [False, False, True, True]
    assert model.layers[2].attn.kv_bytes_per_token(2) == 0 and model.layers[2].attn.k_norm is None


@pytest.mark.parametrize("fields,field", [
    (dict(attention_kind="mla", mla=dict(q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                          v_head_dim=8), layer_types=None, sliding_window=None, v_norm=True), "v_norm"),
    (dict(moe=dict(num_experts=4, top_k=2, expert_size=16), activation_sparsity=[0.9, 0, 0, 0]), "activation_sparsity"),
    (dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=50), "altup_num_inputs"),
])
def test_combinations_that_cannot_work_name_the_field(fields, field):
    with pytest.raises(ConfigError, match=field):
        llmarch.build_model(llmarch.ModelConfig(**LLAMA | fields), device="meta")
