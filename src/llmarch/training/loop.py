"""The training loop: train small versions of the architectures under one fixed token budget.

* :func:`init_weights` gives a fresh model the usual training init (normal(0, 0.02), residual
  output projections scaled by 1/sqrt(2 * layers), norms at identity, biases zero);
  :func:`seeded_model` builds a model and draws that init from a seed alone;
* :func:`train` runs the loop: fixed token budget, warmup + cosine or WSD schedule
  (``llmarch.training.schedule``), gradient accumulation, clipping, AdamW or Muon
  (``llmarch.training.optim``), optional QK-clip, MoE balancing (``llmarch.training.balance``),
  evaluation, JSONL metrics, checkpoints with exact resume (``llmarch.training.checkpointing``),
  and data parallelism under ``torchrun`` (DDP or FSDP2, ``llmarch.training.distributed``);
* :func:`read_metrics` reads a run's ``metrics.jsonl`` back (one row per step; ``batch_crc`` is
  the CRC-32 of the step's first micro-batch of input ids, so runs can be checked to have seen
  the same batches); the run's ``summary.json`` is written at the end (loss spikes and
  gradient-norm outliers by ``llmarch.training.spikes``, validation loss at longer contexts by
  :func:`length_eval`, MoE load balance by :func:`expert_cv`).

The model trained is a published configuration scaled down (``llmarch.training.scale``).
Batches are a function of ``(seed, step)`` (``llmarch.training.data.TokenData``), the schedule a
function of the step, so a resumed run repeats the uninterrupted one loss for loss.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import time
import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..analysis.params import count_model
from ..atomic import check_writable_dir, clean_stale, write_text
from ..errors import CheckpointError, ConfigError
from ..model.config import ModelConfig
from ..model.decoder import Decoder, build_model
from ..model.layers import RMSNorm
from . import distributed
from .balance import ExpertLoad, load_balancing_loss, load_fractions, router_modules
from .checkpointing import (
    CHECKPOINT,
    LEGACY_CHECKPOINT,
    MODEL_CONFIG,
    TRAIN_CONFIG,
    find_checkpoint,
    load_checkpoint,
    read_checkpoint,
    resume_config,
    save_checkpoint,
)
from .config import TrainConfig
from .data import TokenData
from .optim import QKClip, build_optimizer
from .scale import resolve_model_config
from .schedule import lr_factor
from .spikes import detect_grad_norm_outliers, detect_spikes

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
RUN_FILES = (CHECKPOINT, LEGACY_CHECKPOINT, METRICS, SUMMARY, TRAIN_CONFIG, MODEL_CONFIG)
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


def seeded_model(model_cfg: ModelConfig, seed: int) -> Decoder:
    """A freshly built model (on the CPU) with the training init drawn from ``seed`` alone.

    The global generator is seeded after the model is built, not before: module constructors
    draw from it, a different amount per architecture. So two variants of one seed draw the same
    values for the parameters they share up to their first difference in named order, the token
    embedding (first) included.
    """
    model = build_model(model_cfg, device="cpu")
    torch.manual_seed(seed)
    return init_weights(model)


def _autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def batch_crc(x: torch.Tensor) -> int:
    """The fingerprint of a batch of token ids recorded in each metrics row (``batch_crc``): the
    CRC-32 of its ids as int64, so runs can be checked to have seen the same batches."""
    return zlib.crc32(x.to(torch.int64).contiguous().numpy().tobytes())


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, cfg: TrainConfig) -> float:
    """Mean cross-entropy (nats/token) over every target of ``batches`` (one device sync at the end)."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for x, y in batches:
        with _autocast(cfg, device):
            logits = model(x.to(device))
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum")
        n += y.numel()
    model.train()
    return float(total) / n


def usable_length_multiples(cfg: TrainConfig, model_cfg: ModelConfig, windows: int) -> list[int]:
    """The multiples of ``cfg.seq_len`` (of ``cfg.length_multiples``) that :func:`length_eval` can
    evaluate, given the ``windows`` of the regular evaluation: one window of the multiple must fit
    in their tokens, and a model with learned positions has no embedding past
    ``max_position_embeddings``. The scaled configurations size that table to ``seq_len``, so a
    learned-position model gets 1x only; RoPE and NoPE models take any length."""
    out = []
    for m in sorted(set(cfg.length_multiples)):
        if windows // m < 1:
            continue
        if model_cfg.position == "learned" and m * cfg.seq_len > model_cfg.max_position_embeddings:
            continue
        out.append(m)
    return out


