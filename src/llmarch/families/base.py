"""What a family file provides, and the helpers they share.

A family file (``llama.py``, ``gemma3.py``, ...) holds everything llmarch knows about one
architecture family, for every checkpoint format, and nothing else needs to know it:

* ``PRESETS``: the published configurations, by name;
* ``model_types``: the Hugging Face ``model_type`` names it reads, including the multimodal
  wrapper types (``gemma3``, ``mistral3``, ``llama4``, ``gemma3n``) whose text decoder it loads;
* ``from_hf`` / ``to_hf``: ``config.json`` -> :class:`ModelConfig` and back;
* ``gguf_architectures`` + ``from_gguf``: the GGUF ``general.architecture`` names it reads and
  their metadata -> ``config.json`` translation; ``gguf_keys``: GGUF tensor names -> HF names;
* ``keys``: the HF <-> llmarch tensor-name map;
* ``sanitize(tensors, cfg, fmt)``: all checkpoint surgery on the ``(name, tensor)`` stream of an
  ``fmt`` (:data:`HF` or :data:`GGUF`) checkpoint, yielding llmarch names: key renames, GGUF
  layout fixes, FP8 dequantisation, stacking experts, dropping multimodal towers, skipping
  extra layers. Left out, it is :meth:`Family.rename` (GGUF names, then HF names);
* ``save_transform``: the reverse of ``sanitize`` for export, where renaming is not enough;
* ``tokenizer``: a :class:`TokenizerQuirks`, what its GGUF files leave unsaid about the tokenizer.

Adding an architecture = one family file (plus registering its ``FAMILY`` in
``families/__init__.py``) and any new :class:`ModelConfig` fields it needs.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..checkpoints.gguf import GGUFFile
from ..errors import CheckpointError, ConfigError
from ..model.config import CHUNKED, FULL, SLIDING, ModelConfig, RopeConfig

#: tokenizer kinds a ``tokenizer.ggml.model`` name can stand for
SENTENCEPIECE, BYTE_LEVEL = "sentencepiece", "byte_level"


@dataclass(frozen=True)
class TokenizerQuirks:
    """What a GGUF file leaves unsaid about its tokenizer; each family says it for its files."""

    #: ``tokenizer.ggml.model`` -> SENTENCEPIECE or BYTE_LEVEL (llama.cpp names each kind after a model)
    models: Mapping[str, str] = field(default_factory=dict)
    #: ``tokenizer.ggml.pre`` -> the regex that splits text before byte-level BPE
    pre_tokenizers: Mapping[str, str] = field(default_factory=dict)
    #: multi-space tokens are stored with real spaces (and text is split on spaces, not Metaspace)
    spaces_in_vocab: bool = False
    #: SentencePiece scores do not follow the merge order; the position in the vocabulary does
    merges_by_position: bool = False
    #: a dummy prefix space, when ``tokenizer.ggml.add_space_prefix`` is absent
    add_space_prefix: bool = True
    #: the chat template, when the file carries no ``tokenizer.chat_template``
    chat_template: str | None = None

    def merged(self, others: Iterable[TokenizerQuirks]) -> TokenizerQuirks:
        """These quirks with every family's tokenizer-kind and pre-tokenizer names (they are global names)."""
        models, pre = dict(self.models), dict(self.pre_tokenizers)
        for q in others:
            models.update(q.models)
            pre.update(q.pre_tokenizers)
        return replace(self, models=models, pre_tokenizers=pre)



HF_LAYER_TYPES = {"full_attention": FULL, "sliding_attention": SLIDING, "chunked_attention": CHUNKED}
NATIVE_TO_HF_LAYER_TYPES = {v: k for k, v in HF_LAYER_TYPES.items()}

#: checkpoint formats a ``sanitize`` hook is given
HF, GGUF = "hf", "gguf"

Stream = Iterator[tuple[str, torch.Tensor]]


