"""Text generation, beside the model: KV caches, prefill, token-by-token decoding and sampling.

    from .generate import GenerationConfig, generate, stream
    result = generate(model, tokenizer, ["Once upon a time", "def fib(n):"],
                      GenerationConfig(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0))
    print(result.texts, result.stats.decode_tps)
    for step in stream(model, tokenizer, "Hello", GenerationConfig()):  # tokens as they come
        print(step.texts[0], end="", flush=True)

How one request runs:

* The prompts are **left-padded** into one (batch, longest) tensor. Each row's positions
  start at 0 after its padding; padding tokens get position -1, and attention drops keys
  whose position is negative, so a short prompt sees exactly what it would see alone.
* The model allocates its caches once (``model.new_cache(batch, longest + max_new_tokens)``):
  each attention layer brings its own kind (full buffer, sliding-window ring buffer holding
  only the window, chunk ring buffer, compressed latent...).
* **Prefill** runs the whole prompt through the model in one forward and samples the first
  new token from the last position; **decode** then feeds one token per row per step.
* **Sampling** (on float32 logits): repetition penalty, then greedy (``temperature == 0``)
  or temperature, top-k, top-p and min-p filtering and a draw from a seeded generator.
* A row stops at an EOS / end-of-turn id or when its decoded text contains a stop string
  (the text is cut where the stop string starts); streamed text never shows a stop string
  (text that could be the start of one is held back until it is decided).
"""

from __future__ import annotations

import functools
import math
import operator
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..checkpoints.tokenizer import StreamDecoder
from ..errors import GenerationError
from . import native

Prompt = str | Sequence[int]


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------


@dataclass
class GenerationConfig:
    """What to generate and how to sample. ``temperature == 0`` is greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None
    stop: Sequence[str] = ()
    max_context: int | None = None  # None: the model's max_position_embeddings
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    eos_token_ids: Sequence[int] | None = None  # None: the tokenizer's EOS / end-of-turn ids

    def validate(self) -> None:
        """Check every field before any slow work; a GenerationError names the first bad one."""
        for name in ("max_new_tokens", "top_k", "max_context", "seed"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise GenerationError(f"{name} must be an integer, got {v!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise GenerationError(f"{name} must be a finite number, got {v!r}")
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise GenerationError(f"min_p must be in [0, 1) (0 turns it off), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")
        if self.max_context is not None and self.max_context < 1:
            raise GenerationError(f"max_context must be at least 1, got {self.max_context}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise GenerationError(f"seed must be in [0, 2**64), got {self.seed}")
        if isinstance(self.stop, str):
            raise GenerationError("stop must be a list of strings, not a single string")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("stop strings must be non-empty strings")
        check_text(list(self.stop), "stop string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ----------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token already in the context less likely (CTRL's rule, as in transformers):
    a positive logit is divided by ``penalty``, a negative one multiplied by it."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability
    reaches ``p`` (always at least the most likely one)."""
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass of the strictly more likely tokens
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep the tokens whose probability is at least ``min_p`` times the top token's."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


