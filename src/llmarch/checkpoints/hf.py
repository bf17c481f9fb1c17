"""Hugging Face checkpoints: strict, memory-lean loading and export.

Loading builds the module tree on the meta device (no memory), then streams each tensor
from the memory-mapped safetensors files (or a GGUF file), passes the stream through the
family's ``sanitize`` (renaming and any surgery), checks each shape and assigns it as the
parameter: the weights exist once, in the model.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..families import family_for_config, family_for_model_type
from ..families.base import HF
from ..model.config import ModelConfig
from ..model.decoder import Decoder, build_model

if TYPE_CHECKING:
    from .formats import GGUFCheckpoint, HFDirectory

# ----------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------


def read_config_json(path: Path) -> dict[str, Any]:
    f = path / "config.json"
    if not f.exists():
        raise CheckpointError(f"{path} has no config.json (expected a Hugging Face checkpoint directory or a .gguf file)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are not in {path}: {', '.join(missing)}")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"no *.safetensors file in {path}")
    return found


def _check_safetensors_file(f: Path) -> None:
    """Catch truncated files before reading: the header must fit and its data must fit."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{f} is truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if 8 + n > size:
                raise CheckpointError(f"{f} is truncated: header says {n} bytes of metadata, the file has {size} bytes")
            header = json.loads(fh.read(n))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is corrupt: its safetensors header is not valid JSON ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{f} is truncated: its tensors need {8 + n + end} bytes, the file has {size} bytes"
        )


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        _check_safetensors_file(f)
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {f}: {e}") from None


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
    if tuple(cur.shape) != tuple(tensor.shape):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}; the configuration expects {tuple(cur.shape)}"
        )
    mod._parameters[attr] = nn.Parameter(tensor, requires_grad=cur.requires_grad)


def load_tensors(
    model: Decoder, cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]], fmt: str = HF, dtype=None, device=None
) -> Decoder:
    """Assign a checkpoint's tensors (``fmt``: HF or GGUF names) to a (meta) model, strictly."""
    fam = family_for_config(cfg)
    loaded: set[str] = set()
    for native, x in fam.to_native(tensors, cfg, fmt):
        if cfg.tie_embeddings and native == "lm_head.weight":
            continue  # some tied checkpoints also store the head; it is the embedding
        if native in loaded:
            raise CheckpointError(f"tensor {native!r} appears twice in the checkpoint")
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        if device is not None:
            x = x.to(device)
        _set_param(model, native, x)
        loaded.add(native)
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        shown = ", ".join(f"{n} (HF name {fam.keys.to_hf(n) or '?'})" for n in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}{more}")
    return model


def from_pretrained(path: str | os.PathLike | HFDirectory | GGUFCheckpoint, dtype: torch.dtype | None = None, device=None) -> Decoder:
    """Load a Hugging Face checkpoint directory (config.json + safetensors) or a .gguf file.

    ``path`` may also be a checkpoint already opened with
    :func:`llmarch.checkpoints.formats.open_checkpoint` (so a GGUF file's metadata, which
    its tokenizer also reads, is parsed once). ``dtype=None`` keeps the dtype the weights
    are stored in.
    """
    # imported here: formats reads directories with this module's helpers
    from .formats import open_checkpoint

    ck = open_checkpoint(path) if isinstance(path, (str, os.PathLike)) else path
    cfg = ck.config
    model = build_model(cfg, device="meta")
    load_tensors(model, cfg, ck.raw_tensors(), fmt=ck.format, dtype=dtype, device=device)
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
