"""Mixture-of-experts feed-forward: a router picks k of E expert GLUs per token.

One module covers the article's MoE models; the routing rule is configuration
(:class:`llmarch.model.config.MoEConfig`):

* Qwen3-MoE: softmax over all experts, top-k, optionally renormalised.
* DeepSeek-V3 / Kimi K2: sigmoid scores; a bias (``e_score_correction_bias``) that only
  steers *which* experts are chosen; group-limited top-k (keep the ``topk_group`` best of
  ``n_group`` groups, a group scored by the sum of its two best experts); renormalised and
  multiplied by ``routed_scaling_factor``; plus a shared expert every token goes through.
* Llama 4: top-1 sigmoid whose score multiplies the expert's *input*; a shared expert.

Experts are stored stacked, ``gate_up_proj`` (E, 2 * width, hidden) and ``down_proj``
(E, hidden, width), so one expert is a view, never a copy.

Dispatch sorts the (token, expert) assignments by expert and runs each *active* expert once
on its contiguous batch of tokens (when most experts are active, as two batched matmuls over
the stacked weights), then scatter-adds the results back; a single decoding token only
touches the weights of its k experts.

Hook for load balancing (training): after every forward, ``MoE.last_routing`` holds the
:class:`Routing` of the tokens just seen: router ``logits`` (N, E; part of the autograd
graph, for an auxiliary load-balancing loss), ``scores``, the chosen ``indices`` (N, k) and
their ``weights``; ``Routing.expert_load()`` counts tokens per expert. DeepSeek's auxiliary-
loss-free balancing adjusts ``MoE.router.e_score_correction_bias`` (a buffer, saved with the
checkpoint) from that load, outside the gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, MoEConfig
from .ffn import GLU, glu_name
from .layers import activation_fn


@dataclass
class Routing:
    logits: torch.Tensor  # (N, E) float32 router logits
    scores: torch.Tensor  # (N, E) softmax or sigmoid of the logits
    indices: torch.Tensor  # (N, k) chosen experts
    weights: torch.Tensor  # (N, k) their combination weights (float32, or the activations' dtype)

    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert, (E,)."""
        return torch.bincount(self.indices.reshape(-1), minlength=self.scores.shape[-1])


