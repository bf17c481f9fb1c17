"""Optimisers for training: AdamW, Muon (+ AdamW for what Muon does not own) and MuonClip's QK-clip.

Muon
    ``torch.optim.Muon`` ships with torch (2.9 and later; llmarch runs on 2.13), so llmarch uses
    it rather than a copy: Nesterov momentum, then 5 Newton-Schulz steps with Keller Jordan's
    quintic coefficients (3.4445, -4.7750, 2.0315) orthogonalise each update, and
    ``adjust_lr_fn="match_rms_adamw"`` scales it by 0.2 * sqrt(max(m, n)) (Moonshot, "Muon is
    scalable for LLM training") so that the update RMS matches AdamW's and one learning rate
    serves both. Muon owns the 2-D weight matrices of the hidden layers; the embedding, the
    output head, norms and biases stay with AdamW (as in Keller Jordan's and Moonshot's setups).

QK-clip (MuonClip, Kimi K2)
    After each optimiser step, every attention head whose largest pre-softmax logit in that
    step's forward passes exceeded ``tau`` gets its query and key projections rescaled so that
    the logit becomes ``tau``: with MHA, W_q and W_k rows of the head by sqrt(tau / max_logit)
    each. With grouped KV heads a key head is shared, so it takes the square root of the
    smallest factor in its group and each query head the rest, which again scales every head's
    logits by exactly its own factor. The max logits come from a hook on the attention module
    (``Attention.logit_observer``), called with the post-norm, post-RoPE queries and keys.
    For MLA only the per-head parts are rescaled, as in the K2 report: q_nope and k_nope (the
    rows of ``kv_b_proj``) by sqrt(gamma), q_rope by gamma, the shared RoPE key not at all.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
OPTIMIZERS = ("adamw", "muon")


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(hidden 2-D matrices, other weights with decay, no-decay params: norms and biases).

    The hidden matrices are every 2-D parameter except the token/position embeddings and the
    output head (which is the embedding when tied).
    """
    io = {id(p) for name, p in model.named_parameters() if name.split(".")[0] in ("embed", "pos_embed", "lm_head")}
    matrices, other, no_decay = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            no_decay.append(p)
        elif id(p) in io or p.ndim != 2:
            other.append(p)
        else:
            matrices.append(p)
    return matrices, other, no_decay


