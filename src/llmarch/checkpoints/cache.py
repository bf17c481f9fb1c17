"""What llmarch builds once and keeps between runs, under :func:`~llmarch.checkpoints.assets.cache_dir`.

The tokenizer of a GGUF file: building it from the file's metadata (a 262k-token vocabulary,
merges derived in Python) takes seconds; reading back the ``tokenizers`` JSON it serialises to is
several times faster. One entry is one file, ``tokenizers/<key>.json``:

* line 1, a small JSON object: the entry format, the key, the size and SHA-256 of the rest, and
  llmarch's own fields (special tokens, ``add_bos_token``, chat template, end-of-sequence ids);
* the rest, ``tokenizers.Tokenizer.to_str()`` as it was written.

The key hashes everything the tokenizer is made from: the raw bytes of the file's ``tokenizer.*``
metadata (hashed without decoding it), the family's :class:`TokenizerQuirks`, the ``tokenizers``
version and :data:`FORMAT_VERSION`. An entry that does not check out (truncated, altered, written
for another key or another format) is rebuilt, never served. Entries are written to a temporary
file and renamed into place, so a reader never sees half of one; a cache directory that cannot be
written just means the tokenizer is built every time.

Tensors derived from a checkpoint's tensors (:class:`DerivedTensors`: a GGUF file's Q5_0 / Q8_0 /
Q6_K matrices requantised to int8 take 0.5-3 s to compute, and a fraction of that to read back).
One entry per checkpoint file and purpose, ``derived/<source>-<key>.safetensors`` (no pickle).
The key hashes the file's path and stamp (size, modification and change times, inode: what
changes whenever its content does), its metadata, the purpose, llmarch's own source code,
torch's version and :data:`FORMAT_VERSION`, so a hit reads nothing of the file's tensors and code
that would compute something else never meets an old entry; a new entry replaces the source's
older ones. Each item records the SHA-256 of what was stored; items are checked against it
unless the entry's own stamp (``.stamp`` beside it, written after it) shows the entry unchanged
since it was written; an item that fails is computed again and the entry rewritten, atomically.
Served items are views of the memory-mapped entry, its data laid out 64-byte aligned (the page
cache holds them once for all processes, as llama.cpp's memory-mapped file does).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import atomic_file, clean_stale, write_text
from .assets import cache_dir, file_stamp

if TYPE_CHECKING:
    import torch

    from ..families.base import TokenizerQuirks
    from .gguf import GGUFFile
    from .tokenizer import Tokenizer

__all__ = ["FORMAT_VERSION", "DerivedTensors", "cached_tokenizer", "tokenizer_cache_path"]

#: Bump when the entry layout or what the builders produce changes: older entries are then ignored.
FORMAT_VERSION = 3

#: The :class:`Tokenizer` constructor arguments an entry keeps beside the ``tokenizers`` JSON.
_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token", "chat_template")


def tokenizer_cache_path(ckpt: GGUFFile, quirks: TokenizerQuirks) -> Path:
    """Where the tokenizer of ``ckpt`` read with ``quirks`` is cached."""
    import tokenizers

    digest = hashlib.sha256()
    for part in (f"llmarch tokenizer v{FORMAT_VERSION}", tokenizers.__version__,
                 ckpt.metadata_digest("tokenizer."), repr(quirks)):
        digest.update(part.encode("utf-8") + b"\0")
    return cache_dir() / "tokenizers" / f"{digest.hexdigest()}.json"


def cached_tokenizer(cls: type[Tokenizer], ckpt: GGUFFile, quirks: TokenizerQuirks,
                     build: Callable[[], Tokenizer]) -> Tokenizer:
    """The tokenizer of ``ckpt`` from the cache, or ``build()`` and cache it."""
    path = tokenizer_cache_path(ckpt, quirks)
    tokenizer = _read(cls, path)
    if tokenizer is None:
        tokenizer = build()
        _write(path, tokenizer)
    return tokenizer


def _read(cls: type[Tokenizer], path: Path) -> Tokenizer | None:
    """The entry at ``path`` if it is whole and was written for this key and format; else None."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head, _, body = data.partition(b"\n")
    try:
        header = json.loads(head)
        if (header["format"] != FORMAT_VERSION or header["key"] != path.stem or header["size"] != len(body)
                or header["sha256"] != hashlib.sha256(body).hexdigest()):
            return None
        fields = header["fields"]
        backend = _backend(body)
        return cls(backend, **{k: fields[k] for k in _FIELDS}, extra_eos_token_ids=fields["eos_token_ids"])
    except Exception:  # noqa: BLE001 -- whatever is wrong with an entry, it is rebuilt
        return None


