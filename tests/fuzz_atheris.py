"""Coverage-guided fuzzing of llmarch's checkpoint readers with atheris (libFuzzer).

    python tests/fuzz_atheris.py gguf CORPUS_DIR [-runs=N] [-max_total_time=S] [-seed=1]
    python tests/fuzz_atheris.py safetensors CORPUS_DIR ...

Each input is written as a file and loaded with ``llmarch.from_pretrained``; a clean llmarch
error or a successful load is fine, any other exception is a finding (libFuzzer stops and
exits non-zero, keeping the input). libFuzzer's own ``-rss_limit_mb`` and ``-timeout`` bound
each case's memory and time. ``tests/test_fuzz.py::test_atheris_*`` runs a bounded number of
cases in CI; run this script with ``-max_total_time`` for a longer search.
"""

import json
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["llmarch"]):  # the reading code: llmarch's own __init__ imports lazily
    import llmarch
    import llmarch.checkpoints.formats
    import llmarch.checkpoints.gguf
    import llmarch.checkpoints.hf
    import llmarch.checkpoints.safetensors
    import llmarch.families
    from llmarch.errors import LlmarchError

WORK = Path(tempfile.mkdtemp(prefix="llmarch-atheris-"))


def load_gguf(data: bytes) -> None:
    path = WORK / "m.gguf"
    path.write_bytes(data)
    try:
        llmarch.from_pretrained(path)
    except LlmarchError:
        pass


def load_safetensors(data: bytes) -> None:
    d = WORK / "hf"
    d.mkdir(exist_ok=True)
    if not (d / "config.json").exists():
        (d / "config.json").write_text(json.dumps(json.loads(sys.argv[3])))
    (d / "model.safetensors").write_bytes(data)
    try:
        llmarch.from_pretrained(d)
    except LlmarchError:
        pass


if __name__ == "__main__":
    target = {"gguf": load_gguf, "safetensors": load_safetensors}[sys.argv[1]]
    args = [sys.argv[0], *sys.argv[2:]] if sys.argv[1] == "gguf" else [sys.argv[0], sys.argv[2], *sys.argv[4:]]
    atheris.Setup(args, target)
    atheris.Fuzz()
