"""The results of an ablation (``llmarch.training.ablate``): gathered from its run folders,
summarised over seeds and written as ``results.json`` (everything, machine-readable),
``results.md`` / ``results.csv`` (one row per variant, then the n-gram references and the LR
sweep) and plots: ``loss``, ``grad_norm``, ``length`` and ``lr_sweep`` (.png and .svg).

The results are one dict (the content of ``results.json`` plus each run's metrics rows)::

    command, commit, date, wall_time_s, machine{cpu, cores, platform, python}, spec, out, data,
    launcher, nproc, jobs, runs_trained_here, runs_total, seeds, baseline,
    lr_sweep: null | {grid, seed, chosen{variant: lr}, lr_from{variant: source}, losses{variant: {lr: loss}}},
    ngram: null | {seq_len, windows, unigram, bigram},
    variants: [{name, lr, lr_source, params_active_non_embedding, params_total,
                runs: [{seed, lr, run_dir, final_val_loss, val_loss_ctx, loss_spikes, spike_steps,
                        grad_norm_outliers, max_grad_norm, tokens_per_s, expert_load_cv_final,
                        tail{from_step, to_step, drop}, ...}],
                stats: {n_seeds, val_loss{n, mean, std, ci95}, delta_vs_baseline{n, mean, std, ci95,
                        significant, seeds}, val_loss_ctx{multiple: {n, mean, std, ci95}}, loss_spikes,
                        max_grad_norm, expert_load_cv, tokens_per_s, tail_drop{n, mean, std, ci95},
                        flattened, delta_path[{step, n, mean, std, ci95, significant}], verdict_stable}}]

:func:`compute_stats`, :func:`write_table` and :func:`plot` work on that dict alone, so they can
be checked on synthetic rows. Keys an older run's summary lacks are shown as "—".
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

from ..atomic import atomic_file, write_text
from .loop import read_metrics

RUN_KEYS = ("final_val_loss", "final_loss", "val_loss_ctx", "loss_spikes", "spike_steps", "grad_norm_outliers",
            "max_grad_norm", "tokens_per_s", "peak_rss_mb", "expert_load_cv_final", "steps", "tokens")
CTX_COLUMNS = ("2", "4")  # context multiples always given a column (more appear when the runs have them)
DASH = "—"
TAIL = 1 / 8  # the part of training whose validation drop says whether a curve has flattened
LATE = 1 / 4  # the part of training over which each verdict against the baseline is checked to hold


# ----------------------------------------------------------------------------------------
# gathering
# ----------------------------------------------------------------------------------------


def run_entry(run, summary: dict[str, Any]) -> dict[str, Any]:
    """One seed of one variant: where it ran, its LR and the summary's numbers (None where the
    summary predates them), plus its metrics rows (for the plots; not written to results.json)."""
    entry = {"seed": run.seed, "lr": run.lr, "run_dir": str(run.dir)}
    entry.update({k: summary.get(k) for k in RUN_KEYS})
    entry["metrics"] = read_metrics(run.dir / "metrics.jsonl") if (run.dir / "metrics.jsonl").exists() else []
    entry["tail"] = tail_drop(entry["metrics"])
    return entry


def _val_points(metrics: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, validation loss) of the metrics rows that carry an evaluation, in order."""
    return [(int(m["step"]), float(m["val_loss"])) for m in metrics if m.get("val_loss") is not None and "step" in m]


def tail_drop(metrics: list[dict[str, Any]], fraction: float = TAIL) -> dict[str, Any] | None:
    """How far validation loss fell over the last ``fraction`` of training: the final evaluation
    against the latest one at or before step ``(1 - fraction) x`` the final step (so the window is
    at least that long: ``from_step`` says where it starts). None without such an earlier one."""
    pts = _val_points(metrics)
    if len(pts) < 2:
        return None
    end, last = pts[-1]
    earlier = [p for p in pts[:-1] if p[0] <= end * (1 - fraction)]
    if not earlier:
        return None
    start, first = earlier[-1]
    return {"from_step": start, "to_step": end, "drop": first - last}


def lr_source(v) -> str:
    if v.lr_from is not None:
        return f"lr_from {v.lr_from}"
    return "fixed" if v.lr is not None else "sweep"


