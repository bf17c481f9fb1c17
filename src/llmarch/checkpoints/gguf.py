"""Read GGUF checkpoints as if they were Hugging Face checkpoint directories.

A GGUF file (llama.cpp's format) holds metadata under llama.cpp key names and
tensors under llama.cpp tensor names, possibly block-quantised.  This module
turns one into exactly what an HF directory holds:

* :attr:`GGUFCheckpoint.hf_config` -- the ``config.json`` dict, with the field
  names real HF configs use (``rope_theta``, ``rope_scaling``, ...);
* :meth:`GGUFCheckpoint.tensors` -- ``(hf_name, tensor)`` pairs, dequantised,
  in HF naming *and* HF layout.  Two converter transforms are undone:

  - ``convert_hf_to_gguf.py`` permutes the rows of ``q_proj``/``k_proj`` of
    ``llama``-architecture models (LLaMA, Mistral) from HF's "rotate half"
    RoPE layout to llama.cpp's interleaved one; we permute them back.  Qwen2,
    Qwen3 and Gemma 3 are not permuted (llama.cpp uses NEOX-style RoPE for them).
  - For Gemma, the converter stores ``1 + w`` for every RMSNorm weight (Gemma's
    norm multiplies by ``1 + w``; llama.cpp's by ``w``); we subtract the 1.

The HF loader can therefore consume a GGUF checkpoint unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = [
    "GGUFCheckpoint",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TENSOR_TYPES",
    "dequantize",
    "is_gguf_file",
]

GGUF_MAGIC = b"GGUF"

#: GGUF ``general.architecture`` -> HF ``model_type`` (``llama`` may become ``mistral``).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
}

_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}

#: Tensor types we dequantise (all through ``gguf.quants``); tested ones first.
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# Gemma 2/3 "sandwich" norms: four per block.
_GEMMA_BLOCK_TENSORS = dict(
    _BLOCK_TENSORS,
    ffn_norm="pre_feedforward_layernorm",
    post_attention_norm="post_attention_layernorm",
    post_ffw_norm="post_feedforward_layernorm",
)

# GGUF tensors with no HF counterpart (derived data); skipped.
_IGNORED_TENSORS = {"rope_freqs.weight"}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


def _reader_class():
    """``gguf.GGUFReader`` with a fast path for metadata arrays.

    Stock ``GGUFReader`` builds two numpy views per element of every metadata
    array, which takes ~10 s for Gemma's 262k-token vocabulary.  This subclass
    parses arrays of strings with ``struct`` into memoryview slices and keeps
    numeric arrays as one numpy view, which ``ReaderField.contents()`` reads the
    same way.  Anything unusual (big-endian files, nested arrays) goes through
    the stock code.
    """
    import struct

    from gguf import GGUFReader, GGUFValueType

    class _FastReader(GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype = GGUFValueType(int(raw_itype[0]))
            count = int(alen[0])
            offs = orig_offs + 12
            parts: list[Any] = [raw_itype, alen]
            if itype == GGUFValueType.STRING:
                view = getattr(self, "_llmarch_view", None)
                if view is None:
                    view = self._llmarch_view = memoryview(self.data)
                data: list[int] = []
                unpack = struct.Struct("<Q").unpack_from
                for _ in range(count):
                    (n,) = unpack(view, offs)
                    parts.append(view[offs:offs + 8])
                    parts.append(view[offs + 8:offs + 8 + n])
                    data.append(len(parts) - 1)
                    offs += 8 + n
                if offs > len(view):
                    raise ValueError("string array extends past the end of the file")
                return offs - orig_offs, parts, data, [GGUFValueType.ARRAY, itype]
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is None:
                return super()._get_field_parts(orig_offs, raw_type)
            values = self._get(offs, nptype, count)
            if len(values) != count:
                raise ValueError("array extends past the end of the file")
            parts.append(values)
            return 12 + int(values.nbytes), parts, [2], [GGUFValueType.ARRAY, itype]

    return _FastReader


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file starting with the GGUF magic."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _type_name(qtype: Any) -> str:
    return getattr(qtype, "name", str(qtype))


def dequantize(data: np.ndarray, qtype: Any, shape: tuple[int, ...], *,
               name: str = "<tensor>", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantise raw GGUF tensor data to a torch tensor.

    ``shape`` is the tensor's shape in *numpy/torch order*, i.e. ggml's ``ne``
    reversed (ggml lists the fastest-varying dimension first).
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as _gguf_dequantize

    try:
        qtype = GGMLQuantizationType(int(qtype))
    except ValueError as exc:
        raise CheckpointError(f"tensor {name!r} has unknown GGML type id {qtype}") from exc
    try:
        array = _gguf_dequantize(np.asarray(data), qtype)
    except NotImplementedError as exc:
        raise CheckpointError(
            f"tensor {name!r} has unsupported type {qtype.name} "
            f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
        ) from exc
    array = np.ascontiguousarray(array, dtype=np.float32).reshape(shape)
    if not array.flags.writeable:  # F32 data is a view of the read-only memory map
        array = array.copy()
    tensor = torch.from_numpy(array)
    return tensor if dtype == torch.float32 else tensor.to(dtype)


def _round_f32(value: float) -> float:
    """A float32 metadata value as the short decimal a config.json would hold (1e-06, not 9.99e-07)."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's ``LlamaModel.permute`` of Q/K rows (interleaved -> rotate-half RoPE)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


