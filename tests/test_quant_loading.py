"""Loading with ``quant``: a GGUF file's quantised matrices reach the model still quantised (no
float copy on the way or after), a float checkpoint quantises at load, and what cannot work is
refused, before any tensor is read, as one ``llmarch: error:`` line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize as gguf_quantize

import llmarch
from llmarch.checkpoints.formats import open_checkpoint
from llmarch.checkpoints.hf import from_pretrained, save_pretrained
from llmarch.cli import main
from llmarch.errors import ConfigError
from llmarch.inference.generate import load_model
from llmarch.inference.quant import Int4Linear, Int8Linear, QuantEmbedding, QuantHead

HIDDEN, FFN, HEADS, KV, VOCAB = 256, 512, 4, 2, 96  # widths a multiple of Q4_K's 256-weight block
HEAD_DIM = HIDDEN // HEADS


def _q4_k(rows: int, cols: int, rng) -> np.ndarray:
    """Q4_K blocks (gguf.quants cannot quantise to it): random codes and sub-block scales, small
    float16 super-block scales (d, dmin)."""
    block, size = GGML_QUANT_SIZES[QT.Q4_K]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in (0, 2):
        b[..., at : at + 2] = rng.uniform(2e-4, 1e-3, b.shape[:2]).astype(np.float16).view(np.uint8).reshape(*b.shape[:2], 2)
    return b.reshape(rows, -1)


def _write_llama_gguf(path, types: dict[str, QT], tied: bool = True, seed: int = 0):
    """A one-layer llama GGUF file; each matrix in the type ``types`` gives it (default Q8_0)."""
    rng = np.random.default_rng(seed)
    shapes = {
        "token_embd.weight": (VOCAB, HIDDEN), "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
        "blk.0.attn_k.weight": (KV * HEAD_DIM, HIDDEN), "blk.0.attn_v.weight": (KV * HEAD_DIM, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HIDDEN), "blk.0.ffn_gate.weight": (FFN, HIDDEN),
        "blk.0.ffn_up.weight": (FFN, HIDDEN), "blk.0.ffn_down.weight": (HIDDEN, FFN),
    }
    if not tied:
        shapes["output.weight"] = (VOCAB, HIDDEN)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, HIDDEN),
                       (w.add_feed_forward_length, FFN), (w.add_head_count, HEADS), (w.add_head_count_kv, KV),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0)]:
        add(value)
    for name, shape in shapes.items():
        qtype = types.get(name, QT.Q8_0)
        if qtype == QT.Q4_K:
            w.add_tensor(name, _q4_k(*shape, rng), raw_dtype=qtype)
        else:
            scale = 1.0 if name == "token_embd.weight" else shape[1] ** -0.5
            w.add_tensor(name, gguf_quantize(rng.standard_normal(shape).astype(np.float32) * scale, qtype), raw_dtype=qtype)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


MIXED = {"blk.0.attn_q.weight": QT.Q4_0, "blk.0.attn_k.weight": QT.Q4_K, "blk.0.attn_output.weight": QT.Q4_1,
         "blk.0.ffn_gate.weight": QT.Q4_K, "blk.0.ffn_up.weight": QT.Q4_0}  # the rest Q8_0
ALL_4BIT = {**MIXED, "token_embd.weight": QT.Q4_0, "blk.0.attn_v.weight": QT.Q4_0, "blk.0.ffn_down.weight": QT.Q4_1,
            "output.weight": QT.Q4_0}


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    return _write_llama_gguf(tmp_path_factory.mktemp("q") / "mixed.gguf", MIXED)


def _logits(model, seed=0):
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).float()


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("pack", [False, True])
def test_gguf_auto_keeps_the_file_quantised(mixed_gguf, pack):
    model = load_model(open_checkpoint(mixed_gguf), torch.float32, pack=pack, quant="auto")
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    # 4-bit types as int4 (Q/K rows unpermuted on the blocks), the wider Q8_0 as int8
    assert [type(m) for m in (attn.q_proj, attn.k_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj)] == [Int4Linear] * 5
    assert [type(m) for m in (attn.v_proj, mlp.down_proj)] == [Int8Linear] * 2
    assert isinstance(model.embed, QuantEmbedding) and isinstance(model.embed.table, Int8Linear)
    # no float copy of any matrix: only the norms are parameters, and the tied head is the table
    assert [n for n, p in model.named_parameters() if p.dim() > 1] == []
    assert isinstance(model.lm_head, QuantHead) and model.lm_head.embedding is model.embed
    assert not any(k.startswith("lm_head") for k in model.state_dict())
    head_bytes = {b.data_ptr() for m in (model.lm_head.embedding, model.embed) for b in m.buffers()}
    assert len(head_bytes) == len(list(model.embed.buffers()))
    # the same file dequantised to float32: bfloat16 activations and scales, int8 rows requantised
    ref = _logits(from_pretrained(mixed_gguf, torch.float32))
    out = _logits(model)
    assert _rel(out, ref) < 0.02, _rel(out, ref)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_gguf_quantised_rows_unpermuted_like_the_float_path(mixed_gguf):
    """llama.cpp's Q/K row order is undone on the raw blocks: the int4 rows equal the float path's rows."""
    model = load_model(open_checkpoint(mixed_gguf), torch.float32, pack=False, quant="auto")
    ref = from_pretrained(mixed_gguf, torch.float32).layers[0].attn
    for name in ("q_proj", "k_proj"):
        layer = getattr(model.layers[0].attn, name)
        rows = layer.rows(torch.arange(layer.out_features))
        w = getattr(ref, name).weight
        assert ((rows - w).abs() <= 2**-8 * 9 * w.abs().amax(1, keepdim=True)).all()
        # and far from the permuted order (the check would see a missing unpermute)
        assert (rows - w[torch.randperm(len(w), generator=torch.Generator().manual_seed(0))]).abs().max() > 0.1


def test_gguf_int8_and_int4(tmp_path, mixed_gguf):
    int8 = load_model(open_checkpoint(mixed_gguf), torch.float32, pack=False, quant="int8")
    assert {type(m) for m in int8.modules() if isinstance(m, (Int4Linear, Int8Linear))} == {Int8Linear}
    assert _rel(_logits(int8), _logits(from_pretrained(mixed_gguf, torch.float32))) < 0.03
    four = _write_llama_gguf(tmp_path / "q4.gguf", ALL_4BIT, tied=False)
    int4 = load_model(open_checkpoint(four), torch.float32, pack=False, quant="int4")
    assert {type(m) for m in int4.modules() if isinstance(m, (Int4Linear, Int8Linear))} == {Int4Linear}
    assert isinstance(int4.lm_head, Int4Linear) and [n for n, p in int4.named_parameters() if p.dim() > 1] == []
    assert _rel(_logits(int4), _logits(from_pretrained(four, torch.float32))) < 0.02


def test_gguf_compact_keeps_q5_0_codes(tmp_path):
    """--quant compact: Q5_0 matrices in their 5-bit codes (5.5 bits a weight, against 8.5 as int8),
    the other types as auto loads them; the same logits as auto to the bit (the native kernel and
    the float32 product give the int8 layout's results on the same codes and scales). A float
    checkpoint has no codes to keep: refused, naming the choices that work."""
    from llmarch.inference import native
    from llmarch.inference.quant import Q5Linear

    if native.library() is None:
        pytest.skip("Q5_0 codes are kept where llmarch's native kernels are built")
    path = _write_llama_gguf(tmp_path / "q5.gguf", {**MIXED, "blk.0.ffn_down.weight": QT.Q5_0,
                                                   "blk.0.attn_v.weight": QT.Q5_0, "token_embd.weight": QT.Q5_0})
    auto = load_model(open_checkpoint(path), torch.float32, quant="auto")
    compact = load_model(open_checkpoint(path), torch.float32, quant="compact")
    for name in ("attn.v_proj", "mlp.down_proj"):
        assert type(auto.layers[0].get_submodule(name)) is Int8Linear
        assert type(compact.layers[0].get_submodule(name)) is Q5Linear
    assert type(compact.layers[0].attn.q_proj) is Int4Linear and type(compact.embed.table) is Int8Linear
    q5 = [m for m in compact.modules() if isinstance(m, Q5Linear)]
    assert len(q5) == 2 and all(m.blocks.numel() + 2 * m.scales.numel() == m.out_features * m.in_features * 22 // 32
                                for m in q5)  # 22 bytes per 32 weights, as in the file
    for rows in (1, 12):  # the native kernel, the float32 product
        ids = torch.randint(0, VOCAB, (2, rows), generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            assert torch.equal(compact(ids), auto(ids))
    hf = save_pretrained(from_pretrained(path, torch.float32), tmp_path / "hf")
    with pytest.raises(ConfigError, match="--quant compact keeps a GGUF file's quantised matrices in their own codes"):
        load_model(open_checkpoint(hf), quant="compact")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_float_checkpoint_quantised_at_load(tmp_path, mixed_gguf, mode):
    path = save_pretrained(from_pretrained(mixed_gguf, torch.float32), tmp_path / "hf")
    ref = _logits(from_pretrained(path, torch.float32))
    assert type(load_model(open_checkpoint(path), torch.float32, quant="auto").embed) is nn.Embedding  # float stays float
    model = load_model(open_checkpoint(path), torch.float32, quant=mode, group_size=64)
    kind = Int8Linear if mode == "int8" else Int4Linear
    assert type(model.layers[0].mlp.down_proj) is kind and type(model.embed.table) is kind
    assert isinstance(model.lm_head, QuantHead) and model.lm_head.embedding is model.embed
    assert _rel(_logits(model), ref) < (0.03 if mode == "int8" else 0.2)


def test_llmarch_quantize_is_exported(mixed_gguf):
    model = llmarch.quantize(from_pretrained(mixed_gguf, torch.float32), "int4", group_size=128)
    assert model.layers[0].attn.q_proj.group_size == 128


# ---- refusals: one line, exit 2, before any tensor is read ----------------------------------
def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llmarch: error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("command", ["generate", "perplexity"])
def test_cli_refuses_what_cannot_work(capsys, monkeypatch, tmp_path, mixed_gguf, command):
    def never(*a, **k):
        raise AssertionError("tensors were read before the refusal")

    monkeypatch.setattr("llmarch.checkpoints.formats.GGUFCheckpoint.raw_tensors", never)
    (tmp_path / "text.txt").write_text("Some text to score.")
    command = ["generate", "Hi"] if command == "generate" else ["perplexity", str(tmp_path / "text.txt")]
    model = ["--model", str(mixed_gguf), "--threads", "1"]
    assert "invalid choice: 'int3'" in _cli_error(capsys, [*command, *model, "--quant", "int3"])
    assert "group size 48 is not supported" in _cli_error(capsys, [*command, *model, "--quant", "int4", "--group-size", "48"])
    msg = _cli_error(capsys, [*command, *model, "--quant", "int4"])
    assert "holds Q8_0 tensors, wider than 4 bits" in msg and "--quant auto" in msg


def test_refusals_name_the_layer_and_the_fix(tmp_path, mixed_gguf):
    ck = open_checkpoint(_write_llama_gguf(tmp_path / "q4.gguf", ALL_4BIT))
    with pytest.raises(ConfigError, match="one scale per 32 weights; group size 64 cannot be formed"):
        load_model(ck, quant="int4", group_size=64)
    with pytest.raises(ConfigError, match="unknown quantisation 'fp8'"):
        load_model(ck, quant="fp8")
    path = save_pretrained(from_pretrained(mixed_gguf, torch.float32), tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 384
    (path / "config.json").write_text(json.dumps(cfg))
    # refused from config.json alone (the safetensors hold 512-wide tensors that would not even load)
    with pytest.raises(ConfigError, match=r"layer layers\.0\.mlp\.down_proj has input width 384, not divisible by the int4 group size 256"):
        load_model(open_checkpoint(path), quant="int4", group_size=256)


# ---- the int8 requantisations and int4 packings cached between runs ------------------------------------------------
def _counting_requantisations(monkeypatch):
    """The int8 requantisations and int4 repackings done, as their shapes."""
    from llmarch.inference import gguf_quant

    calls = []
    real, real4 = gguf_quant.int8_weights, gguf_quant.int4_codes

    def counted(data, qtype, shape, grouped=False):
        calls.append(shape)
        return real(data, qtype, shape, grouped)

    def counted4(data, qtype, shape):
        calls.append(shape)
        return real4(data, qtype, shape)

    monkeypatch.setattr(gguf_quant, "int8_weights", counted)
    monkeypatch.setattr(gguf_quant, "int4_codes", counted4)
    return calls


def _derived(root):
    return sorted((root / "derived").glob("*.safetensors"))


@pytest.fixture
def derived_cache(tmp_path, monkeypatch):
    from llmarch.checkpoints.cache import DerivedTensors

    root = tmp_path / "cache"
    monkeypatch.setenv("LLMARCH_CACHE", str(root))
    monkeypatch.setattr(DerivedTensors, "MIN_FILE_BYTES", 0)
    return root


def test_int8_requantisation_is_read_back_on_the_second_load(derived_cache, mixed_gguf, monkeypatch):
    from llmarch.checkpoints.gguf import GGUFFile

    calls = _counting_requantisations(monkeypatch)
    reads = []
    raw = GGUFFile.raw
    monkeypatch.setattr(GGUFFile, "raw", lambda self, name: reads.append(name) or raw(self, name))
    first = load_model(open_checkpoint(mixed_gguf), pack=False)
    assert calls and len(_derived(derived_cache)) == 1
    n, first_reads = len(calls), len(reads)
    second = load_model(open_checkpoint(mixed_gguf), pack=False)
    assert len(calls) == n, "the second load requantised again instead of reading the cache"
    assert len(reads) == first_reads, f"a cache hit read the file's tensors: {reads[first_reads:]}"
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert any(isinstance(m, Int4Linear) for m in second.modules())
    for m in second.modules():  # the kernels fault on misaligned memory: read-back tensors are aligned
        if isinstance(m, Int8Linear):
            assert m.weight_int8.data_ptr() % 64 == 0
        if isinstance(m, Int4Linear):
            assert m.weight_int4pack.data_ptr() % 64 == 0
    assert torch.equal(_logits(first), _logits(second))


def test_damaged_or_stale_entries_are_recomputed(derived_cache, monkeypatch, tmp_path):
    import shutil

    from llmarch.checkpoints.cache import DerivedTensors

    path = tmp_path / "model.gguf"
    _write_llama_gguf(path, MIXED)
    calls = _counting_requantisations(monkeypatch)
    reference = _logits(load_model(open_checkpoint(path), pack=False))
    (entry,) = _derived(derived_cache)
    n = len(calls)
    # one flipped byte in the data (the entry's stamp no longer matches, so every item is
    # checked): that item is recomputed, and the entry rewritten whole
    data = bytearray(entry.read_bytes())
    data[-100] ^= 0xFF
    entry.write_bytes(bytes(data))
    assert torch.equal(_logits(load_model(open_checkpoint(path), pack=False)), reference)
    assert len(calls) == n + 1
    load_model(open_checkpoint(path), pack=False)
    assert len(calls) == n + 1, "the rewritten entry was not read back"
    # truncated, then garbage: everything recomputed, never an error
    for damage in (entry.read_bytes()[: entry.stat().st_size // 2], b"not a safetensors file"):
        entry.write_bytes(damage)
        before = len(calls)
        assert torch.equal(_logits(load_model(open_checkpoint(path), pack=False)), reference)
        assert len(calls) - before == n
    # the file replaced by another with the same metadata and size but other weights: a new
    # key (its stamp changed), computed afresh, and the old entry removed
    other = _write_llama_gguf(tmp_path / "other.gguf", MIXED, seed=1)
    assert other.stat().st_size == path.stat().st_size
    shutil.copyfile(other, path)
    before = len(calls)
    got = _logits(load_model(open_checkpoint(path), pack=False))
    assert len(calls) - before == n and len(_derived(derived_cache)) == 1
    monkeypatch.setattr(DerivedTensors, "MIN_FILE_BYTES", 1 << 60)  # no cache at all
    assert torch.equal(got, _logits(load_model(open_checkpoint(path), pack=False)))
    assert not torch.equal(got, reference)


def test_an_unwritable_cache_only_means_no_caching(derived_cache, mixed_gguf, monkeypatch):
    derived_cache.mkdir(parents=True)
    (derived_cache / "derived").write_text("a file where the directory would go")
    calls = _counting_requantisations(monkeypatch)
    reference = _logits(load_model(open_checkpoint(mixed_gguf), pack=False))
    n = len(calls)
    assert torch.equal(_logits(load_model(open_checkpoint(mixed_gguf), pack=False)), reference)
    assert len(calls) == 2 * n


def test_load_with_the_fast_kernels(mixed_gguf, monkeypatch, torch_kernels):
    from llmarch.inference import quant

    if not quant.dynamic_available():
        pytest.skip("this torch build has no fbgemm (x86) quantized engine")
    monkeypatch.setattr(quant, "FAST_MIN_WEIGHTS", 0)  # this file's matrices are small
    plain = load_model(open_checkpoint(mixed_gguf))
    fast = load_model(open_checkpoint(mixed_gguf), fast=True)
    table = fast.lm_head.embedding.table  # the tied Q8_0 table, int8
    assert table.dynamic is not None and plain.lm_head.embedding.table.dynamic is None
    packed = quant.int8_layers(fast)  # the fused groups' layers in place of their members
    # without the native kernels the file's matrices keep one scale a row (torch's kernels and
    # fbgemm's take no other), so every int8 layer is packed, not only the head
    assert len(packed) > 1 and all(m.dynamic is not None and not m.grouped for m in packed)
    ids = torch.tensor([[3, 17, 42, 5]])
    with torch.no_grad():
        a, b = plain(ids[:, -1:]), fast(ids[:, -1:])  # one row: the packed kernels
        assert 0 < _rel(b, a) < 2e-2
        long = torch.tensor([[3, 17, 42, 5, 9, 11, 2, 7, 1]])
        assert torch.equal(plain(long), fast(long))  # a prefill of W8A8_MIN_ROWS rows or more: the same path


def _resident_kib(t: torch.Tensor) -> int:
    """This process's resident KiB of the mapping that holds t (its Rss in /proc/self/smaps)."""
    inside, addr = False, t.data_ptr()
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError("no mapping holds the tensor")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs procfs and madvise (Linux)")
def test_fusing_int8_layers_releases_the_entry_pages_it_copied(derived_cache, monkeypatch):
    """Fused q/k/v (or gate/up) are a copy of int8 weights that a DerivedTensors entry serves as
    views of its mapping: the pages read to make the copy are dropped (their bytes read back the
    same), while a tensor in the process's own memory is never touched."""
    from llmarch.checkpoints.assets import cache_dir
    from llmarch.checkpoints.cache import DerivedTensors, release_mapped_pages

    big = torch.randint(-127, 128, (256, 4096), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    entry = cache_dir() / "derived" / "source-key.safetensors"
    store = DerivedTensors(entry, "source")
    store.get("w", lambda: (big,))  # 1 MiB: whole pages inside
    store.save()
    (mapped,) = DerivedTensors(entry, "source").get("w", lambda: pytest.fail("not served from the entry"))
    assert torch.equal(mapped, big)  # reads every page in
    before = _resident_kib(mapped)
    assert before >= 1000
    released = release_mapped_pages([mapped])
    assert released >= (1 << 20) - 2 * 4096
    assert _resident_kib(mapped) <= before - released // 1024
    assert torch.equal(mapped, big)  # faulted back in, unchanged
    assert _resident_kib(mapped) >= before - 8
    own = big.clone()
    assert release_mapped_pages([own]) == 0 and torch.equal(own, big)


def test_fused_int8_layers_read_a_mapped_entry_in_place(derived_cache, tmp_path):
    """Served from a DerivedTensors entry, a layer's int8 q/k/v (and gate/up) lie back to back in
    the mapping (in the order of their names): the fused product reads them there (no copy, no
    page read at load), its outputs put back in q, k, v order; the logits equal those of the
    first load, whose freshly computed weights were copied into one buffer."""
    from llmarch.inference.packed import _fused

    # int8 q, k, v, gate, up (Q8_0); the output projection int4 (Q4_0), as Gemma 3's file has it:
    # an int8 o_proj would lie between k and q in the entry, and q/k/v would be copied
    path = _write_llama_gguf(tmp_path / "q8.gguf", {"blk.0.attn_output.weight": QT.Q4_0})
    first = load_model(open_checkpoint(path))
    second = load_model(open_checkpoint(path))
    copied = {g: f for m in first.modules() for g, f in _fused(m).items()}
    viewed = {g: f for m in second.modules() for g, f in _fused(m).items()}
    assert set(copied) == set(viewed) == {"qkv", "gate_up"}
    assert not any(f.layer.keep_alive for f in copied.values())
    assert all(f.layer.keep_alive for f in viewed.values())
    assert viewed["qkv"].order == [1, 0, 2] and viewed["gate_up"].order is None  # k, q, v in the entry
    for f in viewed.values():
        assert f.layer.weight_int8.data_ptr() == min(getattr(f.module, n).weight_int8.data_ptr() for n in f.names)
    assert torch.equal(_logits(first), _logits(second))
    # with the output projection int8 too, it lies between k and q: q, k, v are copied, gate/up not
    other = _write_llama_gguf(tmp_path / "all8.gguf", {})
    load_model(open_checkpoint(other))
    groups = {g: f for m in load_model(open_checkpoint(other)).modules() for g, f in _fused(m).items()}
    assert not groups["qkv"].layer.keep_alive and groups["gate_up"].layer.keep_alive