class KeyMap:
    """Bidirectional rename between HF tensor names and llmarch names.

    Entries are prefix pairs; ``{i}`` stands for a layer index. The longest matching prefix
    wins, so ``model.layers.{i}.self_attn.`` and ``model.layers.{i}.`` can coexist.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]]):
        self.pairs = list(pairs)
        self._fwd = [self._compile(h, n) for h, n in self.pairs]
        self._bwd = [self._compile(n, h) for h, n in self.pairs]
        self._fwd.sort(key=lambda e: -len(e[2]))
        self._bwd.sort(key=lambda e: -len(e[2]))

    @staticmethod
    def _compile(src: str, dst: str):
        rx = re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "(.*)$")
        return rx, dst, src

    @staticmethod
    def _apply(table, name: str) -> str | None:
        for rx, dst, _ in table:
            m = rx.match(name)
            if m:
                groups = m.groups()
                out = dst.replace("{i}", groups[0]) if "{i}" in dst else dst
                return out + groups[-1]
        return None

    def to_native(self, hf_name: str) -> str | None:
        return self._apply(self._fwd, hf_name)

    def to_hf(self, native_name: str) -> str | None:
        return self._apply(self._bwd, native_name)

    def updated(self, pairs: Iterable[tuple[str, str]]) -> KeyMap:
        """This map with the entries for the given source prefixes replaced or added."""
        table = dict(self.pairs)
        table.update(pairs)
        return KeyMap(table.items())


LLAMA_KEYS = KeyMap(
    [
        ("model.embed_tokens.", "embed."),
        ("model.layers.{i}.input_layernorm.", "layers.{i}.attn_norm."),
        ("model.layers.{i}.self_attn.", "layers.{i}.attn."),
        ("model.layers.{i}.post_attention_layernorm.", "layers.{i}.mlp_norm."),
        ("model.layers.{i}.mlp.", "layers.{i}.mlp."),
        ("model.norm.", "norm."),
        ("lm_head.", "lm_head."),
    ]
)

#: llama.cpp's tensor names -> HF names of a Llama-style decoder (``.weight`` / ``.bias`` follow)
GGUF_KEYS = KeyMap(
    [
        ("token_embd.", "model.embed_tokens."),
        ("output_norm.", "model.norm."),
        ("output.", "lm_head."),
        ("blk.{i}.attn_q.", "model.layers.{i}.self_attn.q_proj."),
        ("blk.{i}.attn_k.", "model.layers.{i}.self_attn.k_proj."),
        ("blk.{i}.attn_v.", "model.layers.{i}.self_attn.v_proj."),
        ("blk.{i}.attn_output.", "model.layers.{i}.self_attn.o_proj."),
        ("blk.{i}.attn_q_norm.", "model.layers.{i}.self_attn.q_norm."),
        ("blk.{i}.attn_k_norm.", "model.layers.{i}.self_attn.k_norm."),
        ("blk.{i}.ffn_gate.", "model.layers.{i}.mlp.gate_proj."),
        ("blk.{i}.ffn_up.", "model.layers.{i}.mlp.up_proj."),
        ("blk.{i}.ffn_down.", "model.layers.{i}.mlp.down_proj."),
        ("blk.{i}.attn_norm.", "model.layers.{i}.input_layernorm."),
        ("blk.{i}.ffn_norm.", "model.layers.{i}.post_attention_layernorm."),
    ]
)
#: GGUF tensors with no HF counterpart (derived data, e.g. Llama 3's RoPE frequencies); skipped
GGUF_DERIVED = frozenset({"rope_freqs.weight"})
_GGUF_PARAM = re.compile(r"\.(weight|bias)$")


def gguf_to_hf_name(keys: KeyMap, gguf_name: str, where: str = "") -> str | None:
    """The HF name of a GGUF tensor; None for a derived one; a CheckpointError when unknown."""
    if gguf_name in GGUF_DERIVED:
        return None
    hf = keys.to_native(gguf_name) if _GGUF_PARAM.search(gguf_name) else None
    if hf is None:
        raise CheckpointError(f"GGUF tensor {gguf_name!r}{where} has no known HF equivalent")
    return hf


def rename_gguf(tensors: Stream, keys: KeyMap) -> Stream:
    """GGUF-named tensors -> HF-named ones (layout unchanged), derived tensors skipped."""
    for name, t in tensors:
        hf = gguf_to_hf_name(keys, name)
        if hf is not None:
            yield hf, t


def rename(tensors: Stream, keys: KeyMap, family: str) -> Stream:
    """HF-named tensors -> llmarch names, strictly: a name the key map lacks is an error."""
    for name, t in tensors:
        native = keys.to_native(name)
        if native is None:
            raise CheckpointError(f"unexpected tensor {name!r} in a {family} checkpoint: no llmarch parameter maps to it")
        yield native, t


def drop(tensors: Stream, pattern: str) -> Stream:
    """Skip tensors whose name matches ``pattern`` (buffers saved beside the parameters)."""
    rx = re.compile(pattern)
    return ((name, t) for name, t in tensors if not rx.search(name))


# Multimodal checkpoints keep the text decoder under language_model. (hub format) or
# model.language_model. (transformers 5); these rewrite its names to the text model's.
_TEXT_RENAME = [
    (re.compile(r"^language_model\.model\."), "model."),
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
]


def text_only(tensors: Stream, towers: tuple[str, ...]) -> Stream:
    """A multimodal checkpoint's text decoder: ``towers`` (vision/audio modules) dropped with a warning."""
    tower = re.compile(r"^(model\.)?(" + "|".join(map(re.escape, towers)) + r")\.")
    dropped = 0
    for name, t in tensors:
        if tower.search(name):
            dropped += 1
            continue
        for rx, rep in _TEXT_RENAME:
            name, n = rx.subn(rep, name)
            if n:
                break
        yield name, t
    if dropped:
        warnings.warn(f"dropped {dropped} non-text tensors (vision tower / projector); loaded the text decoder only")