class GGUFCheckpoint:
    """A GGUF file viewed as an HF checkpoint (config dict + HF-named tensors).

    >>> ckpt = GGUFCheckpoint("gemma-3-270m-q4_k_m.gguf")
    >>> ckpt.hf_config["model_type"]
    'gemma3_text'
    >>> dict(ckpt.tensors())["model.norm.weight"].shape
    torch.Size([640])
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"GGUF file not found: {self.path}")
        if not self.path.is_file():
            raise CheckpointError(f"not a GGUF file (not a regular file): {self.path}")
        with open(self.path, "rb") as fh:
            magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise CheckpointError(
                f"not a GGUF file (bad magic {magic!r}, expected {GGUF_MAGIC!r}): {self.path}"
            )

        try:
            self._reader = _reader_class()(self.path, "r")
            size = self.path.stat().st_size
            for t in self._reader.tensors:
                if t.data_offset + int(t.n_bytes) > size:
                    raise ValueError(f"tensor {t.name!r} extends past the end of the file")
        except Exception as exc:  # GGUFReader raises assorted errors on damaged files
            raise CheckpointError(
                f"truncated or corrupt GGUF file {self.path}: {type(exc).__name__}: {exc}"
            ) from exc

        self._tensors = {t.name: t for t in self._reader.tensors}
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception as exc:
                raise CheckpointError(
                    f"truncated or corrupt GGUF file {self.path}: cannot read metadata {key!r}: {exc}"
                ) from exc

        arch = self.metadata.get("general.architecture")
        if arch is None:
            raise CheckpointError(f"GGUF file {self.path} has no general.architecture metadata")
        self.architecture: str = str(arch)
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported GGUF architecture {self.architecture!r} in {self.path} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self.hf_config: dict[str, Any] = self._build_config()
        self._name_map = self._build_name_map()

    # ------------------------------------------------------------------ metadata
    def _arch(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def _require(self, key: str) -> Any:
        value = self._arch(key)
        if value is None:
            raise CheckpointError(f"GGUF file {self.path} lacks required metadata {self.architecture}.{key}")
        return value

    @property
    def model_type(self) -> str:
        return self.hf_config["model_type"]

    def _build_config(self) -> dict[str, Any]:
        arch = self.architecture
        model_type = SUPPORTED_ARCHITECTURES[arch]
        name = str(self.metadata.get("general.name", ""))
        if arch == "llama" and "mistral" in name.lower():
            model_type = "mistral"

        hidden = int(self._require("embedding_length"))
        n_head = int(self._require("attention.head_count"))
        n_kv = self._arch("attention.head_count_kv", n_head)
        if isinstance(n_kv, list):  # per-layer lists exist in some files
            n_kv = max(n_kv)
        n_kv = int(n_kv)
        head_dim = self._arch("attention.key_length") or self._arch("rope.dimension_count")
        head_dim = int(head_dim) if head_dim else hidden // n_head
        n_layers = int(self._require("block_count"))
        ctx = int(self._arch("context_length", 2048))

        tokens = self.metadata.get("tokenizer.ggml.tokens")
        vocab_size = self._arch("vocab_size")
        if vocab_size is None:
            if tokens is not None:
                vocab_size = len(tokens)
            elif "token_embd.weight" in self._tensors:
                vocab_size = int(self._tensors["token_embd.weight"].shape[1])
            else:
                raise CheckpointError(f"cannot determine vocab_size of {self.path}: no tokenizer "
                                      f"metadata and no token_embd.weight tensor")

        default_theta = 10000.0
        cfg: dict[str, Any] = {
            "architectures": [_HF_ARCHITECTURES[model_type]],
            "model_type": model_type,
            "vocab_size": int(vocab_size),
            "hidden_size": hidden,
            "intermediate_size": int(self._require("feed_forward_length")),
            "num_hidden_layers": n_layers,
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "rms_norm_eps": _round_f32(self._arch("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": _round_f32(self._arch("rope.freq_base", default_theta)),
            "rope_scaling": self._rope_scaling(),
            "max_position_embeddings": ctx,
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": self._token_id("bos"),
            "eos_token_id": self._token_id("eos"),
            "pad_token_id": self._token_id("padding"),
            "attention_dropout": 0.0,
        }

        if model_type == "gemma3_text":
            cfg["hidden_activation"] = "gelu_pytorch_tanh"
            cfg["rope_local_base_freq"] = 10000.0
            cfg["sliding_window"] = int(self._arch("attention.sliding_window", 4096))
            cfg["sliding_window_pattern"] = 6
            cfg["layer_types"] = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)
            ]
            scalar = self._arch("attention.query_pre_attn_scalar")
            cfg["query_pre_attn_scalar"] = int(scalar) if scalar else head_dim
            cfg["final_logit_softcapping"] = self._float_or_none("final_logit_softcapping")
            cfg["attn_logit_softcapping"] = self._float_or_none("attn_logit_softcapping")
            cfg["attention_bias"] = False
        else:
            cfg["hidden_act"] = "silu"
        if model_type == "qwen2":
            cfg["use_sliding_window"] = False
            cfg["sliding_window"] = ctx
            cfg["max_window_layers"] = n_layers
        elif model_type == "qwen3":
            cfg["use_sliding_window"] = False
            cfg["sliding_window"] = None
            cfg["max_window_layers"] = n_layers
            cfg["attention_bias"] = "blk.0.attn_q.bias" in self._tensors
        elif model_type in ("llama", "mistral"):
            cfg["attention_bias"] = "blk.0.attn_q.bias" in self._tensors
            cfg["mlp_bias"] = False
            if model_type == "mistral":
                window = self._arch("attention.sliding_window")
                cfg["sliding_window"] = int(window) if window else None
        return cfg

    def _float_or_none(self, key: str) -> float | None:
        value = self._arch(key)
        return _round_f32(value) if value else None

    def _token_id(self, kind: str) -> int | None:
        value = self.metadata.get(f"tokenizer.ggml.{kind}_token_id")
        return int(value) if value is not None else None

    def _rope_scaling(self) -> dict[str, Any] | None:
        kind = self._arch("rope.scaling.type")
        factor = self._arch("rope.scaling.factor")
        if not kind or kind == "none" or not factor:
            return None
        scaling: dict[str, Any] = {"rope_type": str(kind), "factor": _round_f32(factor)}
        orig = self._arch("rope.scaling.original_context_length")
        if orig:
            scaling["original_max_position_embeddings"] = int(orig)
        return scaling

    # ------------------------------------------------------------------- tensors
    @property
    def num_tensors(self) -> int:
        """Number of tensors in the file (GGUF names, including any skipped ones)."""
        return len(self._tensors)

    def gguf_tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_names(self) -> list[str]:
        """HF names of the tensors :meth:`tensors` yields, in file order."""
        return list(self._name_map.values())

    def tensor_types(self) -> dict[str, str]:
        """HF name -> GGML type name (``Q4_K``, ``F32``, ...)."""
        return {hf: _type_name(self._tensors[g].tensor_type) for g, hf in self._name_map.items()}

    def _build_name_map(self) -> dict[str, str]:
        block_map = _GEMMA_BLOCK_TENSORS if self.model_type == "gemma3_text" else _BLOCK_TENSORS
        mapping: dict[str, str] = {}
        for name in self._tensors:
            if name in _IGNORED_TENSORS:
                continue
            if m := _BLOCK_RE.match(name):
                layer, part, kind = m.groups()
                hf_part = block_map.get(part)
                if hf_part is not None:
                    mapping[name] = f"model.layers.{layer}.{hf_part}.{kind}"
                    continue
            elif m := _GLOBAL_RE.match(name):
                part, kind = m.groups()
                if part in _GLOBAL_TENSORS:
                    mapping[name] = f"{_GLOBAL_TENSORS[part]}.{kind}"
                    continue
            raise CheckpointError(
                f"GGUF tensor {name!r} in {self.path} has no known HF equivalent "
                f"for architecture {self.architecture!r}"
            )
        return mapping

    def _load(self, gguf_name: str, dtype: torch.dtype) -> torch.Tensor:
        t = self._tensors[gguf_name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensor = dequantize(t.data, t.tensor_type, shape, name=gguf_name)
        if self.model_type == "gemma3_text" and gguf_name.endswith("norm.weight"):
            tensor = tensor - 1.0
        if self.architecture == "llama":
            cfg = self.hf_config
            if ".attn_q." in gguf_name:
                tensor = _unpermute(tensor, cfg["num_attention_heads"])
            elif ".attn_k." in gguf_name:
                tensor = _unpermute(tensor, cfg["num_key_value_heads"])
        return tensor if dtype == torch.float32 else tensor.to(dtype)

    def get_tensor(self, hf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor by HF name, dequantised and in HF layout."""
        for gguf_name, name in self._name_map.items():
            if name == hf_name:
                return self._load(gguf_name, dtype)
        raise KeyError(hf_name)

    def tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, tensor)`` for every tensor, dequantised to ``dtype``, in HF layout.

        ``lm_head.weight`` is only yielded when the file has an ``output.weight``
        (otherwise ``hf_config["tie_word_embeddings"]`` is true).
        """
        for gguf_name, hf_name in self._name_map.items():
            yield hf_name, self._load(gguf_name, dtype)

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return dict(self.tensors(dtype))

    def __repr__(self) -> str:
        return (f"GGUFCheckpoint({str(self.path)!r}, architecture={self.architecture!r}, "
                f"tensors={self.num_tensors})")
