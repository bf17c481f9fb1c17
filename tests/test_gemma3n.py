"""Gemma 3n (text): every component switched on and reaching the logits, greedy generation as
transformers', the multimodal wrapper, PLE offloading and MatFormer slicing, on a tiny random
model in float32. Logits, cached decoding and export against transformers: tests/test_parity.py."""

import json
import re

import pytest
import torch
from oracle import PLE_VOCAB, SEQ, gemma3n_config, random_ids
from safetensors.torch import load_file, save_file

import llmarch
from llmarch.analysis.params import count_model, count_params
from llmarch.checkpoints.matformer import slice_model
from llmarch.cli import main as cli_main
from llmarch.errors import ConfigError
from llmarch.inference.offload import OffloadedTable, offload_ple

TOL = 1e-4


def _ids(batch=2, seq=SEQ, seed=0):
    return random_ids(batch=batch, seq=seq, seed=seed)


@pytest.fixture
def saved(tiny_reference):
    return tiny_reference("gemma3n")


@pytest.fixture
def model(saved):
    return llmarch.from_pretrained(saved[0])


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_config_exercises_every_feature(model):
    cfg = model.config
    assert [cfg.layer_kv_source(i) for i in range(7)] == [None, None, None, None, 2, 3, 2]
    assert cfg.sliding_window < SEQ and "full" in cfg.layer_types
    assert sum(s > 0 for s in cfg.activation_sparsity) == 4 and cfg.activation_sparsity[5] > 0
    assert len(set(cfg.intermediate_sizes)) == 3
    assert (cfg.altup_num_inputs, cfg.laurel_rank, cfg.hidden_size_per_layer_input) == (4, 8, 8)
    assert cfg.v_norm and cfg.final_logit_softcap == 30.0 and cfg.attn_scale == 1.0
    # KV-shared layers have no K/V weights and no cache of their own
    assert model.layers[5].attn.k_proj is None and model.layers[3].attn.k_proj is not None
    cache = model.new_cache(1, 8)
    assert [c is None for c in cache.layers] == [False] * 4 + [True] * 3


def test_activation_sparsity_matters(model):
    """Sparsity changes the logits, so parity above covers it."""
    ids = _ids()
    with torch.no_grad():
        base = model(ids)
        model.layers[0].mlp.sparsity = 0.0
        dense = model(ids)
    assert _max_diff(base, dense) > 1e-2


def test_cached_decoding_matches_transformers_generate(saved, model):
    _, hf = saved
    ids = _ids(batch=1, seq=9, seed=3)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=8, do_sample=False)
        cache = model.new_cache(1, 17)
        seq = ids
        step = model(ids, cache=cache, last_only=True)
        for _ in range(8):
            nxt = step[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            step = model(nxt, cache=cache)
    assert torch.equal(seq, ref)


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_multimodal_checkpoint_loads_text_decoder(saved, model, tmp_path, prefix):
    """gemma3n checkpoints: text weights under a wrapper prefix, towers dropped with a note,
    K/V weights of KV-shared layers (present in released checkpoints) ignored."""
    d, _ = saved
    text = json.loads((d / "config.json").read_text())
    state = load_file(str(d / "model.safetensors"))
    wrapped = {re.sub(r"^model\.", prefix, k): v for k, v in state.items() if not k.startswith("lm_head")}
    wrapped["model.vision_tower.timm_model.conv_stem.weight"] = torch.zeros(3)
    wrapped["model.audio_tower.conformer.0.weight"] = torch.zeros(3)
    wrapped["model.embed_audio.embedding.weight"] = torch.zeros(3)
    wrapped[prefix + "layers.5.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    save_file(wrapped, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3n", "text_config": text}))
    with pytest.warns(UserWarning, match="dropped 3"):
        m = llmarch.from_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        assert _max_diff(m(ids), model(ids)) == 0