def _backend(body: bytes):
    """The ``tokenizers`` object serialised in ``body``. A BPE model's vocabulary, merges and added
    tokens are handed to ``tokenizers`` as Python objects, the rest as JSON: read from JSON,
    ``tokenizers`` takes the model through ``serde_json`` values whose temporaries it frees between
    the strings it keeps, so that pages stay resident for a few live bytes each (Gemma 3's 262k
    entries: 78 MiB resident after loading against 67 this way, in the same 0.65 s). The same
    tokenizer: the tests compare the two serialisations."""
    import gc

    if gc.isenabled():  # half a million new containers would run the cyclic collector over torch's
        gc.disable()    # objects again and again: 0.15 s of the 0.8 it took
        try:
            return _backend(body)
        finally:
            gc.enable()
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    data = json.loads(body)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return Backend.from_str(body.decode("utf-8"))
    vocab, merges, added = model["vocab"], model["merges"], data.get("added_tokens") or []
    model["vocab"], model["merges"], data["added_tokens"] = {}, [], []
    backend = Backend.from_str(json.dumps(data))
    options = {k: v for k, v in model.items() if k not in ("type", "vocab", "merges") and v is not None}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    backend.model = BPE(vocab=vocab, merges=merges, **options)
    del vocab, merges
    backend.add_tokens([AddedToken(t["content"], single_word=t["single_word"], lstrip=t["lstrip"],
                                   rstrip=t["rstrip"], normalized=t["normalized"], special=t["special"])
                        for t in added])
    return backend


def _compact(serialised: str) -> str:
    """``tokenizers``' JSON with a BPE's merges as ``"a b"`` strings (its older form, still read)
    instead of ``["a", "b"]`` pairs, where no merged piece holds a space: the same tokenizer
    (the test reads both back), parsed 0.3 s faster for Gemma's 515k merges."""
    data = json.loads(serialised)
    model = data.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not all(
            isinstance(m, list) and len(m) == 2 and " " not in m[0] and " " not in m[1] for m in merges):
        return serialised
    model["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _write(path: Path, tokenizer: Tokenizer) -> None:
    """Write ``tokenizer``'s entry atomically; silently nothing when the cache directory is not writable."""
    body = _compact(tokenizer.backend.to_str()).encode("utf-8")
    fields: dict[str, Any] = {k: getattr(tokenizer, k) for k in _FIELDS}
    fields["eos_token_ids"] = sorted(tokenizer.eos_token_ids)
    header = {"format": FORMAT_VERSION, "key": path.stem, "size": len(body),
              "sha256": hashlib.sha256(body).hexdigest(), "fields": fields}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path.parent)  # what killed writers left behind
        with atomic_file(path, durable=False) as tmp:
            tmp.write_bytes(json.dumps(header).encode("utf-8") + b"\n" + body)
    except OSError:
        pass  # a full disk, a read-only directory: no caching this time


