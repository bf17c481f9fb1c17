"""Tokenizers for HF checkpoint directories and GGUF files.

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` and adds what generation
needs: BOS handling, the set of end-of-sequence ids, chat-template rendering
and streaming detokenisation (:class:`StreamDecoder`).

GGUF files carry no ``tokenizer.json``; they store the vocabulary, scores,
token types and (for byte-level BPE) merges as metadata.  :meth:`Tokenizer.from_gguf`
rebuilds the equivalent ``tokenizers`` pipeline:

* SentencePiece BPE with byte fallback.  Merges come from the file, or are derived
  from the vocabulary ranked by score (or by position in the file, for vocabularies
  whose scores do not follow the merge order).  Vocabularies that spell multi-space
  tokens with real spaces are respelled with ``▁``.
* Byte-level BPE with merges, split first with the regex named by ``tokenizer.ggml.pre``.

What the metadata leaves unsaid (which ``tokenizer.ggml.model`` name is which kind,
the pre-tokenizer regexes, spacing conventions, a default chat template) is a
:class:`TokenizerQuirks`, filled in by the model's family (``families/``).

Control tokens (token type 3) become special added tokens and user-defined
ones (type 4) plain added tokens, so both are matched whole in the text.
"""

from __future__ import annotations

import functools
import heapq
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, GenerationError, LlmarchError
from ..families.base import BYTE_LEVEL, SENTENCEPIECE, TokenizerQuirks
from .safetensors import read_json_object

__all__ = ["StreamDecoder", "Tokenizer"]

# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

#: Tokens that end a chat turn; counted as EOS when the chat template uses them.
_END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>")

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merges_from_vocab(vocab: dict[str, int], priority: dict[str, float]) -> list[tuple[str, str]]:
    """Derive BPE merges from a SentencePiece-BPE vocabulary, best first.

    Every token that splits into two in-vocabulary pieces gives a merge.  Merges
    are ranked by the token's ``priority`` (higher first), then by the length of
    the left piece (longer first) -- the order ``transformers`` uses.
    """
    ranked: list[tuple[float, int, str, str]] = []
    for token in vocab:
        score = priority[token]
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                ranked.append((-score, -i, left, right))
    ranked.sort(key=lambda m: (m[0], m[1]))
    return _merges_that_fire(vocab, [(m[2], m[3]) for m in ranked])


