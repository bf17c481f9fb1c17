"""Write files and folders so that a reader sees the old version or the new one, never half of one.

Everything llmarch writes for later use (training checkpoints, metrics, summaries, prepared data
folders, sliced checkpoints) is first written to a temporary sibling ``.NAME.PID.llmarch-tmp``,
flushed to disk and then renamed into place: a rename within one folder is atomic, so a process
killed mid-write leaves the previous version intact plus a temporary file. :func:`clean_stale`
removes such leftovers of dead processes on the next run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError

TMP_SUFFIX = ".llmarch-tmp"


def _tmp_sibling(path: Path, tag: str = "") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{tag}{TMP_SUFFIX}")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path`` (fsync'd
    first when ``durable``); on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_text(path: str | Path, text: str, durable: bool = True) -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_file(path, durable) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_dir(path: str | Path, replaceable: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it takes the place of ``path``.

    An existing ``path`` is replaced only when empty or when ``replaceable(path)`` says it is an
    earlier version of the same kind of artefact (``what``); anything else is refused before
    the caller does any work. The old folder is renamed aside, the new one renamed in, and
    only then the old one deleted, so a crash leaves one of the two complete under ``path``.
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or replaceable(path))):
        raise ConfigError(f"{path} exists and is not {what}; refusing to replace it: give another --out or remove it")
    tmp = _tmp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path.parent)
        _remove(tmp)
        tmp.mkdir()
    except OSError as e:
        raise ConfigError(f"cannot write {path} ({e.strerror or e}); give a folder you can write to") from None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        old = _tmp_sibling(path, ".old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        _remove(old)
    except BaseException:
        _remove(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders of writes whose process no longer runs; return them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        pid = p.name[: -len(TMP_SUFFIX)].removesuffix(".old").rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            _remove(p)
            removed.append(p)
    return removed


def check_writable_dir(path: str | Path, option: str = "--out") -> Path:
    """Create the output folder ``path`` (if missing) and prove it writable, before any slow work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = _tmp_sibling(path / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{option} {path} cannot be written ({e.strerror or e}); give a folder you can write to") from None
    return path


__all__ = ["TMP_SUFFIX", "atomic_dir", "atomic_file", "check_writable_dir", "clean_stale", "fsync_dir", "write_text"]
