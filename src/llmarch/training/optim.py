"""Optimisers for training: AdamW, Muon (+ AdamW for what Muon does not own) and MuonClip's QK-clip.

Muon
    :class:`Muon` is the update of ``torch.optim.Muon`` (torch 2.9 and later) with the settings
    llmarch uses: Nesterov momentum, then 5 Newton-Schulz steps with Keller Jordan's quintic
    coefficients (3.4445, -4.7750, 2.0315) orthogonalise each update (a wide orientation: a
    tall matrix is transposed so that the Gram product is on its small side), and
    ``adjust_lr_fn="match_rms_adamw"`` scales it by 0.2 * sqrt(max(m, n)) (Moonshot, "Muon is
    scalable for LLM training") so that the update RMS matches AdamW's and one learning rate
    serves both; decoupled weight decay multiplies the weights by 1 - lr * weight_decay first.
    llmarch has its own step because torch's runs the iteration matrix by matrix: here the
    matrices of one (oriented) shape are stacked and iterated together with ``torch.bmm`` /
    ``torch.baddbmm`` (a tall 688 x 256 and a wide 256 x 688 matrix share one stack), and the
    momentum, weight decay and update use foreach ops. The Newton-Schulz iteration runs in
    bfloat16, as torch's and Keller Jordan's do; ``ns_dtype=torch.float32`` gives the same
    iteration in float32. The state (a ``momentum_buffer`` per matrix) and the param-group keys
    are torch's, so checkpoints written with ``torch.optim.Muon`` load into :class:`Muon`.

    Muon owns the 2-D weight matrices of the hidden layers; the embedding, the output head,
    norms and biases stay with AdamW (as in Keller Jordan's and Moonshot's setups), and so do
    MoE experts stored as one 3-D tensor per layer (their fused gate/up rows would be
    orthogonalised together, not per projection).

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

import math
from collections import defaultdict

import torch
from torch import nn

from ..errors import ConfigError

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7  # torch.optim.Muon's floor on the norm the update is divided by
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


def newton_schulz(
    x: torch.Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS, steps: int = NS_STEPS,
    eps: float = NS_EPS,
) -> torch.Tensor:
    """Orthogonalise a stack of wide matrices (``(batch, m, n)`` with m <= n) by the quintic
    Newton-Schulz iteration, each divided (in place) by its Frobenius norm first.

    Each step is X <- a X + (b A + c A^2) X with A = X X^T, as in ``torch.optim.Muon``, in the
    dtype of ``x``."""
    if x.ndim != 3 or x.shape[-2] > x.shape[-1]:
        raise ValueError(f"newton_schulz takes a stack of wide matrices (batch, m, n) with m <= n, got {tuple(x.shape)}")
    a, b, c = coefficients
    x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp_(min=eps))
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x


def _adjusted_lr(lr: float, shape: torch.Size) -> float:
    """torch.optim.Muon's ``match_rms_adamw``: lr * 0.2 * sqrt(max(m, n))."""
    return lr * 0.2 * math.sqrt(max(shape))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a wide matrix: transposed (a view) when it has more rows than columns."""
    return t.T if t.shape[0] > t.shape[1] else t


class Muon(torch.optim.Optimizer):
    """Muon with Nesterov momentum and AdamW-RMS matching, Newton-Schulz batched by shape.

    The same update as ``torch.optim.Muon(params, lr, weight_decay, momentum, nesterov,
    ns_coefficients, eps, ns_steps, adjust_lr_fn="match_rms_adamw")``, with the same state
    (``momentum_buffer``) and param-group keys. ``ns_dtype`` is the dtype of the iteration
    (bfloat16, torch's; float32 is slower on CPU and closer to exact arithmetic)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = NS_STEPS,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"Muon needs lr, momentum and weight_decay >= 0, got {lr}, {momentum}, {weight_decay}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn="match_rms_adamw")
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if group["adjust_lr_fn"] != "match_rms_adamw":
                raise ValueError(f"Muon scales the lr as 'match_rms_adamw' only, got {group['adjust_lr_fn']!r}")
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every matrix that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _momentum(self, group: dict, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Advance the momentum buffers; return the (Nesterov) directions to orthogonalise."""
        grads = [p.grad for p in params]
        for p in params:
            if p.grad.is_sparse or torch.is_complex(p):
                raise RuntimeError("Muon takes real parameters with dense gradients only")
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        momentum = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * grad
        return torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs

    def _update_group(self, group: dict, params: list[torch.Tensor]) -> None:
        """Momentum, then per (wide) shape: stack, orthogonalise, decay the weights and add."""
        lr, wd = group["lr"], group["weight_decay"]
        directions = self._momentum(group, params)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        stacks: dict[tuple, list[int]] = defaultdict(list)  # one stack per wide shape (and device, dtype)
        for i, p in enumerate(params):
            stacks[(_wide(p).shape, p.device, p.dtype)].append(i)
        for (shape, device, dtype), idx in stacks.items():
            stack = torch.empty((len(idx), *shape), dtype=self.ns_dtype, device=device)
            torch._foreach_copy_(list(stack.unbind(0)), [_wide(directions[i]) for i in idx])  # cast as it stacks
            ortho = newton_schulz(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
            ortho = ortho.to(dtype)
            updates = [o.T if params[i].shape != shape else o for i, o in zip(idx, ortho.unbind(0))]
            torch._foreach_add_([params[i] for i in idx], updates, alpha=-_adjusted_lr(lr, shape))


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
            Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=muon_momentum, nesterov=True,
                 ns_coefficients=NS_COEFFICIENTS, ns_steps=NS_STEPS)
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


__all__ = [
    "NS_COEFFICIENTS", "NS_EPS", "NS_STEPS", "OPTIMIZERS", "Muon", "Optimizers", "QKClip", "build_optimizer",
    "newton_schulz", "split_params",
]

