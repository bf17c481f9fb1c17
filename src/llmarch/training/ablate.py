"""Ablations: train a set of variants under one budget, same seed and data, and compare them.

A spec (YAML) names a base run and the variants that differ from it::

    out: docs/ablations            # results: results.md, results.csv, loss.png/svg, grad_norm.png/svg
    data: data/shakespeare         # a prepared data folder; prepared from `prepare` if missing
    prepare: {corpus: default, vocab_size: 8192}
    match: params                  # params: equal active non-embedding parameters (via the FFN width)
    base: {arch: llama3.2-1b, scale: tiny, tokens: 300000, batch_size: 8, seq_len: 128, lr: 0.003}
    variants:
      - {name: GQA (base)}
      - {name: MHA, set: {num_kv_heads: 4}}
      - {name: Muon, optimizer: muon}

A variant may change any :class:`llmarch.training.config.TrainConfig` field; its ``set`` is merged into
the base's. With ``match: params`` each variant's ``intermediate_size`` (the routed experts'
width for MoE) is chosen so that its active non-embedding parameter count is closest to the
base's, so a change of attention or normalisation is not confounded with a change of size.
Each variant runs in its own process (``llmarch train``), so peak memory is its own, in the folder
``runs/<name>-<hash>`` keyed by a hash of its resolved configuration and data (``spec.json`` records
it). A finished run is reused only when its stored hash is the variant's; a run killed part-way
with the same hash is resumed from its checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ..analysis.params import count_params
from ..atomic import atomic_file, write_text
from ..errors import ConfigError
from ..model.config import ModelConfig
from .checkpointing import find_checkpoint
from .config import TrainConfig
from .data import TokenData, prepare
from .loop import SUMMARY, read_metrics
from .scale import resolve_model_config

SPEC_FILE = "spec.json"
TABLE_COLUMNS = [
    ("variant", "variant"),
    ("active non-emb. params", "params_active_non_embedding"),
    ("final val loss", "final_val_loss"),
    ("tokens/s", "tokens_per_s"),
    ("peak RSS (MB)", "peak_rss_mb"),
    ("max grad norm", "max_grad_norm"),
    ("loss spikes", "loss_spikes"),
]


SPEC_KEYS = {"out", "data", "prepare", "match", "base", "variants"}
VARIANT_KEYS = {"name", "set", "no_match"}


def _bad(path: str | Path, msg: str) -> ConfigError:
    return ConfigError(f"ablation spec {path}: {msg}")


def _check_fields(path: str | Path, where: str, d: Any, extra: set[str]) -> None:
    if not isinstance(d, dict):
        raise _bad(path, f"{where} must be a mapping of training fields, got {type(d).__name__} {d!r}")
    known = set(TrainConfig.__dataclass_fields__) | extra
    unknown = sorted(set(map(str, d)) - known)
    if unknown:
        raise _bad(path, f"unknown field(s) {', '.join(unknown)} in {where}; known: {', '.join(sorted(known))}")
    if not isinstance(d.get("set") or {}, dict):
        raise _bad(path, f"'set' in {where} must be a mapping of model config fields, got {d['set']!r}")


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
    for key in ("out", "data"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise _bad(path, f"'{key}' must be a folder path, got {spec[key]!r}")
    if not isinstance(spec.get("prepare") or {}, dict):
        raise _bad(path, f"'prepare' must be a mapping (corpus, tokenizer, vocab_size), got {spec['prepare']!r}")
    if spec.get("match") not in (None, "params"):
        raise _bad(path, f"'match' must be 'params' or absent, got {spec['match']!r}")
    names = [v.get("name") for v in spec["variants"]]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise _bad(path, f"every variant needs a unique 'name' (a string); got {names}")
    if "arch" not in spec["base"]:
        raise _bad(path, "'base' needs an 'arch' (a preset name or a config.json)")
    return spec


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
    """(train fields, resolved model config) per variant, parameter-matched if asked."""
    base = dict(spec["base"])
    out, target = [], None
    for v in spec["variants"]:
        fields = {**base, **{k: val for k, val in v.items() if k not in ("name", "set")}}
        overrides = {**(base.get("set") or {}), **(v.get("set") or {})}
        fields.pop("set", None)
        seq_len = int(fields.get("seq_len", 128))
        cfg = resolve_model_config(fields["arch"], fields.get("scale", "tiny"), overrides, vocab_size, seq_len)
        if spec.get("match") == "params":
            if target is None:
                target = active_non_embedding(cfg)
            elif not v.get("no_match"):
                cfg = match_params(cfg, target)
        cfg = cfg.replace(name=v["name"])
        fields.pop("no_match", None)
        out.append(({"name": v["name"], **fields}, cfg))
    return out


def _train_args(fields: dict[str, Any], model_json: Path, data: str, run_dir: Path) -> list[str]:
    skip = {"name", "arch", "scale", "data", "out"}
    args = ["--arch", str(model_json), "--scale", "none", "--data", data, "--out", str(run_dir), "--no-progress"]
    for key, val in fields.items():
        if key in skip or val is None:
            continue
        flag = "--" + key.replace("_", "-")
        if key not in TrainConfig.__dataclass_fields__:
            raise ConfigError(f"unknown training field {key!r} in the ablation spec")
        args += [flag, str(val)]
    return args


def run_key(fields: dict[str, Any], cfg: ModelConfig, data_dir: str) -> str:
    """A hash of everything that decides a variant's result: its training fields, its resolved
    model configuration and the data (folder and ``meta.json``)."""
    meta = (Path(data_dir) / "meta.json").read_text()
    blob = json.dumps({"fields": fields, "model": cfg.to_dict(), "data": str(data_dir), "meta": meta}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_dirs(out_dir: Path, variants: list[tuple[dict[str, Any], ModelConfig]], data_dir: str) -> list[tuple[Path, str]]:
    """(run folder, key) per variant: ``runs/<slug>-<key prefix>``, so that "A" and "a", or one name
    with another spec, never share a folder; two variants that would are refused."""
    out = []
    for fields, cfg in variants:
        key = run_key(fields, cfg, data_dir)
        out.append((out_dir / "runs" / f"{slug(fields['name']) or 'variant'}-{key[:12]}", key))
    dirs = [d for d, _ in out]
    clash = sorted({str(d) for d in dirs if dirs.count(d) > 1})
    if clash:
        raise ConfigError(f"variants would share the run folder(s) {', '.join(clash)}; give them distinct names")
    return out


def _stored_key(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / SPEC_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _finished(run_dir: Path, key: str) -> bool:
    """A run to reuse: its stored spec hash is this variant's and its summary says finished."""
    if _stored_key(run_dir) != key:
        return False
    try:
        return bool(json.loads((run_dir / SUMMARY).read_text()).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False


def _select(runs: list, only: list[str] | None) -> list:
    """The ``((fields, cfg), (run_dir, key))`` pairs of the variants named by ``--only`` (all without it)."""
    if not only:
        return runs
    known = [fields["name"] for (fields, _), _ in runs]
    missing = [n for n in only if n not in known]
    if missing:
        raise ConfigError(f"--only {', '.join(missing)}: no such variant; the spec has {', '.join(map(repr, known))}")
    return [r for r in runs if r[0][0]["name"] in only]


def run_spec(path: str | Path, out: str | None = None, only: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every variant of a spec (reusing finished runs of the same spec) and write the table and plots."""
    from tqdm import tqdm

    spec = load_spec(path)
    out_dir = Path(out or spec.get("out") or "ablations")
    data_dir = str(spec.get("data", "data/shakespeare"))
    if not (Path(data_dir) / "meta.json").is_file():
        prep = spec.get("prepare") or {}
        prepare(prep.get("corpus", "default"), data_dir, prep.get("tokenizer", "bpe"), int(prep.get("vocab_size", 8192)))
    data = TokenData.open(data_dir)
    variants = variant_configs(spec, data.vocab_size)
    for fields, _ in variants:
        _train_args(fields, Path("model.json"), data_dir, Path("run"))  # unknown fields fail before any run
    dirs = run_dirs(out_dir, variants, data_dir)
    selected = _select(list(zip(variants, dirs)), only)
    for (fields, cfg), (run_dir, key) in tqdm(selected, desc="variants", unit="run"):
        if _finished(run_dir, key):
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        model_json = run_dir / "model.json"
        if _stored_key(run_dir) == key and find_checkpoint(run_dir):  # killed earlier: continue it
            args = ["--resume", str(run_dir), "--no-progress"]
        else:
            args = [*_train_args(fields, model_json, data_dir, run_dir), "--force"]
            write_text(model_json, json.dumps(cfg.to_dict(), indent=2))
            write_text(run_dir / SPEC_FILE, json.dumps({"key": key, "variant": fields, "model": cfg.to_dict()}, indent=2))
        cmd = [sys.executable, "-m", "llmarch.cli", "train", *args]
        write_text(run_dir / "command.txt", " ".join(cmd[1:]) + "\n")
        with open(run_dir / "train.log", "w") as log:
            rc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)).returncode
        if rc != 0:
            raise ConfigError(f"variant {fields['name']!r} failed (exit {rc}); see {run_dir / 'train.log'}")
    rows = collect([(f, c, d, k) for (f, c), (d, k) in zip(variants, dirs)])
    write_table(rows, out_dir)
    plot(rows, out_dir)
    return rows


def collect(runs: list[tuple[dict[str, Any], ModelConfig, Path, str]]) -> list[dict[str, Any]]:
    """The summaries of the finished runs, each with its variant name, parameter count and metrics."""
    rows = []
    for fields, cfg, run_dir, key in runs:
        if not _finished(run_dir, key):
            continue
        s = json.loads((run_dir / SUMMARY).read_text())
        s.update(variant=fields["name"], params_active_non_embedding=active_non_embedding(cfg),
                 metrics=read_metrics(run_dir / "metrics.jsonl"))
        rows.append(s)
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def write_table(rows: list[dict[str, Any]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([key for _, key in TABLE_COLUMNS])
    for r in rows:
        w.writerow([r.get(key) for _, key in TABLE_COLUMNS])
    write_text(out_dir / "results.csv", buf.getvalue())
    lines = ["| " + " | ".join(h for h, _ in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(key)) for _, key in TABLE_COLUMNS) + " |")
    write_text(out_dir / "results.md", "\n".join(lines) + "\n")


def _smooth(xs: list[float], k: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc = x if i == 0 else acc + (x - acc) / min(i + 1, k)
        out.append(acc)
    return out


def plot(rows: list[dict[str, Any]], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, title, smooth in (("loss", "training loss (EMA-smoothed) and validation loss (dots)", True),
                               ("grad_norm", "global gradient L2 norm (before clipping)", False)):
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for i, r in enumerate(rows):
            m = r["metrics"]
            tokens = [x["tokens"] for x in m]
            ys = [x[key] for x in m]
            (line,) = ax.plot(tokens, _smooth(ys) if smooth else ys, lw=1.2, label=r["variant"])
            if key == "loss":
                vt = [(x["tokens"], x["val_loss"]) for x in m if "val_loss" in x]
                if vt:
                    ax.plot(*zip(*vt), "o", ms=3, color=line.get_color())
        ax.set_xlabel("training tokens")
        ax.set_ylabel(key.replace("_", " "))
        if key == "grad_norm":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        for ext in ("png", "svg"):
            with atomic_file(out_dir / f"{key}.{ext}") as tmp:
                fig.savefig(tmp, format=ext, dpi=120)
        plt.close(fig)


__all__ = ["collect", "load_spec", "match_params", "plot", "run_dirs", "run_key", "run_spec", "variant_configs", "write_table"]
