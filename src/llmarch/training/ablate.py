"""Ablations: train a set of variants under one budget, over several seeds, and compare them.

A spec (YAML) names a base run and the variants that differ from it::

    out: docs/ablations            # results.{json,md,csv}, loss/grad_norm/length/lr_sweep .png/.svg, runs/
    data: data/shakespeare         # a prepared data folder; prepared from `prepare` if missing
    prepare: {corpus: default, vocab_size: 8192}
    match: params                  # params: equal active non-embedding parameters (via the FFN width)
    seeds: 3                       # seeds 0, 1, 2 (or a list: [0, 7, 42]); default: base's seed, else 0
    lr_sweep: [0.001, 0.003, 0.01] # optional: each variant's learning rate is chosen from this grid
                                   # (a variant's own `lr_sweep` replaces it for that variant)
    jobs: 2                        # training processes at once (default 1)
    baseline: GQA (base)           # the row the others are compared with (default: the first variant)
    base: {arch: llama3.2-1b, scale: tiny, tokens: 300000, batch_size: 8, seq_len: 128, lr: 0.003}
    variants:
      - {name: GQA (base)}
      - {name: MHA, set: {num_kv_heads: 4}, lr_from: GQA (base)}
      - {name: Muon, optimizer: muon}

A variant may change any :class:`llmarch.training.config.TrainConfig` field; its ``set`` is merged
into the base's. With ``match: params`` each variant's ``intermediate_size`` (the routed experts'
width for MoE) is chosen so that its active non-embedding parameter count is closest to the
base's, so a change of attention or normalisation is not confounded with a change of size.

**Seeds.** Every variant runs every seed; a seed fixes the init (``loop.seeded_model``) and the
batch order (``TokenData.train_batch``), the same for every variant, so the variants of one seed
see the same batches (each metrics row records the batch's ``batch_crc``) and differences can be
paired by seed (``llmarch.training.stats.paired_difference``).

**Learning rates.** Without ``lr_sweep`` every variant trains at its ``lr``. With it (a base
``lr`` is then unused, a variant's ``lr`` refused), stage 1 trains every variant that has no
``lr_from`` at each grid value on the first seed and picks the LR of the lowest final validation
loss (ties: the smaller LR); a variant with ``lr_from: NAME`` takes NAME's choice (a family: the
attention variants take the baseline's). A swept variant may carry its own ``lr_sweep``, which
replaces the top-level grid for it (three points around a family's known best instead of the
whole range, when a longer budget makes every run count). Stage 2 runs the remaining seeds
(an ``lr_from`` variant: all seeds) at the chosen LR; the sweep's run at the chosen LR is the
first seed's run.

**Runs.** Each run is its own ``llmarch train`` process (``--jobs`` of them at once, or under
``torchrun`` with ``--launcher torchrun --nproc N``: the global batch is unchanged, so is the
result), in the folder ``runs/<name>-s<seed>-lr<lr>-<hash>`` keyed by a hash of its resolved
configuration, seed, LR, data and process count (``spec.json`` records it). An ablation writes a
fresh folder: one that already holds runs or results is refused unless ``resume`` (reuse the
finished runs of the same key, continue killed ones from their checkpoint) or ``force`` (delete
them first) is given. The results (``llmarch.training.ablate_results``) record the command, the
source commit, the machine and the wall time beside every number.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ..analysis.params import count_params
from ..checkpoints.assets import file_stamp
from ..atomic import write_text
from ..errors import ConfigError
from ..model.config import ModelConfig
from .ablate_results import compute_stats, lr_source, ngram_rows, run_entry, write_all
from .checkpointing import find_checkpoint
from .config import TrainConfig
from .data import TokenData, prepare
from .loop import SUMMARY
from .scale import resolve_model_config

SPEC_FILE = "spec.json"
SPEC_KEYS = {"out", "data", "prepare", "match", "base", "variants", "seeds", "jobs", "lr_sweep", "baseline"}
VARIANT_KEYS = {"name", "set", "no_match", "lr_from", "lr_sweep"}
# training fields that a spec sets another way
NOT_IN_SPEC = {"out": "the spec's top-level 'out'", "data": "the spec's top-level 'data'",
               "overrides": "'set'", "progress": "nothing (runs never show a progress bar)"}
LAUNCHERS = ("local", "torchrun")
RESULT_FILES = ("results.json", "results.md", "results.csv", *(f"{n}.{e}" for n in ("loss", "grad_norm", "length", "lr_sweep")
                                                              for e in ("png", "svg")))


# ----------------------------------------------------------------------------------------
# the spec
# ----------------------------------------------------------------------------------------


def _bad(path: str | Path, msg: str) -> ConfigError:
    return ConfigError(f"ablation spec {path}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_fields(path: str | Path, where: str, d: Any, extra: set[str]) -> None:
    if not isinstance(d, dict):
        raise _bad(path, f"{where} must be a mapping of training fields, got {type(d).__name__} {d!r}")
    known = (set(TrainConfig.__dataclass_fields__) - set(NOT_IN_SPEC)) | extra
    for key in sorted(set(map(str, d)) & set(NOT_IN_SPEC)):
        raise _bad(path, f"'{key}' in {where}: set it with {NOT_IN_SPEC[key]}")
    unknown = sorted(set(map(str, d)) - known)
    if unknown:
        raise _bad(path, f"unknown field(s) {', '.join(unknown)} in {where}; known: {', '.join(sorted(known))}")
    if not isinstance(d.get("set") or {}, dict):
        raise _bad(path, f"'set' in {where} must be a mapping of model config fields, got {d['set']!r}")
    if "seed" in d and not _is_int(d["seed"]):
        raise _bad(path, f"'seed' in {where} must be an integer, got {d['seed']!r}")


def _check_top(path: str | Path, spec: dict[str, Any]) -> None:
    """The top-level keys other than base and variants."""
    for key in ("out", "data"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise _bad(path, f"'{key}' must be a folder path, got {spec[key]!r}")
    if not isinstance(spec.get("prepare") or {}, dict):
        raise _bad(path, f"'prepare' must be a mapping (corpus, tokenizer, vocab_size), got {spec['prepare']!r}")
    if spec.get("match") not in (None, "params"):
        raise _bad(path, f"'match' must be 'params' or absent, got {spec['match']!r}")
    seeds = spec.get("seeds")
    if seeds is not None:
        ok_list = (isinstance(seeds, list) and seeds and all(_is_int(s) and s >= 0 for s in seeds)
                   and len(set(seeds)) == len(seeds))
        if not ((_is_int(seeds) and seeds >= 1) or ok_list):
            raise _bad(path, f"'seeds' must be a count (1 or more) or a list of distinct integers >= 0, got {seeds!r}")
        if "seed" in spec["base"]:
            raise _bad(path, "'seed' in 'base' and top-level 'seeds' both given; keep 'seeds' only")
    jobs = spec.get("jobs")
    if jobs is not None and not (_is_int(jobs) and jobs >= 1):
        raise _bad(path, f"'jobs' must be an integer, 1 or more, got {jobs!r}")
    _check_grid(path, "'lr_sweep'", spec.get("lr_sweep"))


def _check_grid(path: str | Path, what: str, grid: Any) -> None:
    """A learning-rate grid: a non-empty list of distinct positive numbers (or absent)."""
    if grid is not None:
        if not (isinstance(grid, list) and grid and all(_is_positive_number(x) for x in grid)):
            raise _bad(path, f"{what} must be a non-empty list of positive numbers, got {grid!r}")
        if len(set(grid)) != len(grid):
            raise _bad(path, f"{what} lists a learning rate twice: {grid!r}")


def _check_variants(path: str | Path, spec: dict[str, Any]) -> None:
    """Names unique; lr_from, baseline and per-variant seeds / lr consistent with the sweep."""
    variants = spec["variants"]
    names = [v.get("name") for v in variants]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise _bad(path, f"every variant needs a unique 'name' (a string); got {names}")
    sweep = spec.get("lr_sweep") is not None
    sources = {v["name"]: v.get("lr_from") for v in variants}
    for i, v in enumerate(variants):
        where = f"variant {i + 1} ({v['name']!r})"
        if "seed" in v:
            raise _bad(path, f"'seed' in {where}: every variant runs the same seeds; use the top-level 'seeds'")
        if sweep and "lr" in v:
            raise _bad(path, f"'lr' in {where}: with 'lr_sweep' the learning rate is chosen by the sweep "
                             "(or taken from another variant with 'lr_from')")
        src = v.get("lr_from")
        if "lr_sweep" in v:
            if not sweep:
                raise _bad(path, f"'lr_sweep' in {where} needs a top-level 'lr_sweep' (the grid of the other variants)")
            if src is not None:
                raise _bad(path, f"'lr_sweep' in {where}: a variant with 'lr_from' takes that variant's LR and is "
                                 "not swept; drop one of the two")
            _check_grid(path, f"'lr_sweep' in {where}", v["lr_sweep"])
        if src is None:
            continue
        if not sweep:
            raise _bad(path, f"'lr_from' in {where} needs a top-level 'lr_sweep' to take the learning rate from")
        if src not in sources:
            raise _bad(path, f"'lr_from' in {where}: no variant is named {src!r}; the spec has {', '.join(map(repr, names))}")
        if src == v["name"] or sources[src] is not None:
            raise _bad(path, f"'lr_from' in {where} names {src!r}, which is not swept itself "
                             "(it has lr_from too); name a variant without lr_from")
    baseline = spec.get("baseline")
    if baseline is not None and baseline not in names:
        raise _bad(path, f"'baseline' {baseline!r} is not a variant; the spec has {', '.join(map(repr, names))}")


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check an ablation spec: every type wrong in it is one error naming the spot."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read ablation spec {path}: {e}") from None
    if not isinstance(spec, dict) or "base" not in spec or not spec.get("variants"):
        raise _bad(path, "needs a 'base' mapping and a non-empty 'variants' list")
    unknown = sorted(set(map(str, spec)) - SPEC_KEYS)
    if unknown:
        raise _bad(path, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(SPEC_KEYS))}")
    _check_fields(path, "'base'", spec["base"], {"set"})
    if not isinstance(spec["variants"], list):
        raise _bad(path, f"'variants' must be a list, got {type(spec['variants']).__name__}")
    for i, v in enumerate(spec["variants"]):
        _check_fields(path, f"variant {i + 1}", v, VARIANT_KEYS)
    if "arch" not in spec["base"]:
        raise _bad(path, "'base' needs an 'arch' (a preset name or a config.json)")
    _check_top(path, spec)
    _check_variants(path, spec)
    return spec


def spec_seeds(spec: dict[str, Any], override: int | None = None) -> list[int]:
    """The seeds every variant runs: ``override`` (a count, from ``--seeds``), else the spec's
    ``seeds`` (a count or a list), else the base's ``seed`` alone, else 0."""
    if override is not None:
        if not (_is_int(override) and override >= 1):
            raise ConfigError(f"--seeds must be 1 or more, got {override}")
        return list(range(override))
    seeds = spec.get("seeds")
    if seeds is None:
        return [int(spec["base"].get("seed", 0))]
    return list(range(seeds)) if _is_int(seeds) else list(seeds)