def _tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's name, dtype, shape and bytes."""
    import torch

    digest = hashlib.sha256(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
    digest.update(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


_ALIGN = 64


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.data_ptr() % _ALIGN == 0 else tensor.clone()


def _stamp(path: Path) -> str:
    return file_stamp(path.stat())


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """SHA-256 of llmarch's own source files: an entry made by other code is never served."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode("utf-8") + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class DerivedTensors:
    """Tensors computed from a checkpoint's tensors, kept between runs (see the module docstring).

    >>> store = DerivedTensors.for_gguf(ckpt, "int8 auto")        # doctest: +SKIP
    >>> q, s = store.get("blk.0.attn_q.weight Q5_0 896x896", lambda: requantise(...))   # doctest: +SKIP
    >>> store.save()                                              # doctest: +SKIP
    """

    #: files smaller than this are not worth an entry (requantising them takes milliseconds)
    MIN_FILE_BYTES = 32 << 20

    def __init__(self, path: Path, family: str = ""):
        self.path = path
        self.family = family  # entries of one source and purpose share it: a new one replaces the old
        self._items: dict[str, tuple[torch.Tensor, ...]] = {}
        self._stored: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._file = None
        self._trusted = False
        try:
            from safetensors import safe_open

            self._file = safe_open(str(path), framework="pt")
            header = json.loads(self._file.metadata()["llmarch"])
            if header["format"] == FORMAT_VERSION and header["key"] == path.stem:
                self._stored = dict(header["items"])
            self._trusted = self._stamp_path.read_text() == _stamp(path)
        except Exception:  # noqa: BLE001 -- a missing or damaged entry is an empty one
            self._stored = self._stored or {}

    @property
    def _stamp_path(self) -> Path:
        return self.path.with_name(self.path.name + ".stamp")

    @classmethod
    def for_gguf(cls, ckpt: GGUFFile, purpose: str) -> DerivedTensors | None:
        """The store for ``purpose`` (e.g. ``"int8 auto"``) of the GGUF file ``ckpt``; None for a
        file under :attr:`MIN_FILE_BYTES`. The key is the file's path and stamp (size, times,
        inode: any change to it makes another key), its metadata, llmarch's code, torch's version,
        the purpose and :data:`FORMAT_VERSION`: a hit reads nothing of the file's tensors."""
        import torch

        path = ckpt.path.resolve()
        if path.stat().st_size < cls.MIN_FILE_BYTES:
            return None
        family = hashlib.sha256(f"{path}\0{purpose}".encode()).hexdigest()[:16]
        digest = hashlib.sha256()
        for part in (f"llmarch derived v{FORMAT_VERSION}", torch.__version__, purpose, str(path),
                     _stamp(path), ckpt.metadata_digest(""), _code_digest()):
            digest.update(part.encode("utf-8") + b"\0")
        return cls(cache_dir() / "derived" / f"{family}-{digest.hexdigest()[:48]}.safetensors", family)

    def get(self, name: str, compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """The tensors kept under ``name`` (which should say what they are made from, e.g. the
        tensor's name, type and shape), else ``compute()`` (kept for :meth:`save`).

        Served items are checked against the SHA-256 the entry recorded, unless the entry's stamp
        (written beside it after the entry, atomically) says it has not changed since."""
        item = self._stored.get(name)
        tensors = None
        if item is not None and self._file is not None:
            try:
                # views of the memory-mapped entry (no copy: the page cache holds the weights once,
                # for every process) where 64-byte aligned, as save() lays them out; anything else is
                # copied into torch's own aligned memory (torch's low-bit CPU kernels fault on
                # misaligned weights)
                got = tuple(_aligned(self._file.get_tensor(f"{name}/{i}")) for i in range(len(item["sha256"])))
                if self._trusted or [_tensor_digest(name, t) for t in got] == item["sha256"]:
                    tensors = got
            except Exception:  # noqa: BLE001 -- an item that does not read back is computed again
                tensors = None
        if tensors is None:
            tensors = tuple(compute())
            self._dirty = True
        self._items[name] = tensors
        return tensors

    def save(self) -> None:
        """Write the entry (every item :meth:`get` returned) if anything was computed; atomically,
        and silently nothing when the cache directory cannot be written."""
        if not self._dirty:
            if not self._trusted and self._items:  # every item served was checked: stamp the entry
                try:
                    write_text(self._stamp_path, _stamp(self.path), durable=False)
                    self._trusted = True
                except OSError:
                    pass
            return
        from safetensors.torch import save_file

        flat, items = {}, {}
        for name, tensors in self._items.items():
            items[name] = {"sha256": [_tensor_digest(name, t) for t in tensors]}
            for i, t in enumerate(tensors):
                flat[f"{name}/{i}"] = t.contiguous()
        header = {"format": FORMAT_VERSION, "key": self.path.stem, "items": items}
        metadata = {"llmarch": json.dumps(header), "pad": ""}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(self.path.parent)  # what killed writers left behind
            with atomic_file(self.path, durable=False) as tmp:
                save_file(flat, str(tmp), metadata=metadata)
                with open(tmp, "rb") as fh:  # the data section starts after 8 bytes of length and the header
                    start = 8 + int.from_bytes(fh.read(8), "little")
                if start % _ALIGN:  # padded so that the data starts 64-byte aligned: see get()
                    metadata["pad"] = " " * (-start % _ALIGN)
                    save_file(flat, str(tmp), metadata=metadata)
            self._dirty = False
            write_text(self._stamp_path, _stamp(self.path), durable=False)
            for old in self.path.parent.glob(f"{self.family}-*"):  # this source's entries for other code or content
                if self.family and old.name not in (self.path.name, self._stamp_path.name):
                    old.unlink(missing_ok=True)
        except Exception:  # noqa: BLE001 -- a full disk, a read-only directory: no caching this time
            pass


def _entry_maps() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of :class:`DerivedTensors` entries
    (``/proc/self/maps``); empty where procfs is missing."""
    try:
        root = str((cache_dir() / "derived").resolve()) + "/"  # the maps name files by their real path
    except OSError:
        return []
    spans = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path
                if len(fields) == 6 and fields[5].startswith(root):
                    lo, hi = fields[0].split("-")
                    spans.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return spans


def release_mapped_pages(tensors: list[torch.Tensor]) -> int:
    """Drop this process's resident pages of the tensors that are views of a memory-mapped
    :class:`DerivedTensors` entry: ``madvise(MADV_DONTNEED)`` on the whole pages inside each
    one's bytes. For tensors whose bytes were just copied elsewhere (the fused int8 layers of
    ``llmarch.inference.quant.FusedInt8``): without it the copy and the pages read to make it
    both count in the process's memory. Nothing is lost: the entry's pages are never written
    (safetensors maps it copy-on-write; weights are not modified in place), so a later read
    of such a page faults it back in, unchanged, from the file; pages shared with a neighbouring
    tensor are kept. Tensors in any other memory are left alone (there the call would zero
    them). Returns the bytes released; 0 where the platform lacks ``madvise`` or procfs."""
    import ctypes
    import mmap

    advice = getattr(mmap, "MADV_DONTNEED", None)
    spans = _entry_maps() if advice is not None else []
    if not spans:
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE
    released = 0
    for t in tensors:
        start = t.data_ptr()
        lo, hi = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
        if hi > lo and t.device.type == "cpu" and any(s <= lo and hi <= e for s, e in spans):
            if madvise(lo, hi - lo, advice) == 0:
                released += hi - lo
    return released
