"""llmarch's Muon: the update of torch.optim.Muon (match_rms_adamw), batched Newton-Schulz, state."""

import copy
import math

import pytest
import torch
from torch import nn

from llmarch import get_config
from llmarch.model.decoder import build_model
from llmarch.training.loop import init_weights
from llmarch.training.optim import NS_COEFFICIENTS, Muon, Optimizers, build_optimizer, newton_schulz, split_params
from llmarch.training.scale import scale_config

HP = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)


class Shapes(nn.Module):
    """Hidden matrices wide (32 x 80), tall (80 x 32: shares a stack with the wide ones), square
    and small; an embedding, a head and a bias that Muon must leave to AdamW."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 32)
        self.up = nn.Linear(32, 80, bias=False)  # weight 80 x 32: tall
        self.down = nn.Linear(80, 32, bias=False)  # 32 x 80: wide
        self.up2 = nn.Linear(32, 80, bias=True)
        self.square = nn.Linear(32, 32, bias=False)
        self.narrow = nn.Linear(32, 8, bias=False)  # 8 x 32
        self.widen = nn.Linear(8, 32, bias=False)
        self.lm_head = nn.Linear(32, 16, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)) * self.up2(h))
        h = h + self.widen(torch.tanh(self.narrow(self.square(h))))
        return self.lm_head(h)


def _train_steps(model, opt, steps, seed=1):
    """``steps`` optimiser steps on a fixed random next-token task; the weights after each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 16, (4, 12), generator=g)
        loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def _assert_same_updates(before, ours, theirs, rtol):
    """Each step's change of each weight agrees to ``rtol`` of the largest change of that weight."""
    for prev, a_step, b_step in zip([before] + ours[:-1], ours, theirs):
        for p0, a, b in zip(prev, a_step, b_step):
            da, db = a - p0, b - p0
            assert float((da - db).abs().max()) <= rtol * float(db.abs().max()) + 1e-12


def test_muon_step_equals_torch_muon_over_steps():
    torch.manual_seed(0)
    ours_model = Shapes()
    torch_model = copy.deepcopy(ours_model)
    ours = build_optimizer(ours_model, "muon", lr=HP["lr"], weight_decay=HP["weight_decay"])
    muon = ours.optimizers[1]
    assert isinstance(muon, Muon) and muon.ns_dtype == torch.bfloat16  # torch's iteration dtype
    # the pairing build_optimizer made, with torch's Muon in place of llmarch's
    matrices, other, no_decay = split_params(torch_model)
    reference = Optimizers([
        torch.optim.AdamW([dict(params=other, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)],
                          lr=HP["lr"], betas=(0.9, 0.95), eps=1e-8),
        torch.optim.Muon(matrices, ns_coefficients=NS_COEFFICIENTS, ns_steps=5, adjust_lr_fn="match_rms_adamw", **HP),
    ])
    before = [p.detach().clone() for p in ours_model.parameters()]
    a = _train_steps(ours_model, ours, 4)
    b = _train_steps(torch_model, reference, 4)
    _assert_same_updates(before, a, b, rtol=1e-5)
    assert {tuple(p.shape) for p in muon.param_groups[0]["params"]} == {(80, 32), (32, 80), (32, 32), (8, 32), (32, 8)}


def _reference_muon_step(p, grad, buf, lr, weight_decay, momentum):
    """torch.optim.Muon's step for one matrix (Nesterov, match_rms_adamw), written out in float64."""
    buf.mul_(momentum).add_(grad, alpha=1 - momentum)
    x = (1 - momentum) * grad + momentum * buf
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm()
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if tall else x
    p.mul_(1 - lr * weight_decay).add_(x, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


def test_float32_muon_equals_the_algorithm_in_float64():
    torch.manual_seed(0)
    shapes = [(80, 32), (32, 80), (32, 80), (32, 32), (8, 32)]
    params = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    ref = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(r) for r in ref]
    opt = Muon(params, ns_dtype=torch.float32, **HP)
    for _ in range(4):
        before = [p.detach().clone() for p in params]
        for p, r, buf in zip(params, ref, bufs):
            p.grad = torch.randn(p.shape)
            _reference_muon_step(r, p.grad.double(), buf, HP["lr"], HP["weight_decay"], HP["momentum"])
        opt.step()
        for p, p0, r in zip(params, before, ref):
            step_ours, step_ref = p.detach().double() - p0.double(), r - p0.double()
            assert float((step_ours - step_ref).abs().max()) <= 1e-5 * float(step_ref.abs().max())
            r.copy_(p.detach().double())  # the next step starts from the same weights


def test_batched_newton_schulz_equals_one_matrix_at_a_time():
    torch.manual_seed(0)
    x = torch.randn(5, 24, 56)
    batched = newton_schulz(x.clone())
    for i in range(5):
        alone = newton_schulz(x[i : i + 1].clone())[0]
        torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-6)
    # and both are the quintic iteration written out here
    a, b, c = NS_COEFFICIENTS
    y = x[2] / x[2].norm()
    for _ in range(5):
        gram = y @ y.T
        y = a * y + (b * gram + c * gram @ gram) @ y
    torch.testing.assert_close(batched[2], y, rtol=1e-5, atol=1e-6)
    s = torch.linalg.svdvals(batched[2])
    assert 0.6 < float(s.min()) and float(s.max()) < 1.3
    with pytest.raises(ValueError, match="wide"):
        newton_schulz(torch.randn(2, 56, 24))


def test_state_of_torch_muon_loads_and_continues_the_same():
    """Checkpoints of runs made with torch.optim.Muon hold its state dict: it loads into Muon."""
    torch.manual_seed(0)
    shapes = [(80, 32), (32, 80), (32, 32)]
    theirs_p = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    theirs = torch.optim.Muon(theirs_p, adjust_lr_fn="match_rms_adamw", **HP)
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    for gs in grads[:2]:
        for p, gr in zip(theirs_p, gs):
            p.grad = gr.clone()
        theirs.step()
    ours_p = [nn.Parameter(p.detach().clone()) for p in theirs_p]
    ours = Muon(ours_p, lr=1.0)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert ours.param_groups[0]["lr"] == HP["lr"] and set(ours.state_dict()["state"][0]) == {"momentum_buffer"}
    for gs in grads[2:]:
        for p, q, gr in zip(theirs_p, ours_p, gs):
            p.grad, q.grad = gr.clone(), gr.clone()
        theirs.step()
        ours.step()
    for p, q in zip(theirs_p, ours_p):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def test_muon_owns_the_hidden_matrices_only():
    """Embeddings, the head, norms, biases and 3-D MoE expert tensors stay with AdamW."""
    cfg = scale_config(get_config("deepseek-v3"), "tiny", 512, 32)
    torch.manual_seed(0)
    model = init_weights(build_model(cfg, device="cpu"))
    adamw, muon = build_optimizer(model, "muon").optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for p in muon.param_groups[0]["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    for n, p in model.named_parameters():
        hidden_matrix = p.ndim == 2 and n.split(".")[0] not in ("embed", "pos_embed", "lm_head")
        assert (n in in_muon) == hidden_matrix, n
    assert any(p.ndim == 3 for p in model.parameters())  # the experts: with AdamW
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.zeros(2, 3, 4))])