class Router(nn.Module):
    param_component = "router"  # how llmarch.analysis.modules files the parameters

    def __init__(self, dim: int, m: MoEConfig):
        super().__init__()
        self.m = m
        self.weight = nn.Parameter(torch.empty(m.num_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)
        if m.score_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(m.num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> Routing:
        m = self.m
        if m.router_fp32:
            logits = F.linear(x.float(), self.weight.float())
        else:  # the reference rounds the logits to the activations' dtype first
            logits = F.linear(x, self.weight).float()
        scores = logits.softmax(-1) if m.score == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if m.n_group > 1:
            n = x.shape[0]
            per_group = m.num_experts // m.n_group
            grouped = choice.view(n, m.n_group, per_group)
            group_score = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)
            keep = group_score.topk(m.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(n, m.num_experts)
        indices = choice.topk(m.top_k, dim=-1, sorted=m.topk_sorted).indices
        weights = scores.gather(1, indices)
        if m.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if m.routed_scaling_factor != 1.0:
            weights = weights * m.routed_scaling_factor
        if not m.router_fp32:
            weights = weights.to(x.dtype)
        return Routing(logits, scores, indices, weights)


class Experts(nn.Module):
    """E gated FFNs stored as stacked (E, out, in) tensors."""

    param_component = "experts"

    def __init__(self, num_experts: int, dim: int, width: int, activation: str):
        super().__init__()
        self.width = width
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, width))
        nn.init.uniform_(self.gate_up_proj, -(dim**-0.5), dim**-0.5)
        nn.init.uniform_(self.down_proj, -(width**-0.5), width**-0.5)
        self.act = activation_fn(activation)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's GLU on x (tokens, dim) (pre-packed per expert in ``llmarch.inference.packed``)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).split(self.width, dim=-1)
        return F.linear(self.act(gate) * up, self.down_proj[e])

    def run_batched(self, x: torch.Tensor, counts: torch.Tensor) -> bool:
        """Whether a prefill runs every expert at once (:meth:`_batched`): when most are active."""
        return 2 * int((counts > 0).sum()) > counts.numel()

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, scale_input: bool) -> torch.Tensor:
        """x (N, dim), indices/weights (N, k) -> sum_k weight * expert_k(x) (N, dim).

        A weighted output (or input) is rounded to x's dtype before it is summed; float32
        weights weight in float32 first (see ``MoEConfig.router_fp32``)."""
        n, k = indices.shape
        if n == 1:  # decoding: k experts, read in place, summed in expert order (as the reference)
            out = None
            for e, j in sorted((e, j) for j, e in enumerate(indices[0].tolist())):
                y = self._weighted(e, x, weights[:, j : j + 1], scale_input)
                out = y if out is None else out + y
            return out
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0])
        token = order // k  # the token of each sorted (token, expert) pair
        ws = weights.reshape(-1, 1).index_select(0, order)
        if self.run_batched(x, counts):
            xs = x.index_select(0, token)
            if scale_input:
                xs = (xs * ws).to(x.dtype)
            ys = self._batched(xs, flat.index_select(0, order), counts)
            if not scale_input:
                ys = (ys * ws).to(x.dtype)
            return torch.zeros_like(x).index_add_(0, token, ys)
        return self._looped(x, token, ws, counts.tolist(), scale_input)

    def _weighted(self, e: int, x: torch.Tensor, w: torch.Tensor, scale_input: bool) -> torch.Tensor:
        """Expert e on x weighted by w (its input, with ``scale_input``), rounded to x's dtype."""
        if scale_input:
            return self.expert(e, (x * w).to(x.dtype))
        return (self.expert(e, x) * w).to(x.dtype)

    def _looped(self, x, token, ws, counts: list[int], scale_input: bool) -> torch.Tensor:
        """Each active expert gathers its tokens, runs once on them and adds its weighted
        output into their rows, experts in index order (the reference's summation order, so
        bfloat16 sums round as they do there). Gathering per expert keeps every temporary
        small: one (N * k, dim) copy of the inputs is tens of MB at prefill sizes."""
        out = torch.zeros_like(x)
        start = 0
        for e, c in enumerate(counts):
            if not c:
                continue
            end = start + c
            rows = token[start:end]
            xe = F.embedding(rows, x)  # a row gather, faster than index_select
            out.index_add_(0, rows, self._weighted(e, xe, ws[start:end], scale_input))
            start = end
        return out

    def _batched(self, xs: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Most experts active: pad every expert's tokens to the busiest one's count and run all
        experts as two batched matmuls (several times faster than per-expert matmuls of a few
        dozen rows on CPU; the weights are read in place through transposed views)."""
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(xs.shape[0], device=xs.device) - starts.index_select(0, expert)
        padded = xs.new_zeros(counts.numel(), int(counts.max()), xs.shape[1])
        padded[expert, slot] = xs
        gate, up = torch.bmm(padded, self.gate_up_proj.transpose(1, 2)).split(self.width, dim=-1)
        out = torch.bmm(self.act(gate) * up, self.down_proj.transpose(1, 2))
        return out[expert, slot]


class MoE(nn.Module):
    """Router + routed experts (+ an optional shared expert every token goes through)."""

    # for llmarch.analysis.modules (a GLU inside, and its gate)
    child_components = {"shared_expert": "shared expert", "shared_expert_gate": "shared expert"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.top_k = m.top_k
        self.scale_input = m.scale_input
        self.router = Router(cfg.hidden_size, m)
        self.experts = Experts(m.num_experts, cfg.hidden_size, m.expert_size, cfg.activation)
        self.shared_expert = GLU(cfg.hidden_size, m.shared_expert_size, cfg.activation) if m.shared_expert_size else None
        # Qwen2-MoE: a per-token sigmoid gate on the shared expert's output
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if m.shared_expert_gate else None
        self.activation = cfg.activation
        self.last_routing: Routing | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1])
        routing = self.router(h)
        self.last_routing = routing
        y = self.experts(h, routing.indices, routing.weights, self.scale_input)
        if self.shared_expert is not None:
            shared = self.shared_expert(h)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared
            y = y + shared
        return y.view(x.shape)

    def describe(self) -> dict:
        """The FFN in the article's terms (the keys of ``GLU.describe`` plus the expert counts)."""
        width = self.experts.width
        shared = self.shared_expert.up_proj.out_features if self.shared_expert is not None else 0
        return dict(
            kind=glu_name(self.activation),
            width=width,
            moe=True,
            experts=self.experts.gate_up_proj.shape[0],
            active=self.top_k,
            shared=shared // width if shared % width == 0 else 1,
            expert_width=width,
            shared_width=shared,
        )

    def inactive_params_per_token(self) -> int:
        """Routed-expert parameters a token does not use (the E - k experts it skips)."""
        e = self.experts.gate_up_proj.shape[0]
        per_expert = math.prod(self.experts.gate_up_proj.shape[1:]) + math.prod(self.experts.down_proj.shape[1:])
        return (e - self.top_k) * per_expert
