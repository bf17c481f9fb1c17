"""Multi-head latent attention: the absorbed decode path, the latent KV cache, FP8 checkpoints."""

import json
import warnings

import pytest
import torch
from oracle import SEQ, random_ids

import llmarch
from llmarch.checkpoints.fp8 import dequantize_blocks
from llmarch.families.deepseek import KEYS
from llmarch.families.experts import PER_EXPERT
from llmarch.model.mla import MLAttention


@pytest.fixture
def ds_dir(tiny_reference):
    return tiny_reference("deepseek_v3")


def _set_absorb(model, value):
    for m in model.modules():
        if isinstance(m, MLAttention):
            m.absorb = value


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v3_plain"])
def test_absorbed_path_equals_expanded(arch, tiny_reference):
    model = llmarch.from_pretrained(tiny_reference(arch)[0])
    ids = random_ids()
    with torch.no_grad():
        _set_absorb(model, False)
        expanded = model(ids)
        _set_absorb(model, True)
        absorbed = model(ids)
        # and absorbed decoding over a prefilled latent cache
        cache = model.new_cache(batch=2, max_len=SEQ)
        _set_absorb(model, False)
        steps = [model(ids[:, :5], cache=cache)]
        _set_absorb(model, True)
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(5, SEQ)]
    assert (absorbed - expanded).abs().max() < 1e-4
    assert (torch.cat(steps, 1) - expanded).abs().max() < 1e-4


def test_latent_cache_size(ds_dir):
    model = llmarch.from_pretrained(ds_dir[0])
    m = model.config.mla
    batch, tokens = 3, 11
    cache = model.new_cache(batch=batch, max_len=tokens)
    per_token = m.kv_lora_rank + m.qk_rope_head_dim
    assert cache.nbytes == per_token * model.config.num_layers * batch * tokens * 4
    assert all(blk.attn.kv_bytes_per_token(2) == per_token * 2 for blk in model.layers)


def test_deepseek_v3_kv_cache_is_the_latent():
    cfg = llmarch.get_config("deepseek-v3")
    model = llmarch.build_model(cfg, device="meta")
    assert model.layers[0].attn.kv_bytes_per_token(2) == (512 + 64) * 2  # 1152 bytes per token per layer in bf16


def test_mscale_corrects_softmax_scale(ds_dir):
    model = llmarch.from_pretrained(ds_dir[0])
    m = model.config.mla
    import math

    mscale = 0.1 * 0.8 * math.log(4.0) + 1.0  # factor 4, mscale_all_dim 0.8 in the tiny config
    assert model.layers[0].attn.scale == pytest.approx((m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5 * mscale**2)


# ---------------------------------------------------------------------------------------
# FP8 block-quantised checkpoints
# ---------------------------------------------------------------------------------------


def _quantize(w: torch.Tensor, block: int = 128):
    """Reference FP8 e4m3 block quantisation: one scale per block, amax mapped to 448."""
    out, inp = w.shape
    rows, cols = -(-out // block), -(-inp // block)
    scale = torch.empty(rows, cols)
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def _within_fp8_error(deq, w, scale_max):
    # e4m3: 3 mantissa bits -> relative error <= 2**-4; subnormals: absolute 2**-9 * scale
    return bool(((deq - w).abs() <= w.abs() * 2**-4 + scale_max * 2**-9).all())


def test_dequantize_ragged_blocks():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-2, 1, 200)  # blocks with very different ranges
    q, scale = _quantize(w)
    assert scale.shape == (3, 2)
    deq = dequantize_blocks(q, scale)
    assert _within_fp8_error(deq, w, scale.max())
    # block (2, 1) is the ragged 44 x 72 corner with its own scale
    torch.testing.assert_close(deq[256:, 128:], q[256:, 128:].float() * scale[2, 1])


def test_fp8_checkpoint_loads_dequantised_and_skips_mtp(ds_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d, _ = ds_dir
    state = load_file(str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    quantised, originals = {}, {}
    for name, w in state.items():
        if name.endswith("proj.weight") and w.dim() == 2:  # linear weights, as in DeepSeek's release
            q, s = _quantize(w)  # tiny weights: one ragged block each (several: test_dequantize_ragged_blocks)
            quantised[name], quantised[name + "_scale_inv"] = q, s
            originals[name] = (w, s)
        else:
            quantised[name] = w
    # the multi-token-prediction layer sits at index num_hidden_layers
    mtp = cfg["num_hidden_layers"]
    quantised[f"model.layers.{mtp}.eh_proj.weight"] = torch.zeros(4, 4)
    quantised[f"model.layers.{mtp}.self_attn.q_a_proj.weight"] = torch.zeros(4, 4)
    save_file(quantised, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = llmarch.from_pretrained(tmp_path)
    assert any("multi-token-prediction" in str(w.message) for w in caught)

    params = dict(model.named_parameters())
    for name, (w, s) in originals.items():
        expert = PER_EXPERT.match(name)
        if expert:  # stacked: gate and up rows of gate_up_proj, or down_proj
            j, proj = int(expert["j"]), expert["proj"]
            stacked = params[KEYS.to_native(expert["prefix"] + (".down_proj" if proj == "down" else ".gate_up_proj"))][j]
            width = w.shape[0] if proj != "down" else None
            loaded = stacked if proj == "down" else (stacked[:width] if proj == "gate" else stacked[width:])
        else:
            loaded = params[KEYS.to_native(name)]
        assert loaded.dtype == torch.float32
        assert _within_fp8_error(loaded, w, s.max()), name
        assert not torch.equal(loaded, w)  # it went through FP8
    assert len(originals) > 30
