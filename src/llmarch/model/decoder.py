"""The one decoder: every architecture in llmarch is this module tree with a different config."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator

import torch
from torch import nn

from .attention import Attention, SharedKV
from .cache import KVCache, LayerCache
from .components import (
    AltUp,
    Laurel,
    PerLayerEmbedding,
    PerLayerInput,
    merge_streams,
    widen_streams,
)
from .config import ModelConfig, check_token_ids
from .ffn import make_ffn
from .layers import Rotary, make_norm
from .mla import MLAttention
from .moe import MoE


class Block(nn.Module):
    """One decoder layer: attention then FFN, each a residual branch.

    Norm placement (``cfg.norm_placement``):
      * ``pre``      x + f(norm(x))               (GPT-2, Llama, Qwen, Mistral, SmolLM3)
      * ``post``     x + norm(f(x))               (OLMo 2: post-norm inside the residual)
      * ``sandwich`` x + post_norm(f(pre_norm(x))) (Gemma 2 / 3)

    Optional small-device components (``llmarch.model.components``), each switched on by its field:
      * LAuReL (``laurel_rank``): x = (x + attn branch + laurel(h)) / sqrt(2), h = the attention's input
      * AltUp (``altup_num_inputs``): x is the n residual streams (n, B, T, hidden); the layer runs
        on the active prediction a = predict(streams)[active] and its output corrects every stream
      * per-layer inputs (``hidden_size_per_layer_input``): streams[1:] += ple(scale(corrected[active]), input_i)
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        pre = cfg.norm_placement in ("pre", "sandwich")
        post = cfg.norm_placement in ("post", "sandwich")
        h = cfg.hidden_size
        self.altup = AltUp(cfg) if cfg.altup_num_inputs else None
        self.scale_active = cfg.altup_correct_scale
        self.attn_norm = make_norm(cfg, h) if pre else None
        self.laurel = Laurel(cfg) if cfg.laurel_rank else None
        self.attn = MLAttention(cfg, layer_idx) if cfg.attention_kind == "mla" else Attention(cfg, layer_idx)
        self.attn_post_norm = make_norm(cfg, h) if post else None
        self.mlp_norm = make_norm(cfg, h) if pre else None
        self.mlp = MoE(cfg) if cfg.layer_is_moe(layer_idx) else make_ffn(cfg, layer_idx)
        self.mlp_post_norm = make_norm(cfg, h) if post else None
        self.ple = PerLayerInput(cfg) if cfg.hidden_size_per_layer_input else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: LayerCache | None = None,
        shared_kv: SharedKV | None = None,
        per_layer_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, hidden), or the AltUp streams (n, B, T, hidden) -> the same shape."""
        if self.altup is None:
            return self.layer(x, positions, rope, cache, shared_kv)
        predictions = self.altup.predict(x)
        out = self.altup.correct(predictions, self.layer(predictions[self.altup.active], positions, rope, cache, shared_kv))
        if self.ple is None:
            return out
        first = out[self.altup.active]
        if self.scale_active:
            first = self.altup.scale_output(first)
        return torch.cat([out[:1], out[1:] + self.ple(first, per_layer_input)])

    def layer(self, x, positions, rope, cache, shared_kv) -> torch.Tensor:
        """The attention and FFN residual branches on one stream (B, T, hidden)."""
        h = self.attn_norm(x) if self.attn_norm is not None else x
        y = self.attn(h, positions, rope, cache, shared_kv)
        if self.attn_post_norm is not None:
            y = self.attn_post_norm(y)
        x = x + y
        if self.laurel is not None:
            x = (x + self.laurel(h)) / math.sqrt(2)
        y = self.mlp(self.mlp_norm(x) if self.mlp_norm is not None else x)
        if self.mlp_post_norm is not None:
            y = self.mlp_post_norm(y)
        return x + y


def _rope_key(rope) -> str:
    return json.dumps({"theta": rope.theta, "scaling": rope.scaling}, sort_keys=True)


class Decoder(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab), with an optional :class:`KVCache`.

    With AltUp (``altup_num_inputs``) the embeddings are widened to n streams before the first
    layer and merged back after the last; with per-layer embeddings (``ple``) every layer gets
    its slice of them.
    """

    # how llmarch.analysis.modules files the parameters of these direct children
    child_components = {"altup_projections": "AltUp", "altup_unembed_projections": "AltUp"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.position == "learned" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # one rotary table per distinct RoPE configuration (Gemma 3: local and global)
        self.rotary = nn.ModuleDict()
        self._layer_rope: list[str | None] = []
        for i in range(cfg.num_layers):
            if not cfg.layer_uses_rope(i):
                self._layer_rope.append(None)
                continue
            rc = cfg.layer_rope(i)
            key = str(len(self.rotary))
            for k, mod in self.rotary.items():
                if _rope_key(mod.rope) == _rope_key(rc):
                    key = k
                    break
            else:
                self.rotary[key] = Rotary(rc, self.layers[i].attn.head_dim, cfg.max_position_embeddings)
            self._layer_rope.append(key)
        self.ple = PerLayerEmbedding(cfg) if cfg.hidden_size_per_layer_input else None
        self.altup_projections = self.altup_unembed_projections = None
        if cfg.altup_num_inputs:
            # the extra streams start as projections of the embedding and are projected back at the end
            n, h = cfg.altup_num_inputs, cfg.hidden_size
            self.altup_projections = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(n - 1))
            self.altup_unembed_projections = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(n - 1))

    # ---------------------------------------------------------------------------------
    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        return KVCache.for_model(self, batch, max_len, dtype, device)

    def embed_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # elsewhere the check would cost a sync; a compiled graph checks its indices itself
        if input_ids.device.type == "cpu" and input_ids.numel() and not torch.compiler.is_compiling():
            check_token_ids(input_ids, self.config.vocab_size)
        x = self.embed(input_ids)
        if self.config.embed_scale is not None:
            # Gemma: the scale is cast to the activation dtype first, as in the reference
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions.clamp(min=0))
        return x

    def hidden_states(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        positions = self.default_positions(input_ids, positions, cache)
        x = self.embed_tokens(input_ids, positions)
        per_layer = self.ple(input_ids, x) if self.ple is not None else None
        if self.altup_projections is not None:
            x = widen_streams(x, self.altup_projections)
        ropes = self.layer_ropes(positions, x.dtype)
        shared_kv: SharedKV = {}
        for i, layer in enumerate(self.layers):
            x = layer(
                x, positions, ropes[i], cache.layers[i] if cache else None, shared_kv,
                per_layer[:, :, i] if per_layer is not None else None,
            )
            self.after_layer(x)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        if self.altup_unembed_projections is not None:
            x = merge_streams(x, self.altup_unembed_projections)
        return self.norm(x)

    def after_layer(self, x: torch.Tensor) -> None:
        """Called with each layer's output; nothing here (an inference subclass,
        :class:`llmarch.inference.packed.PackedDecoder`, returns freed memory there)."""

    @staticmethod
    def default_positions(input_ids: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        if positions is not None:
            return positions
        b, t = input_ids.shape
        start = cache.seq_len if cache is not None else 0
        return torch.arange(start, start + t, device=input_ids.device).expand(b, t)

    def layer_ropes(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """The (cos, sin) of every layer (None on NoPE layers), each table computed once."""
        tables = {k: mod(positions, dtype) for k, mod in self.rotary.items()}
        return [tables[key] if key is not None else None for key in self._layer_rope]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # through the head module when there is one, so a packed head (llmarch.inference.packed) can stand in
        logits = self.lm_head(h) if self.lm_head is not None else nn.functional.linear(h, self.embed.weight)
        cap = self.config.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        last_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab); with ``last_only`` only the last position's (B, 1, vocab); with
        ``last_index`` (B,) only position ``last_index[b]`` of each row b (B, 1, vocab), the last
        real token of a right-padded batch."""
        h = self.hidden_states(input_ids, positions, cache)
        if last_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), last_index.to(h.device)][:, None]
        elif last_only:
            h = h[:, -1:]
        return self.logits(h)


@contextlib.contextmanager
def _meta_init_skipped(device) -> Iterator[None]:
    """On the meta device, skip ``nn.init.normal_`` (there are no values to draw): torch runs meta
    ``normal_`` through its Python references, whose first call imports ``torch._dynamo``, about
    1.5 s of every model load's start-up."""
    if str(device) != "meta":
        yield
        return
    normal = nn.init.normal_
    nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        nn.init.normal_ = normal


def build_model(cfg: ModelConfig, device=None, dtype=None) -> Decoder:
    """Build a model; ``device="meta"`` allocates nothing (parameter counting, lazy loading)."""
    with torch.device(device or "cpu"), _meta_init_skipped(device):
        model = Decoder(cfg)
    if dtype is not None and device != "meta":
        model = model.to(dtype)
    elif dtype is not None:
        model = model.to(dtype=dtype)
    return model
