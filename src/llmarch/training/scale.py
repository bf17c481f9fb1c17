"""The scale-down rule and the model configuration a run trains.

:func:`scale_config` shrinks a published configuration to ``tiny`` or ``small`` while keeping
what distinguishes it (GQA group ratio, head_dim / hidden ratio, FFN ratio, norm placement,
QK-norm, the per-layer window and NoPE schedules, tied head, MoE shape);
:func:`parse_overrides` / :func:`apply_overrides` apply ``--set FIELD=VALUE``;
:func:`resolve_model_config` turns a preset name or config.json into the configuration a run
trains, and :func:`check_trainable` refuses shapes that do not fit the training context.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..model.config import SLIDING, ModelConfig

SCALES = {
    # hidden width, query heads, minimum depth (raised to one full period of the layer schedules)
    "tiny": dict(hidden_size=64, num_heads=4, num_layers=2),
    "small": dict(hidden_size=256, num_heads=8, num_layers=6),
}


def _period(seq: list) -> int:
    """Length of the shortest prefix whose repetition gives ``seq`` (its schedule period)."""
    n = len(seq)
    for p in range(1, n + 1):
        if all(seq[i] == seq[i % p] for i in range(n)):
            return p
    return n


def _schedule(seq: list, n: int) -> list:
    return [seq[i % _period(seq)] for i in range(n)]


def _round(x: float, multiple: int) -> int:
    return max(multiple, round(x / multiple) * multiple)


def scale_config(cfg: ModelConfig, scale: str, vocab_size: int | None = None, context: int = 256) -> ModelConfig:
    """A ``tiny`` or ``small`` version of ``cfg`` that keeps its distinguishing features.

    * width: ``hidden_size`` and query heads from :data:`SCALES`; KV heads keep the GQA ratio
      (MHA stays MHA, 4:1 stays 4:1, at least one KV head); ``head_dim`` keeps its ratio to
      ``hidden_size / num_heads`` (Gemma 3, Qwen3 use larger heads); the FFN keeps its ratio
      to ``hidden_size``; Gemma's ``query_pre_attn_scalar`` follows ``head_dim``.
    * depth: the scale's minimum, raised to a whole number of periods of the layer schedules
      (5 sliding : 1 global keeps 6 layers, NoPE every 4th keeps 4); the schedules are the
      original ones repeated.
    * context: ``max_position_embeddings = context``; sliding windows and attention chunks
      shrink in proportion to the context (window / original context), but never below
      context / 8 so that a local layer still sees more than a handful of tokens. RoPE
      theta is kept, RoPE *scaling* (a context-extension device) is dropped.
    * vocabulary: the data tokenizer's (``vocab_size``); embedding scale (Gemma's
      sqrt(hidden)) is recomputed for the new width; tied/untied head, norms, QK-norm,
      biases, activations and logit soft-capping are kept as they are.
    """
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    s = SCALES[scale]
    d = cfg.to_dict()
    hidden, heads = s["hidden_size"], s["num_heads"]
    kv = max(1, round(heads * cfg.num_kv_heads / cfg.num_heads))
    while heads % kv:
        kv -= 1
    head_ratio = cfg.head_dim * cfg.num_heads / cfg.hidden_size
    head_dim = _round(hidden / heads * head_ratio, 2)
    periods = [_period(cfg.layer_types)]
    if cfg.rope_layers is not None:
        periods.append(_period(cfg.rope_layers))
    moe_layers = getattr(cfg, "moe_layers", None)
    dense_first = _dense_first(moe_layers)
    if moe_layers is not None and dense_first is None:
        periods.append(_period(moe_layers))  # an interleaving such as Llama 4's dense/MoE
    period = math.lcm(*periods)
    layers = max(s["num_layers"], period, 2 if dense_first else 1)
    layers = -(-layers // period) * period
    orig_ctx = cfg.max_position_embeddings

    def shrink(span: int | None) -> int | None:
        if span is None:
            return None
        return min(context, max(context // 8, round(span * context / orig_ctx)))

    d.update(
        name=f"{cfg.name or 'model'}-{scale}",
        vocab_size=vocab_size or cfg.vocab_size,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=_round(hidden * cfg.intermediate_size / cfg.hidden_size, 8),
        num_layers=layers,
        layer_types=_schedule(cfg.layer_types, layers),
        rope_layers=_schedule(cfg.rope_layers, layers) if cfg.rope_layers is not None else None,
        sliding_window=shrink(cfg.sliding_window),
        attention_chunk_size=shrink(cfg.attention_chunk_size),
        max_position_embeddings=context,
        rope=dict(theta=cfg.rope.theta, scaling=None),
        rope_local=dict(theta=cfg.rope_local.theta, scaling=None) if cfg.rope_local is not None else None,
    )
    _scale_small_device_fields(d, cfg, hidden / cfg.hidden_size, period)
    _scale_moe_mla(d, hidden / cfg.hidden_size, (hidden / heads) / (cfg.hidden_size / cfg.num_heads), dense_first)
    if cfg.query_pre_attn_scalar is not None and cfg.query_pre_attn_scalar != 1.0:
        d["query_pre_attn_scalar"] = cfg.query_pre_attn_scalar * head_dim / cfg.head_dim
    if cfg.embed_scale is not None and math.isclose(cfg.embed_scale, math.sqrt(cfg.hidden_size)):
        d["embed_scale"] = math.sqrt(hidden)
    return ModelConfig.from_dict(d).validate()


def _resample(seq: list, n: int) -> list:
    """A per-layer list stretched or squeezed to ``n`` layers, keeping where along the depth each value sits."""
    return [seq[i * len(seq) // n] for i in range(n)]


def _dense_first(moe_layers: list[bool] | None) -> int | None:
    """How many leading dense layers precede all-MoE layers (DeepSeek-V3: 3); None if another pattern."""
    if moe_layers is None:
        return 0
    k = moe_layers.index(True) if True in moe_layers else len(moe_layers)
    return k if all(moe_layers[k:]) else None


def _scale_moe_mla(d: dict[str, Any], ratio: float, head_ratio: float, dense_first: int | None) -> None:
    """MoE keeps its shape (experts, top-k, groups, shared expert, dense-first layers), experts
    get narrower with the width; MLA ranks follow the width, its head dims the head width."""
    n = d["num_layers"]
    if d.get("moe"):
        moe = dict(d["moe"])
        for key in ("expert_size", "shared_expert_size"):
            if moe.get(key):
                moe[key] = _round(moe[key] * ratio, 8)
        d["moe"] = moe
        if d.get("moe_layers") is not None:
            if dense_first is None:
                d["moe_layers"] = _schedule(d["moe_layers"], n)
            else:
                k = min(n - 1, max(1, round(dense_first * n / len(d["moe_layers"])))) if dense_first else 0
                d["moe_layers"] = [False] * k + [True] * (n - k)
    if d.get("mla"):
        mla = dict(d["mla"])
        for key in ("q_lora_rank", "kv_lora_rank"):
            if mla.get(key):
                mla[key] = _round(mla[key] * ratio, 8)
        for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            mla[key] = _round(mla[key] * head_ratio, 2)
        d["mla"] = mla


def _scale_small_device_fields(d: dict[str, Any], cfg: ModelConfig, ratio: float, period: int) -> None:
    """Gemma 3n's extras: per-layer FFN widths and sparsity follow the depth, ranks the width,
    the KV-shared tail keeps its share of the layers (with enough layers before it to share from)."""
    n = d["num_layers"]
    if cfg.num_kv_shared_layers:
        share = cfg.num_kv_shared_layers / cfg.num_layers
        while True:
            shared = max(1, round(n * share))
            first = n - shared
            if first > 0 and set(d["layer_types"][first:]) <= set(d["layer_types"][:first]):
                break
            n += period
            d["layer_types"] = _schedule(cfg.layer_types, n)
            if d.get("rope_layers") is not None:
                d["rope_layers"] = _schedule(cfg.rope_layers, n)
        d.update(num_layers=n, num_kv_shared_layers=shared)
    if cfg.intermediate_sizes is not None:
        d["intermediate_sizes"] = [_round(w * ratio, 8) for w in _resample(cfg.intermediate_sizes, n)]
    if cfg.activation_sparsity is not None:
        d["activation_sparsity"] = _resample(cfg.activation_sparsity, n)
    if cfg.laurel_rank is not None:
        d["laurel_rank"] = max(2, round(cfg.laurel_rank * ratio))
    if cfg.hidden_size_per_layer_input is not None:
        d["hidden_size_per_layer_input"] = max(4, round(cfg.hidden_size_per_layer_input * ratio))
        d["vocab_size_per_layer_input"] = d["vocab_size"]


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["hidden_size=128", "qk_norm=head", "layer_types=[\\"full\\"]"]`` -> dict (JSON values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw  # a bare string such as qk_norm=head
    return out


def _check_override_type(key: str, old: Any, new: Any) -> None:
    """``--set`` values must have the type of the field they replace (an int for an int field...)."""
    if old is None or new is None:
        return
    kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a JSON list",
             dict: "a JSON object"}
    want = type(old)
    ok = isinstance(new, want) and not (want is int and isinstance(new, bool))
    if want is float and isinstance(new, int) and not isinstance(new, bool):
        ok = True
    if not ok:
        raise ConfigError(f"--set {key}={json.dumps(new)}: {key} takes {kinds.get(want, want.__name__)}, "
                          f"like its current value {json.dumps(old)}")


def apply_overrides(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    d = cfg.to_dict()
    for key, value in overrides.items():
        _check_override_type(key, d.get(key), value)
    d.update(overrides)
    if ("hidden_size" in overrides or "num_heads" in overrides) and "head_dim" not in overrides:
        d["head_dim"] = None  # re-derive it from the new hidden_size / num_heads
    if "num_layers" in overrides:
        for key in ("layer_types", "rope_layers"):
            if key not in overrides and d.get(key) is not None:
                d[key] = _schedule(d[key], overrides["num_layers"])
    try:
        return ModelConfig.from_dict(d).validate()
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"--set {', '.join(overrides)} gives an invalid configuration: {e}") from None


def check_trainable(cfg: ModelConfig, seq_len: int) -> None:
    """Shape problems that only show against a training context."""
    if cfg.sliding_window is not None and SLIDING in cfg.layer_types and cfg.sliding_window > seq_len:
        raise ConfigError(
            f"sliding_window ({cfg.sliding_window}) is larger than the training context --seq-len ({seq_len}); "
            "such a layer is global attention. Use a smaller window or a longer context."
        )
    if cfg.position == "learned" and seq_len > cfg.max_position_embeddings:
        raise ConfigError(
            f"--seq-len {seq_len} exceeds max_position_embeddings ({cfg.max_position_embeddings}) of the learned positions"
        )


def _read_arch_json(path: str) -> ModelConfig:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--arch {path}: no such file; give a preset name (llmarch presets) or an llmarch config.json") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--arch {path} is not a readable JSON file: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--arch {path} holds a JSON {type(d).__name__}, expected an object of config fields")
    try:
        return ModelConfig.from_dict(d).validate()
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"--arch {path} is not a valid llmarch model configuration: {e}") from None


def resolve_model_config(
    arch: str, scale: str | None, overrides: dict[str, Any], vocab_size: int, seq_len: int
) -> ModelConfig:
    """Preset name or config.json -> (scaled, overridden) config for a vocabulary and context."""
    from ..families import get_config

    cfg = _read_arch_json(arch) if arch.endswith(".json") else get_config(arch)
    if scale:
        cfg = scale_config(cfg, scale, vocab_size, seq_len)
    else:
        cfg = cfg.replace(vocab_size=vocab_size)
    cfg = apply_overrides(cfg, overrides) if overrides else cfg
    if cfg.vocab_size < vocab_size:
        raise ConfigError(f"vocab_size {cfg.vocab_size} is smaller than the data tokenizer's {vocab_size}")
    check_trainable(cfg, seq_len)
    return cfg


__all__ = ["SCALES", "apply_overrides", "check_trainable", "parse_overrides", "resolve_model_config", "scale_config"]