def _val_windows(data: TokenData, seq_len: int, windows: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly ``windows`` of ``data.val_batches``' fixed windows of ``seq_len``, in batches of ``batch``."""
    singles = data.val_batches(1, seq_len, windows)
    return [
        (torch.cat([x for x, _ in singles[i : i + batch]]), torch.cat([y for _, y in singles[i : i + batch]]))
        for i in range(0, len(singles), batch)
    ]


def length_eval(model: nn.Module, data: TokenData, cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device,
                regular: float | None = None) -> dict[str, float]:
    """Validation loss at each usable multiple ``m`` of the training context (:func:`usable_length_multiples`),
    keyed ``str(m)``.

    Every multiple scores the same validation targets: the first ``T`` tokens of the validation
    split, ``T`` the largest multiple of ``M * seq_len`` (``M`` the largest usable multiple) within
    the regular evaluation's ``windows * seq_len`` tokens. A window of ``m * seq_len`` covers ``m``
    consecutive 1x windows, so the longer contexts differ only in how much each target sees
    before it. Batches hold ``max(1, batch_size // m)`` windows. When ``windows`` is a multiple of
    ``M`` the 1x evaluation is the regular one (same windows, same batches): its loss
    ``regular``, when given, is used instead of evaluating again.
    """
    windows = min((len(data.val) - 1) // cfg.seq_len, cfg.batch_size * cfg.eval_batches)  # as val_batches
    usable = usable_length_multiples(cfg, model_cfg, windows)
    if not usable:
        return {}
    tokens = windows // max(usable) * max(usable) * cfg.seq_len
    out = {}
    for m in usable:
        if m == 1 and regular is not None and tokens == windows * cfg.seq_len:
            out["1"] = regular
            continue
        length = m * cfg.seq_len
        batches = _val_windows(data, length, tokens // length, max(1, cfg.batch_size // m))
        out[str(m)] = evaluate(model, batches, device, cfg)
    return out


def expert_cv(totals: list[torch.Tensor]) -> float:
    """MoE load imbalance of one step: the coefficient of variation (population std / mean) of
    the tokens each expert received, per MoE layer, averaged over the layers (0 = perfectly even)."""
    cvs = []
    for c in totals:
        c = c.double()
        mean = c.mean()
        cvs.append(float(c.std(correction=0) / mean) if mean > 0 else 0.0)
    return sum(cvs) / len(cvs)


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


def _device(name: str | None) -> torch.device:
    """The device to train on, checked before any work: ``None`` picks CUDA when there is a GPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: llmarch trains on cpu or cuda, not {dev.type}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: torch sees no CUDA GPU on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def run_files(out: Path) -> list[str]:
    """The files in ``out`` that show a run was started there (empty: no run)."""
    return [f for f in RUN_FILES if (out / f).exists()]


def _prepare_out(out: Path, resume: str | None, force: bool) -> None:
    """Check the run folder before any slow work: writable, and holding no run this one would overwrite."""
    check_writable_dir(out)
    resuming_here = resume is not None and out.resolve() == Path(resume).resolve()
    found = run_files(out)
    if found and not resuming_here and not force:
        raise ConfigError(
            f"--out {out} already holds a run ({', '.join(found)}); continue it with --resume {out}, "
            "replace it with --force, or give another --out"
        )


def _start_run_folder(out: Path, resuming: bool, start: int, cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """Rank 0: clean stale temporary files; a new run deletes what a forced-over run left, a
    resumed one keeps the metrics up to its checkpoint's step (a torn last line is dropped)."""
    clean_stale(out)
    metrics_path = out / METRICS
    kept = []
    if resuming and metrics_path.exists():
        kept = [r for r in read_metrics(metrics_path) if r["step"] <= start]
    elif not resuming:
        for f in RUN_FILES:
            (out / f).unlink(missing_ok=True)
    # train_config.json last: once it exists, the folder can be resumed
    write_text(out / MODEL_CONFIG, json.dumps(model_cfg.to_dict(), indent=2))
    write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    write_text(out / TRAIN_CONFIG, json.dumps(cfg.to_dict(), indent=2))


def train(cfg: TrainConfig, resume: str | None = None, device: str | None = None, force: bool = False) -> dict[str, Any]:
    """Run (or resume) one training run; return its summary (also written to ``out/summary.json``).

    Every check (configuration, device, output folder, data size, checkpoint compatibility)
    happens before the first step, so a bad run fails fast with a ConfigError / DataError /
    CheckpointError. A folder that already holds a run is refused unless it is the one being
    resumed or ``force`` is given (then the old run is deleted).
    """
    cfg.check()
    dev = _device(device)
    out = Path(cfg.out)
    rank, world = distributed.rank_and_world()
    if rank == 0:
        _prepare_out(out, resume, force)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
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
        ckpt = read_checkpoint(resume) if find_checkpoint(resume) else None
    dev = distributed.setup(dev)

    model = seeded_model(model_cfg, cfg.seed).to(dev)
    counts = count_model(model)
    routers = router_modules(model)
    load = ExpertLoad(routers)
    qk_clip = QKClip(model, cfg.qk_clip) if cfg.qk_clip else None
    wrapped = distributed.wrap(model, cfg.dist, world, dev)
    opt = build_optimizer(wrapped, cfg.optimizer, cfg.lr, cfg.weight_decay)
    start = load_checkpoint(wrapped, opt, ckpt, resume) if ckpt is not None else 0

    metrics_path = out / METRICS
    if rank == 0:
        _start_run_folder(out, resume is not None, start, cfg, model_cfg)
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
            if micro == 0:  # a fingerprint of the step's batch: variants of one seed see the same ones
                crc = batch_crc(x)
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
        norm = distributed.full_norm(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        opt.step()
        opt.zero_grad()
        record: dict[str, Any] = dict(step=step + 1, tokens=(step + 1) * tokens_per_step, batch_crc=crc)
        if routers:
            totals = load.totals()
            if cfg.bias_update:
                load.update_bias(cfg.bias_update, totals)
            record["expert_load"] = load_fractions(totals)
            record["expert_cv"] = expert_cv(totals)
            if cfg.aux_loss:
                record["aux_loss"] = distributed.mean_across(aux_sum, world)
            load.reset()
        if qk_clip is not None:
            record["max_logit"] = qk_clip.global_max()
            record["qk_clipped_heads"] = qk_clip.apply()
        loss_value = distributed.mean_across(loss_sum, world)
        elapsed = time.perf_counter() - t0
        record.update(loss=loss_value, lr=opt.param_groups[0]["lr"], grad_norm=norm, tokens_per_s=tokens_per_step / elapsed)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == total_steps:
            val_loss = evaluate(wrapped, val_batches, dev, cfg)
            record["val_loss"] = val_loss
        if step + 1 == total_steps and cfg.length_multiples:  # every rank: FSDP needs all in the forward
            record["val_loss_ctx"] = length_eval(wrapped, data, cfg, model_cfg, dev, regular=val_loss)
        if rank == 0:
            with open(metrics_path, "a") as f:  # a kill mid-line leaves a torn last line, which resume drops
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
    """The rows of a ``metrics.jsonl``. A last line without its newline is a write cut short by a
    killed process and is dropped; any other line that is not JSON is an error."""
    text = Path(path).read_text()
    lines = text.split("\n")
    rows = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rows.append(json.loads(ln))
        except ValueError:
            if i == len(lines) - 1:  # no newline after it: torn
                break
            raise CheckpointError(f"line {i + 1} of {path} is not a JSON record: {ln[:80]!r}") from None
    return rows


def _expert_cv_summary(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """Mean per-step expert-load CV over all steps and over the last 10% of them (None: no MoE)."""
    cvs = [r["expert_cv"] for r in rows if "expert_cv" in r]
    if not cvs:
        return None, None
    last = cvs[-max(1, math.ceil(0.1 * len(cvs))) :]
    return statistics.fmean(cvs), statistics.fmean(last)


def _summary(metrics_path: Path, cfg: TrainConfig, model_cfg: ModelConfig, counts, total_steps: int, rank: int) -> dict:
    """The run's summary from its metrics rows, also written to ``summary.json``."""
    rows = read_metrics(metrics_path)
    losses = [r["loss"] for r in rows]
    spike_steps = [rows[i]["step"] for i in detect_spikes(losses)]
    cv_all, cv_final = _expert_cv_summary(rows)
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
        val_loss_ctx=next((r["val_loss_ctx"] for r in reversed(rows) if "val_loss_ctx" in r), {}),
        loss_spikes=len(spike_steps),
        spike_steps=spike_steps,
        grad_norm_outliers=[rows[i]["step"] for i in detect_grad_norm_outliers([r["grad_norm"] for r in rows])],
        expert_load_cv=cv_all,
        expert_load_cv_final=cv_final,
        params_total=counts.total,
        params_active=counts.active,
        params_non_embedding=counts.non_embedding,
    )
    write_text(metrics_path.parent / SUMMARY, json.dumps(summary, indent=2))
    return summary


__all__ = [
    "METRICS", "RUN_FILES", "SUMMARY", "batch_crc", "evaluate", "expert_cv", "init_weights", "length_eval", "read_metrics",
    "run_files", "seeded_model", "train", "usable_length_multiples",
]
