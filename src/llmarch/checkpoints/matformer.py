"""MatFormer slicing: cut a smaller model out of a larger one (Gemma 3n E2B from E4B).

A MatFormer is trained so that its nested sub-networks work on their own: the first k
hidden units of every FFN (the first k rows of gate/up, the first k columns of down) and,
optionally, a subset of the layers. Slicing is a configuration change plus weight slicing;
the result is an ordinary checkpoint.

Skipping layers must keep KV sharing valid: a kept KV-shared layer must still read the keys
and values of the same source layer, so a source cannot be skipped while a layer that reads
it is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..atomic import atomic_dir
from ..errors import ConfigError
from ..model.config import ModelConfig
from ..model.decoder import Decoder, build_model


def _widths(cfg: ModelConfig, ffn_widths: int | Sequence[int] | None) -> list[int]:
    n = cfg.num_layers
    have = [cfg.layer_intermediate_size(i) for i in range(n)]
    if ffn_widths is None:
        return have
    widths = [int(ffn_widths)] * n if isinstance(ffn_widths, int) else [int(w) for w in ffn_widths]
    if len(widths) != n:
        raise ConfigError(f"--ffn-widths needs one width or one per layer of the source model ({n}); got {len(widths)}")
    for i, (w, h) in enumerate(zip(widths, have)):
        if not 0 < w <= h:
            raise ConfigError(f"FFN width {w} for layer {i} is not in 1..{h} (the source layer's width)")
    return widths


def slice_config(
    cfg: ModelConfig, ffn_widths: int | Sequence[int] | None = None, skip_layers: Sequence[int] = ()
) -> tuple[ModelConfig, list[int]]:
    """(configuration of the sub-network, indices of the source layers it keeps)."""
    n = cfg.num_layers
    skip = sorted(set(int(i) for i in skip_layers))
    bad = [i for i in skip if not 0 <= i < n]
    if bad:
        raise ConfigError(f"--skip-layers {bad} out of range: the source model has layers 0..{n - 1}")
    keep = [i for i in range(n) if i not in skip]
    if not keep:
        raise ConfigError("cannot skip every layer")
    widths = _widths(cfg, ffn_widths)
    first_shared = n - cfg.num_kv_shared_layers

    def per_layer(values: list | None) -> list | None:
        return [values[i] for i in keep] if values is not None else None

    new = cfg.replace(
        num_layers=len(keep),
        layer_types=per_layer(cfg.layer_types),
        rope_layers=per_layer(cfg.rope_layers),
        activation_sparsity=per_layer(cfg.activation_sparsity),
        intermediate_size=max(widths[i] for i in keep),
        # uniform widths stay a plain intermediate_size, so other decoders can be sliced too
        intermediate_sizes=[widths[i] for i in keep] if len({widths[i] for i in keep}) > 1 else None,
        num_kv_shared_layers=sum(1 for i in keep if i >= first_shared),
        name=f"{cfg.name or 'model'}-sliced",
    )
    new.validate()
    for j, i in enumerate(keep):
        src = new.layer_kv_source(j)
        if (keep[src] if src is not None else None) != cfg.layer_kv_source(i):
            raise ConfigError(
                f"skipping {skip} changes where layer {i} reads its keys/values (layer "
                f"{cfg.layer_kv_source(i)} in the source model); keep that layer or skip layer {i} too"
            )
    return new, keep


def slice_state(state: dict[str, torch.Tensor], cfg: ModelConfig, new: ModelConfig, keep: list[int]) -> dict[str, torch.Tensor]:
    """Slice an llmarch state dict of ``cfg`` to the sub-network ``new`` (layers ``keep``)."""
    out: dict[str, torch.Tensor] = {}
    old_index = {old: j for j, old in enumerate(keep)}
    for name, t in state.items():
        parts = name.split(".")
        if parts[0] == "layers":
            i = int(parts[1])
            if i not in old_index:
                continue
            j = old_index[i]
            parts[1] = str(j)
            w = new.layer_intermediate_size(j)
            if parts[2] == "mlp" and parts[3] in ("gate_proj", "up_proj"):
                t = t[:w]
            elif parts[2] == "mlp" and parts[3] == "down_proj" and parts[4] == "weight":
                t = t[:, :w]
        elif parts[0] == "ple" and parts[1] in ("table", "projection"):
            # both hold num_layers blocks of hidden_size_per_layer_input along one axis
            p = cfg.hidden_size_per_layer_input
            axis = 1 if parts[1] == "table" else 0
            blocks = t.unflatten(axis, (cfg.num_layers, p)).index_select(axis, torch.tensor(keep))
            t = blocks.flatten(axis, axis + 1)
        out[".".join(parts)] = t.contiguous()
    return out


def slice_model(model: Decoder, ffn_widths: int | Sequence[int] | None = None, skip_layers: Sequence[int] = ()) -> Decoder:
    """The MatFormer sub-network of ``model``: narrower FFNs and/or fewer layers, as a new model."""
    from ..inference.offload import OffloadedTable

    ple = getattr(model, "ple", None)
    if ple is not None and isinstance(ple.table, OffloadedTable):
        raise ConfigError("slice the model before offloading its per-layer embeddings")
    cfg = model.config
    new, keep = slice_config(cfg, ffn_widths, skip_layers)
    state = slice_state(model.state_dict(), cfg, new, keep)
    sliced = build_model(new, device="meta")
    sliced.load_state_dict(state, strict=True, assign=True)
    return sliced.train(model.training)


def parse_int_list(text: str) -> list[int]:
    """'8192' or '8192,8192,4096' or '20-24,28' -> list of ints (ranges inclusive)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            a, b = (int(x) for x in part.split("-")) if "-" in part else (int(part), int(part))
        except ValueError:
            raise ConfigError(f"cannot read {part!r} in {text!r}: expected integers or ranges like 20-24") from None
        if a > b:
            raise ConfigError(f"range {part!r} in {text!r} is empty: write ranges low-high, like {b}-{a}")
        out.extend(range(a, b + 1))
    return out


def slice_checkpoint(src: str, out: str, ffn_widths: str | None, skip_layers: str | None) -> Decoder:
    """``llmarch slice``: load ``src``, slice it, write an HF checkpoint to ``out``.

    ``out`` is written beside itself and renamed into place; it may not be ``src`` or inside it,
    and an existing folder there is replaced only if it holds a checkpoint (a config.json)."""
    from .hf import from_pretrained, save_pretrained

    src_path, out_path = Path(src).resolve(), Path(out).resolve()
    if out_path == src_path or src_path in out_path.parents:
        raise ConfigError(f"--out {out} is the source checkpoint {src} or inside it; write the slice to another folder")
    widths = parse_int_list(ffn_widths) if ffn_widths else None
    if widths is not None and len(widths) == 1:
        widths = widths[0]
    skip = parse_int_list(skip_layers) if skip_layers else ()
    with atomic_dir(out, lambda p: (p / "config.json").is_file(), "a checkpoint folder") as tmp:
        sliced = slice_model(from_pretrained(src), widths, skip)
        save_pretrained(sliced, tmp)
    return sliced


__all__ = ["slice_config", "slice_model", "slice_state", "slice_checkpoint", "parse_int_list"]
