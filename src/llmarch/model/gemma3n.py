"""Gemma 3n's small-device layers: the decoder behind ``gemma3n-e2b`` / ``gemma3n-e4b``.

Each idea is a config field (``ModelConfig``), off by default, and a small module here:

* **AltUp** (``altup_num_inputs``): the residual stream is widened to n streams; only the
  active one goes through the layer. A learned map *predicts* every stream before the layer
  and *corrects* them all with the layer's innovation afterwards (:class:`AltUp`).
* **Per-layer embeddings, PLE** (``hidden_size_per_layer_input``): every token also has a
  small vector per layer, looked up in a large table (which can live on the CPU or on disk,
  see ``llmarch.inference.offload``) plus a projection of its embedding; each layer gates it into the
  streams other than the first (:class:`PerLayerEmbedding`, :class:`PerLayerInput`).
* **LAuReL** (``laurel_rank``): a low-rank learned residual beside attention (:class:`Laurel`).
* **KV sharing** (``num_kv_shared_layers``): the last layers compute no keys or values; each
  reuses those of the last earlier layer of its attention type (:class:`SharedKVAttention`).
* **Gaussian top-k activation sparsity** (``activation_sparsity``): the FFN gate keeps only the
  activations above mean + std * Phi^-1(s) of each token (:class:`SparseGLU`).
* **MatFormer** per-layer FFN widths (``intermediate_sizes``), see ``llmarch.checkpoints.matformer``.
* ``v_norm``: a weightless RMSNorm on the values.

The rest is Gemma 3: sandwich norms, per-head QK-norm (here with attention scale 1), GeGLU,
sqrt(hidden)-scaled embeddings, 4 sliding : 1 full layers, final logit soft-capping.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .attention import Attention, attention_mask
from .cache import KVCache, LayerCache
from .config import ModelConfig
from .decoder import Decoder
from .layers import GLU, L2Norm, activation_fn, apply_rope, make_norm

# keys, values and key positions of one layer, for the layers that reuse them
SharedKV = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------
# Feed-forward with Gaussian top-k sparsity
# ----------------------------------------------------------------------------------------


def gaussian_topk(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep what lies above the ``sparsity`` quantile of a normal fit to each row, shifted to 0.

    The cutoff is mean + std * Phi^-1(sparsity) over the last dimension: with 0.95 about 5% of
    the gate activations of a token survive.
    """
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(sparsity, dtype=torch.float32)).to(x.dtype)
    cutoff = x.mean(-1, keepdim=True) + x.std(-1, keepdim=True, unbiased=False) * z
    return F.relu(x - cutoff)


class SparseGLU(GLU):
    """GeGLU whose gate goes through :func:`gaussian_topk` first (``sparsity`` > 0)."""

    def __init__(self, dim: int, hidden: int, activation: str, sparsity: float):
        super().__init__(dim, hidden, activation, bias=False)
        self.sparsity = sparsity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_and_up(x)
        if self.sparsity > 0:
            gate = gaussian_topk(gate, self.sparsity)
        return self.down_proj(self.act(gate) * up)


# ----------------------------------------------------------------------------------------
# Attention with shared keys/values and a value norm
# ----------------------------------------------------------------------------------------


