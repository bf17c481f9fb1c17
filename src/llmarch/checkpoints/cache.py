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
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .assets import cache_dir

if TYPE_CHECKING:
    from ..families.base import TokenizerQuirks
    from .gguf import GGUFFile
    from .tokenizer import Tokenizer

__all__ = ["FORMAT_VERSION", "cached_tokenizer", "tokenizer_cache_path"]

#: Bump when the entry layout or what the builders produce changes: older entries are then ignored.
FORMAT_VERSION = 1

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
    from tokenizers import Tokenizer as Backend

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
        backend = Backend.from_str(body.decode("utf-8"))
        return cls(backend, **{k: fields[k] for k in _FIELDS}, extra_eos_token_ids=fields["eos_token_ids"])
    except Exception:  # noqa: BLE001 -- whatever is wrong with an entry, it is rebuilt
        return None


def _write(path: Path, tokenizer: Tokenizer) -> None:
    """Write ``tokenizer``'s entry atomically; silently nothing when the cache directory is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as fh:
            body = tokenizer.backend.to_str().encode("utf-8")
            fields: dict[str, Any] = {k: getattr(tokenizer, k) for k in _FIELDS}
            fields["eos_token_ids"] = sorted(tokenizer.eos_token_ids)
            header = {"format": FORMAT_VERSION, "key": path.stem, "size": len(body),
                      "sha256": hashlib.sha256(body).hexdigest(), "fields": fields}
            fh.write(json.dumps(header).encode("utf-8") + b"\n")
            fh.write(body)
        os.replace(tmp, path)
    except OSError:
        pass  # a full disk, a directory made read-only meanwhile: no caching this time
    finally:
        Path(tmp).unlink(missing_ok=True)