def ngram_rows(data, seq_len: int, windows: int) -> dict[str, Any]:
    """Unigram and bigram count models scored on the validation windows the runs evaluate on."""
    from .ngram import ngram_reference

    ref = ngram_reference(data, seq_len, windows)
    return {"seq_len": seq_len, "windows": windows, **ref}


# ----------------------------------------------------------------------------------------
# statistics over seeds
# ----------------------------------------------------------------------------------------


def _values(runs: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {r["seed"]: float(r[key]) for r in runs if r.get(key) is not None}


def _ctx_values(runs: list[dict[str, Any]], multiple: str) -> list[float]:
    return [float(r["val_loss_ctx"][multiple]) for r in runs
            if isinstance(r.get("val_loss_ctx"), dict) and r["val_loss_ctx"].get(multiple) is not None]


def context_multiples(results: dict[str, Any]) -> list[str]:
    """The context multiples the runs were evaluated at, as strings ("1", "2", "4"), sorted."""
    found = {m for v in results["variants"] for r in v["runs"] if isinstance(r.get("val_loss_ctx"), dict)
             for m in r["val_loss_ctx"]}
    return sorted(found, key=float)


def _val_by_step(run: dict[str, Any]) -> dict[int, float]:
    return dict(_val_points(run.get("metrics") or []))


def verdict(d: dict[str, Any] | None) -> int | None:
    """A paired difference as a verdict: -1 better beyond the seed noise, +1 worse beyond it,
    0 a wash (its interval holds 0); None without an interval (one seed)."""
    if not d or d.get("ci95") is None:
        return None
    return 0 if not d.get("significant") else (1 if d["mean"] > 0 else -1)


def delta_path(entry: dict[str, Any], baseline: dict[str, Any], fraction: float = LATE) -> list[dict[str, Any]]:
    """The variant's difference from the baseline (paired by seed, as the final one) at every
    evaluation in the last ``fraction`` of training: the steps from ``(1 - fraction) x`` the
    final step on at which every run of both, on their common seeds, has a validation loss.
    Each item: ``step`` and :func:`llmarch.training.stats.paired_difference`'s fields. Empty
    when the runs carry no metrics or share no such step."""
    from . import stats

    mine = {r["seed"]: _val_by_step(r) for r in entry["runs"]}
    base = {r["seed"]: _val_by_step(r) for r in baseline["runs"]}
    seeds = sorted(s for s in mine if s in base and mine[s] and base[s])
    if not seeds:
        return []
    steps = set.intersection(*(set(mine[s]) & set(base[s]) for s in seeds))
    if not steps:
        return []
    end = max(steps)
    path = []
    for step in sorted(t for t in steps if t >= end * (1 - fraction)):
        d = stats.paired_difference([mine[s][step] for s in seeds], [base[s][step] for s in seeds])
        path.append({"step": step, **{k: v for k, v in d.items() if k != "differences"}})
    return path


def variant_stats(entry: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Mean, spread and CI of one variant's final validation loss over its seeds; its difference
    from the baseline paired by seed (None for the baseline itself or without common seeds);
    validation loss at longer contexts; spikes (total), max grad norm (max), expert-load CV and
    throughput (means) over the seeds."""
    from . import stats

    runs = entry["runs"]
    vals = _values(runs, "final_val_loss")
    delta, path = None, []
    if baseline is not None and baseline is not entry:
        path = delta_path(entry, baseline)
        base_vals = _values(baseline["runs"], "final_val_loss")
        common = [s for s in vals if s in base_vals]
        if common:
            delta = dict(stats.paired_difference([vals[s] for s in common], [base_vals[s] for s in common]), seeds=common)
    ctx = {}
    for m in context_multiples({"variants": [entry]}):
        xs = _ctx_values(runs, m)
        if xs:
            ctx[m] = stats.summarize(xs)
    spikes = [int(r["loss_spikes"]) for r in runs if r.get("loss_spikes") is not None]
    norms = list(_values(runs, "max_grad_norm").values())
    cvs = list(_values(runs, "expert_load_cv_final").values())
    speeds = list(_values(runs, "tokens_per_s").values())
    drops = [float(r["tail"]["drop"]) for r in runs if isinstance(r.get("tail"), dict)]
    tail = stats.summarize(drops) if drops else None
    val = stats.summarize(list(vals.values())) if vals else None
    spread = val["std"] if val and val["n"] > 1 else None
    verdicts = {verdict(p) for p in path}
    return {
        "n_seeds": len(vals),
        "val_loss": val,
        "delta_vs_baseline": delta,
        "val_loss_ctx": ctx,
        "loss_spikes": sum(spikes) if spikes else None,
        "max_grad_norm": max(norms) if norms else None,
        "expert_load_cv": statistics.fmean(cvs) if cvs else None,
        "tokens_per_s": statistics.fmean(speeds) if speeds else None,
        "tail_drop": tail,
        # flattened: the last stretch of training moved validation loss less than the seeds do
        "flattened": (tail["mean"] < spread) if tail and spread is not None else None,
        # the verdict against the baseline at each evaluation of the last quarter; stable: the same at all
        "delta_path": path,
        "verdict_stable": (len(verdicts) == 1) if len(path) > 1 and None not in verdicts else None,
    }


def compute_stats(results: dict[str, Any]) -> dict[str, Any]:
    """Fill every variant's ``stats`` (see :func:`variant_stats`) in place; return ``results``."""
    base = next((v for v in results["variants"] if v["name"] == results.get("baseline")), None)
    for v in results["variants"]:
        v["stats"] = variant_stats(v, base)
    return results


# ----------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return DASH
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:,.0f}"


def _signed(v: float) -> str:
    return f"{v:+.4f}".replace("-", "−")


def _ci(ci) -> str:
    return f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else DASH


def _mean_std(s: dict[str, Any] | None, with_n: bool = True) -> str:
    if not s or s.get("mean") is None:
        return DASH
    text = _num(s["mean"])
    if s.get("n", 0) > 1 and s.get("std") is not None:
        text += f" ± {_num(s['std'])}"
    return text + (f" ({s['n']})" if with_n else "")


def _delta(d: dict[str, Any] | None, is_baseline: bool) -> tuple[str, str]:
    """(Δ vs baseline [95% CI], exceeds seed noise?) cells."""
    if is_baseline:
        return "baseline", DASH
    if not d or d.get("mean") is None:
        return DASH, DASH
    ci = d.get("ci95")
    text = _signed(d["mean"]) + (f" [{_signed(ci[0])}, {_signed(ci[1])}]" if ci else "")
    if not ci:
        return text, f"— ({d.get('n', 1)} seed)"
    return text, "yes" if d.get("significant") else "no (wash)"


def _ctx_columns(results: dict[str, Any]) -> list[str]:
    return sorted(set(CTX_COLUMNS) | (set(context_multiples(results)) - {"1"}), key=float)


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The markdown table of results.md: its header and one row of cells per variant, then one
    per n-gram reference (only its loss filled)."""
    ctx = _ctx_columns(results)
    header = ["variant", "LR", "active non-emb. params", "val loss mean ± std (n seeds)", "95% CI",
              "Δ vs baseline [95% CI]", "exceeds seed noise?", *(f"val loss at {m}x ctx" for m in ctx),
              "val drop, last 1/8 (flat?)", "loss spikes", "max grad norm", "expert load CV", "tokens/s"]
    rows = []
    for v in results["variants"]:
        s = v["stats"]
        delta, exceeds = _delta(s.get("delta_vs_baseline"), v["name"] == results.get("baseline"))
        rows.append([v["name"], f"{v['lr']:g}", _num(v.get("params_active_non_embedding")),
                     _mean_std(s.get("val_loss")), _ci((s.get("val_loss") or {}).get("ci95")), delta, exceeds,
                     *(_mean_std(s["val_loss_ctx"].get(m), with_n=False) for m in ctx), _tail_cell(s),
                     _num(s.get("loss_spikes")), _num(s.get("max_grad_norm")), _num(s.get("expert_load_cv"), 3),
                     _num(s.get("tokens_per_s"))])
    for name, loss in _ngram_items(results):
        rows.append([name, DASH, DASH, _num(loss), *[DASH] * (len(header) - 4)])
    return header, rows


def _tail_cell(s: dict[str, Any]) -> str:
    t = s.get("tail_drop")
    if not t or t.get("mean") is None:
        return DASH
    flat = s.get("flattened")
    return _num(t["mean"]) + ("" if flat is None else " (yes)" if flat else " (no)")


def tail_lines(results: dict[str, Any]) -> list[str]:
    """A sentence on whether the baseline's validation curve has flattened, with its numbers."""
    base = next((v for v in results["variants"] if v["name"] == results.get("baseline")), None)
    s = (base or {}).get("stats") or {}
    t, spread = s.get("tail_drop"), (s.get("val_loss") or {}).get("std")
    steps = [r["tail"] for r in (base or {}).get("runs", []) if isinstance(r.get("tail"), dict)]
    if not t or t.get("mean") is None or not steps or spread is None or s.get("n_seeds", 0) < 2:
        return []
    w = steps[0]
    verdict = "flattened" if s.get("flattened") else "still falling"
    return ["", f"Baseline curve: validation loss fell {_num(t['mean'])} (mean over {t['n']} seeds) from step "
                f"{w['from_step']:,} to {w['to_step']:,}, the last {(w['to_step'] - w['from_step']) / w['to_step']:.1%} "
                f"of training, against a seed spread (std) of the final loss of {_num(spread)}: {verdict}. "
                "The column \"val drop, last 1/8\" gives the same test per variant."]


VERDICT_WORDS = {-1: "better", 0: "wash", 1: "worse"}


def path_lines(results: dict[str, Any]) -> list[str]:
    """The section on each variant's difference from the baseline over the last quarter of
    training (:func:`delta_path`): a table, step by step, and whether the verdict held."""
    paths = [(v["name"], v["stats"]) for v in results["variants"] if (v.get("stats") or {}).get("delta_path")]
    if not paths:
        return []
    steps = sorted({p["step"] for _, s in paths for p in s["delta_path"]})
    lines = ["", f"## Δ vs baseline over the last {LATE:.0%} of training", "",
             f"Paired by seed at each evaluation from step {steps[0]:,} on: better / worse when the 95% interval "
             "excludes 0, wash when it holds 0. A verdict that is the same at every step does not depend on where "
             "training stopped.", "",
             "| variant | " + " | ".join(f"step {t:,}" for t in steps) + " | same verdict at each step? |",
             "|---|" + "---|" * (len(steps) + 1)]
    for name, s in paths:
        at = {p["step"]: p for p in s["delta_path"]}
        cells = []
        for t in steps:
            p = at.get(t)
            v = verdict(p)
            cells.append("" if p is None else _signed(p["mean"]) + ("" if v is None else f" ({VERDICT_WORDS[v]})"))
        stable = s.get("verdict_stable")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {DASH if stable is None else 'yes' if stable else 'no'} |")
    known = [(n, s["verdict_stable"]) for n, s in paths if s.get("verdict_stable") is not None]
    if known:
        changed = [n for n, ok in known if not ok]
        lines += ["", f"The verdict is the same at every one of these steps for {len(known) - len(changed)} of the "
                      f"{len(known)} variants" + (f"; it changes for: {', '.join(changed)}." if changed else ".")]
    return lines


def _ngram_items(results: dict[str, Any]) -> list[tuple[str, float]]:
    ng = results.get("ngram") or {}
    return [(f"{k} (count model, no training)", ng[k]) for k in ("unigram", "bigram") if ng.get(k) is not None]


def csv_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """results.csv: one row per variant (and per n-gram reference), numbers unformatted."""
    ctx = _ctx_columns(results)
    out = []
    for v in results["variants"]:
        s = v["stats"]
        val = s.get("val_loss") or {}
        d = s.get("delta_vs_baseline") or {}
        ci, dci = val.get("ci95") or (None, None), d.get("ci95") or (None, None)
        row = {"variant": v["name"], "lr": v["lr"], "lr_source": v.get("lr_source"),
               "params_active_non_embedding": v.get("params_active_non_embedding"), "n_seeds": s.get("n_seeds"),
               "val_loss_mean": val.get("mean"), "val_loss_std": val.get("std"),
               "val_loss_ci_low": ci[0], "val_loss_ci_high": ci[1],
               "delta_mean": d.get("mean"), "delta_ci_low": dci[0], "delta_ci_high": dci[1],
               "exceeds_seed_noise": d.get("significant") if d.get("ci95") else None}
        row.update({f"val_loss_{m}x_mean": (s["val_loss_ctx"].get(m) or {}).get("mean") for m in ctx})
        row["val_drop_last_eighth"] = (s.get("tail_drop") or {}).get("mean")
        row["flattened"] = s.get("flattened")
        row["verdict_stable_last_quarter"] = s.get("verdict_stable")
        row.update({k: s.get(k) for k in ("loss_spikes", "max_grad_norm", "expert_load_cv", "tokens_per_s")})
        out.append(row)
    keys = list(out[0]) if out else ["variant", "val_loss_mean"]
    for name, loss in _ngram_items(results):
        out.append({k: None for k in keys} | {"variant": name, "val_loss_mean": loss})
    return out


def sweep_lines(results: dict[str, Any]) -> list[str]:
    """The LR-sweep table (variant x LR -> final validation loss at the sweep's seed; the chosen
    one in bold) and a line per variant that took another's LR."""
    sw = results.get("lr_sweep")
    if not sw:
        return []
    grid = sw["grid"]
    lines = [f"## LR sweep (seed {sw['seed']}; final validation loss; chosen in bold)", "",
             "| variant | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |", "|---|" + "---|" * (len(grid) + 1)]
    for name, losses in sw["losses"].items():
        chosen = sw["chosen"].get(name)
        cells = []
        for lr in grid:
            if lr not in losses and str(lr) not in losses:  # not in this variant's own grid
                cells.append("")
                continue
            loss = losses.get(lr, losses.get(str(lr)))
            cell = _num(loss)
            cells.append(f"**{cell}**" if lr == chosen and loss is not None else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {DASH if chosen is None else f'{chosen:g}'} |")
    for name, src in sw.get("lr_from", {}).items():
        lr = sw["chosen"].get(src)
        lines.append("")
        lines.append(f"{name}: the LR of {src} ({DASH if lr is None else f'{lr:g}'}), not swept itself.")
    return lines


def header_lines(results: dict[str, Any]) -> list[str]:
    """What produced the table: command, source commit, wall time, seeds, machine, date."""
    m = results.get("machine") or {}
    seeds = results.get("seeds") or []
    wall = results.get("wall_time_s")
    trained, total = results.get("runs_trained_here"), results.get("runs_total")
    return [
        "# Ablation results", "",
        f"- command: `{results.get('command', DASH)}`",
        f"- commit: `{results.get('commit', DASH)}`",
        f"- wall time: {DASH if wall is None else f'{wall:,.0f} s'}"
        + (f" ({trained} of the {total} runs trained by this command"
           + ("; the others reused with --resume)" if trained < total else ")") if None not in (trained, total) else ""),
        f"- seeds: {', '.join(map(str, seeds))} ({len(seeds)}); baseline: {results.get('baseline', DASH)}",
        f"- machine: {m.get('cpu', DASH)}, {m.get('cores', DASH)} cores ({m.get('platform', DASH)}); "
        f"launcher {results.get('launcher', 'local')}"
        + (f" x{results['nproc']}" if results.get("nproc", 1) != 1 else "") + f", jobs {results.get('jobs', 1)}",
        f"- date: {results.get('date', DASH)}",
        *([f"- tables written again from these runs, training nothing: `{rep.get('command', DASH)}` at commit "
           f"`{rep.get('commit', DASH)}`, {rep.get('date', DASH)}"] if isinstance(rep := results.get("report"), dict) else []),
        "",
    ]


def write_table(results: dict[str, Any], out_dir: Path) -> None:
    """Write results.md (header, table, LR sweep) and results.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = csv_rows(results)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_text(out_dir / "results.csv", buf.getvalue())
    header, cells = table_rows(results)
    lines = header_lines(results)
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    lines += tail_lines(results)
    lines += path_lines(results)
    sweep = sweep_lines(results)
    if sweep:
        lines += ["", *sweep]
    write_text(out_dir / "results.md", "\n".join(lines) + "\n")


def _jsonable(x: Any) -> Any:
    """Strict JSON: tuples as lists, float keys as strings, NaN / infinity as the strings "nan" / "inf"."""
    if isinstance(x, dict):
        return {(f"{k:g}" if isinstance(k, float) else str(k)): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def write_json(results: dict[str, Any], out_dir: Path) -> None:
    """results.json: everything but the per-step metrics (those stay in each run's metrics.jsonl)."""
    slim = dict(results, variants=[dict(v, runs=[{k: val for k, val in r.items() if k != "metrics"} for r in v["runs"]])
                                   for v in results["variants"]])
    write_text(out_dir / "results.json", json.dumps(_jsonable(slim), indent=2) + "\n")


def write_all(results: dict[str, Any], out_dir: Path) -> None:
    write_json(results, out_dir)
    write_table(results, out_dir)
    plot(results, out_dir)


# ----------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------


def variant_colours(n: int) -> list[tuple[float, ...]]:
    """``n`` distinct colours: tab10 up to 10; tab20's ten dark then ten light shades up to 20;
    evenly spaced hues beyond."""
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        order = list(range(0, 20, 2)) + list(range(1, 20, 2))
        return [cmap(i) for i in order[:n]]
    cmap = colormaps["hsv"]
    return [cmap(i / n) for i in range(n)]


def _smooth(xs: list[float], k: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc = x if i == 0 else acc + (x - acc) / min(i + 1, k)
        out.append(acc)
    return out


def _across_seeds(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(tokens, mean, min, max) over the seeds of ``key`` at the steps every seed has it."""
    per_run = [{m["step"]: (m["tokens"], float(m[key])) for m in r.get("metrics") or [] if m.get(key) is not None}
               for r in runs]
    per_run = [p for p in per_run if p]
    if not per_run:
        return [], [], [], []
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    tokens = [per_run[0][s][0] for s in steps]
    vals = [[p[s][1] for p in per_run] for s in steps]
    return tokens, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def _figure(title: str, xlabel: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5.8))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _legend(ax) -> None:
    """The legend beside the axes (a dozen long variant names would cover the curves)."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def loss_figure(results: dict[str, Any]):
    """Validation loss (mean over seeds, shaded min-max) vs training tokens per variant, the
    EMA-smoothed training loss (mean over seeds) as a thin line, n-gram references dashed."""
    fig, ax = _figure("validation loss: mean over seeds, band = min–max across seeds; thin: training loss (EMA)",
                      "training tokens", "loss (nats / token)")
    colours = variant_colours(len(results["variants"]))
    shown = [loss for _, loss in _ngram_items(results)]
    for v, c in zip(results["variants"], colours):
        n = len(v["runs"])
        tokens, mean, lo, hi = _across_seeds(v["runs"], "val_loss")
        if tokens:
            ax.plot(tokens, mean, "o-", ms=3, lw=1.6, color=c, label=f"{v['name']} ({n} seed{'s' * (n > 1)})")
            if n > 1:
                ax.fill_between(tokens, lo, hi, color=c, alpha=0.18, lw=0)
            shown += [*lo, *hi]
        t_tokens, t_mean, _, _ = _across_seeds(v["runs"], "loss")
        if t_tokens:
            ax.plot(t_tokens, _smooth(t_mean), "-", lw=0.7, alpha=0.45, color=c, label="_nolegend_")
    for (name, loss), g in zip(_ngram_items(results), ("0.15", "0.5")):
        ax.axhline(loss, ls="--", lw=1.0, color=g, label=name)
    shown = [y for y in shown if math.isfinite(y)]
    if shown:  # the validation curves and references; the early training loss is far above them
        lo, hi = min(shown), max(shown)
        pad = 0.05 * (hi - lo) or 0.05
        ax.set_ylim(lo - pad, hi + pad)
    _legend(ax)
    fig.tight_layout()
    return fig


def grad_norm_figure(results: dict[str, Any]):
    """Global gradient norm (before clipping) per step, mean over seeds with a min-max band."""
    fig, ax = _figure("global gradient L2 norm before clipping: mean over seeds, band = min–max",
                      "training tokens", "grad norm")
    for v, c in zip(results["variants"], variant_colours(len(results["variants"]))):
        tokens, mean, lo, hi = _across_seeds(v["runs"], "grad_norm")
        if tokens:
            ax.plot(tokens, mean, lw=1.0, color=c, label=v["name"])
            if len(v["runs"]) > 1:
                ax.fill_between(tokens, lo, hi, color=c, alpha=0.15, lw=0)
    ax.set_yscale("log")
    _legend(ax)
    fig.tight_layout()
    return fig


def length_figure(results: dict[str, Any]):
    """Validation loss at 1x / 2x / 4x the training context per variant (error bars: std over seeds);
    None when no run measured it."""
    multiples = context_multiples(results)
    if not multiples:
        return None
    fig, ax = _figure("validation loss vs evaluation context (multiple of the training context); bars: std over seeds",
                      "context / training context", "validation loss")
    variants = results["variants"]
    width = 0.08
    for i, (v, c) in enumerate(zip(variants, variant_colours(len(variants)))):
        xs, ys, es = [], [], []
        for m, st in sorted(v["stats"]["val_loss_ctx"].items(), key=lambda kv: float(kv[0])):  # compute_stats'
            xs.append(float(m) * 2 ** (width * (i - (len(variants) - 1) / 2)))  # a small dodge
            ys.append(st["mean"])
            es.append(st["std"])
        if xs:
            ax.errorbar(xs, ys, yerr=es, fmt="o-", ms=4, lw=1.2, capsize=3, color=c, label=v["name"])
    ax.set_xscale("log", base=2)
    ax.set_xticks([float(m) for m in multiples], [f"{m}x" for m in multiples])
    _legend(ax)
    fig.tight_layout()
    return fig


def lr_sweep_figure(results: dict[str, Any]):
    """Final validation loss vs learning rate (log x) per swept variant, the chosen LR starred;
    None without a sweep."""
    sw = results.get("lr_sweep")
    if not sw:
        return None
    fig, ax = _figure(f"LR sweep: final validation loss at seed {sw['seed']}; star = chosen", "learning rate", "validation loss")
    names = [v["name"] for v in results["variants"]]
    colours = dict(zip(names, variant_colours(len(names))))
    extra = variant_colours(len(names) + len(sw["losses"]))[len(names):]
    for name, losses in sw["losses"].items():
        c = colours.get(name) or extra.pop(0)
        pts = [(lr, losses.get(lr, losses.get(str(lr)))) for lr in sw["grid"]]
        pts = [(lr, y) for lr, y in pts if y is not None and math.isfinite(y)]
        if not pts:
            continue
        ax.plot(*zip(*pts), "o-", lw=1.2, ms=4, color=c, label=name)
        chosen = sw["chosen"].get(name)
        best = [y for lr, y in pts if lr == chosen]
        if best:
            ax.plot([chosen], best, "*", ms=13, color=c, markeredgecolor="black", label="_nolegend_")
    ax.set_xscale("log")
    ax.set_xticks(sw["grid"], [f"{lr:g}" for lr in sw["grid"]])
    ax.minorticks_off()
    _legend(ax)
    fig.tight_layout()
    return fig


def plot(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write loss, grad_norm, length and lr_sweep as PNG and SVG (the last two only when there is
    something to show); return the files written."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in (("loss", loss_figure), ("grad_norm", grad_norm_figure), ("length", length_figure),
                       ("lr_sweep", lr_sweep_figure)):
        fig = make(results)
        if fig is None:
            continue
        for ext in ("png", "svg"):
            with atomic_file(out_dir / f"{name}.{ext}") as tmp:
                fig.savefig(tmp, format=ext, dpi=120, bbox_inches="tight")
            written.append(out_dir / f"{name}.{ext}")
        plt.close(fig)
    return written


__all__ = ["compute_stats", "csv_rows", "delta_path", "path_lines", "verdict", "grad_norm_figure", "length_figure", "loss_figure", "lr_sweep_figure",
           "plot", "table_rows", "variant_colours", "variant_stats", "write_all", "write_json", "write_table"]
