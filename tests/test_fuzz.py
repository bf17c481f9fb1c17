"""Fuzzing every input path a hostile file or user controls, with hypothesis.

Targets: the GGUF reader (byte mutations, truncations, header field corruptions of a small
valid file built here), the safetensors reader, config.json and tokenizer_config.json parsing,
chat-template rendering and the generate command's argument checks. Every outcome must be a
clean :class:`llmarch.errors.LlmarchError` or a success: any other exception fails, and so does
a case that runs past :data:`CASE_SECONDS` (``SIGALRM``) or allocates more than
:data:`CASE_BYTES` beyond the process's size (``RLIMIT_AS``: a MemoryError).

CI runs a fixed, derandomised set of examples per target (the file takes well under 60 s);
``LLMARCH_FUZZ_MINUTES=N`` instead fuzzes each target with fresh random seeds for N minutes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest
from hostile import HF_CONFIG, write_gguf, write_hf_dir, write_tokenizer_dir
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import llmarch
from llmarch.checkpoints.safetensors import iter_safetensors, read_header
from llmarch.checkpoints.tokenizer import ChatTemplate, Tokenizer
from llmarch.cli import main
from llmarch.errors import LlmarchError
from llmarch.families import config_from_hf

CASE_SECONDS = 20
CASE_BYTES = 2 << 30
MINUTES = float(os.environ.get("LLMARCH_FUZZ_MINUTES", "0"))
EXAMPLES = 40


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def bounded_case():
    """One fuzz case under a time limit and an address-space limit; both restored after."""
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + CASE_BYTES, hard))

    def timeout(signum, frame):
        raise CaseTimeout(f"case ran past {CASE_SECONDS} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def clean(fn, *args, **kwargs):
    """Run ``fn`` as one case: success or an LlmarchError pass; anything else (or a hang) fails."""
    with bounded_case():
        try:
            return fn(*args, **kwargs)
        except LlmarchError:
            return None


def fuzz(strategy):
    """``@given(strategy)`` with CI settings, or repeated random runs for LLMARCH_FUZZ_MINUTES."""
    def wrap(body):
        ci = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
        test = ci(given(strategy)(body))
        if not MINUTES:
            return test

        @functools.wraps(test)  # keeps the fixture arguments pytest passes
        def long_run(*args, **kwargs):
            stop, run = time.monotonic() + 60 * MINUTES, 0
            while time.monotonic() < stop:
                run += 1
                seeded = seed(int.from_bytes(os.urandom(8), "little"))(
                    settings(ci, max_examples=500, derandomize=False)(given(strategy)(body)))
                seeded(*args, **kwargs)
            print(f"{body.__name__}: {run} runs of 500 examples")

        return long_run
    return wrap


# ------------------------------------------------------------------ GGUF
@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", layers=2).read_bytes()


def _load(path: Path):
    model = llmarch.from_pretrained(path)
    assert model.config.num_layers >= 1


mutations = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8)


@fuzz(st.tuples(mutations, st.one_of(st.none(), st.integers(0, 1 << 20))))
def test_fuzz_gguf_bytes(gguf_bytes, tmp_path_factory, case):
    edits, cut = case
    data = bytearray(gguf_bytes)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    path = tmp_path_factory.mktemp("g") / "m.gguf"
    path.write_bytes(bytes(data))
    clean(_load, path)


_FIELDS = st.sampled_from([
    "llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
])


@fuzz(st.tuples(_FIELDS, st.integers(0, 7), st.integers(0, 255)))
def test_fuzz_gguf_header_fields(gguf_bytes, tmp_path_factory, case):
    """Corrupt the value bytes of one metadata field (a count, a width, a float)."""
    key, offset, value = case
    data = bytearray(gguf_bytes)
    at = data.find(key.encode()) + len(key) + 4  # past the name and the value type
    data[at + offset] = value
    path = tmp_path_factory.mktemp("g") / "m.gguf"
    path.write_bytes(bytes(data))
    clean(_load, path)


# ------------------------------------------------------------------ safetensors
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return write_hf_dir(tmp_path_factory.mktemp("hf") / "ck")


def _read_all(f: Path) -> None:
    read_header(f)
    for _ in iter_safetensors([f]):
        pass


@fuzz(st.tuples(mutations, st.one_of(st.none(), st.integers(0, 1 << 16))))
def test_fuzz_safetensors_bytes(hf_dir, tmp_path_factory, case):
    edits, cut = case
    data = bytearray((hf_dir / "model.safetensors").read_bytes())
    for pos, value in edits:
        data[pos % min(len(data), 600)] = value  # the header and the first tensors
    if cut is not None:
        data = data[: cut % len(data)]
    f = tmp_path_factory.mktemp("s") / "model.safetensors"
    f.write_bytes(bytes(data))
    clean(_read_all, f)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "I32", "BOOL", "X"]) | json_values,
    "shape": st.lists(st.integers(-2, 1 << 40), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-2, 1 << 40), max_size=3) | json_values,
})


@fuzz(st.dictionaries(st.sampled_from(["model.norm.weight", "a", "__metadata__"]), entries | json_values, max_size=3)
      | json_values)
def test_fuzz_safetensors_header(tmp_path_factory, header):
    raw = json.dumps(header).encode()
    f = tmp_path_factory.mktemp("s") / "model.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))
    clean(_read_all, f)


# ------------------------------------------------------------------ config.json, tokenizer_config.json
@fuzz(st.dictionaries(st.sampled_from(sorted(HF_CONFIG) + ["head_dim", "rope_scaling", "layer_types",
                                                            "rope_parameters", "sliding_window"]),
                      json_values, max_size=4))
def test_fuzz_config_json(changes):
    clean(config_from_hf, {**HF_CONFIG, **changes})


@fuzz(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_config_json_file(hf_dir, tmp_path_factory, raw):
    d = tmp_path_factory.mktemp("c") / "ck"
    shutil.copytree(hf_dir, d)
    (d / "config.json").write_bytes(raw)
    clean(_load, d)


@fuzz(st.dictionaries(st.sampled_from(["bos_token", "eos_token", "chat_template", "add_bos_token",
                                       "pad_token", "unk_token"]), json_values, max_size=4)
      | json_values | st.binary(max_size=32))
def test_fuzz_tokenizer_config(tmp_path_factory, config):
    raw = config if isinstance(config, bytes) else json.dumps(config).encode()
    d = write_tokenizer_dir(tmp_path_factory.mktemp("t"), raw)

    def use():
        tok = Tokenizer.from_file(d)
        tok.encode("abc")
        if tok.chat_template:
            tok.apply_chat_template([{"role": "user", "content": "hi"}])

    clean(use)


# ------------------------------------------------------------------ chat templates
_PIECES = [
    "{{ messages[0].content }}", "{% for m in messages %}", "{% endfor %}", "{% if add_generation_prompt %}",
    "{% endif %}", "{{ 'a' * ", "10**9", "99999", " }}", "{{ raise_exception('x') }}", "{{ ''.__class__ }}",
    "{% set ns = namespace(x='ab') %}", "{% set ns.x = ns.x ~ ns.x %}", "{{ ns.x|length }}", "{{ x|center(",
    ") }}", "{% for i in range(", ") %}", "{{ m.role|upper }}", "{{ '%99999999s'|format(1) }}", "{{ 1/0 }}",
    "{{ tojson(messages) }}", "{{ messages|tojson }}", "{%", "}}", "{#", "text", "{{ (", "[1]|batch(10**8)",
]


@fuzz(st.tuples(st.lists(st.sampled_from(_PIECES), max_size=10), st.text(max_size=8)))
def test_fuzz_chat_template(case):
    pieces, content = case
    clean(lambda: ChatTemplate("".join(pieces)).render([{"role": "user", "content": content}],
                                                       add_generation_prompt=True))


# ------------------------------------------------------------------ the generate command's arguments
_FLOATS = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "0.5", "1", "1e308", "1e999", "x", ""])
_INTS = st.sampled_from(["-1", "0", "1", str(2**70), "-" + str(2**70), "1.5", "x"])
_OPTIONS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["--temperature", "--top-p", "--min-p", "--repetition-penalty"]), _FLOATS),
    st.tuples(st.sampled_from(["--seed", "--top-k", "--max-new-tokens", "--max-context", "--threads"]), _INTS),
    st.tuples(st.sampled_from(["--stop", "--system"]), st.sampled_from(["", "\udcff", "ok"])),
), max_size=4)


@fuzz(st.tuples(st.lists(st.sampled_from(["hi", "", "caf\udce9", "\udcff\udcfe"]), max_size=2), _OPTIONS))
def test_fuzz_generate_arguments(tmp_path_factory, case):
    """Every argument combination ends in exit status 2 with one error line: the model path does not
    exist, so even valid arguments fail (cleanly) at the load."""
    prompts, options = case
    argv = ["generate", *prompts, "--model", str(tmp_path_factory.getbasetemp() / "no-model"),
            *[x for pair in options for x in pair]]
    with bounded_case():
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    assert code == 2


# ------------------------------------------------------------------ atheris (coverage-guided), where it installs
@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_atheris_readers(kind, tmp_path):
    """A bounded, seeded libFuzzer run over the GGUF and safetensors readers (tests/fuzz_atheris.py),
    seeded with a valid file: it must end without a finding (exit 0)."""
    import subprocess
    import sys

    pytest.importorskip("atheris")
    from hostile import HF_CONFIG, write_gguf, write_hf_dir

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if kind == "gguf":
        write_gguf(corpus / "seed.gguf", layers=1)
        extra = []
    else:
        d = write_hf_dir(tmp_path / "hf")
        (corpus / "seed.safetensors").write_bytes((d / "model.safetensors").read_bytes())
        extra = [json.dumps(HF_CONFIG)]
    script = Path(__file__).with_name("fuzz_atheris.py")
    runs = int(MINUTES * 60 * 50) or 300
    cmd = [sys.executable, str(script), kind, str(corpus), *extra, f"-runs={runs}", "-seed=1", "-rss_limit_mb=3072",
           "-timeout=30", f"-artifact_prefix={tmp_path}/"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                                         str(Path(__file__).parent)])})
    assert r.returncode == 0, r.stderr[-3000:]
