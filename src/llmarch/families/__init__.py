"""The family registry: presets by name, checkpoint families by HF ``model_type`` and GGUF architecture."""

from __future__ import annotations

import difflib
from typing import Any

from ..checkpoints.gguf import GGUFFile
from ..errors import CheckpointError, ConfigError
from ..model.config import ModelConfig
from . import (
    deepseek,
    gemma2,
    gemma3,
    gemma3n,
    gpt2,
    llama,
    llama4,
    mistral,
    olmo2,
    qwen,
    qwen2_moe,
    qwen3_moe,
    smollm3,
)
from .base import Family, TokenizerQuirks

FAMILIES: list[Family] = [
    gpt2.FAMILY,
    llama.FAMILY,
    mistral.FAMILY,
    qwen.FAMILY,
    olmo2.FAMILY,
    gemma2.FAMILY,
    gemma3.FAMILY,
    smollm3.FAMILY,
    gemma3n.FAMILY,
    deepseek.FAMILY,
    qwen2_moe.FAMILY,
    qwen3_moe.FAMILY,
    llama4.FAMILY,
]


def register(family: Family) -> None:
    """Add a family defined outside this package (the ``FAMILY`` of its file)."""
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
    known = sorted(mt for fam in FAMILIES for mt in fam.model_types)
    raise ConfigError(f"unsupported model_type {model_type!r} in config.json; llmarch supports: {', '.join(known)}")


def family_for_config(cfg: ModelConfig) -> Family:
    return family_for_model_type(cfg.hf_model_type)


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    fam = family_for_model_type(d.get("model_type"))
    try:
        cfg = fam.config_from_hf(d)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot read {fam.name} config.json: {e}") from None
    return cfg.validate()


def family_for_gguf(f: GGUFFile) -> Family:
    """The family that reads a GGUF file's ``general.architecture``."""
    for fam in FAMILIES:
        if f.architecture in fam.gguf_architectures:
            return fam
    known = [a for fam in FAMILIES for a in fam.gguf_architectures]
    raise CheckpointError(f"unsupported GGUF architecture {f.architecture!r} in {f.path} (supported: {', '.join(known)})")


def config_json_from_gguf(f: GGUFFile) -> dict[str, Any]:
    """The ``config.json`` dict a GGUF file's metadata describes."""
    return family_for_gguf(f).from_gguf(f)


def tokenizer_quirks(gguf_architecture: str) -> TokenizerQuirks:
    """The tokenizer quirks of a GGUF architecture's family, with every family's tokenizer names."""
    own = next((fam.tokenizer for fam in FAMILIES if gguf_architecture in fam.gguf_architectures), TokenizerQuirks())
    return own.merged(fam.tokenizer for fam in FAMILIES)
