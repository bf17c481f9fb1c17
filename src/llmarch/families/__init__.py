"""The family registry: presets by name and checkpoint families by HF ``model_type``."""

from __future__ import annotations

import difflib
import re
from typing import Any

from ..errors import ConfigError
from ..model.config import ModelConfig
from . import (
    deepseek,
    gemma3,
    gemma3n,
    gpt2,
    llama,
    llama4,
    mistral,
    olmo2,
    qwen,
    qwen3_moe,
    smollm3,
)
from .base import Family

FAMILIES: list[Family] = [
    gpt2.FAMILY,
    llama.FAMILY,
    mistral.FAMILY,
    qwen.FAMILY,
    olmo2.FAMILY,
    gemma3.FAMILY,
    smollm3.FAMILY,
    gemma3n.FAMILY,
    deepseek.FAMILY,
    qwen3_moe.FAMILY,
    llama4.FAMILY,
]

# Multimodal checkpoints whose text decoder llmarch loads: model_type -> (text prefixes
# rewritten to the text model's names, prefixes dropped with a note). The text weights sit
# under language_model. (hub format) or model.language_model. (transformers 5).
_TEXT_RENAME = [
    (r"^language_model\.model\.", "model."),
    (r"^model\.language_model\.", "model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
WRAPPERS: dict[str, dict[str, Any]] = {
    "mistral3": dict(rename=_TEXT_RENAME, drop=(r"^(model\.)?vision_tower\.", r"^(model\.)?multi_modal_projector\.")),
    "gemma3": dict(rename=_TEXT_RENAME, drop=(r"^(model\.)?vision_tower\.", r"^(model\.)?multi_modal_projector\.")),
    "gemma3n": dict(rename=_TEXT_RENAME, drop=(r"^(model\.)?(vision_tower|audio_tower|embed_vision|embed_audio)\.",)),
    "llama4": dict(rename=_TEXT_RENAME, drop=(r"^(model\.)?vision_model\.", r"^(model\.)?multi_modal_projector\.")),
}
WRAPPED_TEXT_MODEL_TYPES = {"gemma3": "gemma3_text", "mistral3": "mistral", "llama4": "llama4_text",
                            "gemma3n": "gemma3n_text"}


def register(family: Family) -> None:
    """Add a family (used by the MoE/MLA and Gemma 3n modules)."""
    if family not in FAMILIES:
        FAMILIES.append(family)


def preset_names() -> list[str]:
    return [name for fam in FAMILIES for name in fam.presets]


def get_config(name: str) -> ModelConfig:
    """The published configuration of a preset, e.g. ``get_config("qwen3-0.6b")``."""
    for fam in FAMILIES:
        if name in fam.presets:
            return fam.presets[name]().validate()
    names = preset_names()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.4)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown preset {name!r}.{hint} Known presets: {', '.join(names)}")


def family_for_model_type(model_type: str | None) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = sorted([mt for fam in FAMILIES for mt in fam.model_types] + list(WRAPPERS))
    raise ConfigError(f"unsupported model_type {model_type!r} in config.json; llmarch supports: {', '.join(known)}")


def family_for_config(cfg: ModelConfig) -> Family:
    return family_for_model_type(cfg.hf_model_type)


def resolve_hf_config(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(text config dict, wrapper rules or None) for a config.json dict."""
    mt = d.get("model_type")
    if mt in WRAPPERS:
        text = dict(d.get("text_config") or {})
        if not text:
            raise ConfigError(f"config.json of model_type {mt!r} has no text_config")
        text.setdefault("model_type", WRAPPED_TEXT_MODEL_TYPES[mt])
        if text["model_type"] == "gemma3":
            text["model_type"] = "gemma3_text"
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if text.get(k) is None and d.get(k) is not None:
                text[k] = d[k]
        return text, WRAPPERS[mt]
    return d, None


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    text, _ = resolve_hf_config(d)
    fam = family_for_model_type(text.get("model_type"))
    try:
        cfg = fam.config_from_hf(text)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot read {fam.name} config.json: {e}") from None
    return cfg.validate()


def rename_wrapped(name: str, wrapper: dict[str, Any] | None) -> str | None:
    """Map a wrapped checkpoint's tensor name to the text model's; None to drop it."""
    if wrapper is None:
        return name
    if any(re.search(p, name) for p in wrapper["drop"]):
        return None
    for rx, rep in wrapper["rename"]:
        new, n = re.subn(rx, rep, name)
        if n:
            return new
    return name