class Sampler:
    """Picks the next token of every row from its logits (B, vocab)."""

    def __init__(self, config: GenerationConfig, batch: int, vocab: int, device=None):
        self.config = config
        self.generator = None
        if config.seed is not None:
            self.generator = torch.Generator(device=device or "cpu").manual_seed(config.seed)
        # which tokens each row has in its context, for the repetition penalty
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device) if config.repetition_penalty != 1 else None

    def observe(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Record tokens (B, T) as part of the context (``valid`` masks out padding)."""
        if self.seen is None:
            return
        hits = torch.ones_like(ids, dtype=torch.int32) if valid is None else valid.to(torch.int32)
        counts = torch.zeros(self.seen.shape, dtype=torch.int32, device=ids.device).scatter_add_(1, ids, hits)
        self.seen |= counts > 0

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The filtered, temperature-scaled logits the sampler draws from (-inf = never)."""
        c = self.config
        logits = logits.float()
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, c.repetition_penalty)
        if c.greedy:
            return logits
        logits = logits / c.temperature
        logits = filter_top_k(logits, c.top_k)
        logits = filter_top_p(logits, c.top_p)
        return filter_min_p(logits, c.min_p)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids (B,)."""
        if self.config.greedy and self.seen is None:
            picked = native.argmax(logits)  # torch's own takes 0.3 ms for 262k logits, 2-3% of a token
            return picked if picked is not None else logits.max(-1).indices  # the first maximum, as argmax
        logits = self.distribution(logits)
        if self.config.greedy:
            return logits.argmax(-1)
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


# ----------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------


@dataclass
class GenerationStats:
    """Token counts and wall-clock seconds of the two phases (time spent by the consumer of
    :func:`stream` between steps is not counted)."""

    prompt_tokens: int = 0  # real prompt tokens, padding excluded
    prefill_seconds: float = 0.0
    generated_tokens: int = 0  # new tokens of every row (the first comes from the prefill)
    decode_tokens: int = 0  # new tokens produced by decode steps
    decode_seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def summary(self) -> str:
        return (
            f"prefill: {self.prompt_tokens} tokens in {self.prefill_seconds:.2f} s ({self.prefill_tps:.1f} tok/s) | "
            f"decode: {self.decode_tokens} tokens in {self.decode_seconds:.2f} s ({self.decode_tps:.1f} tok/s)"
        )


@dataclass
class Step:
    """One generation step: what each row of the batch produced.

    ``token_ids[r]`` is None for a row that had already finished; ``texts[r]`` is the newly
    printable text of row r (possibly empty: an incomplete character or a possible stop
    string is held back); ``finished[r]`` says the row is done after this step.
    """

    index: int
    token_ids: list[int | None]
    texts: list[str]
    finished: list[bool]


@dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]  # "eos" | "stop" | "length"
    stats: GenerationStats

    @property
    def text(self) -> str:
        return self.texts[0]


# ----------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------


class _Row:
    """The output of one prompt: ids, decoded text, what was already streamed, stop state."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.ids: list[int] = []
        self.stop = list(stop)
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.text = ""
        self.emitted = 0  # characters of `text` already streamed
        self.finish_reason: str | None = None

    def add(self, token: int, is_eos: bool) -> str:
        """Take one new token; return the text that can be streamed now."""
        self.ids.append(token)
        if is_eos:
            self.finish(reason="eos")
        elif self.decoder is not None:
            searched = len(self.text)
            self.text += self.decoder.feed(token)
            self._find_stop(searched)
        return self._release()

    def finish(self, reason: str) -> str:
        """Close the row (length limit); return the text still held back."""
        if self.finish_reason is None:
            self.finish_reason = reason
            if self.decoder is not None:
                searched = len(self.text)
                self.text += self.decoder.flush()
                self._find_stop(searched)
        return self._release()

    def _find_stop(self, searched: int) -> None:
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, searched - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"

    def _release(self) -> str:
        end = len(self.text)
        if self.finish_reason is None:
            end -= self._held_back()
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest end of the text that could start a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest


def check_text(texts: Sequence[str | None], what: str) -> None:
    """Text from the command line must be UTF-8 (Python hands undecodable bytes over as lone surrogates)."""
    for i, t in enumerate(texts):
        try:
            if t is not None:
                t.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(e.object[e.start]) - 0xDC00  # the undecodable byte, as Python escaped it
            shown = f"byte 0x{byte:02x}" if 0 <= byte < 256 else f"character {e.object[e.start]!r}"
            raise GenerationError(f"{what} {i} is not valid UTF-8 text ({shown} at position {e.start}); "
                                  "pass UTF-8 text") from None


def chat_prompt(tokenizer, message: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat (the tokenizer's chat template, generation prompt added)."""
    if not message:
        raise GenerationError("the prompt is empty")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)  # the template writes its own BOS


def _prompt_ids(tokenizer, prompt: Prompt, index: int) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise GenerationError(f"prompt {index} is empty")
        if tokenizer is None:
            raise GenerationError("text prompts need a tokenizer (or pass token ids)")
        check_text([prompt], "prompt")
        ids = tokenizer.encode(prompt)
    else:
        try:
            ids = [operator.index(i) for i in prompt]
        except TypeError:
            raise GenerationError(f"prompt {index} must be text or a sequence of integer token ids") from None
    if not ids:
        raise GenerationError(f"prompt {index} is empty (no tokens)")
    return ids


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt given as token ids
    if not prompts:
        raise GenerationError("no prompt given")
    return prompts


def model_context(model, config: GenerationConfig) -> int:
    """The longest sequence (prompt + new tokens) a request may reach."""
    limit = model.config.max_position_embeddings
    if config.max_context is None:
        return limit
    if config.max_context > limit:
        raise GenerationError(f"max_context {config.max_context} exceeds the model's context of {limit} tokens")
    return config.max_context


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) left-padded with ``pad_id`` and positions (B, T): 0.. after the
    padding, -1 on padding (attention ignores keys at negative positions)."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    pos = torch.full((len(rows), longest), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r) :] = torch.tensor(r, dtype=torch.long)
        pos[i, longest - len(r) :] = torch.arange(len(r))
    return ids, pos


