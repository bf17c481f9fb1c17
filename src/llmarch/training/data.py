"""Training data: a real text corpus, a real tokenizer, and a memory-mapped token file.

``llmarch data prepare`` reads a corpus (a .txt / .txt.gz file or a folder of them; the
default is the public-domain Shakespeare bundled in ``llmarch/data/``), trains a byte-level
BPE with the ``tokenizers`` library (or uses a given ``tokenizer.json``), tokenises the text
and writes::

    OUT/train.bin  OUT/val.bin   flat token ids (uint16 when the vocabulary fits, else uint32)
    OUT/meta.json                vocab size, dtype, token counts, corpus and tokenizer used
    OUT/tokenizer.json           the tokenizer, so that ids can be decoded again

:class:`TokenData` opens them as numpy memmaps. Batches are a pure function of
``(seed, step)``, which is what makes resume exact and lets several processes share one
global batch (see :meth:`TokenData.train_batch`).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_dir
from ..errors import DataError

DEFAULT_CORPUS = Path(__file__).parent.parent / "data" / "shakespeare.txt.gz"
TEXT_SUFFIXES = (".txt", ".txt.gz", ".md")
DOC_SEPARATOR = "<|endoftext|>"
MIN_BPE_VOCAB = 257


def _read_text(path: Path) -> str:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    return path.read_text(encoding="utf-8", errors="replace")


def corpus_files(corpus: str | Path | None) -> list[Path]:
    """The text files of a corpus: one file, or every .txt/.txt.gz/.md under a folder."""
    if corpus in (None, "default"):
        return [DEFAULT_CORPUS]
    path = Path(corpus)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"corpus folder {path} holds no {', '.join(TEXT_SUFFIXES)} files")
        return files
    if not path.is_file():
        raise DataError(f"corpus {path} does not exist; give a text file, a folder of text files or 'default'")
    return [path]


def read_documents(corpus: str | Path | None) -> list[str]:
    """The corpus as a list of non-empty documents (one per file)."""
    docs = [t for t in (_read_text(p) for p in corpus_files(corpus)) if t.strip()]
    if not docs:
        raise DataError(f"corpus {corpus} is empty: it contains no text to train on")
    return docs


def train_bpe(docs: list[str], vocab_size: int = 8192):
    """A byte-level BPE (GPT-2 style pre-tokenisation) trained on ``docs``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[DOC_SEPARATOR],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Split into pieces of about ``size`` characters for batched encoding.

    Cuts fall after a newline between two non-space characters: the byte-level
    pre-tokenizer never joins across such a point, so the pieces encode exactly as the whole.
    """
    out, start = [], 0
    boundary = re.compile(r"(?<=\S)\n(?=\S)")
    while start < len(text):
        m = boundary.search(text, start + size)
        end = m.end() if m else len(text)
        out.append(text[start:end])
        start = end
    return out


def tokenize(tok, docs: list[str], progress: bool = True) -> np.ndarray:
    """All documents as one id stream, documents separated by ``<|endoftext|>``."""
    from tqdm import tqdm

    sep = tok.token_to_id(DOC_SEPARATOR)
    ids: list[np.ndarray] = []
    with tqdm(total=sum(map(len, docs)), unit="char", unit_scale=True, desc="tokenising", disable=not progress) as bar:
        for doc in docs:
            pieces = _chunks(doc)
            for enc in tok.encode_batch(pieces):
                ids.append(np.asarray(enc.ids, dtype=np.int64))
            if sep is not None:
                ids.append(np.asarray([sep], dtype=np.int64))
            bar.update(len(doc))
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def prepare(
    corpus: str | Path | None = "default",
    out: str | Path = "data/shakespeare",
    tokenizer: str | Path | None = "bpe",
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    progress: bool = True,
) -> dict:
    """Tokenise a corpus into ``out/{train,val}.bin`` + ``meta.json`` + ``tokenizer.json``.

    The folder is built beside ``out`` and renamed into place, so an earlier data folder there is
    replaced whole or not at all; a folder that is not a data folder is refused."""
    from tokenizers import Tokenizer

    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    bpe = tokenizer in (None, "bpe")
    if bpe and vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"--vocab-size must be at least {MIN_BPE_VOCAB} (256 bytes + the document separator), got {vocab_size}")
    with atomic_dir(out, lambda p: (p / "meta.json").is_file(), "a prepared data folder") as tmp:
        docs = read_documents(corpus)
        if bpe:
            tok = train_bpe(docs, vocab_size)
        else:
            tpath = Path(tokenizer)
            if not tpath.is_file():
                raise DataError(f"tokenizer {tpath} does not exist; give a tokenizer.json or 'bpe'")
            tok = Tokenizer.from_file(str(tpath))
        ids = tokenize(tok, docs, progress)
        n_val = max(1, int(len(ids) * val_fraction))
        if len(ids) - n_val < 2:
            raise DataError(f"corpus {corpus} has only {len(ids)} tokens; too few for a train/validation split")
        vocab = tok.get_vocab_size()
        dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
        ids[: len(ids) - n_val].astype(dtype).tofile(tmp / "train.bin")
        ids[len(ids) - n_val :].astype(dtype).tofile(tmp / "val.bin")
        tok.save(str(tmp / "tokenizer.json"))
        meta = dict(
            vocab_size=vocab,
            dtype=np.dtype(dtype).name,
            train_tokens=int(len(ids) - n_val),
            val_tokens=int(n_val),
            corpus=[str(p) for p in corpus_files(corpus)],
            characters=sum(len(d) for d in docs),
            tokenizer="bpe" if bpe else str(tokenizer),
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _read_meta(path: Path) -> dict:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{path} is not a prepared data folder (no meta.json); run `llmarch data prepare --out {path}`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        vocab, dtype = meta["vocab_size"], np.dtype(meta["dtype"])
        if not (isinstance(vocab, int) and vocab > 0 and dtype in (np.uint16, np.uint32)):
            raise ValueError(f"vocab_size {vocab!r} and dtype {meta['dtype']!r} are not a positive int and uint16/uint32")
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"{meta_path} is damaged ({type(e).__name__}: {e}); prepare the data again "
                        f"(llmarch data prepare --out {path})") from None
    return meta


@dataclass
class TokenData:
    """The prepared token files of one folder, memory-mapped."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> TokenData:
        path = Path(path)
        meta = _read_meta(path)
        dtype = np.dtype(meta["dtype"])

        def load(split: str) -> np.ndarray:
            f = path / f"{split}.bin"
            if not f.is_file() or f.stat().st_size == 0:
                raise DataError(f"{f} is missing or empty; prepare the data again")
            return np.memmap(f, dtype=dtype, mode="r")

        return cls(load("train"), load("val"), int(meta["vocab_size"]), path)

    def check_fits(self, seq_len: int, sequences: int) -> None:
        """Raise DataError unless the train split holds one global batch of ``sequences``
        windows and the validation split one window (each window is seq_len + 1 tokens)."""
        need = sequences * seq_len + 1
        if len(self.train) < need:
            raise DataError(
                f"the train split of {self.path} has {len(self.train)} tokens, fewer than one batch of {sequences} "
                f"sequences x {seq_len} tokens (+1); use a larger corpus or a smaller --batch-size / --seq-len"
            )
        if len(self.val) < seq_len + 1:
            raise DataError(
                f"the validation split of {self.path} has {len(self.val)} tokens, fewer than one sequence of "
                f"seq_len + 1 = {seq_len + 1}; use a larger corpus or a shorter --seq-len"
            )

    @staticmethod
    def _window(arr: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(arr[s : s + seq_len + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def train_batch(
        self, seed: int, step: int, micro: int, rank: int, world: int, batch: int, grad_accum: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (batch, seq_len) of one micro-batch of one rank.

        Each optimiser step draws ``batch * grad_accum * world`` random windows from a generator
        seeded by ``(seed, step)``; micro-batch ``micro`` of rank ``rank`` is the slice
        ``(micro * world + rank)``. One process with ``batch * world`` rows therefore sees
        exactly the rows that ``world`` processes see together.
        """
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.train) - seq_len, size=batch * grad_accum * world)
        i = (micro * world + rank) * batch
        return self._window(self.train, starts[i : i + batch], seq_len)

    def val_batches(self, batch: int, seq_len: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, non-overlapping validation windows (the same every evaluation)."""
        n = min((len(self.val) - 1) // seq_len, batch * max_batches)
        starts = np.arange(n) * seq_len
        return [self._window(self.val, starts[i : i + batch], seq_len) for i in range(0, n, batch)]


__all__ = ["DEFAULT_CORPUS", "TokenData", "prepare", "read_documents", "tokenize", "train_bpe"]
