"""KV caches, one kind per attention kind.

* :class:`FullCache` -- a preallocated buffer of ``max_len`` keys and values (full attention).
* :class:`RingCache` -- a ring buffer that holds only the last ``size`` tokens: sliding-window
  layers (size = window) and chunked layers (size = chunk).

Each cache stores, next to the keys and values, the *position* of every slot (-1 for an
empty slot or a padding token). Attention builds its mask from query and key positions, so
the same rule serves full, sliding and chunked layers, ring buffers whose slots are out of
order, and left-padded batches.

Caches are created by the attention modules themselves (``attn.make_cache``), so an
attention kind with a different cache layout (MLA's compressed latent) brings its own.
"""

from __future__ import annotations

import torch

from ..errors import GenerationError


class LayerCache:
    """Interface: ``update`` stores new keys/values and returns what the queries attend to."""

    # masks shared by the layers of one model (set by KVCache): the layers of one forward get
    # the same positions, so caches with equal ``layout()`` hold equal key positions and
    # attention with the same window/chunk rule needs the mask only once per forward
    masks: dict | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):  # pragma: no cover - interface
        raise NotImplementedError

    def layout(self) -> tuple:
        """Identifies the key positions this cache returned from its last update."""
        return (id(self),)

    def tensors(self) -> list[torch.Tensor]:
        return []

    @property
    def nbytes(self) -> int:
        """Bytes of key/value storage this cache allocated (positions excluded)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class FullCache(LayerCache):
    def __init__(self, batch: int, kv_heads: int, k_dim: int, v_dim: int, max_len: int, dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, kv_heads, max_len, v_dim, dtype=dtype, device=device)
        self.pos = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.max_len = max_len
        self.len = 0

    def update(self, k, v, pos):
        t = k.shape[2]
        end = self.len + t
        if end > self.max_len:
            raise GenerationError(f"KV cache is full: {end} tokens requested, the cache was allocated for {self.max_len}")
        self.k[:, :, self.len : end] = k
        self.v[:, :, self.len : end] = v
        self.pos[:, self.len : end] = pos
        self.len = end
        return self.k[:, :, :end], self.v[:, :, :end], self.pos[:, :end]

    def layout(self) -> tuple:
        return ("full", self.max_len, self.len)

    def tensors(self):
        return [self.k, self.v]


class RingCache(LayerCache):
    """Holds the last ``size`` tokens only; older slots are overwritten in place."""

    def __init__(self, batch: int, kv_heads: int, k_dim: int, v_dim: int, size: int, dtype, device):
        self.k = torch.zeros(batch, kv_heads, size, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, kv_heads, size, v_dim, dtype=dtype, device=device)
        self.pos = torch.full((batch, size), -1, dtype=torch.long, device=device)
        self.size = size
        self.written = 0  # tokens written so far (the next slot is written % size)
        self._returned = (0, 0)

    def filled(self) -> int:
        """Slots written so far: the ring fills slots 0, 1, ... in order before it wraps, so
        until then the slots from here on are empty (masked) and attention can skip them."""
        return min(self.written, self.size)

    def update(self, k, v, pos):
        t = k.shape[2]
        if t == 1:
            # decoding: overwrite the oldest slot, attend over the ring (the mask drops what
            # falls outside the window or chunk)
            slot = self.written % self.size
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            self.pos[:, slot] = pos[:, 0]
            self.written += 1
            n = self.filled()
            self._returned = (1, n)
            if n < self.size:  # a short context in a large window: only the slots written
                return self.k[:, :, :n], self.v[:, :, :n], self.pos[:, :n]
            return self.k, self.v, self.pos
        # prefill (possibly longer than the ring): attend over what the ring holds plus every
        # new token, then keep the last `size` of them
        if self.written:
            n = self.filled()
            k_all = torch.cat([self.k[:, :, :n], k], dim=2)
            v_all = torch.cat([self.v[:, :, :n], v], dim=2)
            p_all = torch.cat([self.pos[:, :n], pos], dim=1)
        else:
            k_all, v_all, p_all = k, v, pos
        keep = min(t, self.size)
        slots = (self.written + torch.arange(t - keep, t, device=k.device)) % self.size
        self.k[:, :, slots] = k[:, :, t - keep :]
        self.v[:, :, slots] = v[:, :, t - keep :]
        self.pos[:, slots] = pos[:, t - keep :]
        self.written += t
        self._returned = (t, k_all.shape[2])
        return k_all, v_all, p_all

    def layout(self) -> tuple:
        return ("ring", self.size, self.written, self._returned)

    def tensors(self):
        return [self.k, self.v]


class KVCache:
    """The caches of every layer of one model, plus the number of tokens seen."""

    def __init__(self, layers: list[LayerCache | None]):
        self.layers = layers
        self.seq_len = 0
        masks: dict = {}
        for c in layers:
            if c is not None:
                c.masks = masks

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, dtype=None, device=None) -> "KVCache":
        p = next(model.parameters())
        dtype = dtype or p.dtype
        device = device or p.device
        return cls([blk.attn.make_cache(batch, max_len, dtype, device) for blk in model.layers])

    @property
    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for c in self.layers:
            if c is None or id(c) in seen:
                continue
            seen.add(id(c))
            total += c.nbytes
        return total
