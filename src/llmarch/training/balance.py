"""Load balancing of mixture-of-experts routers during training.

Works with any module (``llmarch.model.moe.MoE``) that exposes, after its forward pass,
``last_routing`` with

* ``logits``: (tokens, num_experts) router logits, still attached to the graph;
* ``indices``: (tokens, top_k) the experts each token was sent to;

and optionally a buffer ``router.e_score_correction_bias`` (num_experts,) added to the
scores used for *selection* only (DeepSeek-V3).

Two ways to balance the load:

* **Auxiliary loss** (Switch Transformer, Qwen-MoE, Mixtral): ``E * sum_i f_i * P_i`` with
  ``f_i`` the fraction of routed (token, slot) pairs sent to expert ``i`` and ``P_i`` the mean
  router probability of expert ``i``; 1.0 at perfect balance, larger when skewed. Averaged
  over the MoE layers and added to the loss with a coefficient.
* **Auxiliary-loss-free** (DeepSeek-V3): after each optimiser step, every expert's selection
  bias moves by ``gamma * sign(mean_load - load_i)``: under-loaded experts become more likely
  to be picked, over-loaded ones less, without a gradient that competes with the LM loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def router_modules(model: nn.Module) -> list[nn.Module]:
    """The MoE layers of a model, in module order (those that expose router outputs)."""
    return [m for m in model.modules() if hasattr(m, "last_routing")]


def _bias(m: nn.Module) -> torch.Tensor | None:
    return getattr(getattr(m, "router", None), "e_score_correction_bias", None)


def load_balancing_loss(routers: list[nn.Module]) -> torch.Tensor | None:
    """Mean over MoE layers of ``E * sum_i f_i * P_i`` for the last forward pass."""
    losses = []
    for m in routers:
        if m.last_routing is None:
            continue
        logits, chosen = m.last_routing.logits, m.last_routing.indices
        n_exp = logits.shape[-1]
        probs = torch.softmax(logits.float(), dim=-1).mean(0)  # P_i
        frac = torch.bincount(chosen.reshape(-1), minlength=n_exp).float() / chosen.numel()  # f_i
        losses.append(n_exp * (frac * probs).sum())
    return torch.stack(losses).mean() if losses else None


class ExpertLoad:
    """Per-layer expert token counts accumulated over the micro-batches of one step."""

    def __init__(self, routers: list[nn.Module]):
        self.routers = routers
        self.counts: list[torch.Tensor | None] = [None] * len(routers)

    def record(self) -> None:
        """Add the experts chosen in the last forward pass (call after each micro-batch)."""
        for i, m in enumerate(self.routers):
            if m.last_routing is None:
                continue
            logits, chosen = m.last_routing.logits, m.last_routing.indices
            c = torch.bincount(chosen.detach().reshape(-1), minlength=logits.shape[-1]).float()
            self.counts[i] = c if self.counts[i] is None else self.counts[i] + c

    def totals(self) -> list[torch.Tensor]:
        """The step's counts, summed over data-parallel ranks when running distributed."""
        out = []
        for c in self.counts:
            if c is None:
                continue
            if dist.is_available() and dist.is_initialized():
                c = c.clone()
                dist.all_reduce(c)
            out.append(c)
        return out

    @torch.no_grad()
    def update_bias(self, gamma: float, totals: list[torch.Tensor]) -> None:
        """DeepSeek-V3's update: ``b_i += gamma * sign(mean_load - load_i)``."""
        for m, load in zip((m for m, c in zip(self.routers, self.counts) if c is not None), totals):
            bias = _bias(m)
            if bias is not None:
                bias.add_(gamma * torch.sign(load.mean() - load).to(bias.dtype))

    def reset(self) -> None:
        self.counts = [None] * len(self.routers)


def load_fractions(totals: list[torch.Tensor]) -> list[list[float]]:
    """Per layer, each expert's share of the routed tokens (sums to 1 per layer)."""
    return [[round(float(x), 5) for x in (c / c.sum().clamp(min=1))] for c in totals]


__all__ = ["ExpertLoad", "load_balancing_loss", "load_fractions", "router_modules"]
