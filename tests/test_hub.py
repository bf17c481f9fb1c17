"""``--model org/name``: Hub ids resolved through huggingface_hub's cache, with no network."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmarch.checkpoints.hub import HubId, parse_hub_id

SRC = Path(__file__).resolve().parents[1] / "src"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_parse_hub_id():
    assert parse_hub_id("Qwen/Qwen2.5-0.5B-Instruct") == HubId("Qwen/Qwen2.5-0.5B-Instruct")
    assert parse_hub_id("org/name@v1.0") == HubId("org/name", "v1.0")
    assert parse_hub_id("org/name:model-q4_k_m.gguf") == HubId("org/name", None, "model-q4_k_m.gguf")
    assert parse_hub_id("org/name@main:m.gguf") == HubId("org/name", "main", "m.gguf")
    for not_hub in ("gemma-3-270m", "./org/name", "/abs/path", "a/b/c", "~/x/y"):
        assert parse_hub_id(not_hub) is None, not_hub


def hub_cache(root: Path, repo: str, files: Path) -> Path:
    """A huggingface_hub cache holding ``files`` as the ``main`` snapshot of ``repo``."""
    model = root / f"models--{repo.replace('/', '--')}"
    (model / "refs").mkdir(parents=True)
    (model / "refs" / "main").write_text(COMMIT)
    shutil.copytree(files, model / "snapshots" / COMMIT)
    return root


def _generate(model: str, cache: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home")}
    return subprocess.run([sys.executable, "-m", "llmarch", "generate", "abc", "--model", model,
                           "--max-new-tokens", "3", "--dtype", "float32", "--threads", "1"],
                          check=False, capture_output=True, text=True, env=env, timeout=300)


def test_resolve_model_finds_the_snapshot_and_says_what_is_missing(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    from llmarch.checkpoints.assets import resolve_model
    from llmarch.errors import CheckpointError

    files = tmp_path / "files"
    files.mkdir()
    (files / "config.json").write_text("{}")
    (files / "m.gguf").write_bytes(b"GGUF")
    cache = hub_cache(tmp_path / "hub", "org/name", files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("org/name") == cache / "models--org--name" / "snapshots" / COMMIT
    assert resolve_model("org/name:m.gguf").read_bytes() == b"GGUF"
    with pytest.raises(CheckpointError, match="not in the local cache"):
        resolve_model("org/other")
    with pytest.raises(CheckpointError, match="not in the local cache"):
        resolve_model("org/name:absent.gguf")


@pytest.mark.slow
def test_hub_id_resolves_to_the_cached_snapshot_offline(tmp_path, tiny_reference):
    """The whole command, with huggingface_hub configured only by its environment variables."""
    pytest.importorskip("huggingface_hub")
    from test_serve import tiny_checkpoint

    files = tiny_checkpoint(tiny_reference("llama")[0], tmp_path / "files")
    cache = hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", files)
    done = _generate("tiny-org/tiny-llama", cache, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "decode:" in done.stderr
    missing = _generate("tiny-org/not-there", cache, tmp_path)
    assert missing.returncode == 2
    assert "cannot fetch 'tiny-org/not-there'" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr
    assert "Traceback" not in missing.stderr
