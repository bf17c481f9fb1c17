"""FP8 (e4m3) checkpoints with 128x128 block scales, as DeepSeek-V3 and Kimi K2 ship them.

Each quantised ``X.weight`` (float8_e4m3fn, shape (out, in)) comes with
``X.weight_scale_inv`` (float32, shape (ceil(out/128), ceil(in/128))): the real weight is the
FP8 value times the scale of its 128x128 block. Edge blocks are ragged when a dimension is
not a multiple of 128.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import CheckpointError

SCALE_SUFFIX = "_scale_inv"


def dequantize_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype=torch.float32) -> torch.Tensor:
    """W = fp8.float() * scale_inv broadcast over ``block`` x ``block`` tiles."""
    out, inp = w.shape
    rows, cols = -(-out // block), -(-inp // block)
    if tuple(scale_inv.shape) != (rows, cols):
        raise CheckpointError(
            f"FP8 block scale has shape {tuple(scale_inv.shape)}; a {out}x{inp} weight in {block}x{block} blocks needs {(rows, cols)}"
        )
    scale = scale_inv.float().repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inp]
    return (w.float() * scale).to(dtype)


def dequantize_stream(tensors: Iterator[tuple[str, torch.Tensor]], block: int = 128) -> Iterator[tuple[str, torch.Tensor]]:
    """Pair each FP8 weight with its ``*_scale_inv`` (in either order) and yield the float weight."""
    waiting_w: dict[str, torch.Tensor] = {}
    waiting_s: dict[str, torch.Tensor] = {}
    for name, t in tensors:
        if name.endswith(SCALE_SUFFIX):
            wname = name[: -len(SCALE_SUFFIX)]
            if wname in waiting_w:
                yield wname, dequantize_blocks(waiting_w.pop(wname), t, block)
            else:
                waiting_s[wname] = t
        elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if name in waiting_s:
                yield name, dequantize_blocks(t, waiting_s.pop(name), block)
            else:
                waiting_w[name] = t
        else:
            yield name, t
    if waiting_w or waiting_s:
        lone = sorted(waiting_w)[:4] + [n + SCALE_SUFFIX for n in sorted(waiting_s)[:4]]
        raise CheckpointError(
            f"FP8 checkpoint has {len(waiting_w)} weight(s) without a {SCALE_SUFFIX} and {len(waiting_s)} scale(s) "
            f"without a weight, e.g. {', '.join(lone)}"
        )
