"""Small-device components (introduced by Gemma 3n), each a config field any decoder may switch on.

All are off by default; :class:`llmarch.model.decoder.Block` and ``Decoder`` build them when
their field is set, whatever the norm placement or FFN kind:

* **AltUp** (``altup_num_inputs``): the residual stream is widened to n streams; only the
  active one goes through the layer. A learned map *predicts* every stream before the layer
  and *corrects* them all with the layer's innovation afterwards (:class:`AltUp`,
  :func:`widen_streams`, :func:`merge_streams`).
* **Per-layer embeddings, PLE** (``hidden_size_per_layer_input``): every token also has a
  small vector per layer, looked up in a large table (which can live on the CPU or on disk,
  see ``llmarch.inference.offload``) plus a projection of its embedding; each layer gates it
  into the AltUp streams other than the first (:class:`PerLayerEmbedding`, :class:`PerLayerInput`).
* **LAuReL** (``laurel_rank``): a low-rank learned residual beside attention (:class:`Laurel`).
* **Gaussian top-k activation sparsity** (``activation_sparsity``): the FFN keeps only the
  pre-activations above mean + std * Phi^-1(s) of each token (:func:`gaussian_topk`, applied
  by the FFNs of ``llmarch.model.ffn``).

The other two are options of the one attention (``llmarch.model.attention``): **KV sharing**
(``num_kv_shared_layers``) and the weightless value norm (``v_norm``); per-layer FFN widths
(``intermediate_sizes``, MatFormer) are an option of the FFN factory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import activation_fn, make_norm


def gaussian_topk(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep what lies above the ``sparsity`` quantile of a normal fit to each row, shifted to 0.

    The cutoff is mean + std * Phi^-1(sparsity) over the last dimension: with 0.95 about 5% of
    the gate activations of a token survive.
    """
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(sparsity, dtype=torch.float32)).to(x.dtype)
    cutoff = x.mean(-1, keepdim=True) + x.std(-1, keepdim=True, unbiased=False) * z
    return F.relu(x - cutoff)


class Laurel(nn.Module):
    """Learned Augmented Residual Layer: x + norm(right(left(x))), a rank-r residual branch."""

    param_component = "LAuReL"

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


def _rescale(x: torch.Tensor, target_rms: torch.Tensor) -> torch.Tensor:
    """x with the root-mean-square of ``target_rms`` (per token)."""
    rms = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
    return x * target_rms / rms


def _mix(first: torch.Tensor, others, projections) -> torch.Tensor:
    rms = torch.mean(first**2, dim=-1, keepdim=True) ** 0.5
    return torch.stack([first] + [_rescale(p(x), rms) for p, x in zip(projections, others)])


def widen_streams(x: torch.Tensor, projections: nn.ModuleList) -> torch.Tensor:
    """The embeddings (B, T, hidden) -> AltUp streams (n, B, T, hidden): the first is x, the others
    projections of x rescaled to its RMS."""
    return _mix(x, [x] * len(projections), projections)


def merge_streams(streams: torch.Tensor, projections: nn.ModuleList) -> torch.Tensor:
    """AltUp streams -> (B, T, hidden): the mean of the first and the others projected back (at its RMS)."""
    return _mix(streams[0], streams[1:], projections).mean(0)


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
    the token's (scaled) embedding. ``table`` is the part ``llmarch.inference.offload.offload_ple``
    moves off the accelerator: only the rows of the current tokens are ever needed.
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
