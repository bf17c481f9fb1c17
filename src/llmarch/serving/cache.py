"""KV caches for continuous batching: one *slot* (batch row) per sequence, each with its own length.

The model's own caches (:mod:`llmarch.model.cache`) move every row of a batch in step: one
write index for all. A server's sequences start and end at different times, so here each row
keeps its own count of stored tokens (``SlotPool.lens``) and the caches write each row where
that row is:

* :class:`SlotFull` wraps a :class:`~llmarch.model.cache.FullCache` (and MLA's latent cache,
  a FullCache of one "head"): row ``r``'s token ``j`` lives in column ``j``.
* :class:`SlotRing` wraps a :class:`~llmarch.model.cache.RingCache` (sliding-window and
  chunked layers): token ``j`` lives in slot ``j % size``, as in the ring itself.

Columns a row has not written hold position -1, so a batched decode step attends over the
longest row's columns and attention masks the rest, as it masks left padding.

A forward is either the **decode** of rows ``[0, n)`` (one new token each, at each row's own
position) or the **prefill** of some rows, each from its current length on (a prompt chunk per
row). Chunks of different lengths are right-padded to the longest; padding tokens have position
-1, so the columns they write stay invisible (and a decode overwrites them). The scheduler keeps
decoding sequences in the leading rows (:meth:`SlotPool.swap`), so a decode step reads plain
views, never a gather.
"""

from __future__ import annotations

import torch

from ..errors import GenerationError
from ..model.cache import FullCache, KVCache, LayerCache, RingCache


class SlotPool:
    """The slot caches of every layer of one model, and the per-row token counts they share."""

    def __init__(self, model, slots: int, max_len: int):
        base = model.new_cache(slots, max_len)
        self.slots, self.max_len = slots, max_len
        self.device = base.layers[0].pos.device if base.layers and base.layers[0] is not None else torch.device("cpu")
        self.lens = [0] * slots  # tokens stored per row
        self.forward_id = 0  # bumped per forward: the layout key that lets layers share masks
        self.prefill_rows: list[int] | None = None  # the rows of the coming prefill, None for a decode
        self.decode_cols: torch.Tensor | None = None  # each decoding row's write column
        self.decode_span = 0  # columns a decode step attends over
        wrapped: dict[int, LayerCache] = {}
        layers = []
        for c in base.layers:
            if c is not None and id(c) not in wrapped:  # KV-shared layers keep sharing one cache
                wrapped[id(c)] = (SlotRing if isinstance(c, RingCache) else SlotFull)(c, self)
            layers.append(None if c is None else wrapped[id(c)])
        self.caches = list(wrapped.values())
        self.kv = KVCache(layers)

    @property
    def has_rings(self) -> bool:
        return any(isinstance(c, SlotRing) for c in self.caches)

    # -- the two kinds of forward -------------------------------------------------------
    def prefill_fits(self, row: int, width: int) -> bool:
        """Whether ``row`` can take a prefill of ``width`` columns (its chunk plus padding).

        A full cache needs the columns; a ring, when the prefill is padded or batched, must
        not wrap (padding written past the ring's end would overwrite tokens still in the
        window): such a row is prefilled alone, where a ring keeps the last ``size`` tokens."""
        end = self.lens[row] + width
        return end <= self.max_len and all(end <= c.size for c in self.caches if isinstance(c, SlotRing))

    def begin_prefill(self, rows: list[int], counts: list[int]) -> torch.Tensor:
        """Prepare a forward of ``counts[i]`` new tokens of each row ``rows[i]``, right-padded to
        the longest; their positions (len(rows), max(counts)), -1 for padding."""
        width = max(counts)
        for row, n in zip(rows, counts):
            if self.lens[row] + n > self.max_len:
                raise GenerationError(f"slot {row} is full: {self.lens[row] + n} tokens, the cache holds {self.max_len}")
            if len(rows) > 1 and not self.prefill_fits(row, width):
                raise GenerationError(f"slot {row} cannot take a batched prefill of {width} columns")
        self.prefill_rows = list(rows)
        self.forward_id += 1
        pos = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, counts)):
            pos[i, :n] = torch.arange(self.lens[row], self.lens[row] + n)
        return pos.to(self.device)

    def begin_decode(self, n: int) -> torch.Tensor:
        """Prepare a forward of one token for each of rows [0, n); their positions (n, 1)."""
        lens = self.lens[:n]
        if max(lens) >= self.max_len:
            raise GenerationError(f"a slot is full: the cache holds {self.max_len} tokens")
        self.prefill_rows = None
        self.forward_id += 1
        self.decode_cols = torch.tensor(lens, device=self.device)
        self.decode_span = max(lens) + 1
        return self.decode_cols[:, None]

    def end_prefill(self, rows: list[int], counts: list[int]) -> None:
        for row, n in zip(rows, counts):
            self.lens[row] += n

    def end_decode(self, n: int) -> None:
        for r in range(n):
            self.lens[r] += 1

    # -- row operations -----------------------------------------------------------------
    def clear(self, row: int, keep: int = 0) -> None:
        """Forget row ``row`` past its first ``keep`` tokens."""
        for c in self.caches:
            c.forget(row, keep, self.lens[row])
        self.lens[row] = min(keep, self.lens[row])

    def copy_prefix(self, src: int, dst: int, tokens: int) -> None:
        """Make row ``dst`` hold the first ``tokens`` tokens of row ``src`` (see :meth:`reusable`)."""
        self.clear(dst)
        for c in self.caches:
            c.copy_row(src, dst, self.lens[src])
        self.lens[dst] = self.lens[src]
        self.clear(dst, tokens)

    def swap(self, a: int, b: int) -> None:
        if a == b:
            return
        cols = max(self.lens[a], self.lens[b])
        for c in self.caches:
            c.swap_rows(a, b, cols)
        self.lens[a], self.lens[b] = self.lens[b], self.lens[a]

    def reusable(self, row: int, tokens: int) -> bool:
        """Whether the first ``tokens`` tokens of ``row`` can be continued from.

        Full caches hold every token, so any prefix can. A ring holds only the last ``size``
        tokens written: once a row has written more than that, the ring lost the keys just
        before a shorter prefix's end, so only the whole row can be continued.
        """
        written = self.lens[row]
        return tokens <= written and all(
            written <= c.size or tokens == written for c in self.caches if isinstance(c, SlotRing)
        )