def _merges_that_fire(vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The merges, in order, that ``tokenizers``' BPE can ever apply: the same tokenizer, smaller.

    A vocabulary's derived merges hold every way each token splits in two (Gemma 3: 515k for
    262k tokens), but a piece of text becomes token ``t`` only through the merges that turn
    ``t``'s own characters into ``t``: BPE applies merges in (rank, position) order, and a merge
    with the text around ``t`` would have used up one of its characters, so inside ``t`` the
    merges run as they do on ``t`` alone. So the merges ever applied are, for each token that
    encodes alone to itself, the last merge of that encoding; the others are never applied and
    never change which of these applies, and dropping them changes no encoding (Gemma 3: 236k
    kept; its tokenizer reads 0.3 s faster and holds about 25 MB less). This runs
    ``tokenizers``' merge loop (``models/bpe/word.rs``: a min-heap on (rank, position), stale
    entries skipped) on each token made by two merges or more; a token's only merge is kept.
    """
    table: dict[tuple[int, int], tuple[int, int]] = {}
    for rank, (a, b) in enumerate(merges):  # as tokenizers builds its map: a later duplicate wins
        table[vocab[a], vocab[b]] = (rank, vocab[a + b])
    get = table.get
    ways: dict[int, list[int]] = {}  # token id -> ranks of the merges that make it
    for rank, new in table.values():
        ways.setdefault(new, []).append(rank)
    used = {ranks[0] for ranks in ways.values() if len(ranks) == 1}  # kept without asking (a third)
    for token, token_id in vocab.items():
        n = len(token)
        if len(ways.get(token_id, ())) < 2:
            continue
        sym = [vocab.get(ch) for ch in token]
        if None in sym:
            continue
        nxt, prv, alive = list(range(1, n)) + [-1], list(range(-1, n - 1)), [True] * n
        heap = [(m[0], i, m[1]) for i in range(n - 1) if (m := get((sym[i], sym[i + 1]))) is not None]
        heapq.heapify(heap)
        last = None
        while heap:
            rank, pos, new = heapq.heappop(heap)
            right = nxt[pos]
            if not alive[pos] or right == -1 or (m := get((sym[pos], sym[right]))) is None or m[1] != new:
                continue  # a stale entry
            sym[pos], alive[right], nxt[pos], last = new, False, nxt[right], rank
            if nxt[pos] != -1:
                prv[nxt[pos]] = pos
            if prv[pos] >= 0 and (m := get((sym[prv[pos]], new))) is not None:
                heapq.heappush(heap, (m[0], prv[pos], m[1]))
            if nxt[pos] != -1 and (m := get((new, sym[nxt[pos]]))) is not None:
                heapq.heappush(heap, (m[0], pos, m[1]))
        if nxt[0] == -1 and sym[0] == token_id:
            used.add(last)
    return [m for rank, m in enumerate(merges) if rank in used]


def _token_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


#: the longest text a chat template may render, in characters (far beyond any model's context)
MAX_RENDERED_CHARS = 10_000_000
#: address space a template may allocate while it is compiled and rendered (Linux)
TEMPLATE_MEMORY_BYTES = 1 << 30
#: wall-clock seconds a template may take to compile and render (main thread, POSIX)
TEMPLATE_SECONDS = 10.0
#: iterations of ``range`` a template may create in total (the sandbox caps each one at 100,000)
TEMPLATE_RANGE_BUDGET = 1_000_000


class _TemplateTimeout(Exception):
    pass


def _too_big(what: str) -> CheckpointError:
    return CheckpointError(f"the chat template tried to build {what} longer than {MAX_RENDERED_CHARS:,} characters; "
                           "the template is broken or hostile")


def _vm_size() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def _template_limits() -> Iterator[None]:
    """Bound the memory (``RLIMIT_AS``, Linux) and the time (``SIGALRM``, main thread) of a template.

    A limit that cannot be set here (another platform, a worker thread, other threads running, an
    alarm already in use) is skipped; the operator, ``range`` and output caps of :func:`_render_env` still hold.
    """
    import resource
    import signal
    import threading

    restore = []
    vm = _vm_size()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # the address-space cap is process-wide: only set it while no other Python thread (a server's
    # scheduler, say) could have its own allocations refused during the render
    alone = threading.active_count() == 1
    if alone and vm is not None and (soft == resource.RLIM_INFINITY or soft > vm + TEMPLATE_MEMORY_BYTES):
        cap = vm + TEMPLATE_MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(vm + TEMPLATE_MEMORY_BYTES, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        restore.append(lambda: resource.setrlimit(resource.RLIMIT_AS, (soft, hard)))
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGALRM) == signal.SIG_DFL:
        def timeout(signum, frame):
            raise _TemplateTimeout

        signal.signal(signal.SIGALRM, timeout)
        signal.setitimer(signal.ITIMER_REAL, TEMPLATE_SECONDS)
        restore.append(lambda: (signal.setitimer(signal.ITIMER_REAL, 0), signal.signal(signal.SIGALRM, signal.SIG_DFL)))
    try:
        try:
            yield
        finally:
            for undo in reversed(restore):
                undo()
    except MemoryError:
        raise CheckpointError(f"the chat template needs more than {TEMPLATE_MEMORY_BYTES >> 20} MB of memory; "
                              "the template is broken or hostile") from None
    except _TemplateTimeout:
        raise CheckpointError(f"the chat template ran for more than {TEMPLATE_SECONDS:g} s; "
                              "the template is broken or hostile") from None


def _sized(x: Any) -> int:
    return len(x) if isinstance(x, (str, list, tuple)) else 0


def _check_sizes(args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """A width or count argument past the cap (``center(10**9)``, ``slice(10**9)``) is refused."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_RENDERED_CHARS:
            raise CheckpointError(f"the chat template asked for a width or count of {a:,}, past the cap of "
                                  f"{MAX_RENDERED_CHARS:,}; the template is broken or hostile")


