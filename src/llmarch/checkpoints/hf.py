"""Hugging Face checkpoints: strict, memory-lean loading and export.

Loading builds the module tree on the meta device (no memory), then streams each tensor
from the memory-mapped safetensors files, renames it with the family's key map, checks its
shape and assigns it as the parameter: the weights exist once, in the model.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import CheckpointError
from ..families import (
    config_from_hf,
    family_for_config,
    family_for_model_type,
    rename_wrapped,
    resolve_hf_config,
)
from ..model.config import ModelConfig
from ..model.decoder import Decoder, build_model

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
    model: Decoder, cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]], wrapper=None, dtype=None, device=None
) -> Decoder:
    """Assign HF-named tensors to a (meta) model, strictly."""
    fam = family_for_config(cfg)
    loaded: set[str] = set()
    dropped = 0

    def text_tensors():
        nonlocal dropped
        for hf_name, t in tensors:
            name = rename_wrapped(hf_name, wrapper)
            if name is None:
                dropped += 1
            else:
                yield name, t

    stream = text_tensors() if fam.prepare is None else fam.prepare(text_tensors(), cfg)
    for name, t in stream:
        if fam.is_ignored(name):
            continue
        if cfg.tie_embeddings and name == fam.keys.to_hf("lm_head.weight"):
            continue  # some tied checkpoints also store the head; it is the embedding
        for native, x in fam.hf_to_native(name, t, cfg):
            if native in loaded:
                raise CheckpointError(f"tensor {native!r} appears twice in the checkpoint")
            if dtype is not None and x.is_floating_point():
                x = x.to(dtype)
            if device is not None:
                x = x.to(device)
            _set_param(model, native, x)
            loaded.add(native)
    if dropped:
        warnings.warn(f"dropped {dropped} non-text tensors (vision tower / projector); loaded the text decoder only")
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        shown = ", ".join(f"{n} (HF name {fam.keys.to_hf(n) or '?'})" for n in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}{more}")
    return model


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None) -> Decoder:
    """Load a Hugging Face checkpoint directory (config.json + safetensors) or a .gguf file.

    ``dtype=None`` keeps the dtype the weights are stored in.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file() and p.suffix == ".gguf":
        from .gguf import GGUFCheckpoint

        ck = GGUFCheckpoint(p)
        d = ck.hf_config
        tensors = ck.tensors()
    elif p.is_dir():
        d = read_config_json(p)
        tensors = iter_safetensors(safetensors_files(p))
    else:
        raise CheckpointError(f"{p} is neither a checkpoint directory nor a .gguf file")
    cfg = config_from_hf(d)
    _, wrapper = resolve_hf_config(d)
    model = build_model(cfg, device="meta")
    load_tensors(model, cfg, tensors, wrapper=wrapper, dtype=dtype, device=device)
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


__all__ = ["from_pretrained", "save_pretrained", "load_tensors", "family_for_model_type"]
