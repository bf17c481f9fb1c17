"""Regression tests for issue 14 (items 4-7 for model files, configs, templates and the model cache):
one test per hostile input, each named after the case. Every case must end in one clean
``LlmarchError`` (a one-line ``llmarch: error:`` and exit 2 on the command line), quickly."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time

import pytest
import torch
from hostile import HF_CONFIG, write_gguf, write_hf_dir, write_tokenizer_dir

import llmarch
from llmarch.checkpoints import assets, budget
from llmarch.checkpoints.formats import open_checkpoint
from llmarch.checkpoints.tokenizer import ChatTemplate, Tokenizer
from llmarch.cli import main
from llmarch.errors import CheckpointError, ConfigError, GenerationError, LlmarchError
from llmarch.inference.generate import GenerationConfig, generate

USER = [{"role": "user", "content": "hi"}]


# ------------------------------------------------------------------ 1. budgets from the file
def test_gguf_block_count_million_is_refused_before_building(tmp_path):
    t = time.monotonic()
    with pytest.raises(ConfigError, match=r"block_count = 1000000 is out of range \(expected .* to 10000\)"):
        llmarch.from_pretrained(write_gguf(tmp_path / "m.gguf", block_count=10**6))
    assert time.monotonic() - t < 5


def test_gguf_block_count_beyond_its_tensors_is_refused_before_building(tmp_path, monkeypatch):
    monkeypatch.setattr("llmarch.checkpoints.hf.build_model", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(CheckpointError, match=r"num_layers = 5000, but the file's tensors cover only 1 layer"):
        llmarch.from_pretrained(write_gguf(tmp_path / "m.gguf", block_count=5000))


def test_config_json_num_hidden_layers_million_is_refused(tmp_path):
    d = write_hf_dir(tmp_path / "ck", {**HF_CONFIG, "num_hidden_layers": 10**6})
    with pytest.raises(ConfigError, match=r"num_hidden_layers = 1000000 is out of range"):
        llmarch.from_pretrained(d)


def test_config_json_layers_beyond_tensors_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("llmarch.checkpoints.hf.build_model", lambda *a, **k: pytest.fail("built the model"))
    d = write_hf_dir(tmp_path / "ck", {**HF_CONFIG, "num_hidden_layers": 9000})
    with pytest.raises(CheckpointError, match=r"num_layers = 9000, but the file's tensors cover only 1 layer"):
        llmarch.from_pretrained(d)


def test_config_json_sizes_beyond_tensors_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("llmarch.checkpoints.hf.build_model", lambda *a, **k: pytest.fail("built the model"))
    d = write_hf_dir(tmp_path / "ck", {**HF_CONFIG, "hidden_size": 1 << 20, "head_dim": 4})
    with pytest.raises(CheckpointError, match=r"describes at least [\d,]+ parameters .* hold only [\d,]+ values"):
        llmarch.from_pretrained(d)


def test_model_larger_than_available_memory_is_refused_with_the_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "available_memory", lambda: 1000)
    with pytest.raises(CheckpointError, match=r"needs about 0\.00 GB .* only 0\.00 GB is available"):
        llmarch.from_pretrained(write_gguf(tmp_path / "m.gguf"))
    held = budget.file_tensors(open_checkpoint(tmp_path / "m.gguf"), torch.bfloat16)
    assert held.loaded_bytes == 2 * held.values and held.layers == 1


def test_the_valid_files_still_load(tmp_path):
    for path in (write_gguf(tmp_path / "m.gguf", layers=2), write_hf_dir(tmp_path / "ck")):
        model = llmarch.from_pretrained(path)
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 32)


# ------------------------------------------------------------------ 2. chat templates
@pytest.mark.parametrize("template, match", [
    ("{{ 'a' * 10**9 }}", "longer than 10,000,000 characters"),
    ("{{ 'a' + 'b' * 9000000 + 'c' * 9000000 }}", "longer than 10,000,000 characters"),
    ("{{ 'a'|center(1000000000) }}", "width or count of 1,000,000,000"),
    ("{{ 'a'.ljust(10**9) }}", "width or count of 1,000,000,000"),
    ("{{ '%999999999d'|format(1) }}", "width or count of 999,999,999"),
    ("{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
     "namespace value longer than"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loops more than"),
    ("{% for i in range(99999) %}{{ 'x' * 999 }}{% endfor %}", "longer than 10,000,000 characters"),
])
def test_template_amplification_is_capped(template, match):
    t = time.monotonic()
    with pytest.raises(CheckpointError, match=match):
        ChatTemplate(template).render(USER)
    assert time.monotonic() - t < 5


def test_template_syntax_error_is_one_error():
    with pytest.raises(CheckpointError, match=r"chat template is invalid \(line 1\)"):
        ChatTemplate("{% for m in messages %}")


def test_template_raise_exception_is_one_error():
    with pytest.raises(GenerationError, match="chat template refused the messages: roles must alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render(USER)


def test_template_sandbox_security_error_is_one_error():
    with pytest.raises(CheckpointError, match="SecurityError"):
        ChatTemplate("{{ ().__class__.__mro__ }}").render(USER)


def test_template_runtime_errors_are_one_error():
    for template in ("{{ 1 / 0 }}", "{{ x.y.z }}", "{{ messages[5].content }}"):
        with pytest.raises(CheckpointError, match="chat template failed"):
            ChatTemplate(template).render(USER)


def test_template_caps_leave_the_process_limits_as_they_were():
    import resource
    import signal

    before = resource.getrlimit(resource.RLIMIT_AS), signal.getsignal(signal.SIGALRM)
    with pytest.raises(CheckpointError):
        ChatTemplate("{{ 'a' * 10**9 }}").render(USER)
    assert ChatTemplate("{{ messages[0].content }}").render(USER) == "hi"
    assert (resource.getrlimit(resource.RLIMIT_AS), signal.getsignal(signal.SIGALRM)) == before


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "caf\udce9"}],
    [{"role": "system", "content": "\udcff"}, {"role": "user", "content": "hi"}],
])
def test_non_utf8_prompt_or_system_message_is_one_error(messages):
    with pytest.raises(GenerationError, match="is not valid UTF-8 text"):
        ChatTemplate("{{ messages[0].content }}").render(messages)


# ------------------------------------------------------------------ 3. readers
def _safetensors_with_header(path, header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, match", [
    (b"\xff\xfe{}", "header is not UTF-8"),
    ([1, 2], "header is a JSON list"),
    ({"w": {"dtype": "F32", "shape": [2]}}, r"tensor 'w' has data_offsets None"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "0 <= begin <= end"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, r"tensors 'a' and 'b' overlap"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "need 12"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "has dtype 'Q4'"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "non-negative integers"),
])
def test_malformed_safetensors_header_is_one_error(tmp_path, header, match):
    d = write_hf_dir(tmp_path / "ck")
    _safetensors_with_header(d / "model.safetensors", header, bytes(16))
    with pytest.raises(CheckpointError, match=match):
        llmarch.from_pretrained(d)


def test_int32_tensor_for_a_float_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    d = write_hf_dir(tmp_path / "ck")
    state = load_file(str(d / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'norm\.weight' has dtype torch\.int32"):
        llmarch.from_pretrained(d)


@pytest.mark.parametrize("raw, match", [(b"[1, 2]", "holds a JSON list"), (b'{"a": "\xff"}', "not UTF-8")])
def test_config_json_list_or_not_utf8_is_one_error(tmp_path, raw, match):
    d = write_hf_dir(tmp_path / "ck")
    (d / "config.json").write_bytes(raw)
    with pytest.raises(CheckpointError, match=match):
        llmarch.from_pretrained(d)


@pytest.mark.parametrize("raw, match", [(b"[1, 2]", "holds a JSON list"), (b'{"a": "\xff"}', "not UTF-8")])
def test_tokenizer_config_list_or_not_utf8_is_one_error(tmp_path, raw, match):
    with pytest.raises(CheckpointError, match=match):
        Tokenizer.from_file(write_tokenizer_dir(tmp_path / "tok", raw))


@pytest.mark.parametrize("field, value, match", [
    ("hidden_size", 64.5, "hidden_size must be an integer, got 64.5"),
    ("num_attention_heads", "4", "num_attention_heads must be an integer"),
    ("num_hidden_layers", True, "num_hidden_layers must be an integer"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number"),
    ("rope_theta", "1e4", "rope_theta must be a finite number"),
    ("hidden_act", "gelu_quick_and_dirty", "unsupported hidden_act 'gelu_quick_and_dirty'"),
])
def test_config_json_values_are_strictly_typed(tmp_path, field, value, match):
    d = write_hf_dir(tmp_path / "ck", {**HF_CONFIG, field: value})
    with pytest.raises(ConfigError, match=match):
        llmarch.from_pretrained(d)


def test_gguf_context_length_zero_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"context_length = 0 is out of range \(expected 1 to"):
        llmarch.from_pretrained(write_gguf(tmp_path / "m.gguf", context_length=0))


def test_token_ids_beyond_the_vocabulary_are_one_error(tmp_path):
    model = llmarch.from_pretrained(write_gguf(tmp_path / "m.gguf"))
    with pytest.raises(GenerationError, match=r"outside the vocabulary \[0, 32\)"):
        generate(model, None, [[1, 2, 99]], GenerationConfig(max_new_tokens=1))
    for bad in (32, -1):
        with pytest.raises(GenerationError, match=rf"token id {bad} is outside the model's vocabulary \[0, 32\)"):
            model(torch.tensor([[1, bad]]))
    with pytest.raises(GenerationError, match="text or a sequence of integer token ids"):
        generate(model, None, [[1, "a"]], GenerationConfig(max_new_tokens=1))


# ------------------------------------------------------------------ 4. the model cache
@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    parts = [tmp_path / "p1", tmp_path / "p2"]
    parts[0].write_bytes(b"hello " * 1000)
    parts[1].write_bytes(b"world" * 1000)
    digest = hashlib.sha256(parts[0].read_bytes() + parts[1].read_bytes()).hexdigest()
    monkeypatch.setattr(assets.PackagedModel, "part_paths", lambda self: parts)
    monkeypatch.setitem(assets.MODELS, "tiny", assets.PackagedModel("tiny", "tiny.bin", digest, (), ("tiny-pkg",)))
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMARCH_CACHE", str(cache))
    return cache / "tiny.bin"


def test_cache_readonly_with_a_valid_model_is_used(tiny_model, monkeypatch):
    good = assets.resolve_model("tiny", progress=False).read_bytes()
    tiny_model.with_name("tiny.bin.sha256").unlink()

    def read_only(*a, **k):
        raise PermissionError(30, "Read-only file system")

    for name in ("write_text", "write_bytes", "mkdir", "unlink"):
        monkeypatch.setattr(type(tiny_model), name, read_only)
    monkeypatch.setattr(assets.tempfile, "mkstemp", read_only)
    assert assets.resolve_model("tiny", progress=False).read_bytes() == good


def test_cache_killed_assembly_temp_file_is_cleaned(tiny_model):
    tiny_model.parent.mkdir(parents=True)
    stale = tiny_model.with_name("tiny.bin.abc123.tmp")
    stale.write_bytes(b"x" * 1000)  # what a kill -9 during assembly leaves
    assets.resolve_model("tiny", progress=False)
    assert not stale.exists() and not list(tiny_model.parent.glob("*.tmp"))


def test_cache_byte_flipped_with_size_and_mtime_kept_is_not_served(tiny_model):
    good = assets.resolve_model("tiny", progress=False).read_bytes()
    st = tiny_model.stat()
    data = bytearray(good)
    data[100] ^= 1
    tiny_model.write_bytes(bytes(data))
    os.utime(tiny_model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tiny_model.stat().st_size == st.st_size and tiny_model.stat().st_mtime_ns == st.st_mtime_ns
    assert assets.resolve_model("tiny", progress=False).read_bytes() == good


def test_cache_pointing_at_a_file_is_one_error(tiny_model, monkeypatch, tmp_path):
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    monkeypatch.setenv("LLMARCH_CACHE", str(f))
    with pytest.raises(CheckpointError, match="is not a directory; set LLMARCH_CACHE to a writable folder"):
        assets.resolve_model("tiny", progress=False)


def test_cache_read_only_without_a_model_is_one_error(tiny_model, monkeypatch):
    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(tiny_model), "mkdir", read_only)
    with pytest.raises(CheckpointError, match="cannot assemble tiny.bin .* set LLMARCH_CACHE to a writable folder"):
        assets.resolve_model("tiny", progress=False)


# ------------------------------------------------------------------ 5. one error path
@pytest.mark.parametrize("args, match", [
    (["--temperature", "nan"], "temperature must be a finite number, got nan"),
    (["--temperature", "inf"], "temperature must be a finite number, got inf"),
    (["--repetition-penalty", "nan"], "repetition_penalty must be a finite number"),
    (["--top-p", "nan"], "top_p must be a finite number"),
    (["--seed", str(2**70)], r"seed must be in \[0, 2\*\*64\)"),
    (["--seed", "-1"], r"seed must be in \[0, 2\*\*64\)"),
    (["--system", "\udcff", "--chat"], "system message 0 is not valid UTF-8 text"),
])
def test_generate_arguments_are_checked_before_the_model_load(args, match, capsys, tmp_path):
    # the model path does not exist: the argument error must come first, as the only line
    assert main(["generate", "hello", "--model", str(tmp_path / "nothing"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmarch: error: ") and re.search(match, err)


def test_unparsable_option_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "hello", "--temperature", "warm"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "llmarch: error: argument --temperature" in err


def test_non_utf8_prompt_argument_is_one_error(capsys, tmp_path):
    assert main(["generate", "caf\udce9", "--model", str(tmp_path / "nothing")]) == 2
    assert "prompt 0 is not valid UTF-8 text (byte 0xe9 at position 3)" in capsys.readouterr().err


def test_perplexity_arguments_are_one_error(capsys, tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"\xff\xfe")
    assert main(["perplexity", str(f), "--model", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("llmarch: error: ")


def test_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(GenerationError, match="temperature"):
        main(["--debug", "generate", "hi", "--temperature", "nan"])


def test_a_genuine_bug_still_shows_its_traceback(monkeypatch):
    from llmarch.cli import generate as cmd

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cmd, "run", bug)
    with pytest.raises(ZeroDivisionError):
        main(["generate", "hi"])
    assert not issubclass(ZeroDivisionError, LlmarchError)


def test_missing_model_is_one_error(capsys, tmp_path):
    assert main(["generate", "hi", "--model", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("llmarch: error: no such model or path")


@pytest.mark.parametrize("template", [[None], 5, [{"name": "default", "template": 7}]])
def test_tokenizer_config_chat_template_of_the_wrong_type_is_one_error(tmp_path, template):
    d = write_tokenizer_dir(tmp_path / "tok", {"bos_token": "<s>", "chat_template": template})
    with pytest.raises(CheckpointError, match="chat_template in .* must be text"):
        Tokenizer.from_file(d)
