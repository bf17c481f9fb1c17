"""Train small versions of the architectures under one fixed token budget.

The pieces, in the order a run uses them:

* :func:`scale_config` shrinks a published configuration to ``tiny`` or ``small`` while keeping
  what distinguishes it (GQA group ratio, head_dim / hidden ratio, FFN ratio, norm placement,
  QK-norm, the per-layer window and NoPE schedules, tied head, MoE shape);
* :func:`init_weights` gives a fresh model the usual training init (normal(0, 0.02), residual
  output projections scaled by 1/sqrt(2 * layers), norms at identity, biases zero);
* :func:`train` runs the loop: fixed token budget, warmup + cosine or WSD schedule, gradient
  accumulation, clipping, AdamW or Muon (``llmarch.training.optim``), optional QK-clip, MoE balancing
  (``llmarch.training.balance``), evaluation, JSONL metrics, checkpoints with exact resume, and data
  parallelism under ``torchrun`` (DDP or FSDP2).

Batches are a function of ``(seed, step)`` (``llmarch.training.data.TokenData``), the schedule a
function of the step, so a resumed run repeats the uninterrupted one loss for loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..analysis.params import count_model
from ..errors import CheckpointError, ConfigError
from ..model.config import SLIDING, ModelConfig
from ..model.decoder import Decoder, build_model
from ..model.layers import RMSNorm
from .balance import ExpertLoad, load_balancing_loss, load_fractions, router_modules
from .data import TokenData
from .optim import OPTIMIZERS, QKClip, build_optimizer

SCALES = {
    # hidden width, query heads, minimum depth (raised to one full period of the layer schedules)
    "tiny": dict(hidden_size=64, num_heads=4, num_layers=2),
    "small": dict(hidden_size=256, num_heads=8, num_layers=6),
}
SCHEDULES = ("cosine", "wsd")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


# ----------------------------------------------------------------------------------------
# Scale-down rule
# ----------------------------------------------------------------------------------------


def _period(seq: list) -> int:
    """Length of the shortest prefix whose repetition gives ``seq`` (its schedule period)."""
    n = len(seq)
    for p in range(1, n + 1):
        if all(seq[i] == seq[i % p] for i in range(n)):
            return p
    return n


def _schedule(seq: list, n: int) -> list:
    return [seq[i % _period(seq)] for i in range(n)]


def _round(x: float, multiple: int) -> int:
    return max(multiple, round(x / multiple) * multiple)


def scale_config(cfg: ModelConfig, scale: str, vocab_size: int | None = None, context: int = 256) -> ModelConfig:
    """A ``tiny`` or ``small`` version of ``cfg`` that keeps its distinguishing features.

    * width: ``hidden_size`` and query heads from :data:`SCALES`; KV heads keep the GQA ratio
      (MHA stays MHA, 4:1 stays 4:1, at least one KV head); ``head_dim`` keeps its ratio to
      ``hidden_size / num_heads`` (Gemma 3, Qwen3 use larger heads); the FFN keeps its ratio
      to ``hidden_size``; Gemma's ``query_pre_attn_scalar`` follows ``head_dim``.
    * depth: the scale's minimum, raised to a whole number of periods of the layer schedules
      (5 sliding : 1 global keeps 6 layers, NoPE every 4th keeps 4); the schedules are the
      original ones repeated.
    * context: ``max_position_embeddings = context``; sliding windows and attention chunks
      shrink in proportion to the context (window / original context), but never below
      context / 8 so that a local layer still sees more than a handful of tokens. RoPE
      theta is kept, RoPE *scaling* (a context-extension device) is dropped.
    * vocabulary: the data tokenizer's (``vocab_size``); embedding scale (Gemma's
      sqrt(hidden)) is recomputed for the new width; tied/untied head, norms, QK-norm,
      biases, activations and logit soft-capping are kept as they are.
    """
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    s = SCALES[scale]
    d = cfg.to_dict()
    hidden, heads = s["hidden_size"], s["num_heads"]
    kv = max(1, round(heads * cfg.num_kv_heads / cfg.num_heads))
    while heads % kv:
        kv -= 1
    head_ratio = cfg.head_dim * cfg.num_heads / cfg.hidden_size
    head_dim = _round(hidden / heads * head_ratio, 2)
    periods = [_period(cfg.layer_types)]
    if cfg.rope_layers is not None:
        periods.append(_period(cfg.rope_layers))
    moe_layers = getattr(cfg, "moe_layers", None)
    dense_first = _dense_first(moe_layers)
    if moe_layers is not None and dense_first is None:
        periods.append(_period(moe_layers))  # an interleaving such as Llama 4's dense/MoE
    period = math.lcm(*periods)
    layers = max(s["num_layers"], period, 2 if dense_first else 1)
    layers = -(-layers // period) * period
    orig_ctx = cfg.max_position_embeddings

    def shrink(span: int | None) -> int | None:
        if span is None:
            return None
        return min(context, max(context // 8, round(span * context / orig_ctx)))

    d.update(
        name=f"{cfg.name or 'model'}-{scale}",
        vocab_size=vocab_size or cfg.vocab_size,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=_round(hidden * cfg.intermediate_size / cfg.hidden_size, 8),
        num_layers=layers,
        layer_types=_schedule(cfg.layer_types, layers),
        rope_layers=_schedule(cfg.rope_layers, layers) if cfg.rope_layers is not None else None,
        sliding_window=shrink(cfg.sliding_window),
        attention_chunk_size=shrink(cfg.attention_chunk_size),
        max_position_embeddings=context,
        rope=dict(theta=cfg.rope.theta, scaling=None),
        rope_local=dict(theta=cfg.rope_local.theta, scaling=None) if cfg.rope_local is not None else None,
    )
    _scale_small_device_fields(d, cfg, hidden / cfg.hidden_size, period)
    _scale_moe_mla(d, hidden / cfg.hidden_size, (hidden / heads) / (cfg.hidden_size / cfg.num_heads), dense_first)
    if cfg.query_pre_attn_scalar is not None and cfg.query_pre_attn_scalar != 1.0:
        d["query_pre_attn_scalar"] = cfg.query_pre_attn_scalar * head_dim / cfg.head_dim
    if cfg.embed_scale is not None and math.isclose(cfg.embed_scale, math.sqrt(cfg.hidden_size)):
        d["embed_scale"] = math.sqrt(hidden)
    return ModelConfig.from_dict(d).validate()


def _resample(seq: list, n: int) -> list:
    """A per-layer list stretched or squeezed to ``n`` layers, keeping where along the depth each value sits."""
    return [seq[i * len(seq) // n] for i in range(n)]


def _dense_first(moe_layers: list[bool] | None) -> int | None:
    """How many leading dense layers precede all-MoE layers (DeepSeek-V3: 3); None if another pattern."""
    if moe_layers is None:
        return 0
    k = moe_layers.index(True) if True in moe_layers else len(moe_layers)
    return k if all(moe_layers[k:]) else None


def _scale_moe_mla(d: dict[str, Any], ratio: float, head_ratio: float, dense_first: int | None) -> None:
    """MoE keeps its shape (experts, top-k, groups, shared expert, dense-first layers), experts
    get narrower with the width; MLA ranks follow the width, its head dims the head width."""
    n = d["num_layers"]
    if d.get("moe"):
        moe = dict(d["moe"])
        for key in ("expert_size", "shared_expert_size"):
            if moe.get(key):
                moe[key] = _round(moe[key] * ratio, 8)
        d["moe"] = moe
        if d.get("moe_layers") is not None:
            if dense_first is None:
                d["moe_layers"] = _schedule(d["moe_layers"], n)
            else:
                k = min(n - 1, max(1, round(dense_first * n / len(d["moe_layers"])))) if dense_first else 0
                d["moe_layers"] = [False] * k + [True] * (n - k)
    if d.get("mla"):
        mla = dict(d["mla"])
        for key in ("q_lora_rank", "kv_lora_rank"):
            if mla.get(key):
                mla[key] = _round(mla[key] * ratio, 8)
        for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            mla[key] = _round(mla[key] * head_ratio, 2)
        d["mla"] = mla


def _scale_small_device_fields(d: dict[str, Any], cfg: ModelConfig, ratio: float, period: int) -> None:
    """Gemma 3n's extras: per-layer FFN widths and sparsity follow the depth, ranks the width,
    the KV-shared tail keeps its share of the layers (with enough layers before it to share from)."""
    n = d["num_layers"]
    if cfg.num_kv_shared_layers:
        share = cfg.num_kv_shared_layers / cfg.num_layers
        while True:
            shared = max(1, round(n * share))
            first = n - shared
            if first > 0 and set(d["layer_types"][first:]) <= set(d["layer_types"][:first]):
                break
            n += period
            d["layer_types"] = _schedule(cfg.layer_types, n)
            if d.get("rope_layers") is not None:
                d["rope_layers"] = _schedule(cfg.rope_layers, n)
        d.update(num_layers=n, num_kv_shared_layers=shared)
    if cfg.intermediate_sizes is not None:
        d["intermediate_sizes"] = [_round(w * ratio, 8) for w in _resample(cfg.intermediate_sizes, n)]
    if cfg.activation_sparsity is not None:
        d["activation_sparsity"] = _resample(cfg.activation_sparsity, n)
    if cfg.laurel_rank is not None:
        d["laurel_rank"] = max(2, round(cfg.laurel_rank * ratio))
    if cfg.hidden_size_per_layer_input is not None:
        d["hidden_size_per_layer_input"] = max(4, round(cfg.hidden_size_per_layer_input * ratio))
        d["vocab_size_per_layer_input"] = d["vocab_size"]


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["hidden_size=128", "qk_norm=head", "layer_types=[\\"full\\"]"]`` -> dict (JSON values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw  # a bare string such as qk_norm=head
    return out


def apply_overrides(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    d = cfg.to_dict()
    d.update(overrides)
    if ("hidden_size" in overrides or "num_heads" in overrides) and "head_dim" not in overrides:
        d["head_dim"] = None  # re-derive it from the new hidden_size / num_heads
    if "num_layers" in overrides:
        for key in ("layer_types", "rope_layers"):
            if key not in overrides and d.get(key) is not None:
                d[key] = _schedule(d[key], overrides["num_layers"])
    return ModelConfig.from_dict(d).validate()


def check_trainable(cfg: ModelConfig, seq_len: int) -> None:
    """Shape problems that only show against a training context."""
    if cfg.sliding_window is not None and SLIDING in cfg.layer_types and cfg.sliding_window > seq_len:
        raise ConfigError(
            f"sliding_window ({cfg.sliding_window}) is larger than the training context --seq-len ({seq_len}); "
            "such a layer is global attention. Use a smaller window or a longer context."
        )
    if cfg.position == "learned" and seq_len > cfg.max_position_embeddings:
        raise ConfigError(
            f"--seq-len {seq_len} exceeds max_position_embeddings ({cfg.max_position_embeddings}) of the learned positions"
        )


def resolve_model_config(
    arch: str, scale: str | None, overrides: dict[str, Any], vocab_size: int, seq_len: int
) -> ModelConfig:
    """Preset name or config.json -> (scaled, overridden) config for a vocabulary and context."""
    from ..families import get_config

    cfg = ModelConfig.from_json(arch) if arch.endswith(".json") else get_config(arch)
    if scale:
        cfg = scale_config(cfg, scale, vocab_size, seq_len)
    else:
        cfg = cfg.replace(vocab_size=vocab_size)
    cfg = apply_overrides(cfg, overrides) if overrides else cfg
    if cfg.vocab_size < vocab_size:
        raise ConfigError(f"vocab_size {cfg.vocab_size} is smaller than the data tokenizer's {vocab_size}")
    check_trainable(cfg, seq_len)
    return cfg


# ----------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------

RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


@torch.no_grad()
def init_weights(model: Decoder, std: float = 0.02) -> Decoder:
    """Training init: normal(0, std) weights, residual outputs std / sqrt(2 * layers), norms identity.

    Parameters are visited by name so that any new module (MoE experts stored as 3-D tensors,
    MLA projections) is covered: a name containing ``o_proj`` or ``down_proj`` is a residual
    output; 1-D parameters of norms go to their identity and other 1-D parameters (biases) to
    zero. Buffers named ``e_score_correction_bias`` (MoE selection bias) are zeroed.
    """
    resid_std = std / math.sqrt(2 * model.config.num_layers)
    norms = {
        id(p): m
        for m in model.modules()
        if isinstance(m, (RMSNorm, nn.LayerNorm))
        for p in m.parameters(recurse=False)
    }
    for name, p in model.named_parameters():
        if id(p) in norms:
            m = norms[id(p)]
            unit_offset = getattr(m, "unit_offset", False)
            p.fill_(0.0 if (name.endswith("bias") or unit_offset) else 1.0)
        elif p.ndim >= 2:
            p.normal_(0.0, resid_std if any(r in name for r in RESIDUAL_OUTPUTS) else std)
        else:
            p.zero_()
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    return model


# ----------------------------------------------------------------------------------------
# Run configuration
# ----------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    arch: str  # preset name or config.json
    data: str  # prepared data folder (llmarch data prepare)
    out: str
    scale: str | None = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    tokens: int = 1_000_000  # training budget in tokens (steps = tokens // tokens per step)
    batch_size: int = 8  # sequences per micro-batch per process
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup: int = 20  # steps
    decay_fraction: float = 0.2  # WSD: share of the steps spent decaying
    optimizer: str = "adamw"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    qk_clip: float | None = None  # tau of MuonClip's QK-clip
    aux_loss: float = 0.0  # coefficient of the MoE load-balancing loss
    bias_update: float = 0.0  # gamma of DeepSeek-V3's auxiliary-loss-free balancing
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 0  # 0: only at the end
    stop_at: int | None = None  # stop (after saving) at this step, as if pre-empted
    seed: int = 0
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU | float32 | bf16
    dist: str = "ddp"  # under torchrun: ddp | fsdp
    # intra-op CPU threads (None: torch's default, one per core). On a machine shared with other
    # jobs 1 is often much faster: an op split over 2 threads waits for the slower one.
    threads: int | None = None
    progress: bool = True

    def check(self) -> None:
        for name in ("tokens", "batch_size", "seq_len", "grad_accum", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.dtype not in ("auto", "float32", "bf16"):
            raise ConfigError(f"dtype must be auto, float32 or bf16, got {self.dtype!r}")
        if self.dist not in ("ddp", "fsdp"):
            raise ConfigError(f"dist must be ddp or fsdp, got {self.dist!r}")
        if self.dist == "fsdp" and _world()[1] > 1:
            if self.optimizer == "muon":
                raise ConfigError("Muon orthogonalises whole matrices, FSDP2 holds shards of them: use --dist ddp with Muon")
            if self.qk_clip:
                raise ConfigError("QK-clip rescales whole heads of W_q/W_k, FSDP2 holds shards of them: use --dist ddp")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warmup, then cosine or WSD."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    lo = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = max(1, int(total * cfg.decay_fraction))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1.0 - lo) * (step - decay_start + 1) / decay_steps


def count_spikes(losses: list[float], factor: float = 1.5, window: int = 50) -> int:
    """Steps whose loss exceeds ``factor`` x the median of the preceding ``window`` losses."""
    spikes = 0
    for i in range(1, len(losses)):
        if losses[i] > factor * statistics.median(losses[max(0, i - window) : i]):
            spikes += 1
    return spikes


# ----------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _setup_distributed(device: torch.device) -> tuple[int, int]:
    rank, world = _world()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


def _wrap(model: Decoder, kind: str, world: int, device: torch.device) -> nn.Module:
    if world == 1:
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _mean_across(x: float, world: int) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def _full_norm(norm: torch.Tensor) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


def _state_dicts(model: nn.Module, opt) -> tuple[dict, list[dict] | dict]:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module.state_dict(), opt.state_dict()
    if dist.is_initialized():  # FSDP2: gather full tensors
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
        )

        return get_state_dict(model, opt.optimizers, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), opt.state_dict()


def _load_state_dicts(model: nn.Module, opt, model_state: dict, opt_state) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.module.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
    elif dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_state_dict,
        )

        set_state_dict(model, opt.optimizers, model_state_dict=model_state, optim_state_dict=opt_state,
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)


def save_checkpoint(path: Path, step: int, model: nn.Module, opt, cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    model_state, opt_state = _state_dicts(model, opt)
    if _world()[0] != 0:
        return
    state = dict(
        step=step,
        model=model_state,
        optimizer=opt_state,
        train_config=cfg.to_dict(),
        model_config=model_cfg.to_dict(),
        rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate()),
    )
    tmp = path / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / CHECKPOINT)


def read_checkpoint(run_dir: str | Path) -> dict:
    f = Path(run_dir) / CHECKPOINT
    if not f.is_file():
        raise CheckpointError(f"no {CHECKPOINT} in {run_dir}; --resume expects the --out folder of an earlier run")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # truncated or foreign
        raise CheckpointError(f"cannot read {f}: {e}") from None


def resume_config(run_dir: str | Path, arch: str | None = None, model_cfg: ModelConfig | None = None) -> TrainConfig:
    """The run configuration stored in a checkpoint; refuse another architecture."""
    ck = read_checkpoint(run_dir)
    cfg = TrainConfig(**ck["train_config"])
    if arch is not None and arch != cfg.arch:
        raise CheckpointError(
            f"checkpoint in {run_dir} is of architecture {cfg.arch!r}, not {arch!r}; resume it without --arch "
            "or start a new run in another --out folder"
        )
    if model_cfg is not None and model_cfg.to_dict() != ck["model_config"]:
        raise CheckpointError(f"checkpoint in {run_dir} was trained with a different model configuration")
    return cfg


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------


def _autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, cfg: TrainConfig) -> float:
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        with _autocast(cfg, device):
            logits = model(x.to(device))
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum"))
        n += y.numel()
    model.train()
    return total / n


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec; ru_maxrss
    would carry the peak of a parent that forked us (e.g. ``llmarch ablate``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train(cfg: TrainConfig, resume: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Run (or resume) one training run; return its summary (also written to ``out/summary.json``).

    Every check (configuration, data size, checkpoint compatibility) happens before the first
    step, so a bad run fails fast with a ConfigError / DataError / CheckpointError.
    """
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = _world()
    data = TokenData.open(cfg.data)
    model_cfg = resolve_model_config(cfg.arch, cfg.scale, cfg.overrides, data.vocab_size, cfg.seq_len)
    data.check_fits(cfg.seq_len, cfg.batch_size * cfg.grad_accum * world)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    total_steps = cfg.tokens // tokens_per_step
    if total_steps < 1:
        raise ConfigError(f"--tokens {cfg.tokens} is less than one step of {tokens_per_step} tokens")
    ckpt = None
    if resume is not None:
        resume_config(resume, cfg.arch, model_cfg)
        ckpt = read_checkpoint(resume)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    _setup_distributed(dev)

    torch.manual_seed(cfg.seed)
    model = init_weights(build_model(model_cfg, device="cpu")).to(dev)
    counts = count_model(model)
    routers = router_modules(model)
    load = ExpertLoad(routers)
    qk_clip = QKClip(model, cfg.qk_clip) if cfg.qk_clip else None
    wrapped = _wrap(model, cfg.dist, world, dev)
    opt = build_optimizer(wrapped, cfg.optimizer, cfg.lr, cfg.weight_decay)
    start = 0
    if ckpt is not None:
        try:
            _load_state_dicts(wrapped, opt, ckpt["model"], ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint in {resume} does not fit this model: {e}") from None
        start = int(ckpt["step"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])

    out = Path(cfg.out)
    metrics_path = out / METRICS
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model_config.json").write_text(json.dumps(model_cfg.to_dict(), indent=2))
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        lines = metrics_path.read_text().splitlines() if (ckpt is not None and metrics_path.exists()) else []
        kept = [ln for ln in lines if json.loads(ln)["step"] <= start]  # drop steps after the checkpoint
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
    val_batches = data.val_batches(cfg.batch_size, cfg.seq_len, cfg.eval_batches)

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start, desc=model_cfg.name or "train", unit="step",
               disable=not cfg.progress or rank != 0)
    end = total_steps if cfg.stop_at is None else min(total_steps, cfg.stop_at)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    val_loss = None
    for step in range(start, end):
        t0 = time.perf_counter()
        opt.set_lr_factor(lr_factor(step, total_steps, cfg))
        loss_sum, aux_sum = 0.0, 0.0
        for micro in range(cfg.grad_accum):
            x, y = data.train_batch(cfg.seed, step, micro, rank, world, cfg.batch_size, cfg.grad_accum, cfg.seq_len)
            sync = nullcontext()
            if isinstance(wrapped, nn.parallel.DistributedDataParallel) and micro < cfg.grad_accum - 1:
                sync = wrapped.no_sync()
            with sync:
                with _autocast(cfg, dev):
                    logits = wrapped(x.to(dev))
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(dev).flatten())
                total = loss
                aux = load_balancing_loss(routers) if routers and cfg.aux_loss else None
                if aux is not None:
                    total = total + cfg.aux_loss * aux
                    aux_sum += float(aux.detach()) / cfg.grad_accum
                (total / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
            load.record()
        norm = _full_norm(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        opt.step()
        opt.zero_grad()
        record: dict[str, Any] = dict(step=step + 1, tokens=(step + 1) * tokens_per_step)
        if routers:
            totals = load.totals()
            if cfg.bias_update:
                load.update_bias(cfg.bias_update, totals)
            record["expert_load"] = load_fractions(totals)
            if cfg.aux_loss:
                record["aux_loss"] = _mean_across(aux_sum, world)
            load.reset()
        if qk_clip is not None:
            record["max_logit"] = qk_clip.global_max()
            record["qk_clipped_heads"] = qk_clip.apply()
        loss_value = _mean_across(loss_sum, world)
        elapsed = time.perf_counter() - t0
        record.update(loss=loss_value, lr=opt.param_groups[0]["lr"], grad_norm=norm, tokens_per_s=tokens_per_step / elapsed)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == total_steps:
            val_loss = evaluate(wrapped, val_batches, dev, cfg)
            record["val_loss"] = val_loss
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{record['lr']:.2e}")
        at_save = cfg.save_every and (step + 1) % cfg.save_every == 0
        if at_save or step + 1 == end:
            save_checkpoint(out, step + 1, wrapped, opt, cfg, model_cfg)
    bar.close()
    summary = _summary(metrics_path, cfg, model_cfg, counts, total_steps, rank) if rank == 0 else {}
    if dist.is_initialized():
        dist.barrier()
    return summary


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def _summary(metrics_path: Path, cfg: TrainConfig, model_cfg: ModelConfig, counts, total_steps: int, rank: int) -> dict:
    rows = read_metrics(metrics_path)
    losses = [r["loss"] for r in rows]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in rows[1:]] or [r["tokens_per_s"] for r in rows]
    summary = dict(
        name=model_cfg.name,
        steps=len(rows),
        total_steps=total_steps,
        finished=len(rows) == total_steps,
        tokens=rows[-1]["tokens"] if rows else 0,
        final_loss=losses[-1] if losses else None,
        final_val_loss=vals[-1] if vals else None,
        tokens_per_s=statistics.median(speeds) if speeds else None,
        peak_rss_mb=_peak_rss_mb(),
        max_grad_norm=max((r["grad_norm"] for r in rows), default=None),
        loss_spikes=count_spikes(losses),
        params_total=counts.total,
        params_active=counts.active,
        params_non_embedding=counts.non_embedding,
    )
    (metrics_path.parent / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


__all__ = [
    "TrainConfig",
    "count_spikes",
    "init_weights",
    "lr_factor",
    "read_metrics",
    "resolve_model_config",
    "scale_config",
    "train",
]