def baseline_name(spec: dict[str, Any]) -> str:
    """The variant the others are compared with: the spec's ``baseline``, else the first."""
    return spec.get("baseline") or spec["variants"][0]["name"]


# ----------------------------------------------------------------------------------------
# variants and runs
# ----------------------------------------------------------------------------------------


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower()


def active_non_embedding(cfg: ModelConfig) -> int:
    c = count_params(cfg)
    return c.active - c.embedding


def _width_field(cfg: ModelConfig) -> str:
    """The FFN width that matching adjusts: the routed experts' when the model has MoE."""
    return "moe.expert_size" if cfg.moe is not None else "intermediate_size"


def _with_width(cfg: ModelConfig, field: str, width: int) -> ModelConfig:
    if field == "intermediate_size":
        return cfg.replace(intermediate_size=width)
    d = cfg.to_dict()
    d["moe"] = dict(d["moe"], expert_size=width)
    return ModelConfig.from_dict(d)


def match_params(cfg: ModelConfig, target: int, multiple: int = 8) -> ModelConfig:
    """``cfg`` with the FFN width (multiple of 8) whose active non-embedding count is nearest ``target``."""
    field = _width_field(cfg)
    lo, hi = multiple, multiple * 1024
    while hi - lo > multiple:  # active params grow monotonically with the width
        mid = (lo + hi) // 2 // multiple * multiple
        if active_non_embedding(_with_width(cfg, field, mid)) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda w: abs(active_non_embedding(_with_width(cfg, field, w)) - target))
    return _with_width(cfg, field, best)


