"""The report follows the article: its sections in order with the article's pairings, each claim
with llmarch's figure and verdict, and the what-ifs, whose KV figures are worked out by hand here."""

import re
from html import unescape

import pytest

from llmarch.analysis import article
from llmarch.analysis.compare import _bytes
from llmarch.analysis.report import article_sections

CONTEXT = 32768
BF16 = 2

# the article's side-by-side figures, in its order: (section, left model, right model)
PAIRS = [
    ("1. DeepSeek V3/R1", "deepseek-v3", "deepseek-v3 [attention_kind=mha, num_kv_heads=128, head_dim=128]"),
    ("2. OLMo 2", "llama3-8b", "olmo2-7b"),
    ("3. Gemma 3", "olmo2-7b", "gemma3-27b"),
    ("4. Gemma 3n", "gemma3-4b", "gemma3n-e4b"),
    ("5. Mistral Small 3.1", "gemma3-27b", "mistral-small-3.1-24b"),
    ("6. Llama 4", "deepseek-v3", "llama4-maverick"),
    ("7. Qwen3 (dense)", "qwen3-0.6b", "llama3.2-1b"),
    ("7. Qwen3 (MoE)", "deepseek-v3", "qwen3-235b-a22b"),
    ("8. SmolLM3", "qwen3-4b", "smollm3-3b"),
    ("9. Kimi K2", "deepseek-v3", "kimi-k2"),
]


@pytest.fixture(scope="module")
def html():
    return article_sections(CONTEXT)


@pytest.fixture(scope="module")
def get():
    return article.Profiles(CONTEXT, "bf16")


def test_every_section_in_the_article_order_with_its_pairing(html):
    found = [tuple(unescape(x) for x in m) for m in
             re.findall(r'<section class="article" id="[^"]+" data-pair="([^"]+) \| ([^"]+)"><h3>([^<:]+):', html)]
    assert [(t, a, b) for a, b, t in found] == PAIRS
    assert html.count('class="claim">The article: ') == len(PAIRS)
    # every section draws its pair
    assert html.count('<div class="diagram"') == len(PAIRS)


def test_verdicts_and_reasons(html, get):
    verdicts = dict(zip([p[0] for p in PAIRS], re.findall(r'data-agrees="(true|false)"', html), strict=True))
    # Gemma 3n: the article's 5.44B is not the text decoder's count; Mistral's cache is smaller only at short
    # context; every other claim holds
    assert {k for k, v in verdicts.items() if v == "false"} == {"4. Gemma 3n", "5. Mistral Small 3.1"}
    sec = {s.key: s for s in article.SECTIONS}
    mistral = sec["mistral"].check(*(get(m) for m in sec["mistral"].pair))
    assert "5,325 tokens" in mistral.reason and "window" in mistral.reason
    gemma3n = sec["gemma3n"].check(*(get(m) for m in sec["gemma3n"].pair))
    assert "vision and audio" in gemma3n.reason


def test_gemma3_window_what_if_by_hand(get):
    w = next(w for w in article.WHAT_IFS if w.key == "gemma3-windows")
    per_layer = 2 * 16 * 128 * BF16  # K and V, 16 KV heads of 128, per token
    expected = {
        "all global": 62 * per_layer * CONTEXT,
        # Gemma 2's schedule on Gemma 3 27B: layers 0, 2, ... slide over 4096 tokens, 31 of each
        "Gemma 2's 1:1, window 4096": 31 * per_layer * 4096 + 31 * per_layer * CONTEXT,
        # 52 sliding layers over 1024 tokens, 10 global
        "Gemma 3's 5:1, window 1024 (published)": 52 * per_layer * 1024 + 10 * per_layer * CONTEXT,
    }
    got = {label: article.kv_at(get(model), CONTEXT) for label, model in w.variants}
    assert got == expected
    cells = dict(article.what_if_rows(w, get))
    assert all(cells[label][1] == _bytes(v) for label, v in expected.items())


def test_deepseek_attention_what_if_by_hand(get):
    w = next(w for w in article.WHAT_IFS if w.key == "deepseek-attention")
    got = {label: get(model).summary.kv_bytes_per_token for label, model in w.variants}
    assert got == {
        "MHA, 128 KV heads": 61 * 2 * 128 * 128 * BF16,  # 3.81 MiB per token
        "GQA, 8 KV heads": 61 * 2 * 8 * 128 * BF16,
        "MLA (published)": 61 * (512 + 64) * BF16,  # the latent and the shared RoPE key
    }


def test_maverick_all_moe_what_if_by_hand(get):
    w = next(w for w in article.WHAT_IFS if w.key == "maverick-all-moe")
    (_, published), (_, all_moe) = w.variants
    a, b = get(published).summary.params, get(all_moe).summary.params
    hidden, dense, expert, experts = 5120, 16384, 8192, 128
    router = hidden * experts
    # the 24 dense blocks become MoE blocks: 128 routed experts + 1 shared + router instead of one FFN
    assert b.total - a.total == 24 * (router + (experts + 1) * 3 * hidden * expert - 3 * hidden * dense)
    # per token each such block now runs one routed + the shared expert (and the router) instead of the FFN
    assert b.active - a.active == 24 * (router + 2 * 3 * hidden * expert - 3 * hidden * dense)


def test_mistral_gemma_crossover_by_hand(get):
    w = next(w for w in article.WHAT_IFS if w.key == "mistral-gemma-crossover")
    gemma, mistral = (get(model) for _, model in w.variants)
    per_layer_gemma = 2 * 16 * 128 * BF16
    mistral_per_token = 40 * 2 * 8 * 128 * BF16
    # beyond the 1024-token window: 10 x per_layer x c + 52 x per_layer x 1024 < mistral_per_token x c
    c = 52 * per_layer_gemma * 1024 / (mistral_per_token - 10 * per_layer_gemma)
    assert article.crossover(gemma, mistral) == int(c) + 1 == 5325
    assert "from 5,325 tokens" in article.what_if_answer(w, get)