_PRINTF_WIDTH = re.compile(r"%[-#0 +]*(?:\((?:[^)]*)\))?[-#0 +]*(\d*)(?:\.(\d*))?")


def _check_printf(fmt: Any) -> None:
    """``'%999999999d'|format(1)``: a printf width or precision past the cap is refused."""
    if isinstance(fmt, str):
        for m in _PRINTF_WIDTH.finditer(fmt):
            _check_sizes([int(g) for g in m.groups() if g], {})


def _capped_format(f: Any) -> Any:
    """The ``format`` filter with its printf widths checked too."""

    @functools.wraps(f)
    def capped(value, *args, **kwargs):
        _check_printf(value)
        return f(value, *args, **kwargs)

    return capped


def _capped_filter(f: Any) -> Any:
    """A jinja2 filter whose arguments (not the filtered value) pass :func:`_check_sizes`."""
    skip = 2 if getattr(f, "jinja_pass_arg", None) else 1  # (context/environment,) value, arguments...

    @functools.wraps(f)
    def capped(*args, **kwargs):
        _check_sizes(args[skip:], kwargs)
        return f(*args, **kwargs)

    return capped


def _render_env():
    """jinja2's immutable sandbox (as transformers renders chat templates), with size caps."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError, safe_range
    from jinja2.utils import Namespace

    class CappedEnvironment(ImmutableSandboxedEnvironment):
        """Refuses ``'a' * 10**9``-style amplification before it allocates; no compile-time folding of these."""

        intercepted_binops = frozenset({"*", "+", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*" and isinstance(right, int) and _sized(left) * right > MAX_RENDERED_CHARS:
                raise _too_big("a value")
            if operator == "*" and isinstance(left, int) and _sized(right) * left > MAX_RENDERED_CHARS:
                raise _too_big("a value")
            if operator == "+" and _sized(left) + _sized(right) > MAX_RENDERED_CHARS:
                raise _too_big("a value")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 4096:
                raise SecurityError(f"exponent {right} is too large")
            return super().call_binop(context, operator, left, right)

        def call(self, context, obj, /, *args, **kwargs):
            _check_sizes(args, kwargs)  # 'a'.center(10**9), 'a'.ljust(...), range(...)
            return super().call(context, obj, *args, **kwargs)

    class CappedNamespace(Namespace):
        """``namespace()`` whose values cannot grow past the cap (the one mutable state a template has)."""

        def __setitem__(self, name, value):
            if _sized(value) > MAX_RENDERED_CHARS:
                raise _too_big("a namespace value")
            super().__setitem__(name, value)

    ranged = [0]

    def budget_range(*args):
        r = safe_range(*args)
        ranged[0] += len(r)
        if ranged[0] > TEMPLATE_RANGE_BUDGET:
            raise SecurityError(f"the template loops more than {TEMPLATE_RANGE_BUDGET:,} times")
        return r

    def raise_exception(message):
        raise GenerationError(f"the chat template refused the messages: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = CappedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _capped_filter(f) for name, f in env.filters.items()}
    env.filters["format"] = _capped_format(env.filters["format"])
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=CappedNamespace,
                       range=budget_range)
    env.reset_range_budget = lambda: ranged.__setitem__(0, 0)
    return env


def _check_text(value: Any, where: str) -> None:
    """Messages must be text that UTF-8 can encode (a non-UTF-8 argument arrives with lone surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise GenerationError(f"{where} is not valid UTF-8 text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_text(v, f"{where}[{i}]")


@contextmanager
def _template_errors() -> Iterator[None]:
    """A template's own failures (syntax, ``raise_exception``, the sandbox, the caps) as one llmarch error."""
    from jinja2 import TemplateError, TemplateSyntaxError
    from jinja2.sandbox import SecurityError

    try:
        with _template_limits():
            yield
    except LlmarchError:
        raise
    except TemplateSyntaxError as e:
        raise CheckpointError(f"the model's chat template is invalid (line {e.lineno}): {e}") from None
    except (TemplateError, SecurityError, TypeError, ValueError, AttributeError, LookupError, ArithmeticError,
            RecursionError) as e:
        raise CheckpointError(f"the model's chat template failed: {type(e).__name__}: {e}") from None


class ChatTemplate:
    """A chat template compiled in the capped sandbox of :func:`_render_env`; :meth:`render` keeps the caps."""

    def __init__(self, source: str):
        self._env = _render_env()
        with _template_errors():
            self._compiled = self._env.from_string(source)

    def render(self, messages: Sequence[dict[str, Any]], **context: Any) -> str:
        _check_text(list(messages), "message")
        _check_text(context, "chat template argument")
        self._env.reset_range_budget()
        out: list[str] = []
        size = 0
        with _template_errors():
            for piece in self._compiled.generate(messages=list(messages), **context):
                size += len(piece)
                if size > MAX_RENDERED_CHARS:
                    raise _too_big("a prompt")
                out.append(piece)
        return "".join(out)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus BOS/EOS handling, chat templates and streaming decode."""

    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.unk_token = unk_token
        self.pad_token = pad_token
        self.add_bos_token = bool(add_bos_token and bos_token is not None)
        self.add_eos_token = bool(add_eos_token and eos_token is not None)
        self.chat_template = chat_template
        self._template = None

        eos_ids = set(int(i) for i in extra_eos_token_ids)
        if self.eos_token_id is not None:
            eos_ids.add(self.eos_token_id)
        if chat_template:
            for tok in _END_OF_TURN_TOKENS:
                tid = backend.token_to_id(tok)
                if tid is not None and tok in chat_template:
                    eos_ids.add(tid)
        self.eos_token_ids: set[int] = eos_ids

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load an HF tokenizer from a directory (or a ``tokenizer.json`` inside one)."""
        from tokenizers import Tokenizer as _Backend

        path = Path(path)
        if path.is_dir():
            directory, tok_file = path, path / "tokenizer.json"
        else:
            directory, tok_file = path.parent, path
        if not tok_file.is_file():
            raise CheckpointError(f"no tokenizer.json found at {tok_file}")
        try:
            backend = _Backend.from_file(str(tok_file))
        except Exception as exc:
            raise CheckpointError(f"cannot read tokenizer {tok_file}: {exc}") from exc

        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
            f = directory / name
            if f.is_file():
                config.update(read_json_object(f, name))

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            if not all(isinstance(t, dict) for t in template):
                raise CheckpointError(f"chat_template in {directory} must be text or a list of "
                                      "{\"name\": ..., \"template\": ...} objects")
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"chat_template in {directory} must be text, got {type(template).__name__}")
        jinja_file = directory / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")

        bos = _token_text(config.get("bos_token"))
        eos = _token_text(config.get("eos_token"))

        def adds_at(position: int, token: str | None) -> bool:
            tid = backend.token_to_id(token) if token else None
            if tid is None:
                return False
            with_special = backend.encode("a", add_special_tokens=True).ids
            plain = backend.encode("a", add_special_tokens=False).ids
            return len(with_special) > len(plain) and with_special[position] == tid

        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = adds_at(0, bos)
        add_eos = config.get("add_eos_token")
        if add_eos is None:
            add_eos = adds_at(-1, eos)

        extra_eos: list[int] = []
        gen = directory / "generation_config.json"
        if gen.is_file():
            ids = read_json_object(gen, gen.name).get("eos_token_id")
            if ids is not None:
                extra_eos = list(ids) if isinstance(ids, list) else [ids]

        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            unk_token=_token_text(config.get("unk_token")),
            pad_token=_token_text(config.get("pad_token")),
            add_bos_token=bool(add_bos),
            add_eos_token=bool(add_eos),
            chat_template=template,
            extra_eos_token_ids=extra_eos,
        )

    @classmethod
    def from_gguf(cls, source: Any, quirks: TokenizerQuirks | None = None) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's metadata.

        ``source`` is a path or an opened :class:`~llmarch.checkpoints.gguf.GGUFFile` (whose
        metadata is then not parsed again); ``quirks`` default to those of the file's family.
        Built once, then read from the cache (:mod:`llmarch.checkpoints.cache`).
        """
        from .cache import cached_tokenizer
        from .gguf import GGUFFile

        ckpt = source if isinstance(source, GGUFFile) else GGUFFile(source)
        if quirks is None:
            from ..families import tokenizer_quirks

            quirks = tokenizer_quirks(ckpt.architecture)
        return cached_tokenizer(cls, ckpt, quirks, lambda: cls._build_from_gguf(ckpt, quirks))

    @classmethod
    def _build_from_gguf(cls, ckpt: Any, quirks: TokenizerQuirks) -> Tokenizer:
        meta = ckpt.metadata
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise CheckpointError(f"GGUF file {ckpt.path} has no tokenizer metadata")
        tokens = list(tokens)
        types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))

        kind = quirks.models.get(model)
        if kind == SENTENCEPIECE:
            backend, tokens_as_spelled = _build_spm(quirks, tokens, meta)
        elif kind == BYTE_LEVEL:
            backend, tokens_as_spelled = _build_byte_level(quirks, tokens, meta)
        else:
            raise CheckpointError(
                f"unsupported GGUF tokenizer model {model!r} in {ckpt.path} (supported: {', '.join(quirks.models)})"
            )
        _add_special_tokens(backend, tokens, types, byte_level=(kind == BYTE_LEVEL),
                            vocab=set(tokens_as_spelled))

        def tok(kind: str) -> str | None:
            tid = meta.get(f"tokenizer.ggml.{kind}_token_id")
            return tokens[int(tid)] if tid is not None and 0 <= int(tid) < len(tokens) else None

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = kind == SENTENCEPIECE  # llama.cpp's default for SentencePiece vocabularies
        template = meta.get("tokenizer.chat_template")
        if template is None:
            template = quirks.chat_template
        extra = [int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                 if meta.get(k) is not None]
        return cls(
            backend,
            bos_token=tok("bos"),
            eos_token=tok("eos"),
            unk_token=tok("unknown"),
            pad_token=tok("padding"),
            add_bos_token=bool(add_bos),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=template,
            extra_eos_token_ids=extra,
        )

    # ----------------------------------------------------------------- ids
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    @property
    def bos_token_id(self) -> int | None:
        return self.backend.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def eos_token_id(self) -> int | None:
        return self.backend.token_to_id(self.eos_token) if self.eos_token is not None else None

    @property
    def pad_token_id(self) -> int | None:
        return self.backend.token_to_id(self.pad_token) if self.pad_token is not None else None

    # ----------------------------------------------------------------- encode/decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the BOS (and EOS) the model expects.

        Special tokens written in the text (``<start_of_turn>``, ``<|im_start|>``) are
        always matched whole.  To encode a rendered chat template, which already starts
        with its own BOS, pass ``add_special_tokens=False``.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token:
                ids = [*ids, self.eos_token_id]
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------- chat
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the chat template (jinja2 sandbox, as transformers does, with size,
        memory and time caps); a broken template or messages that are not text are one llmarch error."""
        template = chat_template or self.chat_template
        if template is None:
            raise CheckpointError("this tokenizer has no chat template")
        if chat_template is not None or self._template is None:
            compiled = ChatTemplate(template)
            if chat_template is None:
                self._template = compiled
        else:
            compiled = self._template
        context = dict(
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            unk_token=self.unk_token,
            pad_token=self.pad_token,
        )
        context.update(kwargs)
        if tools is not None:
            context["tools"] = tools
        return compiled.render(messages, add_generation_prompt=add_generation_prompt, **context)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos_ids={sorted(self.eos_token_ids)}, add_bos={self.add_bos_token})")