def variant_configs(spec: dict[str, Any], vocab_size: int) -> list[tuple[dict[str, Any], ModelConfig]]:
    """(train fields, resolved model config) per variant, parameter-matched if asked. The fields
    are the base's merged with the variant's (``name`` included; ``set``, ``no_match`` and
    ``lr_from`` are not training fields and are left out)."""
    base = dict(spec["base"])
    out, target = [], None
    for v in spec["variants"]:
        fields = {**base, **{k: val for k, val in v.items() if k not in VARIANT_KEYS}}
        overrides = {**(base.get("set") or {}), **(v.get("set") or {})}
        fields.pop("set", None)
        seq_len = int(fields.get("seq_len", 128))
        cfg = resolve_model_config(fields["arch"], fields.get("scale", "tiny"), overrides, vocab_size, seq_len)
        if spec.get("match") == "params":
            if target is None:
                target = active_non_embedding(cfg)
            elif not v.get("no_match"):
                cfg = match_params(cfg, target)
        out.append(({"name": v["name"], **fields}, cfg.replace(name=v["name"])))
    return out


@dataclass
class Variant:
    """One row of the ablation: its training fields (without seed and LR), its model, and where
    its learning rate comes from: fixed (``lr``), the sweep (neither set) or another variant."""

    name: str
    fields: dict[str, Any]
    cfg: ModelConfig
    lr: float | None = None
    lr_from: str | None = None
    grid: list[float] | None = None  # its own LR grid (replaces the spec's top-level one)

    @property
    def swept(self) -> bool:
        return self.lr is None and self.lr_from is None

    def lrs(self, grid: list[float] | None) -> list[float]:
        """The learning rates this variant's sweep tries: its own grid, else the spec's."""
        return list(self.grid or grid or []) if self.swept else []


@dataclass
class Run:
    """One training run: a variant at one seed and one learning rate, in its own folder."""

    variant: str
    seed: int
    lr: float
    fields: dict[str, Any]
    cfg: ModelConfig
    dir: Path
    key: str