class Optimizers:
    """Several optimisers stepped as one, with one learning-rate multiplier for all.

    Each param group remembers its ``base_lr``; :meth:`set_lr_factor` sets ``lr = base_lr * f``.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        for opt in optimizers:
            for g in opt.param_groups:
                g.setdefault("base_lr", g["lr"])

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * factor

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError(f"optimizer state has {len(states)} parts, expected {len(self.optimizers)}")
        for opt, s in zip(self.optimizers, states):
            opt.load_state_dict(s)


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    muon_momentum: float = 0.95,
) -> Optimizers:
    """AdamW for everything, or Muon for the hidden matrices + AdamW for the rest."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    matrices, other, no_decay = split_params(model)
    adam_groups = [dict(params=other, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if name == "adamw":
        adam_groups[0]["params"] = matrices + other
    adam_groups = [g for g in adam_groups if g["params"]]
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(adam_groups, lr=lr, betas=betas, eps=1e-8)]
    if name == "muon" and matrices:
        opts.append(
            torch.optim.Muon(
                matrices, lr=lr, weight_decay=weight_decay, momentum=muon_momentum, nesterov=True,
                ns_coefficients=NS_COEFFICIENTS, ns_steps=NS_STEPS, adjust_lr_fn="match_rms_adamw",
            )
        )
    return Optimizers(opts)


# ----------------------------------------------------------------------------------------
# QK-clip
# ----------------------------------------------------------------------------------------


def _max_logits_per_head(q: torch.Tensor, k: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """Largest causal (and in-window) pre-softmax logit of each query head: (heads,)."""
    h, t = q.shape[1], q.shape[2]
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    i = torch.arange(t, device=q.device)
    visible = i[None, :] <= i[:, None]
    if window is not None:
        visible &= (i[:, None] - i[None, :]) < window
    logits = logits.masked_fill(~visible, float("-inf"))
    return logits.amax(dim=(0, 2, 3))


class QKClip:
    """Track each head's max attention logit during forward passes; rescale W_q/W_k after a step."""

    def __init__(self, model: nn.Module, tau: float):
        if tau <= 0:
            raise ConfigError(f"--qk-clip tau must be positive, got {tau}")
        self.tau = float(tau)
        self.attentions = [m for m in model.modules() if hasattr(m, "logit_observer")]
        if not self.attentions:
            raise ConfigError("QK-clip needs attention modules with a logit_observer hook; this model has none")
        for att in self.attentions:
            if getattr(att, "qk_norm", "none") != "none":
                raise ConfigError(
                    f"QK-clip rescales W_q and W_k, which QK-norm ({att.qk_norm!r}) undoes; QK-norm already bounds "
                    "the logits. Use --qk-clip with qk_norm='none' only."
                )
        self.max_logits: dict[int, torch.Tensor] = {}
        for att in self.attentions:
            att.logit_observer = self._observe

    def _observe(self, att: nn.Module, q: torch.Tensor, k: torch.Tensor) -> None:
        if not torch.is_grad_enabled():  # evaluation passes do not count
            return
        with torch.no_grad():
            m = _max_logits_per_head(q.detach(), k.detach(), att.scale, getattr(att, "window", None))
        prev = self.max_logits.get(id(att))
        self.max_logits[id(att)] = m if prev is None else torch.maximum(prev, m)

    def global_max(self) -> float:
        return max((float(m.max()) for m in self.max_logits.values()), default=0.0)

    @torch.no_grad()
    def apply(self) -> int:
        """Rescale every head whose max logit exceeded tau; return how many heads were clipped."""
        clipped = 0
        for att in self.attentions:
            m = self.max_logits.get(id(att))
            if m is None:
                continue
            gamma = (self.tau / m.clamp(min=1e-12)).clamp(max=1.0)  # (heads,)
            clipped += int((gamma < 1).sum())
            if bool((gamma < 1).any()):
                self._rescale(att, gamma)
        self.max_logits.clear()
        return clipped

    @staticmethod
    def _rescale(att: nn.Module, gamma: torch.Tensor) -> None:
        if hasattr(att, "kv_b_proj"):
            QKClip._rescale_mla(att, gamma)
            return
        h, kv = att.num_heads, att.num_kv_heads
        if att.k_proj is None:  # a KV-shared layer: its keys belong to another layer, so scale its queries alone
            pairs = ((att.q_proj, gamma),)
        else:
            group = gamma.view(kv, h // kv)
            k_scale = group.min(dim=1).values.sqrt()  # (kv,)
            q_scale = (group / k_scale[:, None]).reshape(h)  # q * k scale = gamma per head
            pairs = ((att.q_proj, q_scale), (att.k_proj, k_scale))
        for proj, scale in pairs:
            rows = scale.repeat_interleave(att.head_dim).to(proj.weight.dtype)
            proj.weight.mul_(rows[:, None])
            if proj.bias is not None:
                proj.bias.mul_(rows)


    @staticmethod
    def _rescale_mla(att: nn.Module, gamma: torch.Tensor) -> None:
        """MLA (Kimi K2): q_nope and k_nope rows of a head by sqrt(gamma), its q_rope rows by
        gamma; the decoupled RoPE key is shared by all heads and stays as it is."""
        nope, rope, v = att.nope_dim, att.rope_dim, att.v_dim
        root = gamma.sqrt()
        q_rows = torch.cat([root[:, None].expand(-1, nope), gamma[:, None].expand(-1, rope)], dim=1).reshape(-1)
        k_rows = torch.cat([root[:, None].expand(-1, nope), torch.ones_like(gamma)[:, None].expand(-1, v)], dim=1)
        q_proj = att.q_proj if getattr(att, "q_proj", None) is not None else att.q_b_proj
        q_proj.weight.mul_(q_rows.to(q_proj.weight.dtype)[:, None])
        att.kv_b_proj.weight.mul_(k_rows.reshape(-1).to(att.kv_b_proj.weight.dtype)[:, None])


__all__ = ["NS_COEFFICIENTS", "NS_STEPS", "OPTIMIZERS", "Optimizers", "QKClip", "build_optimizer", "split_params"]

