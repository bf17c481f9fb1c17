"""The typed summary of one architecture: what ``compare``, ``diff``, the diagrams, the plots and
the report render.

:func:`summarize_model` builds the model on the meta device and reads it once, through the
protocols listed in :mod:`llmarch.analysis.modules`: the per-layer attention and FFN, the
block's norms and extra modules, the parameters by component, and the KV cache and FLOPs at one
context length. Every field is plain data (numbers, flags, the modules' own names); the words of
a table, a diff or a diagram are produced only by the renderers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..model.config import ModelConfig, RopeConfig
from ..model.decoder import Decoder
from . import modules as an
from .params import ParamCount, count_model


@dataclass(frozen=True)
class Summary:
    name: str
    # shapes
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_context: int  # the model's maximum position
    tied_head: bool  # the output head is the embedding matrix
    # positions: "rope", "learned" (absolute, added to the embedding) or "none"
    position: str
    rope: RopeConfig  # the global layers' RoPE (unused unless position is "rope")
    rope_local: RopeConfig | None  # the sliding layers' own RoPE, if they have one
    embed_scale: float | None  # the token embedding is multiplied by this
    logit_softcap: float | None
    # per layer, in order
    attention: tuple[an.AttentionLayer, ...]
    ffn: tuple[an.FFNLayer, ...]
    norms: an.BlockNorms
    extras: tuple[str, ...]  # classes of the per-layer modules beyond attention, FFN and norms
    # parameters
    params: ParamCount
    breakdown: dict[str, int]  # parameters per component (sums to params.total)
    # costs of one sequence of `context` tokens, cached in `dtype`
    context: int
    dtype: str
    kv_bytes_per_token: int  # all layers' cache per token of context (before windows cap it)
    kv_bytes: int
    prefill_flops: an.Flops  # per token, averaged over a `context`-token prompt
    decode_flops: an.Flops  # of the token at position context - 1

    @property
    def moe(self) -> list[an.FFNLayer]:
        """The MoE layers' FFNs."""
        return [f for f in self.ffn if f.moe]

    @property
    def dense(self) -> list[an.FFNLayer]:
        """The dense layers' FFNs."""
        return [f for f in self.ffn if not f.moe]

    @property
    def kv_sharing_layers(self) -> int:
        """Layers that cache nothing: they reuse another layer's K and V."""
        return sum(a.kv_elements_per_token == 0 for a in self.attention)

    def kv_cache_bytes(self, context: int, bytes_per_element: int) -> int:
        """KV-cache bytes of one sequence at another context length or dtype."""
        return an.cache_bytes(list(self.attention), context, bytes_per_element)


def summarize_model(model: Decoder, context: int = 8192, dtype: str = "bf16", name: str | None = None) -> Summary:
    """Read a built model (usually on the meta device); KV cache and FLOPs at ``context`` tokens."""
    if context < 1:
        raise ConfigError(f"context must be a positive number of tokens, got {context}")
    cfg = model.config
    name = name or cfg.name or "model"
    attention = an.attention_layers(model)
    bpe = an.dtype_bytes(dtype)
    return Summary(
        name=name,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_context=cfg.max_position_embeddings,
        tied_head=model.lm_head is None,
        position=cfg.position,
        rope=cfg.rope,
        rope_local=cfg.rope_local,
        embed_scale=cfg.embed_scale,
        logit_softcap=cfg.final_logit_softcap,
        attention=tuple(attention),
        ffn=tuple(an.ffn_layers(model)),
        norms=an.BlockNorms.of(model),
        extras=tuple(an.block_extras(model)),
        params=count_model(model, name),
        breakdown=an.param_breakdown(model),
        context=context,
        dtype=dtype,
        kv_bytes_per_token=sum(a.kv_elements_per_token for a in attention) * bpe,
        kv_bytes=an.cache_bytes(attention, context, bpe),
        prefill_flops=an.prefill_flops_per_token(model, context),
        decode_flops=an.decode_flops_per_token(model, context),
    )


def summarize_config(cfg: ModelConfig, context: int = 8192, dtype: str = "bf16", name: str | None = None) -> Summary:
    """Build ``cfg`` on the meta device (no memory) and summarise it."""
    return summarize_model(an.meta_model(cfg), context, dtype, name)