class Generation:
    """An iterable over the :class:`Step` s of one request; afterwards holds its results.

    Inputs are checked when it is created (bad input raises :class:`GenerationError` before
    any work); the model runs while it is iterated.
    """

    def __init__(self, model, tokenizer, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config or GenerationConfig()
        config.validate()
        if config.stop and tokenizer is None:
            raise GenerationError("stop strings need a tokenizer to decode the output")
        self.prompts = [_prompt_ids(tokenizer, p, i) for i, p in enumerate(_as_prompt_list(prompts))]
        context = model_context(model, config)
        for i, ids in enumerate(self.prompts):
            which = "the prompt" if len(self.prompts) == 1 else f"prompt {i}"
            if len(ids) > context:
                raise GenerationError(f"{which} is {len(ids)} tokens long; the context is {context} tokens")
            if len(ids) + config.max_new_tokens > context:
                raise GenerationError(
                    f"{which} ({len(ids)} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the context of "
                    f"{context} tokens; lower max_new_tokens to at most {context - len(ids)}"
                )
        vocab = model.config.vocab_size
        for i, ids in enumerate(self.prompts):
            if min(ids) < 0 or max(ids) >= vocab:
                raise GenerationError(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")
        if config.eos_token_ids is not None:
            self.eos = set(config.eos_token_ids)
        else:
            self.eos = set(getattr(tokenizer, "eos_token_ids", ()) or ())
            if model.config.eos_token_id is not None:
                self.eos.add(model.config.eos_token_id)
        if config.ignore_eos:
            self.eos = set()
        self.rows = [_Row(tokenizer, config.stop) for _ in self.prompts]
        self.stats = GenerationStats(prompt_tokens=sum(len(p) for p in self.prompts))
        self.cache = None  # the KV cache, once running
        self._done = False

    # ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Step]:
        if self._done:
            raise GenerationError("this generation has already run; start a new one")
        self._done = True
        model, cfg, stats = self.model, self.config, self.stats
        device = next(model.parameters()).device
        pad = model.config.pad_token_id or 0
        ids, positions = left_pad(self.prompts, pad)
        ids, positions = ids.to(device), positions.to(device)
        batch, longest = ids.shape
        next_pos = positions[:, -1:] + 1  # (B, 1)
        sampler = Sampler(cfg, batch, model.config.vocab_size, device)
        sampler.observe(ids, positions >= 0)

        # inference mode only around the work: the caller runs between steps, outside it
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.cache = cache = model.new_cache(batch, longest + cfg.max_new_tokens)
            tokens = sampler(model(ids, positions=positions, cache=cache, last_only=True)[:, -1])
        step = self._take(0, tokens.tolist())
        stats.prefill_seconds = time.perf_counter() - t0
        yield step
        for i in range(1, cfg.max_new_tokens):
            if all(step.finished):
                break
            t0 = time.perf_counter()
            with torch.inference_mode():
                sampler.observe(tokens[:, None])
                tokens = sampler(model(tokens[:, None], positions=next_pos, cache=cache, last_only=True)[:, -1])
            next_pos = next_pos + 1
            step = self._take(i, tokens.tolist())
            stats.decode_seconds += time.perf_counter() - t0
            stats.decode_tokens += sum(t is not None for t in step.token_ids)
            yield step

    def _take(self, index: int, tokens: list[int]) -> Step:
        """Hand each unfinished row its new token; close rows at the length limit."""
        last = index == self.config.max_new_tokens - 1
        out, texts, finished = [], [], []
        for row, tok in zip(self.rows, tokens):
            if row.finish_reason is not None:
                out.append(None)
                texts.append("")
                finished.append(True)
                continue
            piece = row.add(tok, tok in self.eos)
            if last and row.finish_reason is None:
                piece += row.finish("length")
            self.stats.generated_tokens += 1
            out.append(tok)
            texts.append(piece)
            finished.append(row.finish_reason is not None)
        return Step(index, out, texts, finished)

    # ---------------------------------------------------------------------------------
    def run(self) -> GenerationResult:
        """Run to the end (if not iterated yet) and return the result."""
        if not self._done:
            for _ in self:
                pass
        return self.result()

    def result(self) -> GenerationResult:
        return GenerationResult(
            texts=[r.text for r in self.rows],
            token_ids=[list(r.ids) for r in self.rows],
            finish_reasons=[r.finish_reason or "length" for r in self.rows],
            stats=self.stats,
        )


def stream(model, tokenizer, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None) -> Generation:
    """Generate, yielding a :class:`Step` per token; ``.result()`` afterwards.

    ``prompts``: a string, a list of strings, token ids, or a list of token-id lists.
    """
    return Generation(model, tokenizer, prompts, config)


def generate(
    model, tokenizer, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None
) -> GenerationResult:
    """Generate for every prompt; the texts, token ids, finish reasons and speed."""
    return Generation(model, tokenizer, prompts, config).run()


def load_model(checkpoint, dtype: torch.dtype | None = torch.float32, pack: bool = True, quant: str = "auto",
               group_size: int = 32, fast: bool = False):
    """An opened checkpoint (:func:`llmarch.checkpoints.formats.open_checkpoint`) as a model for
    inference; the arguments as for :func:`load`."""
    from ..checkpoints.cache import DerivedTensors
    from ..checkpoints.formats import GGUFCheckpoint
    from ..checkpoints.hf import from_pretrained
    from .gguf_quant import assign_quantized, resolve_quant
    from . import native
    from .packed import pack_linears
    from .quant import MODES, fast_kernels, quantize

    mode = resolve_quant(checkpoint, quant, group_size)  # refuses what cannot work before reading a tensor
    keep = store = None
    if mode != "none":  # int4 from a GGUF file: resolve_quant let only its 4-bit types through, as they are
        kept = mode if mode in ("int8", "compact") else "auto"
        if isinstance(checkpoint, GGUFCheckpoint):  # its int8 requantisations are kept between runs
            # (the layout depends on whether the native kernels are built: one store for each,
            # so that a run without them does not replace the other's)
            layout = "" if native.library() is None else ", blocks of 32"
            store = DerivedTensors.for_gguf(checkpoint, f"int8 weights, quant {kept}{layout}")
        keep = functools.partial(assign_quantized, mode=kept, dtype=dtype or torch.float32, store=store)
    model = from_pretrained(checkpoint, dtype=dtype, quantized=keep)
    if store is not None:
        store.save()
    if mode in MODES:
        quantize(model, mode, group_size)  # the layers still in float
    if pack:
        pack_linears(model, release=True)
        if fast:
            fast_kernels(model)
    return model


def load(
    name_or_path: str | None = None,
    dtype: torch.dtype | None = torch.float32,
    pack: bool = True,
    quant: str = "auto",
    group_size: int = 32,
    fast: bool = False,
):
    """Model and tokenizer from an alias (``gemma-3-270m``, the default), a .gguf file or an
    HF checkpoint directory (with its tokenizer.json), for inference.

    ``quant`` (see :mod:`llmarch.inference.gguf_quant`): ``auto`` keeps a GGUF file's quantised
    matrices quantised (never dequantised on the way: int4 for its 4-bit types, int8 for the
    wider ones) and a float checkpoint in float; ``none`` computes in float; ``int8`` / ``int4``
    (``group_size`` inputs per int4 scale) quantise at load. What cannot work is refused before
    the tensors are read. ``pack``: then pre-pack the layers left in float for fast CPU decoding
    and free their plain copies (:func:`llmarch.inference.packed.pack_linears` with ``release``),
    so the model holds its weights once; use :func:`llmarch.from_pretrained` for a model to
    train or export. ``fast`` (with ``pack``), where llmarch's native kernels are not built
    (:mod:`llmarch.inference.native`; with them it changes nothing): the large int8 layers get a
    second copy packed for fbgemm's int8 kernel, used for products of a few rows (decoding), about
    1.2-1.3x faster decoding once packed; packing takes 2.2 s for Gemma 3 270M, 3.6 s for Qwen2.5-0.5B (on a second thread, while
    the tokenizer is read and the prompt prefilled; until then the same products, to the bit,
    run unpacked): see :func:`llmarch.inference.quant.fast_kernels`. A server's batch-invariant model and
    a perplexity's many-row products do not use it."""
    from ..checkpoints.assets import resolve_model
    from ..checkpoints.formats import GGUFCheckpoint, open_checkpoint
    from ..checkpoints.tokenizer import Tokenizer
    from .device import release_free_memory
    from .gguf_quant import resolve_quant

    checkpoint = open_checkpoint(resolve_model(name_or_path))  # a GGUF file's metadata is parsed once, here
    resolve_quant(checkpoint, quant, group_size)  # a --quant that cannot work is refused before anything is read
    model = None
    if fast:  # the weights first: they are packed while the tokenizer is read
        model = load_model(checkpoint, dtype, pack, quant, group_size, fast)
    if isinstance(checkpoint, GGUFCheckpoint):
        tokenizer = Tokenizer.from_gguf(checkpoint)
    else:
        tokenizer = Tokenizer.from_file(checkpoint.path)
    # Reading a 262k-entry tokenizer leaves about 280 MB freed but still held by the C allocator:
    # returned before the weights load, it stays out of the peak memory
    release_free_memory()
    if model is None:
        model = load_model(checkpoint, dtype, pack, quant, group_size)
    if isinstance(checkpoint, GGUFCheckpoint):  # what loading read of the file need not stay resident
        checkpoint.release_pages()
    release_free_memory()  # nor the temporaries of converting it (Qwen2.5-0.5B: about 180 MB)
    return model, tokenizer