class SlotFull(LayerCache):
    """A full buffer (or MLA latent) with a write column per row."""

    def __init__(self, base: FullCache, pool: SlotPool):
        self.k, self.v, self.pos, self.pool = base.k, base.v, base.pos, pool

    def update(self, k, v, pos):
        pool = self.pool
        if pool.prefill_rows is not None:
            return self.prefill(k, v, pos)
        n, cols, span = k.shape[0], pool.decode_cols, pool.decode_span
        rows = torch.arange(n, device=k.device)
        self.k[rows, :, cols] = k[:, :, 0]
        self.v[rows, :, cols] = v[:, :, 0]
        self.pos[rows, cols] = pos[:, 0]
        return self.k[:n, :, :span], self.v[:n, :, :span], self.pos[:n, :span]

    def prefill(self, k, v, pos):
        """Write each prefilled row's chunk (padding included) from its length on; the rows' keys
        up to the furthest column written."""
        rows, width = self.pool.prefill_rows, k.shape[2]
        end = 0
        for i, r in enumerate(rows):
            start = self.pool.lens[r]
            self.k[r, :, start : start + width] = k[i]
            self.v[r, :, start : start + width] = v[i]
            self.pos[r, start : start + width] = pos[i]
            end = max(end, start + width)
        if len(rows) == 1:
            r = rows[0]
            return self.k[r : r + 1, :, :end], self.v[r : r + 1, :, :end], self.pos[r : r + 1, :end]
        idx = torch.tensor(rows, device=k.device)
        return self.k[idx, :, :end], self.v[idx, :, :end], self.pos[idx, :end]

    def layout(self) -> tuple:
        return ("slot-full", self.pool.forward_id)

    def forget(self, row: int, keep: int, written: int) -> None:
        self.pos[row, keep:] = -1

    def copy_row(self, src: int, dst: int, cols: int) -> None:
        self.k[dst, :, :cols] = self.k[src, :, :cols]
        self.v[dst, :, :cols] = self.v[src, :, :cols]
        self.pos[dst, :cols] = self.pos[src, :cols]

    def swap_rows(self, a: int, b: int, cols: int) -> None:
        rows, back = [a, b], [b, a]
        for t in (self.k, self.v):
            t[rows, :, :cols] = t[back, :, :cols]
        self.pos[rows, :cols] = self.pos[back, :cols]

    def tensors(self):
        return [self.k, self.v]


class SlotRing(SlotFull):
    """A ring buffer (sliding window or chunk) with a write slot per row: token j in slot j % size."""

    def __init__(self, base: RingCache, pool: SlotPool):
        super().__init__(base, pool)
        self.size = base.size

    def update(self, k, v, pos):
        pool, size = self.pool, self.size
        if pool.prefill_rows is not None and len(pool.prefill_rows) > 1:
            # batched (and padded): no row wraps (SlotPool.prefill_fits), so slot = column
            return self.prefill(k, v, pos)
        if pool.prefill_rows is not None:
            # as RingCache's prefill: attend over what the ring holds plus every new token,
            # then keep the last `size` of them
            r, t = pool.prefill_rows[0], k.shape[2]
            written = pool.lens[r]
            ring = slice(r, r + 1)
            k_all = torch.cat([self.k[ring], k], 2) if written else k
            v_all = torch.cat([self.v[ring], v], 2) if written else v
            p_all = torch.cat([self.pos[ring], pos], 1) if written else pos
            keep = min(t, size)
            slots = (written + torch.arange(t - keep, t, device=k.device)) % size
            self.k[r, :, slots] = k[0, :, t - keep :]
            self.v[r, :, slots] = v[0, :, t - keep :]
            self.pos[r, slots] = pos[0, t - keep :]
            return k_all, v_all, p_all
        n = k.shape[0]
        rows, slots = torch.arange(n, device=k.device), pool.decode_cols % size
        self.k[rows, :, slots] = k[:, :, 0]
        self.v[rows, :, slots] = v[:, :, 0]
        self.pos[rows, slots] = pos[:, 0]
        return self.k[:n], self.v[:n], self.pos[:n]

    def layout(self) -> tuple:
        return ("slot-ring", self.size, self.pool.forward_id, self.pool.prefill_rows is None)

    def forget(self, row: int, keep: int, written: int) -> None:
        if keep == 0:
            self.pos[row] = -1
        elif keep < written:  # only reached when nothing wrapped yet (see SlotPool.reusable)
            self.pos[row, keep:written] = -1

    def copy_row(self, src: int, dst: int, cols: int) -> None:
        super().copy_row(src, dst, self.size)

    def swap_rows(self, a: int, b: int, cols: int) -> None:
        super().swap_rows(a, b, self.size)
