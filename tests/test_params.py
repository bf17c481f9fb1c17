"""Parameter counts from the module tree, on the meta device, against published figures."""

import json
import subprocess
import sys
import time

import pytest
import torch

import llmarch
from llmarch.analysis.params import count_params
from llmarch.errors import ConfigError

DENSE = ["gpt2", "llama3.2-1b", "llama3-8b", "olmo2-7b", "gemma3-270m", "gemma3-1b", "gemma3-4b", "gemma3-12b",
         "gemma3-27b", "mistral-small-3.1-24b", "qwen2.5-0.5b", "qwen3-0.6b", "qwen3-4b", "qwen3-8b", "qwen3-32b",
         "smollm3-3b", "qwen3-1.7b", "qwen3-14b", "llama3.2-3b", "olmo2-13b", "olmo2-32b", "gemma2-9b", "gemma2-27b"]

# Published totals. Exact figures are the parameter totals of the released safetensors
# (Hugging Face model pages, "Model size"/safetensors metadata); rounded ones are model-card figures.
EXACT = {
    "gpt2": 124_439_808,  # openai-community/gpt2 (the GPT-2 small 124M checkpoint)
    "llama3.2-1b": 1_235_814_400,  # meta-llama/Llama-3.2-1B safetensors total
    "llama3-8b": 8_030_261_248,  # meta-llama/Meta-Llama-3-8B safetensors total
    "qwen2.5-0.5b": 494_032_768,  # Qwen/Qwen2.5-0.5B safetensors total (0.49B on the card)
    "olmo2-7b": 7_298_617_344,  # allenai/OLMo-2-1124-7B safetensors total (7.30B)
    "llama3.2-3b": 3_212_749_824,  # meta-llama/Llama-3.2-3B safetensors total
    "gemma2-9b": 9_241_705_984,  # google/gemma-2-9b safetensors total
    "gemma2-27b": 27_227_128_320,  # google/gemma-2-27b safetensors total
}
# (total in billions, non-embedding in billions) from the model cards, compared at the
# precision the card prints them
CARD = {
    "qwen3-0.6b": ("0.6", "0.44"),  # Qwen/Qwen3-0.6B: "Number of Parameters: 0.6B, Non-Embedding: 0.44B"
    "qwen3-4b": ("4.0", "3.6"),  # Qwen/Qwen3-4B: 4.0B, 3.6B
    "qwen3-8b": ("8.2", "6.95"),  # Qwen/Qwen3-8B: 8.2B, 6.95B
    "qwen3-32b": ("32.8", "31.2"),  # Qwen/Qwen3-32B: 32.8B, 31.2B
    "qwen3-1.7b": ("1.7", "1.4"),  # Qwen/Qwen3-1.7B: 1.7B, 1.4B
    "qwen3-14b": ("14.8", "13.2"),  # Qwen/Qwen3-14B: 14.8B, 13.2B
}
# total in billions as the model card prints it
CARD_TOTAL = {
    "olmo2-13b": "13.7",  # allenai/OLMo-2-1124-13B: 13.7B
    "olmo2-32b": "32.2",  # allenai/OLMo-2-0325-32B: 32.2B
}


@pytest.mark.parametrize("name", DENSE)
def test_count_equals_module_tree(name):
    cfg = llmarch.get_config(name)
    c = count_params(cfg)
    model = llmarch.build_model(cfg, device="meta")
    assert c.total == sum(p.numel() for p in model.parameters())
    assert c.embedding + c.non_embedding == c.total
    assert c.active == c.total  # dense


@pytest.mark.parametrize("name,expected", sorted(EXACT.items()))
def test_exact_published_totals(name, expected):
    assert count_params(llmarch.get_config(name)).total == expected


@pytest.mark.parametrize("name,card", sorted(CARD.items()))
def test_model_card_figures(name, card):
    c = count_params(llmarch.get_config(name))
    for printed, value in zip(card, (c.total, c.non_embedding)):
        nd = len(printed.split(".")[1])
        assert f"{value / 1e9:.{nd}f}" == printed


@pytest.mark.parametrize("name,printed", sorted(CARD_TOTAL.items()))
def test_model_card_totals(name, printed):
    nd = len(printed.split(".")[1])
    assert f"{count_params(llmarch.get_config(name)).total / 1e9:.{nd}f}" == printed


