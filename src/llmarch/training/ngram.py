"""Count-model reference losses: what a unigram and a bigram model score on the validation split.

An ablation's validation loss means more next to these: a model at the bigram loss has learnt
little beyond which token follows which. Both models are counted on the train split with the
same tokenizer and scored (cross-entropy, nats/token) on exactly the targets that
``loop.evaluate`` scores: the fixed non-overlapping windows of ``TokenData.val_batches``. The
bigram's context for the first target of a window is the window's first input token, the one
the model sees; so the scored pairs are ``(val[j], val[j + 1])`` for ``j < windows * seq_len``.

* unigram: add-one smoothing, ``P(b) = (c(b) + 1) / (N + V)``;
* bigram: interpolated with the unigram, ``P(b | a) = lam * c(a, b) / c(a) + (1 - lam) * P(b)``
  (``P(b)`` alone for a context never seen in training). ``lam`` is the value of
  :data:`LAMBDAS` with the lowest loss on the last 5% of the train split, counted on the rest;
  the final counts are then taken on the whole train split. Tuned this way it is a strong
  (conservative) reference.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .data import TokenData

LAMBDAS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
HELD_OUT_FRACTION = 0.05


class _Counts:
    """Unigram and bigram counts of one token stream (pairs as sorted ``a * V + b`` codes)."""

    def __init__(self, tokens: np.ndarray, vocab: int):
        self.vocab = vocab
        self.n = len(tokens)
        self.uni = np.bincount(tokens, minlength=vocab)
        self.ctx = np.bincount(tokens[:-1], minlength=vocab)  # c(a): a as the context of a pair
        self.pair_codes, self.pair_counts = np.unique(tokens[:-1] * vocab + tokens[1:], return_counts=True)

    def unigram_p(self, b: np.ndarray) -> np.ndarray:
        return (self.uni[b] + 1.0) / (self.n + self.vocab)

    def pair_count(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        codes = a * self.vocab + b
        i = np.searchsorted(self.pair_codes, codes).clip(max=len(self.pair_codes) - 1)
        return np.where(self.pair_codes[i] == codes, self.pair_counts[i], 0)

    def bigram_p(self, a: np.ndarray, b: np.ndarray, lam: float) -> np.ndarray:
        c_a = self.ctx[a]
        ml = self.pair_count(a, b) / np.maximum(c_a, 1)
        uni = self.unigram_p(b)
        return np.where(c_a > 0, lam * ml + (1.0 - lam) * uni, uni)


def _cross_entropy(p: np.ndarray) -> float:
    return float(-np.log(p).mean())


def pick_lambda(train: np.ndarray, vocab: int) -> float:
    """The interpolation weight with the lowest bigram loss on the train split's last 5%,
    counting on the first 95% (the held-out pairs include the one across the cut)."""
    cut = len(train) - max(1, int(len(train) * HELD_OUT_FRACTION))
    counts = _Counts(train[:cut], vocab)
    a, b = train[cut - 1 : -1], train[cut:]
    losses = [_cross_entropy(counts.bigram_p(a, b, lam)) for lam in LAMBDAS]
    return LAMBDAS[int(np.argmin(losses))]


def ngram_reference(data: TokenData, seq_len: int, max_windows: int | None = None) -> dict:
    """Unigram and bigram cross-entropies (nats/token) on the validation targets of
    ``data.val_batches(batch, seq_len, n)`` with ``batch * n = max_windows`` (None: every
    window). Pass ``cfg.batch_size * cfg.eval_batches`` to score what a run's evaluation scores.

    Returns ``unigram``, ``bigram``, ``bigram_lambda``, ``val_tokens`` (targets scored) and
    ``train_tokens``.
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len}")
    train = np.asarray(data.train, dtype=np.int64)
    val = np.asarray(data.val, dtype=np.int64)
    if len(train) < 3:
        raise DataError(f"the train split of {data.path} has {len(train)} tokens; a bigram reference needs at least 3")
    windows = (len(val) - 1) // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise DataError(f"the validation split of {data.path} has {len(val)} tokens, fewer than one window of {seq_len} + 1")
    vocab = max(data.vocab_size, int(train.max()) + 1, int(val.max()) + 1)
    lam = pick_lambda(train, vocab)
    counts = _Counts(train, vocab)
    n = windows * seq_len
    a, b = val[:n], val[1 : n + 1]
    return dict(
        unigram=_cross_entropy(counts.unigram_p(b)),
        bigram=_cross_entropy(counts.bigram_p(a, b, lam)),
        bigram_lambda=lam,
        val_tokens=n,
        train_tokens=len(train),
    )


__all__ = ["HELD_OUT_FRACTION", "LAMBDAS", "ngram_reference", "pick_lambda"]