class SharedKVAttention(Attention):
    """Grouped-query attention that can reuse another layer's keys and values.

    A KV-shared layer keeps only its query and output projections; it attends over the keys,
    values and key positions that its source layer produced in the same forward (after the
    source's cache update), with its own mask. It needs no cache of its own.
    """

    fusable = {}  # its forward projects q, k and v separately (k and v only on source layers)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        if cfg.qk_norm not in ("none", "head"):
            raise ConfigError(f"KV sharing / v_norm support qk_norm 'none' or 'head', got {cfg.qk_norm!r}")
        super().__init__(cfg, layer_idx)
        self.kv_source = cfg.layer_kv_source(layer_idx)
        self.is_kv_source = any(cfg.layer_kv_source(j) == layer_idx for j in range(cfg.num_layers))
        self.v_norm = L2Norm(cfg.norm_eps) if cfg.v_norm else None
        if self.kv_source is not None:
            self.k_proj = self.v_proj = self.v_norm = None
            if cfg.qk_norm == "head":
                self.k_norm = None

    def make_cache(self, batch: int, max_len: int, dtype, device) -> LayerCache | None:
        if self.kv_source is not None:
            return None
        return super().make_cache(batch, max_len, dtype, device)

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        return 0 if self.kv_source is not None else super().kv_bytes_per_token(bytes_per_element)

    def describe(self) -> dict:
        d = super().describe()
        if self.kv_source is not None:
            d["cache"] = f"none: reuses layer {self.kv_source}'s K and V"
        return d

    def _heads(self, x: torch.Tensor, proj: nn.Linear, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, n, self.head_dim).transpose(1, 2)

    def _rope(self, x: torch.Tensor, rope) -> torch.Tensor:
        return apply_rope(x, *rope, self.rope_interleaved) if self.use_rope else x

    def forward(self, x, positions, rope, cache=None, shared: SharedKV | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self._heads(x, self.q_proj, self.num_heads)
        if self.qk_norm == "head":
            q = self.q_norm(q)
        q = self._rope(q, rope)
        if self.kv_source is not None:
            k, v, kpos = shared[self.kv_source]
        else:
            k = self._heads(x, self.k_proj, self.num_kv_heads)
            v = self._heads(x, self.v_proj, self.num_kv_heads)
            if self.qk_norm == "head":
                k = self.k_norm(k)
            if self.v_norm is not None:
                v = self.v_norm(v)
            k = self._rope(k, rope)
            kpos = positions
            if cache is not None:
                k, v, kpos = cache.update(k, v, positions)
            if self.is_kv_source:
                shared[self.layer_idx] = (k, v, kpos)
        mask = attention_mask(positions, kpos, self.window, self.chunk, q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


# ----------------------------------------------------------------------------------------
# LAuReL, AltUp, per-layer inputs
# ----------------------------------------------------------------------------------------


class Laurel(nn.Module):
    """Learned Augmented Residual Layer: x + norm(right(left(x))), a rank-r residual branch."""

    param_component = "LAuReL"  # how llmarch.analysis.modules files the parameters

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.linear_left = nn.Linear(cfg.hidden_size, cfg.laurel_rank, bias=False)
        self.linear_right = nn.Linear(cfg.laurel_rank, cfg.hidden_size, bias=False)
        self.post_laurel_norm = make_norm(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class AltUp(nn.Module):
    """Alternating updates over n residual streams, shaped (n, B, T, hidden).

    Both steps are driven by a tiny router: tanh(W (norm(x) / hidden)) gives n mixing inputs
    per token. ``predict`` mixes the streams with per-token n x n coefficients (plus identity);
    ``correct`` adds the layer's innovation (its output minus the active prediction) to every
    stream with per-token weights (plus one). Coefficients are clipped to +-``altup_coef_clip``
    in training.
    """

    reads_weights = ("correction_coefs", "prediction_coefs")  # clipped in training (_coefs)

    param_component = "AltUp"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, h = cfg.altup_num_inputs, cfg.hidden_size
        self.n = n
        self.active = cfg.altup_active_idx
        self.coef_clip = cfg.altup_coef_clip
        self.router_input_scale = 1.0 / h
        self.correct_output_scale = nn.Parameter(torch.zeros(h))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(h, n, bias=False)
        self.router_norm = make_norm(cfg, h)

    def _coefs(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        if self.training and self.coef_clip is not None:
            w = w.clamp(-self.coef_clip, self.coef_clip)
        return F.linear(x, w)

    def router(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.modality_router(self.router_norm(x) * self.router_input_scale)
        return torch.tanh(routed.float()).type_as(x)

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        mix = self._coefs(self.prediction_coefs, self.router(streams[self.active]))
        mix = mix.unflatten(-1, (self.n, self.n))  # (B, T, to, from)
        return (streams + torch.einsum("btji,ibth->jbth", mix, streams)).type_as(streams)

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        weight = self._coefs(self.correction_coefs, self.router(activated)) + 1.0  # (B, T, n)
        innovation = activated - predictions[self.active]
        return (innovation * weight.permute(2, 0, 1)[..., None] + predictions).type_as(activated)

    def scale_output(self, x: torch.Tensor) -> torch.Tensor:
        return (x.type_as(self.correct_output_scale) * self.correct_output_scale).type_as(x)


class PerLayerInput(nn.Module):
    """A layer's use of its per-layer embedding: norm(proj(act(gate(x)) * per_layer_input))."""

    param_component = "per-layer inputs"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.hidden_size_per_layer_input, bias=False)
        self.projection = nn.Linear(cfg.hidden_size_per_layer_input, cfg.hidden_size, bias=False)
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.act = activation_fn(cfg.activation)

    def forward(self, x: torch.Tensor, per_layer_input: torch.Tensor) -> torch.Tensor:
        return self.norm(self.projection(self.act(self.gate(x)) * per_layer_input))


class PerLayerEmbedding(nn.Module):
    """Token ids -> one ``hidden_size_per_layer_input`` vector per layer, (B, T, layers, P).

    The sum, scaled by 1/sqrt(2), of a row of the big ``table`` (vocab_size_per_layer_input x
    layers * P, scaled by sqrt(P); ids outside it read row 0) and a normalised projection of
    the token's (scaled) embedding. ``table`` is the part ``llmarch.inference.offload.offload_ple`` moves
    off the accelerator: only the rows of the current tokens are ever needed.
    """

    param_component = "per-layer inputs"  # its table is an embedding

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = cfg.num_layers
        self.dim = cfg.hidden_size_per_layer_input
        self.vocab = cfg.vocab_size_per_layer_input
        self.table = nn.Embedding(self.vocab, self.layers * self.dim)
        self.table_scale = math.sqrt(self.dim)
        self.projection = nn.Linear(cfg.hidden_size, self.layers * self.dim, bias=False)
        self.projection_scale = cfg.hidden_size**-0.5
        self.norm = make_norm(cfg, self.dim)

    def offloadable_params(self) -> int:
        """Parameters of the table (none once it is offloaded: it is no longer a parameter)."""
        return sum(p.numel() for p in self.table.parameters())

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.where((input_ids >= 0) & (input_ids < self.vocab), input_ids, 0)
        rows = self.table(ids)
        return rows * torch.tensor(self.table_scale, dtype=rows.dtype, device=rows.device)

    def forward(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        dtype = embeds.dtype
        proj = self.projection(embeds) * torch.tensor(self.projection_scale, dtype=dtype)
        proj = self.norm(proj.unflatten(-1, (self.layers, self.dim)))
        rows = self.lookup(input_ids).to(device=proj.device, dtype=dtype).unflatten(-1, (self.layers, self.dim))
        return (proj + rows) * torch.tensor(2.0).rsqrt().to(dtype)


# ----------------------------------------------------------------------------------------
# Block and decoder
# ----------------------------------------------------------------------------------------


class Gemma3nBlock(nn.Module):
    """One layer over the AltUp streams (n, B, T, hidden); n = 1 without AltUp.

    predict -> active stream a -> h = norm(a);
    x = (a + post_norm(attn(h)) + laurel(h)) / sqrt(2)      (without LAuReL: a + post_norm(attn(h)))
    x = x + post_norm(ffn(norm(x)))
    correct the streams with x; streams[1:] += per_layer_input(scale * corrected[active]).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        if cfg.norm_placement != "sandwich" or cfg.ffn_kind != "glu" or cfg.ffn_bias:
            raise ConfigError(
                "the Gemma 3n layer (used for AltUp, PLE, LAuReL, KV sharing, sparse or per-layer FFN widths) "
                f"needs norm_placement 'sandwich' and a bias-free GLU FFN; got {cfg.norm_placement!r}, {cfg.ffn_kind!r}"
            )
        h = cfg.hidden_size
        self.layer_idx = layer_idx
        self.active = cfg.altup_active_idx if cfg.altup_num_inputs else 0
        self.scale_active = cfg.altup_correct_scale
        self.altup = AltUp(cfg) if cfg.altup_num_inputs else None
        self.attn_norm = make_norm(cfg, h)
        self.laurel = Laurel(cfg) if cfg.laurel_rank else None
        self.attn = SharedKVAttention(cfg, layer_idx)
        self.attn_post_norm = make_norm(cfg, h)
        self.mlp_norm = make_norm(cfg, h)
        self.mlp = SparseGLU(h, cfg.layer_intermediate_size(layer_idx), cfg.activation,
                             cfg.layer_activation_sparsity(layer_idx))
        self.mlp_post_norm = make_norm(cfg, h)
        self.ple = PerLayerInput(cfg) if cfg.hidden_size_per_layer_input else None

    def forward(self, streams, positions, rope, cache=None, shared: SharedKV | None = None, per_layer_input=None):
        predictions = self.altup.predict(streams) if self.altup is not None else streams
        active = predictions[self.active]
        h = self.attn_norm(active)
        x = active + self.attn_post_norm(self.attn(h, positions, rope, cache, shared))
        if self.laurel is not None:
            x = (x + self.laurel(h)) / math.sqrt(2)
        x = x + self.mlp_post_norm(self.mlp(self.mlp_norm(x)))
        if self.altup is None:
            return x[None]
        out = self.altup.correct(predictions, x)
        if self.ple is not None:
            first = out[self.active]
            if self.scale_active:
                first = self.altup.scale_output(first)
            out = torch.cat([out[:1], out[1:] + self.ple(first, per_layer_input)])
        return out


def _rescale(x: torch.Tensor, target_rms: torch.Tensor) -> torch.Tensor:
    """x with the root-mean-square of ``target_rms`` (per token)."""
    rms = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
    return x * target_rms / rms


class Gemma3nDecoder(Decoder):
    """The decoder over AltUp streams with per-layer embeddings (selected by ``build_model``
    whenever a config uses any field of this module)."""

    # how llmarch.analysis.modules files the parameters of these direct children
    child_components = {"altup_projections": "AltUp", "altup_unembed_projections": "AltUp"}

    block_class = Gemma3nBlock

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        n, h = cfg.altup_num_inputs or 1, cfg.hidden_size
        self.ple = PerLayerEmbedding(cfg) if cfg.hidden_size_per_layer_input else None
        # the extra streams start as projections of the embedding, and are projected back
        # and averaged with the first stream at the end
        self.altup_projections = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(n - 1))
        self.altup_unembed_projections = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(n - 1))

    @staticmethod
    def _mix(first: torch.Tensor, others, projections) -> torch.Tensor:
        rms = torch.mean(first**2, dim=-1, keepdim=True) ** 0.5
        return torch.stack([first] + [_rescale(p(x), rms) for p, x in zip(projections, others)])

    def hidden_states(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        positions = self.default_positions(input_ids, positions, cache)
        x = self.embed_tokens(input_ids, positions)
        per_layer = self.ple(input_ids, x) if self.ple is not None else None
        streams = self._mix(x, [x] * len(self.altup_projections), self.altup_projections)
        ropes = self.layer_ropes(positions, x.dtype)
        shared: SharedKV = {}
        for i, layer in enumerate(self.layers):
            streams = layer(
                streams, positions, ropes[i], cache.layers[i] if cache else None, shared,
                per_layer[:, :, i] if per_layer is not None else None,
            )
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        out = self._mix(streams[0], streams[1:], self.altup_unembed_projections).mean(0)
        return self.norm(out)


__all__ = [
    "AltUp", "Gemma3nBlock", "Gemma3nDecoder", "Laurel", "PerLayerEmbedding", "PerLayerInput", "SharedKVAttention",
    "SparseGLU", "gaussian_topk",
]
