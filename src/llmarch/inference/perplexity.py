"""Sliding-window perplexity: how well a model predicts a text, the usual check of a
checkpoint's quality (quantised against float, one file against another).

    from llmarch.inference.perplexity import perplexity
    result = perplexity(model, token_ids, context=512, stride=256)
    print(result.perplexity, result.tokens)

The text's tokens are cut into windows of ``context`` tokens whose starts advance by
``stride``; each window scores only the tokens that no earlier window scored, each predicted
from everything before it inside the window (Hugging Face's "strided" perplexity recipe). With
``stride == context`` the windows do not overlap and every token sees only its own window's
past, and the first token of each window is not scored (nothing in the window predicts it); a
smaller stride gives every scored token at least ``context - stride`` tokens of context, at
the price of recomputing the overlap, and scores every token but the text's first.

Logits are computed ``chunk`` positions at a time in float32, so a 262k-entry vocabulary never
needs a (context x vocab) float32 tensor at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import GenerationError


@dataclass
class PerplexityResult:
    perplexity: float  # exp(mean negative log-likelihood)
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # scored tokens
    windows: int
    context: int
    stride: int
    evaluated: int  # tokens run through the model (scored + recomputed overlap)
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Tokens run through the model per second."""
        return self.evaluated / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}

    def summary(self) -> str:
        return (
            f"perplexity {self.perplexity:.4f} (mean NLL {self.nll:.4f} nats) over {self.tokens} tokens, "
            f"{self.windows} window(s) of {self.context} advancing by {self.stride}; "
            f"{self.tokens_per_second:.1f} tok/s ({self.seconds:.1f} s)"
        )


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over ``n`` tokens."""
    out = []
    scored_to = 1  # position 0 is never scored
    begin = 0
    while scored_to < n:
        end = min(begin + context, n)
        out.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        begin += stride
    return out


def check_arguments(context: int, stride: int | None, max_context: int | None = None) -> int:
    """The stride to use; GenerationError for values that cannot work."""
    if not isinstance(context, int) or context < 2:
        raise GenerationError(f"context must be an integer of at least 2 tokens, got {context!r}")
    if max_context is not None and context > max_context:
        raise GenerationError(f"context {context} exceeds the model's maximum context of {max_context} tokens")
    stride = context if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= context:
        raise GenerationError(f"stride must be between 1 and the context ({context}), got {stride!r}")
    return stride


def _window_nll(model, ids: torch.Tensor, first: int, chunk: int) -> torch.Tensor:
    """Summed NLL of tokens ids[first:] of one window (1, T), each predicted from its past."""
    h = model.hidden_states(ids)
    total = torch.zeros((), dtype=torch.float64)
    for a in range(first - 1, ids.shape[1] - 1, chunk):
        b = min(a + chunk, ids.shape[1] - 1)
        logits = model.logits(h[:, a:b]).float()
        total += F.cross_entropy(logits[0], ids[0, a + 1 : b + 1], reduction="sum").double()
    return total


@torch.no_grad()
def perplexity(
    model,
    ids: Sequence[int] | torch.Tensor,
    context: int,
    stride: int | None = None,
    chunk: int = 128,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on the token ids ``ids`` (see the module docstring)."""
    max_ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    stride = check_arguments(context, stride, max_ctx)
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    n = ids.shape[1]
    if n < 2:
        raise GenerationError(f"perplexity needs at least 2 tokens, got {n}")
    device = next(model.parameters()).device
    spans = windows(n, context, stride)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n - 1, unit="tok", desc="perplexity", leave=False)
    nll, scored, evaluated = torch.zeros((), dtype=torch.float64), 0, 0
    start = time.perf_counter()
    for begin, end, first in spans:
        nll += _window_nll(model, ids[:, begin:end].to(device), first - begin, chunk).cpu()
        scored += end - first
        evaluated += end - begin
        if bar is not None:
            bar.update(end - first)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    mean = (nll / scored).item()
    return PerplexityResult(
        perplexity=math.exp(mean), nll=mean, tokens=scored, windows=len(spans), context=context, stride=stride,
        evaluated=evaluated, seconds=seconds,
    )