def unwrap_text_config(d: dict[str, Any], wrapper: str, text_model_type: str) -> dict[str, Any]:
    """The text decoder's config of a multimodal ``config.json`` (model_type ``wrapper``); others unchanged."""
    if d.get("model_type") != wrapper:
        return d
    text = dict(d.get("text_config") or {})
    if not text:
        raise ConfigError(f"config.json of model_type {wrapper!r} has no text_config")
    if text.get("model_type", wrapper) == wrapper:
        text["model_type"] = text_model_type
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if text.get(k) is None and d.get(k) is not None:
            text[k] = d[k]
    return text


Sanitize = Callable[[Stream, ModelConfig, str], Stream]


@dataclass
class Family:
    """One architecture family: presets, config translation (HF, GGUF), checkpoint surgery, tokenizer quirks."""

    name: str
    model_types: tuple[str, ...]
    presets: dict[str, Callable[[], ModelConfig]]
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    keys: KeyMap = LLAMA_KEYS
    # (checkpoint-named tensors, config, HF or GGUF) -> llmarch-named tensors; None: self.rename
    sanitize: Sanitize | None = None
    # optional export transform: native state dict -> HF state dict
    save_transform: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]] | None = None
    # GGUF: the general.architecture names this family reads, their metadata -> config.json dict,
    # and llama.cpp tensor names -> HF names (for files of this family's model types)
    gguf_architectures: tuple[str, ...] = ()
    from_gguf: Callable[[GGUFFile], dict[str, Any]] | None = None
    gguf_keys: KeyMap | None = None
    tokenizer: TokenizerQuirks = field(default_factory=TokenizerQuirks)
    notes: list[str] = field(default_factory=list)

    def rename(self, tensors: Stream, cfg: ModelConfig, fmt: str = HF) -> Stream:
        """The plain checkpoint: GGUF names to HF names (for a GGUF file), HF names to llmarch names."""
        if fmt == GGUF:
            tensors = rename_gguf(tensors, self.gguf_keys)
        return rename(tensors, self.keys, self.name)

    def to_native(self, tensors: Stream, cfg: ModelConfig, fmt: str = HF) -> Stream:
        """A checkpoint's ``(name, tensor)`` stream in llmarch names, through the family's ``sanitize``."""
        return (self.sanitize or self.rename)(tensors, cfg, fmt)

    def native_to_hf(self, state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        if self.save_transform is not None:
            return self.save_transform(state, cfg)
        out = {}
        for k, v in state.items():
            hf = self.keys.to_hf(k)
            if hf is None:
                raise CheckpointError(f"llmarch parameter {k!r} has no {self.name} checkpoint name")
            out[hf] = v
        return out


# ----------------------------------------------------------------------------------------
# config.json helpers shared by the families
# ----------------------------------------------------------------------------------------


def _scaling_from(params: dict[str, Any] | None) -> dict[str, Any] | None:
    if not params:
        return None
    if not isinstance(params, dict):
        raise ConfigError(f"rope_scaling / rope_parameters must be an object, got {params!r}")
    s = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    s["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if s["rope_type"] == "default" and set(s) <= {"rope_type", "partial_rotary_factor"}:
        return None
    return s


def parse_rope(d: dict[str, Any], default_theta: float = 10000.0) -> tuple[RopeConfig, RopeConfig | None]:
    """(global RoPE, local RoPE or None) from either config.json style.

    Hugging Face checkpoints write ``rope_theta`` + ``rope_scaling`` (+ Gemma 3's
    ``rope_local_base_freq``); transformers 5 writes ``rope_parameters``, flat or keyed by
    layer type.
    """
    rp = d.get("rope_parameters")
    if rp and not isinstance(rp, dict):
        raise ConfigError(f"rope_parameters must be an object, got {rp!r}")
    if rp:
        if "full_attention" in rp or "sliding_attention" in rp or "chunked_attention" in rp:
            full = rp.get("full_attention") or rp.get("chunked_attention") or {}
            glob = RopeConfig(as_float(full.get("rope_theta", default_theta), "rope_theta"), _scaling_from(full))
            local = None
            if "sliding_attention" in rp:
                sl = rp["sliding_attention"]
                local = RopeConfig(as_float(sl.get("rope_theta", default_theta), "rope_theta"), _scaling_from(sl))
            return glob, local
        theta = rp.get("rope_theta", d.get("rope_theta", default_theta))
        return RopeConfig(as_float(theta, "rope_theta"), _scaling_from(rp)), None
    glob = RopeConfig(as_float(d.get("rope_theta", default_theta), "rope_theta"), _scaling_from(d.get("rope_scaling")))
    local = None
    if d.get("rope_local_base_freq") is not None:
        local = RopeConfig(as_float(d["rope_local_base_freq"], "rope_local_base_freq"), None)
    return glob, local


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_theta": rope.theta}
    out["rope_scaling"] = dict(rope.scaling) if rope.scaling else None
    return out


def parse_layer_types(d: dict[str, Any], n: int, default: str = FULL) -> list[str]:
    lt = d.get("layer_types")
    if lt:
        try:
            return [HF_LAYER_TYPES[t] for t in lt]
        except KeyError as e:
            raise ConfigError(f"unsupported layer type {e.args[0]!r} in layer_types; expected one of {sorted(HF_LAYER_TYPES)}") from None
    return [default] * n


def layer_types_to_hf(cfg: ModelConfig) -> list[str]:
    return [NATIVE_TO_HF_LAYER_TYPES[t] for t in cfg.layer_types]


def require(d: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise ConfigError(f"config.json (model_type {d.get('model_type')!r}) lacks required field(s): {', '.join(missing)}")


#: the most layers a configuration may declare (the largest published models have about 130)
MAX_LAYERS = 10_000
#: the largest size (width, vocabulary, context) a configuration may declare
MAX_SIZE = 1 << 31


def as_int(value: Any, field: str, maximum: int = MAX_SIZE, minimum: int = -MAX_SIZE) -> int:
    """A configuration integer, strictly: ``64`` or ``64.0``, never ``64.5``, ``"64"`` or ``true``."""
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer())
    if isinstance(value, bool) or not integral:
        raise ConfigError(f"{field} must be an integer, got {value!r}")
    if not minimum <= int(value) <= maximum:
        raise ConfigError(f"{field} = {int(value)} is out of range (expected {minimum} to {maximum})")
    return int(value)


def as_float(value: Any, field: str) -> float:
    """A configuration number, strictly: finite, and a number (not a string or a boolean)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{field} must be a finite number, got {value!r}")
    return float(value)


#: Hugging Face ``hidden_act`` names -> llmarch activations
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "relu": "relu"}


def activation_from_hf(d: dict[str, Any], default: str = "silu") -> str:
    """The FFN activation of ``hidden_activation`` / ``hidden_act`` (``default`` when absent)."""
    act = d.get("hidden_activation") or d.get("hidden_act") or default
    if act not in HF_ACTIVATIONS:
        raise ConfigError(f"unsupported hidden_act {act!r} in config.json; expected one of {', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[act]


def common_from_hf(d: dict[str, Any], tie_default: bool = False) -> dict[str, Any]:
    """ModelConfig fields that every decoder-only HF config spells the same way, strictly typed."""
    require(d, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    heads = as_int(d["num_attention_heads"], "num_attention_heads")
    hidden = as_int(d["hidden_size"], "hidden_size")
    glob, local = parse_rope(d)
    return dict(
        vocab_size=as_int(d["vocab_size"], "vocab_size"),
        hidden_size=hidden,
        num_layers=as_int(d["num_hidden_layers"], "num_hidden_layers", MAX_LAYERS),
        num_heads=heads,
        num_kv_heads=as_int(d.get("num_key_value_heads") or heads, "num_key_value_heads"),
        head_dim=as_int(d.get("head_dim") or (hidden // heads if heads > 0 else 0), "head_dim"),
        intermediate_size=as_int(d["intermediate_size"], "intermediate_size"),
        max_position_embeddings=as_int(d.get("max_position_embeddings") or 4096, "max_position_embeddings"),
        norm_eps=as_float(d.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        tie_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
        rope=glob,
        rope_local=local,
        activation=activation_from_hf(d),
        qkv_bias=bool(d.get("attention_bias", False)),
        attn_out_bias=bool(d.get("attention_bias", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
        hf_model_type=d.get("model_type"),
    )


def common_to_hf(cfg: ModelConfig, model_type: str, architectures: str) -> dict[str, Any]:
    d: dict[str, Any] = dict(
        model_type=model_type,
        architectures=[architectures],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    if cfg.position == "rope":
        d.update(rope_to_hf(cfg.rope))
    return d


def check_exportable(cfg: ModelConfig, family: str, **expected: Any) -> None:
    """Refuse to export a config whose fields the target HF architecture cannot express."""
    for fname, want in expected.items():
        have = getattr(cfg, fname)
        if have != want:
            raise ConfigError(
                f"cannot export as {family}: {fname} = {have!r}, but {family} checkpoints require {want!r}"
            )



# ----------------------------------------------------------------------------------------
# GGUF metadata helpers shared by the families
# ----------------------------------------------------------------------------------------


def gguf_config(f: GGUFFile, model_type: str, architecture: str) -> dict[str, Any]:
    """The ``config.json`` fields every llama.cpp architecture writes under the same metadata keys."""
    hidden = as_int(f.require("embedding_length"), "embedding_length", minimum=1)
    n_head = as_int(f.require("attention.head_count"), "attention.head_count", minimum=1)
    n_kv = f.value("attention.head_count_kv", n_head)
    if isinstance(n_kv, list):  # per-layer lists exist in some files
        n_kv = max(n_kv)
    head_dim = f.value("attention.key_length") or f.value("rope.dimension_count")
    vocab_size = f.value("vocab_size")
    if vocab_size is None:
        n_tokens = f.metadata.array_length("tokenizer.ggml.tokens")  # the vocabulary is not decoded
        if n_tokens is not None:
            vocab_size = n_tokens
        elif f.has_tensor("token_embd.weight"):
            vocab_size = f.tensor_shape("token_embd.weight")[0]
        else:
            raise CheckpointError(f"cannot determine vocab_size of {f.path}: no tokenizer "
                                  f"metadata and no token_embd.weight tensor")
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": as_int(f.require("feed_forward_length"), "feed_forward_length"),
        "num_hidden_layers": as_int(f.require("block_count"), "block_count", MAX_LAYERS),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(n_kv),
        "head_dim": int(head_dim) if head_dim else hidden // n_head,
        "rms_norm_eps": f.float_value("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": f.float_value("rope.freq_base", 10000.0),
        "rope_scaling": _gguf_rope_scaling(f),
        "max_position_embeddings": as_int(f.value("context_length", 2048), "context_length", minimum=1),
        "tie_word_embeddings": not f.has_tensor("output.weight"),
        "bos_token_id": f.token_id("bos"),
        "eos_token_id": f.token_id("eos"),
        "pad_token_id": f.token_id("padding"),
        "attention_dropout": 0.0,
    }


def _gguf_rope_scaling(f: GGUFFile) -> dict[str, Any] | None:
    kind = f.value("rope.scaling.type")
    factor = f.float_value("rope.scaling.factor")
    if not kind or kind == "none" or not factor:
        return None
    scaling: dict[str, Any] = {"rope_type": str(kind), "factor": factor}
    orig = f.value("rope.scaling.original_context_length")
    if orig:
        scaling["original_max_position_embeddings"] = int(orig)
    return scaling
