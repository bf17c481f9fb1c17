"""Strict, clear checkpoint loading: every bad input names what was wrong and what was expected."""

import json
import shutil

import pytest
import torch
from oracle import VOCAB, make_hf_model
from safetensors.torch import load_file, save_file

import llmarch
from llmarch.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3")
    make_hf_model("qwen3").save_pretrained(d)
    return d


def _copy(src, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    return dst


def _edit_weights(d, fn):
    f = d / "model.safetensors"
    state = load_file(str(f))
    fn(state)
    save_file(state, str(f), metadata={"format": "pt"})


def test_missing_tensor_is_named(qwen3_dir, tmp_path):
    d = _copy(qwen3_dir, tmp_path)
    _edit_weights(d, lambda s: s.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*layers\.1\.attn\.k_norm\.weight.*model\.layers\.1\.self_attn\.k_norm\.weight"):
        llmarch.from_pretrained(d)


def test_unexpected_tensor_is_named(qwen3_dir, tmp_path):
    d = _copy(qwen3_dir, tmp_path)
    _edit_weights(d, lambda s: s.__setitem__("model.layers.0.mlp.extra_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"extra_proj"):
        llmarch.from_pretrained(d)
    d2 = tmp_path / "ck2"
    shutil.copytree(qwen3_dir, d2)
    _edit_weights(d2, lambda s: s.__setitem__("model.vision.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.vision\.weight'"):
        llmarch.from_pretrained(d2)


def test_misshaped_tensor_names_both_shapes(qwen3_dir, tmp_path):
    d = _copy(qwen3_dir, tmp_path)

    def cut(s):
        s["model.layers.0.mlp.up_proj.weight"] = s["model.layers.0.mlp.up_proj.weight"][:-1].clone()

    _edit_weights(d, cut)
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.up_proj\.weight.*\(95, 64\).*expects \(96, 64\)"):
        llmarch.from_pretrained(d)


def test_unsupported_model_type_lists_supported(qwen3_dir, tmp_path):
    d = _copy(qwen3_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bloom"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unsupported model_type 'bloom'.*qwen3"):
        llmarch.from_pretrained(d)


def test_missing_config_field(qwen3_dir, tmp_path):
    d = _copy(qwen3_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size"):
        llmarch.from_pretrained(d)


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated_safetensors(qwen3_dir, tmp_path, keep):
    d = _copy(qwen3_dir, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(CheckpointError, match="truncated"):
        llmarch.from_pretrained(d)


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        llmarch.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        llmarch.from_pretrained(tmp_path / "empty")


def test_sharded_checkpoint(tmp_path):
    """A sharded checkpoint (index.json + several files) loads to the same logits."""
    hf = make_hf_model("llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    files = list((tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = llmarch.from_pretrained(tmp_path / "sharded")
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4


def test_loading_allocates_weights_once(qwen3_dir):
    """Memory-lean: every parameter is a tensor read from the file, assigned, not copied into
    a preallocated model (no parameter shares storage with another, none is left on meta)."""
    model = llmarch.from_pretrained(qwen3_dir)
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs))
    assert not any(p.is_meta for p in model.parameters())


def _tiny_gemma3_multimodal():
    import transformers as T

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, sliding_window=4, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = T.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                         boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3)
    return T.Gemma3ForConditionalGeneration(cfg)


def test_multimodal_wrapper_loads_text_decoder(tmp_path):
    """gemma3 (multimodal) checkpoints: the text decoder loads, the vision tower is dropped."""
    from oracle import perturb_

    torch.manual_seed(0)
    hf = perturb_(_tiny_gemma3_multimodal()).eval()
    hf.save_pretrained(tmp_path / "mm")
    with pytest.warns(UserWarning, match="dropped .* non-text tensors"):
        model = llmarch.from_pretrained(tmp_path / "mm")
    ids = torch.randint(3, VOCAB - 4, (2, 11))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        err = (model(ids) - ref).abs().max().item()
    assert err < 1e-4


def test_hub_style_wrapper_prefixes(tmp_path):
    """Hub checkpoints of mistral3 / gemma3 store text weights as language_model.model.*."""
    from llmarch.families.base import text_only
    from llmarch.families.mistral import TOWERS

    def renamed(name):
        out = [n for n, _ in text_only(iter([(name, None)]), TOWERS)]
        return out[0] if out else None

    assert renamed("language_model.model.layers.3.self_attn.q_proj.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert renamed("model.language_model.norm.weight") == "model.norm.weight"
    assert renamed("language_model.lm_head.weight") == "lm_head.weight"
    with pytest.warns(UserWarning, match="dropped 1 non-text"):
        assert renamed("vision_tower.transformer.layers.0.attention.q_proj.weight") is None
    with pytest.warns(UserWarning, match="dropped 1 non-text"):
        assert renamed("multi_modal_projector.linear_1.weight") is None
