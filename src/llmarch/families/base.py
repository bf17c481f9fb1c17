"""What a family file provides, and the helpers they share.

A family (``llama.py``, ``gemma3.py``, ...) is data: the Hugging Face ``model_type`` names it
reads, its presets, the translation of ``config.json`` to a :class:`ModelConfig` and back, and
the key map between Hugging Face tensor names and llmarch's module tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from ..errors import CheckpointError, ConfigError
from ..model.config import CHUNKED, FULL, SLIDING, ModelConfig, RopeConfig

HF_LAYER_TYPES = {"full_attention": FULL, "sliding_attention": SLIDING, "chunked_attention": CHUNKED}
NATIVE_TO_HF_LAYER_TYPES = {v: k for k, v in HF_LAYER_TYPES.items()}


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


@dataclass
class Family:
    """One architecture family: presets, config translation and checkpoint key map."""

    name: str
    model_types: tuple[str, ...]
    presets: dict[str, Callable[[], ModelConfig]]
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    keys: KeyMap = LLAMA_KEYS
    # HF tensors that are not parameters (old GPT-2 attention-mask buffers...) and are skipped
    ignore: tuple[str, ...] = ()
    # optional tensor transforms: (hf_name, tensor) -> [(native_name, tensor)]
    load_transform: Callable[[str, torch.Tensor, ModelConfig], list[tuple[str, torch.Tensor]] | None] | None = None
    # optional export transform: native state dict -> HF state dict
    save_transform: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]] | None = None
    notes: list[str] = field(default_factory=list)
    # optional checkpoint surgery on the whole (hf_name, tensor) stream, before renaming:
    # FP8 dequantisation, stacking per-expert tensors, skipping extra layers
    prepare: Callable[[Iterator[tuple[str, torch.Tensor]], ModelConfig], Iterator[tuple[str, torch.Tensor]]] | None = None

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.search(p, hf_name) for p in self.ignore)

    def hf_to_native(self, hf_name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
        if self.load_transform is not None:
            out = self.load_transform(hf_name, tensor, cfg)
            if out is not None:
                return out
        native = self.keys.to_native(hf_name)
        if native is None:
            raise CheckpointError(f"unexpected tensor {hf_name!r} in a {self.name} checkpoint: no llmarch parameter maps to it")
        return [(native, tensor)]

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
    if rp:
        if "full_attention" in rp or "sliding_attention" in rp or "chunked_attention" in rp:
            full = rp.get("full_attention") or rp.get("chunked_attention") or {}
            glob = RopeConfig(float(full.get("rope_theta", default_theta)), _scaling_from(full))
            local = None
            if "sliding_attention" in rp:
                sl = rp["sliding_attention"]
                local = RopeConfig(float(sl.get("rope_theta", default_theta)), _scaling_from(sl))
            return glob, local
        return RopeConfig(float(rp.get("rope_theta", d.get("rope_theta", default_theta))), _scaling_from(rp)), None
    glob = RopeConfig(float(d.get("rope_theta", default_theta)), _scaling_from(d.get("rope_scaling")))
    local = None
    if d.get("rope_local_base_freq") is not None:
        local = RopeConfig(float(d["rope_local_base_freq"]), None)
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


def common_from_hf(d: dict[str, Any], tie_default: bool = False) -> dict[str, Any]:
    """ModelConfig fields that every decoder-only HF config spells the same way."""
    require(d, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    heads = int(d["num_attention_heads"])
    n = int(d["num_hidden_layers"])
    glob, local = parse_rope(d)
    return dict(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        num_layers=n,
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
        intermediate_size=int(d["intermediate_size"]),
        max_position_embeddings=int(d.get("max_position_embeddings") or 4096),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
        rope=glob,
        rope_local=local,
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

