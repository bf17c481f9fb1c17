"""Continuous batching: one thread runs the model for every request of a server.

Each turn of the loop (:meth:`Scheduler.step`):

1. **admit** waiting requests into free rows of the :class:`~.cache.SlotPool`; a request
   whose prompt starts with tokens a finished row still holds gets that prefix copied in
   and skips computing it (*prefix reuse*);
2. **prefill** one chunk of the oldest sequence still reading its prompt, together with the
   next chunks of the sequences after it while the batch, right-padded to its longest chunk,
   stays within ``prefill_chunk`` tokens (sixteen short prompts arriving at once are one
   forward, not sixteen); a sequence whose prompt is done gets its first token sampled and
   joins the decoders;
3. **decode** one token for every decoding sequence in a single batched forward.

A long prompt is so spread over several turns and never stalls the decoders for more than
one chunk. A sequence that ends (EOS, stop string, length, or its client went away) leaves
at once; its row keeps its tokens for prefix reuse until the row is needed again.

Rows ``[0, n_decoding)`` hold the decoding sequences, so a decode step reads plain views;
:meth:`SlotPool.swap` moves rows to keep it so.

Results go back through each :class:`Sequence`'s ``emit`` callback, from the scheduler
thread (the HTTP layer hands them to its event loop).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import GenerationError
from ..inference.generate import GenerationConfig, Sampler, _Row
from ..inference.quant import batch_invariant
from .cache import SlotPool


class QueueFull(GenerationError):
    """The server holds as many requests as it may; try again later."""


@dataclass
class Event:
    """What one sequence produced: new text (and the token), or its end."""

    text: str
    token: int | None = None
    finish_reason: str | None = None  # "eos" | "stop" | "length" | "cancelled" | "error"
    completion_tokens: int = 0


@dataclass
class Sequence:
    prompt: list[int]
    config: GenerationConfig
    emit: Callable[[Event], None]
    id: int = 0
    row: int | None = None
    reused: int = 0  # prompt tokens taken from an earlier sequence's cache
    prefilled: int = 0  # prompt tokens in the cache
    last: int | None = None  # the newest token, not yet in the cache
    cancelled: bool = False
    out: _Row | None = None
    sampler: Sampler | None = None
    arrived: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop generating (the client went away); the scheduler frees the row on its next turn."""
        self.cancelled = True


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Scheduler:
    """Runs the requests of many clients on one model, continuously batched.

    ``slots``: sequences computed at once (rows of the KV cache); ``context``: the longest
    prompt + completion; ``max_queue``: requests waiting for a row beyond which
    :meth:`submit` raises :class:`QueueFull`.
    """

    def __init__(self, model, tokenizer, *, slots: int = 16, context: int | None = None,
                 max_queue: int = 64, prefill_chunk: int = 256):
        self.model, self.tokenizer = model, tokenizer
        batch_invariant(model)  # a request's tokens must not depend on the batch it lands in
        limit = model.config.max_position_embeddings
        self.context = min(context or limit, limit)
        self.pool = SlotPool(model, slots, self.context)
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.eos = set(getattr(tokenizer, "eos_token_ids", ()) or ())
        if model.config.eos_token_id is not None:
            self.eos.add(model.config.eos_token_id)
        self.device = next(model.parameters()).device
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence | None] = [None] * slots  # the live sequence of each row
        self.cached: list[list[int]] = [[] for _ in range(slots)]  # tokens a free row still holds
        self.last_used = [0.0] * slots
        self.decoding = 0  # rows [0, decoding) decode
        self.prefilling: deque[Sequence] = deque()
        self.ids = itertools.count(1)
        self.lock = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.reused_tokens = 0  # prompt tokens served from earlier caches (all requests)

    # -- the API of the HTTP layer ----------------------------------------------------------
    @property
    def active(self) -> int:
        """Sequences holding a row or waiting for one."""
        with self.lock:
            return len(self.waiting) + sum(s is not None for s in self.rows)

    def check(self, prompt: list[int], config: GenerationConfig) -> None:
        """Raise :class:`GenerationError` (a 400) for a request that can never run."""
        config.validate()
        if not prompt:
            raise GenerationError("the prompt is empty (no tokens)")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise GenerationError(f"the prompt has token ids outside the vocabulary [0, {vocab})")
        if len(prompt) + config.max_new_tokens > self.context:
            raise GenerationError(
                f"the prompt ({len(prompt)} tokens) + max_tokens ({config.max_new_tokens}) exceeds the context of "
                f"{self.context} tokens; lower max_tokens to at most {max(self.context - len(prompt), 0)}"
            )

    def submit(self, prompt: list[int], config: GenerationConfig, emit: Callable[[Event], None]) -> Sequence:
        self.check(prompt, config)
        seq = Sequence(list(prompt), config, emit, id=next(self.ids))
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy ({len(self.waiting)} requests waiting); retry later")
            self.waiting.append(seq)
            self.lock.notify()
        return seq

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="llmarch-scheduler", daemon=True)
        self.thread.start()

    def stop(self, drain: bool = True) -> None:
        """Finish every request already taken (``drain``) or cancel them, then end the thread."""
        with self.lock:
            self.stopping = True
            if not drain:
                for s in [*self.waiting, *(r for r in self.rows if r is not None)]:
                    s.cancel()
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            with self.lock:
                while not (self.waiting or self.busy) and not self.stopping:
                    self.lock.wait()
                if self.stopping and not (self.waiting or self.busy):
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a bug or out-of-memory fails the requests, not the server
                self.fail_all(f"{type(e).__name__}: {e}")

    @property
    def busy(self) -> bool:
        return any(s is not None for s in self.rows)

    def step(self) -> None:
        self.drop_cancelled()
        self.admit()
        if self.prefilling:
            self.prefill(self.prefill_batch())
        if self.decoding:
            self.decode()

    def admit(self) -> None:
        while True:
            with self.lock:
                if not self.waiting:
                    return
                row = self.free_row()
                if row is None:
                    return
                seq = self.waiting.popleft()
            if seq.cancelled:
                seq.emit(Event("", finish_reason="cancelled"))
                continue
            self.place(seq, row)

    def free_row(self) -> int | None:
        """A row no live sequence holds: an empty one, else the least recently used cached one."""
        free = [r for r in range(self.decoding, self.pool.slots) if self.rows[r] is None]
        if not free:
            return None
        return min(free, key=lambda r: (bool(self.cached[r]), self.last_used[r]))

    def place(self, seq: Sequence, row: int) -> None:
        """Put ``seq`` into ``row``, with the longest prefix a cached row can give it."""
        best, source = 0, None
        for r in range(self.pool.slots):
            if self.rows[r] is None and self.cached[r]:
                n = min(common_prefix(self.cached[r], seq.prompt), len(seq.prompt) - 1)  # the last token gives logits
                if n > best and self.pool.reusable(r, n):
                    best, source = n, r
        if source is None:
            self.pool.clear(row)
        elif source == row:
            self.pool.clear(row, best)
        else:
            self.pool.copy_prefix(source, row, best)
            self.last_used[source] = time.perf_counter()
        self.cached[row] = []
        self.rows[row] = seq
        seq.row, seq.reused, seq.prefilled = row, best, best
        self.reused_tokens += best
        seq.out = _Row(self.tokenizer, seq.config.stop)
        seq.sampler = Sampler(seq.config, 1, self.model.config.vocab_size, self.device)
        self.prefilling.append(seq)

    def prefill_batch(self) -> list[tuple[Sequence, int]]:
        """This turn's prefill: (sequence, chunk length) for the oldest prefilling sequence and
        then, in arrival order, each next one that keeps the padded batch (rows x longest chunk)
        within ``prefill_chunk`` tokens and fits its row's cache (see ``SlotPool.prefill_fits``)."""
        def chunk(seq: Sequence) -> int:
            return min(self.prefill_chunk, len(seq.prompt) - seq.prefilled)

        first = self.prefilling[0]
        batch, width = [(first, chunk(first))], chunk(first)
        for seq in itertools.islice(self.prefilling, 1, None):
            n = chunk(seq)
            w = max(width, n)
            if (len(batch) + 1) * w > self.prefill_chunk:
                continue
            if all(self.pool.prefill_fits(s.row, w) for s, _ in batch) and self.pool.prefill_fits(seq.row, w):
                batch.append((seq, n))
                width = w
        return batch

    @torch.inference_mode()
    def prefill(self, batch: list[tuple[Sequence, int]]) -> None:
        rows, counts = [s.row for s, _ in batch], [n for _, n in batch]
        positions = self.pool.begin_prefill(rows, counts)
        ids = torch.zeros((len(batch), max(counts)), dtype=torch.long)
        for i, (seq, n) in enumerate(batch):
            ids[i, :n] = torch.tensor(seq.prompt[seq.prefilled : seq.prefilled + n])
        last = torch.tensor([n - 1 for n in counts], device=self.device)  # each row's last real token
        logits = self.model(ids.to(self.device), positions=positions, cache=self.pool.kv, last_index=last)[:, -1]
        self.pool.end_prefill(rows, counts)
        for i, (seq, n) in enumerate(batch):
            seq.prefilled += n
            if seq.prefilled < len(seq.prompt):
                continue
            self.prefilling.remove(seq)
            # join the decoders: row `decoding` becomes this sequence's (take may retire it)
            self.move(seq.row, self.decoding)
            self.decoding += 1
            self.take(seq, int(seq.sampler(logits[i : i + 1])[0]), index=0)

    @torch.inference_mode()
    def decode(self) -> None:
        n = self.decoding
        seqs = self.rows[:n]
        positions = self.pool.begin_decode(n)
        ids = torch.tensor([[s.last] for s in seqs], device=self.device)
        logits = self.model(ids, positions=positions, cache=self.pool.kv, last_only=True)[:, -1]
        self.pool.end_decode(n)
        greedy = logits.max(-1).indices.tolist()
        for i, s in enumerate(seqs):
            tok = greedy[i] if s.config.greedy else int(s.sampler(logits[i : i + 1])[0])
            self.take(s, tok, index=len(s.out.ids))

    def take(self, seq: Sequence, token: int, index: int) -> None:
        """Hand ``seq`` its new token; retire it when it is done."""
        seq.last = token
        is_eos = token in self.eos and not seq.config.ignore_eos
        piece = seq.out.add(token, is_eos)
        if seq.out.finish_reason is None and index == seq.config.max_new_tokens - 1:
            piece += seq.out.finish("length")
        done = seq.out.finish_reason is not None
        seq.emit(Event(piece, token, seq.out.finish_reason, len(seq.out.ids)))
        if done:
            self.retire(seq)

    def retire(self, seq: Sequence) -> None:
        """Free ``seq``'s row; the row keeps its tokens for prefix reuse."""
        row = seq.row
        if row < self.decoding:
            self.move(row, self.decoding - 1)
            self.decoding -= 1
            row = seq.row
        else:
            self.prefilling.remove(seq)
        with self.lock:
            self.rows[row] = None
        self.cached[row] = (seq.prompt + seq.out.ids)[: self.pool.lens[row]]
        self.last_used[row] = time.perf_counter()
        seq.row = None

    def move(self, a: int, b: int) -> None:
        """Swap rows a and b: cache contents and what the scheduler knows of them."""
        self.pool.swap(a, b)
        with self.lock:
            self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
        self.cached[a], self.cached[b] = self.cached[b], self.cached[a]
        self.last_used[a], self.last_used[b] = self.last_used[b], self.last_used[a]
        for r in (a, b):
            if self.rows[r] is not None:
                self.rows[r].row = r

    def drop_cancelled(self) -> None:
        for seq in [s for s in self.rows if s is not None and s.cancelled]:
            seq.out.finish_reason = "cancelled"
            self.retire(seq)
            seq.emit(Event("", finish_reason="cancelled", completion_tokens=len(seq.out.ids)))

    def fail_all(self, message: str) -> None:
        for seq in [s for s in self.rows if s is not None]:
            self.retire(seq)
            seq.emit(Event(message, finish_reason="error"))
        self.pool.lens = [0] * self.pool.slots
        self.cached = [[] for _ in range(self.pool.slots)]