@dataclass
class Launch:
    """How runs are started: ``jobs`` at once, each one process (``local``) or ``nproc``
    processes under ``torchrun``."""

    launcher: str = "local"
    nproc: int = 1
    jobs: int = 1

    def check(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if not (_is_int(self.nproc) and self.nproc >= 1):
            raise ConfigError(f"--nproc must be 1 or more, got {self.nproc}")
        if self.launcher == "local" and self.nproc != 1:
            raise ConfigError(f"--nproc {self.nproc} needs --launcher torchrun (the local launcher runs one process per run)")
        if not (_is_int(self.jobs) and self.jobs >= 1):
            raise ConfigError(f"--jobs must be 1 or more, got {self.jobs}")


def variants_of(spec: dict[str, Any], vocab_size: int) -> list[Variant]:
    """The spec's variants with their learning-rate source: with ``lr_sweep`` the swept ones
    carry no LR (the base's is replaced by the sweep's choice)."""
    sweep = spec.get("lr_sweep") is not None
    out = []
    for (fields, cfg), v in zip(variant_configs(spec, vocab_size), spec["variants"]):
        fields = dict(fields)
        fields.pop("seed", None)
        lr = fields.pop("lr", TrainConfig.__dataclass_fields__["lr"].default)
        out.append(Variant(v["name"], fields, cfg, None if sweep else lr, v.get("lr_from"), v.get("lr_sweep")))
    return out


def check_variant_values(variants: list[Variant], grid: list[float] | None, launch: Launch) -> None:
    """Every training value a run would refuse, refused before the first run (naming the variant)."""
    for v in variants:
        values = {k: val for k, val in v.fields.items() if k in TrainConfig.__dataclass_fields__}
        values.update(data="", out="", lr=v.lr if v.lr is not None else min(v.lrs(grid) or grid or [1.0]))
        try:
            TrainConfig(**values).check()
        except ConfigError as e:
            raise ConfigError(f"variant {v.name!r}: {e}") from None
        batch = int(values.get("batch_size", TrainConfig.batch_size))
        if batch % launch.nproc:
            raise ConfigError(f"variant {v.name!r}: batch_size {batch} is not divisible by --nproc {launch.nproc}; "
                              "the global batch is split evenly over the processes")


DATA_FILES = ("train.bin", "val.bin", "tokenizer.json")


def data_identity(data_dir: str | Path) -> str:
    """A hash of what a prepared data folder holds, wherever it is: its ``meta.json`` without the
    corpus paths (absolute, so they name the checkout, not the text) and the bytes of its token
    and tokenizer files. Cached per folder while the files' stamps (``file_stamp``: size, times,
    inode) stay the same."""
    path = Path(data_dir)
    stamp = tuple((f, file_stamp(st)) for f in ("meta.json", *DATA_FILES) if (st := _stat(path / f)) is not None)
    return _data_identity(str(path.resolve()), stamp)


def _stat(p: Path):
    try:
        return p.stat()
    except OSError:
        return None


@functools.lru_cache(maxsize=8)
def _data_identity(path: str, stamp: tuple) -> str:
    meta = json.loads((Path(path) / "meta.json").read_text())
    if isinstance(meta, dict):
        meta.pop("corpus", None)
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for f in DATA_FILES:
        p = Path(path) / f
        h.update(f"\0{f}\0".encode())
        if p.is_file():
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def out_dir_of(spec: dict[str, Any], out: str | None) -> Path:
    """The ablation's results folder: ``--out``, else the spec's ``out``, else ``ablations``."""
    return Path(out or spec.get("out") or "ablations")


def data_dir_of(spec: dict[str, Any]) -> str:
    """The prepared data folder the spec's runs train and are scored on."""
    return str(spec.get("data", "data/shakespeare"))


def run_key(fields: dict[str, Any], cfg: ModelConfig, data_dir: str, procs: int = 1) -> str:
    """A hash of everything that decides a run's result: its training fields (seed and LR
    included), its resolved model configuration, the data (:func:`data_identity`: its content,
    not where the folder or the checkout is) and the number of processes it runs on."""
    blob = json.dumps({"fields": fields, "model": cfg.to_dict(), "data": data_identity(data_dir), "procs": procs,
                       "key": 2}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def make_run(v: Variant, seed: int, lr: float, out_dir: Path, data_dir: str, procs: int = 1) -> Run:
    """The run of variant ``v`` at ``seed`` and ``lr``: ``runs/<name>-s<seed>-lr<lr>-<key prefix>``,
    so that "A" and "a", or one name in another spec, never share a folder."""
    fields = {**v.fields, "seed": seed, "lr": lr}
    key = run_key(fields, v.cfg, data_dir, procs)
    folder = f"{slug(v.name) or 'variant'}-s{seed}-lr{lr:g}-{key[:10]}"
    return Run(v.name, seed, lr, fields, v.cfg, out_dir / "runs" / folder, key)


def sweep_runs(variants: list[Variant], grid: list[float] | None, seed: int, out_dir: Path, data_dir: str,
               procs: int) -> list[Run]:
    """The LR sweep's runs of the swept ``variants``: each at every rate of its grid, at ``seed``."""
    return [make_run(v, seed, lr, out_dir, data_dir, procs) for v in variants if v.swept for lr in v.lrs(grid)]


def final_runs(variants: list[Variant], chosen: dict[str, float], seeds: list[int], out_dir: Path, data_dir: str,
               procs: int) -> list[Run]:
    """Every seed of each of ``variants`` that has a learning rate in ``chosen``, at that rate."""
    return [make_run(v, s, chosen[v.name], out_dir, data_dir, procs) for v in variants if v.name in chosen for s in seeds]


def choose_lr(losses: dict[float, float | None]) -> float | None:
    """The learning rate of the lowest final validation loss (a diverged run's NaN counts as
    infinite; ties go to the smaller LR); None when no run of the sweep finished."""
    done = {lr: loss for lr, loss in losses.items() if loss is not None}
    if not done:
        return None
    return min(done, key=lambda lr: (done[lr] if math.isfinite(done[lr]) else math.inf, lr))


def _stored_key(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / SPEC_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_summary(run: Run) -> dict[str, Any] | None:
    """The summary of a finished run whose stored key is this run's; None otherwise."""
    if _stored_key(run.dir) != run.key:
        return None
    try:
        s = json.loads((run.dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and s.get("finished") else None


def final_val_loss(run: Run) -> float | None:
    s = read_summary(run)
    v = s.get("final_val_loss") if s else None
    return float(v) if v is not None else None


def sweep_losses(v: Variant, grid: list[float], seed: int, out_dir: Path, data_dir: str,
                 procs: int) -> dict[float, float | None]:
    """LR -> final validation loss of the sweep runs of ``v`` (None where not finished)."""
    return {lr: final_val_loss(make_run(v, seed, lr, out_dir, data_dir, procs)) for lr in grid}


def chosen_lrs(variants: list[Variant], grid: list[float] | None, seed: int, out_dir: Path, data_dir: str,
               procs: int) -> dict[str, float]:
    """Variant name -> its learning rate: fixed, chosen by its sweep, or its ``lr_from``'s choice
    (absent where the sweep it depends on has no finished run)."""
    out: dict[str, float] = {v.name: v.lr for v in variants if v.lr is not None}
    for v in variants:
        if v.swept and v.lrs(grid):
            lr = choose_lr(sweep_losses(v, v.lrs(grid), seed, out_dir, data_dir, procs))
            if lr is not None:
                out[v.name] = lr
    for v in variants:
        if v.lr_from is not None and v.lr_from in out:
            out[v.name] = out[v.lr_from]
    return out


def _select(variants: list[Variant], only: list[str] | None) -> list[Variant]:
    """The variants named by ``--only`` (all without it)."""
    if not only:
        return variants
    known = [v.name for v in variants]
    missing = [n for n in only if n not in known]
    if missing:
        raise ConfigError(f"--only {', '.join(missing)}: no such variant; the spec has {', '.join(map(repr, known))}")
    return [v for v in variants if v.name in only]


# ----------------------------------------------------------------------------------------
# starting runs
# ----------------------------------------------------------------------------------------


def _train_args(fields: dict[str, Any], model_json: Path, data: str, run_dir: Path, procs: int = 1) -> list[str]:
    """``llmarch train`` options for one run. Under ``procs`` processes each gets batch_size /
    procs rows (the global batch is the same) and eval_batches x procs batches (the same
    validation windows)."""
    skip = {"name", "arch", "scale", "data", "out"}
    fields = dict(fields)
    if procs > 1:
        fields["batch_size"] = int(fields.get("batch_size", TrainConfig.batch_size)) // procs
        fields["eval_batches"] = int(fields.get("eval_batches", TrainConfig.eval_batches)) * procs
    args = ["--arch", str(model_json), "--scale", "none", "--data", data, "--out", str(run_dir), "--no-progress"]
    for key, val in fields.items():
        if key in skip or val is None:
            continue
        if key not in TrainConfig.__dataclass_fields__:
            raise ConfigError(f"unknown training field {key!r} in the ablation spec")
        flag = "--" + key.replace("_", "-")
        if isinstance(val, (list, tuple)):  # e.g. length_multiples: 1,2,4
            args += [flag, ",".join(map(str, val))]
        else:
            args += [flag, str(val)]
    return args


def _launcher_prefix(launch: Launch) -> list[str]:
    if launch.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(launch.nproc),
                "-m", "llmarch.cli", "train"]
    return [sys.executable, "-m", "llmarch.cli", "train"]


def prepare_run(run: Run, data_dir: str, launch: Launch) -> list[str] | None:
    """Set up ``run``'s folder and return its command, or None when it already finished.

    A run of the same key killed part-way continues from its checkpoint; anything else starts
    afresh (``--force`` over what the folder held)."""
    if read_summary(run) is not None:
        return None
    run.dir.mkdir(parents=True, exist_ok=True)
    if _stored_key(run.dir) == run.key and find_checkpoint(run.dir):
        args = ["--resume", str(run.dir), "--no-progress"]
    else:
        model_json = run.dir / "model.json"
        args = [*_train_args(run.fields, model_json, data_dir, run.dir, launch.nproc), "--force"]
        write_text(model_json, json.dumps(run.cfg.to_dict(), indent=2))
        write_text(run.dir / SPEC_FILE, json.dumps({"key": run.key, "variant": run.variant, "seed": run.seed, "lr": run.lr,
                                                    "fields": run.fields, "launcher": launch.launcher,
                                                    "nproc": launch.nproc, "model": run.cfg.to_dict()}, indent=2))
    cmd = [*_launcher_prefix(launch), *args]
    write_text(run.dir / "command.txt", shlex.join(["python", *cmd[1:]]) + "\n")
    return cmd


def child_env() -> dict[str, str]:
    """The environment of a training process: ours, with this llmarch first on PYTHONPATH, so
    that the runs use the source the ablation was started from."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    if Path(root).name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_pool(tasks: list[tuple[Run, list[str]]], jobs: int, on_done=None,
             env: dict[str, str] | None = None) -> list[tuple[Run, int]]:
    """Run the commands, up to ``jobs`` at once, each writing ``train.log`` in its run folder.

    A failed command does not stop the others; the (run, exit status) of those that failed are
    returned. ``on_done(run, status)`` is called as each finishes. If this process is interrupted,
    the running commands are terminated."""
    pending = list(tasks)
    running: dict[subprocess.Popen, tuple[Run, Any]] = {}
    failed = []
    env = env or child_env()
    try:
        while pending or running:
            while pending and len(running) < jobs:
                run, cmd = pending.pop(0)
                log = open(run.dir / "train.log", "w")
                running[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)] = (run, log)
            done = [p for p in running if p.poll() is not None]
            for proc in done:
                run, log = running.pop(proc)
                log.close()
                if proc.returncode != 0:
                    failed.append((run, proc.returncode))
                if on_done is not None:
                    on_done(run, proc.returncode)
            if not done:
                time.sleep(0.05)
    finally:
        for proc, (_, log) in running.items():
            proc.terminate()
        for proc, (_, log) in running.items():
            proc.wait()
            log.close()
    return failed


def run_stage(runs: list[Run], data_dir: str, launch: Launch, desc: str) -> None:
    """Train every unfinished run of a stage (``launch.jobs`` at once, one progress bar, the best
    final validation loss so far as its postfix). Raise ConfigError at the end if any failed."""
    from tqdm import tqdm

    unique = list({r.dir: r for r in runs}.values())
    tasks = [(r, cmd) for r in unique if (cmd := prepare_run(r, data_dir, launch)) is not None]
    best: list[tuple[float, str]] = []

    def note(run: Run, status: int) -> None:
        loss = final_val_loss(run) if status == 0 else None
        if loss is not None and math.isfinite(loss):
            best.append((loss, f"{run.variant} s{run.seed} lr{run.lr:g}"))
            low = min(best)
            bar.set_postfix_str(f"best {low[0]:.4f} ({low[1]})")
        bar.update(1)

    with tqdm(total=len(unique), initial=len(unique) - len(tasks), desc=desc, unit="run") as bar:
        failed = run_pool(tasks, launch.jobs, note)
    if failed:
        lines = [f"{r.variant!r} (seed {r.seed}, lr {r.lr:g}, exit {rc}): see {r.dir / 'train.log'}" for r, rc in failed]
        raise ConfigError(f"{len(failed)} of {len(tasks)} run(s) of the {desc} failed: " + "; ".join(lines))


# ----------------------------------------------------------------------------------------
# the output folder and provenance
# ----------------------------------------------------------------------------------------


def existing_ablation(out_dir: Path) -> list[str]:
    """What in ``out_dir`` shows an earlier ablation: its result files and its run folders."""
    found = [f for f in RESULT_FILES if (out_dir / f).exists()]
    if len(found) > 3:
        found = [*found[:3], f"{len(found) - 3} more result file(s)"]
    runs = out_dir / "runs"
    if runs.is_dir():
        n = sum(1 for _ in runs.iterdir())
        if n:
            found.append(f"runs/ with {n} folder(s)")
    return found


def check_out_dir(out_dir: Path, resume: bool, force: bool) -> None:
    """Refuse, before any work, to write over an earlier ablation unless resuming or forcing."""
    if resume and force:
        raise ConfigError("--resume and --force exclude each other: continue the ablation or replace it, not both")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; give a folder")
    found = existing_ablation(out_dir)
    if found and not (resume or force):
        raise ConfigError(f"{out_dir} already holds an ablation ({', '.join(found)}); continue it with --resume, "
                          "replace it with --force, or give another --out")


def clear_out_dir(out_dir: Path) -> None:
    """``--force``: delete the earlier ablation's runs and results (nothing else in the folder)."""
    shutil.rmtree(out_dir / "runs", ignore_errors=True)
    for f in RESULT_FILES:
        (out_dir / f).unlink(missing_ok=True)


def _git(src: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def source_commit(exclude: Path | None = None) -> str:
    """The git commit of the llmarch source in use (``+dirty`` when ``git status --porcelain``
    shows changes outside ``exclude``, the ablation's own output folder), or ``llmarch <version>``
    when the source is not a git checkout."""
    from .. import __version__

    pkg = Path(__file__).resolve().parents[1]
    head = _git(pkg, "rev-parse", "HEAD")
    if head is None or _git(pkg, "ls-files", "--error-unmatch", "__init__.py") is None:  # e.g. a venv inside a repo
        return f"llmarch {__version__}"
    spec = ["--", "."]
    top = _git(pkg, "rev-parse", "--show-toplevel")
    if exclude is not None and top is not None:
        try:
            rel = Path(exclude).resolve().relative_to(Path(top).resolve())
            spec = ["--", ":/", f":(exclude,top){rel.as_posix()}"]
        except ValueError:
            spec = ["--", ":/"]
    dirty = _git(pkg, "status", "--porcelain", *spec)
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    """CPU model, core count and platform of this machine."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}


# ----------------------------------------------------------------------------------------
# the whole ablation
# ----------------------------------------------------------------------------------------


def _canonical_command(path, out, only, seeds, jobs, resume, force, launcher, nproc) -> list[str]:
    """The ``llmarch ablate`` command line equivalent to a :func:`run_spec` call from Python."""
    argv = ["llmarch", "ablate", str(path)]
    for flag, value in (("--out", out), ("--seeds", seeds), ("--jobs", jobs)):
        if value is not None:
            argv += [flag, str(value)]
    for name in only or []:
        argv += ["--only", name]
    argv += ["--resume"] * bool(resume) + ["--force"] * bool(force)
    if launcher != "local":
        argv += ["--launcher", launcher, "--nproc", str(nproc)]
    return argv


def run_spec(path: str | Path, out: str | None = None, only: list[str] | None = None, seeds: int | None = None,
             jobs: int | None = None, resume: bool = False, force: bool = False, launcher: str = "local",
             nproc: int = 1, command: list[str] | None = None) -> dict[str, Any]:
    """Run an ablation: check everything, run the LR sweep (if any) and every seed of every
    variant (of ``only``), then write results.json/md/csv and the plots; return the results."""
    t0 = time.monotonic()
    spec = load_spec(path)
    out_dir = out_dir_of(spec, out)
    launch = Launch(launcher, nproc, jobs if jobs is not None else int(spec.get("jobs", 1)))
    launch.check()
    check_out_dir(out_dir, resume, force)
    seed_list = spec_seeds(spec, seeds)
    commit = source_commit(exclude=out_dir)
    data_dir = data_dir_of(spec)
    if not (Path(data_dir) / "meta.json").is_file():
        prep = spec.get("prepare") or {}
        prepare(prep.get("corpus", "default"), data_dir, prep.get("tokenizer", "bpe"), int(prep.get("vocab_size", 8192)))
    data = TokenData.open(data_dir)
    variants = variants_of(spec, data.vocab_size)
    grid = spec.get("lr_sweep")
    check_variant_values(variants, grid, launch)  # unknown fields were refused by load_spec
    selected = _select(variants, only)
    if force:
        clear_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    first = seed_list[0]
    trained_before = set((out_dir / "runs").glob("*/" + SUMMARY))
    sweep: list[Run] = []
    if grid:
        needed = {v.name for v in selected} | {v.lr_from for v in selected if v.lr_from}
        sweep = sweep_runs([v for v in variants if v.name in needed], grid, first, out_dir, data_dir, nproc)
        run_stage(sweep, data_dir, launch, "LR sweep")
    chosen = chosen_lrs(variants, grid, first, out_dir, data_dir, nproc)
    finals = final_runs(selected, chosen, seed_list, out_dir, data_dir, nproc)
    run_stage(finals, data_dir, launch, "runs")
    trained_now = set((out_dir / "runs").glob("*/" + SUMMARY)) - trained_before

    provenance = {
        "command": shlex.join(command or _canonical_command(path, out, only, seeds, jobs, resume, force, launcher, nproc)),
        "commit": commit,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "spec": str(path),
        "out": str(out_dir),
        "data": data_dir,
        "launcher": launch.launcher,
        "nproc": launch.nproc,
        "jobs": launch.jobs,
        "runs_trained_here": len(trained_now),
        "runs_total": len({r.dir for r in sweep + finals}),
    }
    results = gather(spec, variants, seed_list, chosen, grid, out_dir, data, nproc, provenance)
    results["wall_time_s"] = round(time.monotonic() - t0, 1)
    write_all(results, out_dir)
    return results


#: what results.json records about the invocation that trained the runs, kept by :func:`report_spec`
TRAINING_PROVENANCE = ("command", "commit", "date", "machine", "launcher", "nproc", "jobs", "runs_trained_here",
                       "runs_total", "wall_time_s")
#: the type each of those holds as an ablation writes it (str where not listed)
_PROVENANCE_TYPES = {"machine": dict, "nproc": int, "jobs": int, "runs_trained_here": int, "runs_total": int,
                     "wall_time_s": (int, float)}


def _previous_provenance(out_dir: Path) -> dict[str, Any]:
    """The training provenance of the results.json in ``out_dir`` ({} when there is none); a
    results.json that is not a JSON object is an error, never silently dropped."""
    path = out_dir / "results.json"
    if not path.exists():
        return {}
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not readable JSON ({e}); rebuild it with --resume") from None
    if not isinstance(prev, dict):
        raise ConfigError(f"{path} holds a JSON {type(prev).__name__}, not an object; rebuild it with --resume")
    kept = {k: prev[k] for k in TRAINING_PROVENANCE if k in prev}
    for k, v in kept.items():  # the tables format these: a wrong type is refused here, not a crash there
        want = _PROVENANCE_TYPES.get(k, str)
        if not isinstance(v, want) or isinstance(v, bool) or (want is dict and not all(isinstance(x, (str, int, type(None))) for x in v.values())):
            raise ConfigError(f"{path}: {k!r} is {v!r}, not what an ablation writes there; rebuild it with --resume")
    return kept


def report_spec(path: str | Path, out: str | None = None, seeds: int | None = None, launcher: str = "local",
                nproc: int = 1, command: list[str] | None = None) -> dict[str, Any]:
    """Write results.json/md/csv and the plots again from the finished runs in ``out``, training
    nothing (``llmarch ablate SPEC --report``): after an llmarch update adds a column, or to
    check the committed tables against their runs. Every run the results need (the LR sweep's
    and every seed of every variant) must have finished, else a ConfigError says how many are
    missing. The command, commit, date, machine and wall time of the invocation that trained the
    runs are kept from the previous results.json; this one is recorded under ``report``."""
    spec = load_spec(path)
    out_dir = out_dir_of(spec, out)
    Launch(launcher, nproc, 1).check()
    if not (out_dir / "runs").is_dir():
        raise ConfigError(f"--report: {out_dir} holds no ablation runs; train them first (without --report)")
    prev = _previous_provenance(out_dir)
    seed_list = spec_seeds(spec, seeds)
    data_dir = data_dir_of(spec)
    if not (Path(data_dir) / "meta.json").is_file():
        raise ConfigError(f"--report: the spec's data folder {data_dir} is missing; the runs were scored on it")
    data = TokenData.open(data_dir)
    variants = variants_of(spec, data.vocab_size)
    grid = spec.get("lr_sweep")
    first = seed_list[0]
    chosen = chosen_lrs(variants, grid, first, out_dir, data_dir, nproc)
    needed = sweep_runs(variants, grid, first, out_dir, data_dir, nproc) if grid else []
    needed = list({r.dir: r for r in needed + final_runs(variants, chosen, seed_list, out_dir, data_dir, nproc)}.values())
    missing = [r for r in needed if read_summary(r) is None]
    unchosen = [v.name for v in variants if v.name not in chosen]
    if missing or unchosen:
        what = [f"{len(missing)} of {len(needed)} runs have not finished (e.g. {missing[0].dir.name})"] if missing else []
        what += [f"no learning rate yet for {len(unchosen)} variant(s) (e.g. {unchosen[0]!r})"] if unchosen else []
        raise ConfigError(f"--report: {'; '.join(what)}; train them with --resume")
    report = {"command": shlex.join(command or ["llmarch", "ablate", str(path), "--report"]),
              "commit": source_commit(exclude=out_dir),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    provenance = {"spec": str(path), "out": str(out_dir), "data": data_dir, **prev, "report": report}
    results = gather(spec, variants, seed_list, chosen, grid, out_dir, data, nproc, provenance)
    write_all(results, out_dir)
    return results


def gather(spec: dict[str, Any], variants: list, seeds: list[int], chosen: dict[str, float], grid: list[float] | None,
           out_dir: Path, data, procs: int, provenance: dict[str, Any]) -> dict[str, Any]:
    """The results of every variant's finished runs (at its chosen LR, every seed), the LR
    sweep's losses, the n-gram references, the provenance, and the statistics over seeds."""
    data_dir = str(data.path)
    entries = []
    for v in variants:
        if v.name not in chosen:
            continue
        runs = []
        for seed in seeds:
            run = make_run(v, seed, chosen[v.name], out_dir, data_dir, procs)
            summary = read_summary(run)
            if summary is not None:
                runs.append(run_entry(run, summary))
        if runs:
            entries.append({"name": v.name, "lr": chosen[v.name], "lr_source": lr_source(v),
                            "params_active_non_embedding": active_non_embedding(v.cfg),
                            "params_total": count_params(v.cfg).total, "runs": runs})
    sweep = None
    if grid:
        swept = [v for v in variants if v.swept]
        sweep = {"grid": sorted({lr for v in swept for lr in v.lrs(grid)}), "seed": seeds[0],
                 "chosen": {v.name: chosen[v.name] for v in swept if v.name in chosen},
                 "lr_from": {v.name: v.lr_from for v in variants if v.lr_from},
                 "losses": {v.name: sweep_losses(v, v.lrs(grid), seeds[0], out_dir, data_dir, procs) for v in swept}}
    base = spec["base"]
    seq_len = int(base.get("seq_len", TrainConfig.seq_len))
    windows = int(base.get("eval_batches", TrainConfig.eval_batches)) * int(base.get("batch_size", TrainConfig.batch_size))
    results = {**provenance, "seeds": list(seeds), "baseline": baseline_name(spec), "lr_sweep": sweep,
               "ngram": ngram_rows(data, seq_len, windows), "variants": entries}
    compute_stats(results)
    return results


__all__ = [
    "Launch", "Run", "Variant", "active_non_embedding", "baseline_name", "check_out_dir", "gather", "choose_lr", "chosen_lrs",
    "load_spec", "make_run", "match_params", "prepare_run", "read_summary", "report_spec", "run_key", "run_pool", "run_spec", "final_runs", "sweep_runs",
    "data_identity", "source_commit", "spec_seeds", "variant_configs", "variants_of",
]
