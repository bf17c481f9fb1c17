"""Hugging Face checkpoints: strict, memory-lean loading and export.

Loading builds the module tree on the meta device (no memory), then streams each tensor
from the memory-mapped safetensors files (or a GGUF file), passes the stream through the
family's ``sanitize`` (renaming and any surgery), checks each shape and assigns it as the
parameter: the weights exist once, in the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..families import family_for_config, family_for_model_type
from ..families.base import HF
from ..model.config import ModelConfig
from ..model.decoder import Decoder, build_model
from .budget import check_budget
from .formats import GGUFCheckpoint, HFDirectory, open_checkpoint
from .quantized import QuantizedTensor

#: (model, llmarch name, tensor): puts a still-quantised tensor into the model being loaded
KeepQuantized = Callable[[nn.Module, str, QuantizedTensor], None]


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        mod = None
    if mod is not None and mod._buffers.get(attr) is not None and attr not in mod._non_persistent_buffers_set:
        cur = mod._buffers[attr]  # saved buffers (the MoE router's e_score_correction_bias)
        if tuple(cur.shape) != tuple(tensor.shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}; the configuration expects {tuple(cur.shape)}")
        mod._buffers[attr] = tensor
        return
    if mod is None or attr not in mod._parameters or mod._parameters[attr] is None:
        raise CheckpointError(f"checkpoint tensor maps to {name!r}, which this architecture does not have")
    cur = mod._parameters[attr]
    if cur.is_floating_point() and not tensor.is_floating_point():
        raise CheckpointError(f"tensor {name!r} has dtype {tensor.dtype}; the configuration expects a floating-point weight")
    if tuple(cur.shape) != tuple(tensor.shape):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}; the configuration expects {tuple(cur.shape)}"
        )
    mod._parameters[attr] = nn.Parameter(tensor, requires_grad=cur.requires_grad)


def load_tensors(
    model: Decoder,
    cfg: ModelConfig,
    tensors: Iterator[tuple[str, torch.Tensor | QuantizedTensor]],
    fmt: str = HF,
    dtype=None,
    device=None,
    quantized: KeepQuantized | None = None,
) -> Decoder:
    """Assign a checkpoint's tensors (``fmt``: HF or GGUF names) to a (meta) model, strictly.

    A :class:`QuantizedTensor` in the stream is dequantised, or handed to ``quantized(model,
    llmarch name, tensor)``, which puts it into the model itself (as a quantised module:
    :func:`llmarch.inference.gguf_quant.assign_quantized`) as soon as it arrives."""
    fam = family_for_config(cfg)
    loaded: set[str] = set()
    for native, x in fam.to_native(tensors, cfg, fmt):
        if cfg.tie_embeddings and native == "lm_head.weight":
            continue  # some tied checkpoints also store the head; it is the embedding
        if native in loaded:
            raise CheckpointError(f"tensor {native!r} appears twice in the checkpoint")
        loaded.add(native)
        if isinstance(x, QuantizedTensor):
            if quantized is not None:
                quantized(model, native, x)
                continue
            x = x.dequantize()
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        if device is not None:
            x = x.to(device)
        _set_param(model, native, x)
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        shown = ", ".join(f"{n} (HF name {fam.keys.to_hf(n) or '?'})" for n in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}{more}")
    return model


def from_pretrained(
    path: str | os.PathLike | HFDirectory | GGUFCheckpoint,
    dtype: torch.dtype | None = None,
    device=None,
    quantized: KeepQuantized | None = None,
) -> Decoder:
    """Load a Hugging Face checkpoint directory (config.json + safetensors) or a .gguf file.

    ``path`` may also be a checkpoint already opened with
    :func:`llmarch.checkpoints.formats.open_checkpoint` (so a GGUF file's metadata, which
    its tokenizer also reads, is parsed once). ``dtype=None`` keeps the dtype the weights
    are stored in. ``quantized``: what to do with a GGUF file's block-quantised matrices
    instead of dequantising them (see :func:`load_tensors`).
    """
    ck = open_checkpoint(path) if isinstance(path, (str, os.PathLike)) else path
    cfg = ck.config
    check_budget(ck, cfg, dtype=dtype, device=device)
    model = build_model(cfg, device="meta")
    load_tensors(model, cfg, ck.raw_tensors(quantized is not None), ck.format, dtype, device, quantized)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def save_pretrained(model: Decoder, path: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the Hugging Face format of the model's family.

    transformers (and so vLLM) loads the result with ``AutoModelForCausalLM.from_pretrained``.
    """
    from safetensors.torch import save_file

    cfg = model.config
    fam = family_for_config(cfg)
    d = fam.config_to_hf(cfg)
    dtype = next(model.parameters()).dtype
    d["torch_dtype"] = _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if any(v.is_meta for v in state.values()):
        from ..inference.packed import RELEASED

        raise CheckpointError(f"cannot save: {RELEASED}")
    hf_state = fam.native_to_hf(state, cfg)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(d, indent=2))
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


__all__ = ["family_for_model_type", "from_pretrained", "load_tensors", "save_pretrained"]