# ----------------------------------------------------------------------------------------
# PLE offloading
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("to_disk", [False, True])
def test_offloaded_ple_gives_the_same_logits(model, tmp_path, to_disk):
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
    before = count_model(model)
    table = offload_ple(model, tmp_path / "ple.bin" if to_disk else None)
    assert isinstance(table, OffloadedTable) and model.ple.table is table
    if to_disk:  # memory-mapped from the file, not copied into memory
        assert str(tmp_path / "ple.bin") in open("/proc/self/maps").read()
    # the table is no longer a parameter: moving the model does not move it
    assert not any("ple.table" in n for n, _ in model.named_parameters())
    assert before.total - sum(p.numel() for p in model.parameters()) == PLE_VOCAB * 7 * 8
    with torch.no_grad():
        assert torch.equal(model(ids), ref)
    # an offloaded model still exports its whole checkpoint
    llmarch.save_pretrained(model, tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(llmarch.from_pretrained(tmp_path / "export")(ids), ref)


def test_offload_needs_a_ple_model():
    cfg = llmarch.ModelConfig(num_layers=1, vocab_size=64, hidden_size=32, intermediate_size=32, num_heads=2, num_kv_heads=2)
    with pytest.raises(ConfigError, match="per-layer embedding"):
        offload_ple(llmarch.build_model(cfg))


# ----------------------------------------------------------------------------------------
# MatFormer slicing
# ----------------------------------------------------------------------------------------


def _slice_hf_state(state, widths, keep, n_old, p):
    """transformers-named state dict of the sub-network, sliced independently of llmarch."""
    out = {}
    for k, v in state.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if i not in keep:
                continue
            w = widths[i]
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                v = v[:w]
            elif rest == "mlp.down_proj.weight":
                v = v[:, :w]
            k = f"model.layers.{keep.index(i)}.{rest}"
        elif k == "model.embed_tokens_per_layer.weight":
            v = v.reshape(v.shape[0], n_old, p)[:, keep].reshape(v.shape[0], -1)
        elif k == "model.per_layer_model_projection.weight":
            v = v.reshape(n_old, p, -1)[keep].reshape(len(keep) * p, -1)
        out[k] = v
    return out


@pytest.mark.parametrize("widths,skip", [([64, 96, 48, 32, 64, 80, 32], []), (64, [1, 5])])
def test_sliced_model_matches_transformers_sub_network(saved, tmp_path, widths, skip):
    import transformers as T

    d, hf = saved
    out = tmp_path / "sliced"
    args = ["slice", str(d), "--ffn-widths", ",".join(map(str, widths)) if isinstance(widths, list) else str(widths),
            "--out", str(out)] + (["--skip-layers", ",".join(map(str, skip))] if skip else [])
    assert cli_main(args) == 0
    sliced = llmarch.from_pretrained(out)
    cfg = sliced.config
    keep = [i for i in range(7) if i not in skip]
    assert cfg.num_layers == len(keep)
    assert count_params(cfg).total == sum(p.numel() for p in sliced.parameters())
    assert count_params(cfg).total < count_model(hf_model := llmarch.from_pretrained(d)).total

    per_layer = widths if isinstance(widths, list) else [widths] * 7
    small_cfg = gemma3n_config(
        intermediate_size=[per_layer[i] for i in keep], num_hidden_layers=len(keep),
        layer_types=[gemma3n_config().layer_types[i] for i in keep],
        activation_sparsity_pattern=[gemma3n_config().activation_sparsity_pattern[i] for i in keep],
        num_kv_shared_layers=sum(i >= 4 for i in keep),
    )
    small = T.Gemma3nForCausalLM(small_cfg).eval()
    small.load_state_dict(_slice_hf_state(hf.state_dict(), per_layer, keep, 7, 8), strict=False)
    ids = _ids(seed=4)
    with torch.no_grad():
        ref = small(ids).logits
        assert _max_diff(sliced(ids), ref) < TOL
        assert _max_diff(hf_model(ids), ref) > 1e-2  # the sub-network is a different function


def test_full_width_slice_is_the_identity(model):
    same = slice_model(model)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(same(ids), model(ids))


def test_slice_refuses_to_break_kv_sharing(model):
    with pytest.raises(ConfigError, match="keys/values"):
        slice_model(model, skip_layers=[3])  # layer 5 reads layer 3's K/V
    with pytest.raises(ConfigError, match="not in 1..96"):
        slice_model(model, ffn_widths=[200] * 7)


# ----------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,layers,shared,ffn", [("gemma3n-e2b", 30, 10, 8192), ("gemma3n-e4b", 35, 15, 16384)])
def test_presets_count_like_transformers(name, layers, shared, ffn):
    import transformers as T

    cfg = llmarch.get_config(name)
    with torch.device("meta"):
        hf = T.Gemma3nForCausalLM(T.Gemma3nTextConfig(num_hidden_layers=layers, intermediate_size=ffn,
                                                      num_kv_shared_layers=shared))
    n = count_params(cfg)
    assert n.total == sum(p.numel() for p in hf.parameters())
    table = 262144 * layers * 256
    assert n.effective == n.total - table
    assert cfg.activation_sparsity == [0.95] * 10 + [0.0] * (layers - 10)
    assert cfg.layer_types[:5] == ["sliding"] * 4 + ["full"]


def test_altup_coefficients_are_clipped_in_training(saved, model):
    """Training mode clips the AltUp predict/correct coefficients to +-altup_coef_clip, as
    transformers does (it clamps the prediction weights in place)."""
    import transformers as T

    hf = T.Gemma3nForCausalLM.from_pretrained(saved[0], dtype=torch.float32, attn_implementation="eager")
    for m in (hf.model.layers[1].altup, model.layers[1].altup):
        with torch.no_grad():
            m.prediction_coefs.weight[0, 0] = 300.0
            m.correction_coefs.weight[1, 2] = -500.0
    ids = _ids(seed=5)
    hf.train()
    model.train()
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
        model.eval()
        unclipped = model(ids)
    assert _max_diff(out, ref) < TOL
    assert _max_diff(out, unclipped) > 1e-2


def test_cli_slice_reports_bad_input(saved, tmp_path, capsys):
    assert cli_main(["slice", str(saved[0]), "--skip-layers", "9", "--out", str(tmp_path / "x")]) == 2
    assert "out of range" in capsys.readouterr().err


def test_cli_slice_skip_layers_reversed_range_is_refused(saved, tmp_path, capsys):
    assert cli_main(["slice", str(saved[0]), "--skip-layers", "5-2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "range '5-2'" in err and "2-5" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_cli_slice_out_in_source_is_refused(saved, capsys, where):
    src = saved[0]
    before = {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()}
    out = src if where == "same" else src / "sub"
    assert cli_main(["slice", str(src), "--ffn-widths", "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is the source checkpoint" in err and len(err.splitlines()) == 1
    assert {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()} == before and not (src / "sub").exists()


def test_cli_slice_replaces_an_old_slice_atomically_and_refuses_other_folders(saved, tmp_path, capsys):
    out = tmp_path / "sliced"
    assert cli_main(["slice", str(saved[0]), "--skip-layers", "6", "--out", str(out)]) == 0
    assert cli_main(["slice", str(saved[0]), "--out", str(out)]) == 0  # an earlier slice is replaced whole
    assert llmarch.from_pretrained(out).config.num_layers == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary sibling left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    capsys.readouterr()
    assert cli_main(["slice", str(saved[0]), "--out", str(tmp_path / "notes")]) == 2
    assert "is not a checkpoint folder" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_e2b_shape_is_a_slice_of_e4b():
    """FFN 16384 -> 8192 and one 4-sliding + 1-full group of KV-shared layers dropped turns the
    E4B configuration into E2B's (the same shapes; which layers Google's E2B keeps is not claimed)."""
    from llmarch.checkpoints.matformer import slice_config

    e4b, e2b = llmarch.get_config("gemma3n-e4b"), llmarch.get_config("gemma3n-e2b")
    sliced, keep = slice_config(e4b, 8192, skip_layers=range(20, 25))
    assert sliced.to_dict() | {"name": None} == e2b.to_dict() | {"name": None}
    assert count_params(sliced).total == count_params(e2b).total
