"""The two packaged real checkpoints (Gemma 3 270M and Qwen2.5-Coder-0.5B-Instruct, GGUF
Q4_K_M) against transformers loading the same GGUF file, in float32.

* Live oracle (transformers takes about a minute to dequantise each file): logits on a
  fixed prompt within 1e-3, and greedy generation of 32 new tokens token for token.
* Recorded oracle (no transformers): ``data/real_greedy.json`` holds transformers' greedy
  continuations; llmarch's engine and ``llmarch generate`` (default model) must reproduce them.
  The live test checks that the recording still matches live transformers, so it cannot go stale.

Every test here loads a real checkpoint: all are marked slow (``pytest -m "not slow"`` skips them).
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmarch
from llmarch.checkpoints.assets import MODELS, resolve_model
from llmarch.checkpoints.tokenizer import Tokenizer
from llmarch.errors import CheckpointError
from llmarch.inference.generate import GenerationConfig, generate, load
from llmarch.inference.packed import pack_linears

RECORDED = json.loads((Path(__file__).parent / "data" / "real_greedy.json").read_text())
ALIASES = list(RECORDED)
SRC = Path(__file__).resolve().parents[1] / "src"
LOGIT_TOL = 1e-3

pytestmark = pytest.mark.slow


def _path(alias: str) -> Path:
    try:
        MODELS[alias].part_paths()
    except CheckpointError:
        pytest.skip(f"packaged model {alias} not installed")
    return resolve_model(alias, progress=False)


@pytest.fixture(scope="module", params=ALIASES)
def ours(request):
    """(alias, llmarch model in float32 as `llmarch generate --quant none --dtype float32` loads it, tokenizer)."""
    alias = request.param
    _path(alias)
    model, tokenizer = load(alias, torch.float32, quant="none")
    yield alias, model, tokenizer
    del model


def test_greedy_matches_recorded_transformers(ours):
    alias, model, tokenizer = ours
    rec = RECORDED[alias]
    assert tokenizer.encode(rec["prompt"]) == rec["prompt_ids"]
    res = generate(model, tokenizer, rec["prompt"], GenerationConfig(max_new_tokens=32))
    assert res.token_ids[0] == rec["greedy_32"]
    assert res.texts[0] == rec["text"]


def test_cli_default_model_streams_the_recorded_text():
    _path("gemma-3-270m")
    rec = RECORDED["gemma-3-270m"]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "llmarch.cli", "generate", rec["prompt"], "--max-new-tokens", "12", "--dtype", "float32",
           "--quant", "none"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    tokenizer = Tokenizer.from_gguf(_path("gemma-3-270m"))
    assert r.stdout == tokenizer.decode(rec["greedy_32"][:12], skip_special_tokens=True) + "\n"
    assert "prefill:" in r.stderr and "decode:" in r.stderr and "tok/s" in r.stderr


# ----------------------------------------------------------------------------------------
# live transformers
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ALIASES)
def live(request, tmp_path_factory):
    """(alias, llmarch model, transformers model, tokenizer), both loading the same GGUF file."""
    import transformers

    alias = request.param
    path = _path(alias)
    d = tmp_path_factory.mktemp("gguf")
    os.symlink(path, d / path.name)  # transformers takes (directory, file name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), gguf_file=path.name, dtype=torch.float32).eval()
    model = llmarch.from_pretrained(path, dtype=torch.float32)
    yield alias, model, hf, Tokenizer.from_gguf(path)
    del hf, model


def test_logits_match_transformers(live):
    alias, model, hf, tokenizer = live
    ids = torch.tensor([tokenizer.encode(RECORDED[alias]["prompt"])])
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
        assert (out - ref).abs().max().item() < LOGIT_TOL
        packed = pack_linears(copy.deepcopy(model))(ids)
        assert (packed - ref).abs().max().item() < LOGIT_TOL  # the layers `llmarch generate` uses
    assert ref.std() > 1


def test_greedy_generation_matches_transformers(live):
    alias, model, hf, tokenizer = live
    rec = RECORDED[alias]
    x = torch.tensor([rec["prompt_ids"]])
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=32)
    ref = ref[0, x.shape[1] :].tolist()
    ours = generate(model, tokenizer, rec["prompt"], GenerationConfig(max_new_tokens=32)).token_ids[0]
    assert len(ref) == 32 and ours == ref
    assert ref == rec["greedy_32"]  # the recording used by the fast tests is still transformers' output


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the GPU check runs where one is")
def test_cuda_greedy_equals_cpu_float32():
    """`--device cuda` (bfloat16 weights cast to float32 here, so the arithmetic is comparable)
    gives the default model's greedy tokens of CPU float32."""
    rec = RECORDED["gemma-3-270m"]
    _path("gemma-3-270m")
    cpu, tokenizer = load("gemma-3-270m", torch.float32, quant="none")
    gpu, _ = load("gemma-3-270m", torch.float32, pack=False, quant="none")
    gpu = gpu.to("cuda")
    config = GenerationConfig(max_new_tokens=32)
    assert generate(gpu, tokenizer, rec["prompt"], config).token_ids[0] == generate(cpu, tokenizer, rec["prompt"],
                                                                                    config).token_ids[0]