class StreamDecoder:
    """Incremental detokeniser: feed ids one at a time, get printable text pieces.

    Text is only released once it is complete: a character split across byte
    tokens (byte fallback, byte-level BPE) is held back until its last byte
    arrives.  Decoding always restarts a few tokens back (from the previous
    piece's start) so that tokenizers whose decoders depend on context (leading
    ``▁`` stripping) produce the same text as a one-shot decode.

    >>> stream = tokenizer.stream_decoder()
    >>> for tid in generated: print(stream.feed(tid), end="")
    >>> print(stream.flush())
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids up to here have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def feed(self, token_ids: int | Iterable[int]) -> str:
        """Add one id (or several); return newly completed text (possibly empty)."""
        if isinstance(token_ids, int):
            self.ids.append(token_ids)
        else:
            self.ids.extend(int(i) for i in token_ids)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (incomplete characters decode as U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]

    @property
    def text(self) -> str:
        """Everything fed so far, decoded in one go."""
        return self._decode(self.ids)


# ---------------------------------------------------------------------- GGUF builders
def _build_spm(quirks: TokenizerQuirks, tokens: list[str], meta: dict[str, Any]):
    """SentencePiece-style BPE with byte fallback."""
    from tokenizers import Tokenizer as _Backend
    from tokenizers import decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    if quirks.spaces_in_vocab:
        # Multi-space tokens are stored with real spaces; the model looks them up as "▁▁...".
        spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    else:
        spelled = list(tokens)
    vocab = {t: i for i, t in enumerate(spelled)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    elif quirks.merges_by_position:
        merges = _merges_from_vocab(vocab, {t: -i for t, i in vocab.items()})
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            priority = {t: -i for t, i in vocab.items()}
        else:
            priority = dict(zip(spelled, (float(x) for x in scores)))
        merges = _merges_from_vocab(vocab, priority)

    backend = _Backend(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                           byte_fallback=True, dropout=None))
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix")
    if add_prefix is None:
        add_prefix = quirks.add_space_prefix
    decoder_steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if quirks.spaces_in_vocab and not add_prefix:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False
        )
        if add_prefix:
            decoder_steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decoder_steps)
    return backend, spelled


def _build_byte_level(quirks: TokenizerQuirks, tokens: list[str], meta: dict[str, Any]):
    """Byte-level BPE with merges."""
    from tokenizers import Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as _Backend
    from tokenizers.models import BPE

    table = _bytes_to_unicode()
    alphabet = set(table.values())
    spelled = [t if set(t) <= alphabet else "".join(table[b] for b in t.encode("utf-8"))
               for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    backend = _Backend(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                           end_of_word_suffix="", fuse_unk=False))
    split = quirks.pre_tokenizers.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:  # GPT-2's own regex
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend, spelled


def _add_special_tokens(backend, tokens: list[str], types: list[int], *, byte_level: bool,
                        vocab: set[str]) -> None:
    """Control tokens -> special added tokens; user-defined tokens -> plain added tokens."""
    from tokenizers import AddedToken

    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        # a byte-level "control" token outside the byte alphabet is a llama.cpp mislabel
        if ty == _CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    if control:
        backend.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)
