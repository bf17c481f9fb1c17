"""Parameter counts computed from the module tree, built on the meta device (no memory)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..model.config import ModelConfig
from ..model.decoder import Decoder, build_model
from .modules import module_sum


@dataclass
class ParamCount:
    name: str
    total: int
    active: int  # per token: total minus the routed experts a token does not use
    embedding: int  # input embedding (+ learned positions) + untied output head
    non_embedding: int  # total - embedding (what model cards call "non-embedding")
    # total without tables that can live off the accelerator (Gemma 3n's per-layer embeddings:
    # Google's "effective" size); None for models without such tables
    effective: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def count_model(model: Decoder, name: str | None = None) -> ParamCount:
    total = _numel(model.parameters())  # .parameters() yields a tied weight once
    emb = model.embed.weight.numel()
    if model.pos_embed is not None:
        emb += model.pos_embed.weight.numel()
    if model.lm_head is not None:
        emb += model.lm_head.weight.numel()
    inactive = module_sum(model, "inactive_params_per_token")
    offloadable = module_sum(model, "offloadable_params")
    emb += offloadable  # an offloadable table is a token-indexed embedding
    return ParamCount(
        name=name or model.config.name or "model",
        total=total,
        active=total - inactive,
        embedding=emb,
        non_embedding=total - emb,
        effective=total - offloadable if offloadable else None,
    )


def count_params(cfg: ModelConfig) -> ParamCount:
    """Count a configuration's parameters without allocating them."""
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    return count_model(model, cfg.name)


def human(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


__all__ = ["ParamCount", "count_params", "count_model", "human"]