def test_gemma3_270m_split():
    # Google: "270M parameters: 170M embedding parameters ... and 100M for our transformer blocks"
    c = count_params(llmarch.get_config("gemma3-270m"))
    assert round(c.embedding / 1e6, -1) == 170
    assert round(c.non_embedding / 1e6, -1) == 100


def test_embedding_split_tied_and_untied():
    tied = count_params(llmarch.get_config("qwen3-0.6b"))
    assert tied.embedding == 151936 * 1024
    untied = count_params(llmarch.get_config("qwen3-8b"))
    assert untied.embedding == 2 * 151936 * 4096


def test_unknown_preset_suggests_closest():
    with pytest.raises(ConfigError) as e:
        llmarch.get_config("qwen3-06b")
    msg = str(e.value)
    assert "qwen3-0.6b" in msg and "Did you mean" in msg and "gemma3-270m" in msg


def test_params_cli_all_presets_fast_and_lean():
    # run the CLI in a fresh process that reports its own peak memory
    # (VmHWM, not ru_maxrss: the latter carries the forking parent's peak through exec)
    code = ("import re, sys; from llmarch.cli import main; rc = main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print('MAXRSS', hwm, file=sys.stderr); sys.exit(rc)")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code, "params", *DENSE, "--json"], capture_output=True, text=True,
                         check=True)
    elapsed = time.time() - t0
    rows = json.loads(out.stdout)
    assert [r["name"] for r in rows] == DENSE
    for r in rows:
        assert set(r) >= {"name", "total", "active", "embedding", "non_embedding"}
    assert elapsed < 60
    # no large allocation: qwen3-32b alone would need 131 GB in float32
    maxrss_kib = int(out.stderr.split("MAXRSS")[1].split()[0])
    assert maxrss_kib < 1_500_000, f"params used {maxrss_kib / 1e6:.1f} GB of memory"


def test_params_cli_unknown_name_exits_cleanly():
    out = subprocess.run([sys.executable, "-m", "llmarch.cli", "params", "lama3-8b"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "llama3-8b" in out.stderr and "Traceback" not in out.stderr


def test_meta_build_allocates_nothing():
    cfg = llmarch.get_config("qwen3-32b")
    model = llmarch.build_model(cfg, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert isinstance(model, torch.nn.Module)


def test_gemma2_attention_softcap_is_exercised(tiny_reference):
    # the tiny Gemma 2's cap (2) bites: without it the logits move away from transformers'
    from oracle import max_logit_diff, random_ids

    d, hf = tiny_reference("gemma2")
    model = llmarch.from_pretrained(d)
    assert model.config.attn_logit_softcap == 2.0
    assert max_logit_diff(model, hf, random_ids()) < 1e-4
    for m in model.modules():
        if hasattr(m, "logit_softcap"):
            m.logit_softcap = None
    assert max_logit_diff(model, hf, random_ids()) > 1e-2


# MoE models with a gated shared expert (Qwen2-MoE): (total, active) in billions as the model cards print them
MOE_CARD = {
    "qwen1.5-moe-a2.7b": ("14.3", "2.7"),  # Qwen/Qwen1.5-MoE-A2.7B: "14.3B parameters in total and 2.7B activated"
    "qwen2-57b-a14b": ("57", "14"),  # Qwen/Qwen2-57B-A14B: 57B total, 14B activated
}


@pytest.mark.parametrize("name,card", sorted(MOE_CARD.items()))
def test_moe_model_card_figures(name, card):
    c = count_params(llmarch.get_config(name))
    for printed, value in zip(card, (c.total, c.active), strict=True):
        nd = len(printed.split(".")[1]) if "." in printed else 0
        assert f"{value / 1e9:.{nd}f}" == printed


def test_qwen2_moe_shared_expert_gate_is_exercised(tiny_reference):
    from oracle import max_logit_diff, random_ids

    d, hf = tiny_reference("qwen2_moe")
    model = llmarch.from_pretrained(d)
    assert max_logit_diff(model, hf, random_ids()) < 1e-4
    gates = [m for m in model.modules() if getattr(m, "shared_expert_gate", None) is not None]
    assert len(gates) == 2  # the two MoE layers (layer 1 is dense)
    for m in gates:
        m.shared_expert_gate = None  # the ungated shared expert: transformers' logits move away
    assert max_logit_diff(model, hf, random_ids()) > 1e-2
