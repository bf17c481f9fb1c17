"""``llmarch ablate``: seeds, the per-variant LR sweep, parallel jobs, fresh / --resume / --force
output folders, the torchrun launcher, results.json/md/csv and the plots.

The runs are real ``llmarch train`` processes of a tiny model (a few seconds each); the tables
and plots are also checked on synthetic rows, against statistics computed here by hand.
"""

import csv
import json
import math
import statistics
import sys
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from llmarch.cli import main as cli_main
from llmarch.errors import ConfigError
from llmarch.training import ablate
from llmarch.training.ablate import (
    Launch,
    active_non_embedding,
    check_variant_values,
    choose_lr,
    load_spec,
    make_run,
    prepare_run,
    run_pool,
    run_stage,
    run_key,
    run_spec,
    source_commit,
    spec_seeds,
    variant_configs,
    variants_of,
)
from llmarch.training.ablate_results import (
    compute_stats,
    delta_path,
    loss_figure,
    lr_sweep_figure,
    plot,
    tail_drop,
    variant_colours,
    write_json,
    write_table,
)
from llmarch.training.data import TokenData
from llmarch.training.loop import read_metrics, seeded_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
BASE = {"arch": "llama3.2-1b", "set": TINY, "tokens": 4 * 32 * 6, "batch_size": 4, "seq_len": 32, "warmup": 1,
        "eval_every": 3, "eval_batches": 2, "threads": 1}
T_975_DF1 = 12.706  # Student's t, two-sided 95%, 1 degree of freedom (any statistics table)


@pytest.fixture(scope="module")
def data_dir(token_data):
    return token_data(100_000, 300)


def write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def cli(capsys, *argv):
    rc = cli_main(list(argv))
    return rc, capsys.readouterr().err.strip()


def one_error(rc, err, *fragments):
    last = err.splitlines()[-1] if err else ""
    assert rc == 2 and last.startswith("llmarch: error: "), (rc, err)
    for fragment in fragments:
        assert fragment in last, last


# ----------------------------------------------------------------------------------------
# the spec
# ----------------------------------------------------------------------------------------


def _spec(tmp_path, data_dir, **changes):
    spec = {"out": str(tmp_path / "abl"), "data": str(data_dir),
            "base": {"arch": "llama3.2-1b", "tokens": 4 * 32 * 2, "batch_size": 4, "seq_len": 32},
            "variants": [{"name": "A"}, {"name": "a", "lr": 1e-3}]}
    spec.update(changes)
    return write_spec(tmp_path / "spec.yaml", **spec), spec


SWEEP = {"lr_sweep": [1e-3, 3e-3]}


@pytest.mark.parametrize("change,fragment", [
    ({"base": 5}, "'base' must be a mapping"),
    ({"variants": [{"name": "A", "set": 3}]}, "'set' in variant 1 must be a mapping"),
    ({"variants": [{"name": "A", "learning_rate": 1}]}, "unknown field(s) learning_rate in variant 1"),
    ({"variants": [{"name": 7}]}, "unique 'name'"),
    ({"variants": [{"name": "A"}, {"name": "A", "lr": 1e-3}]}, "unique 'name'"),
    ({"sweeps": 3}, "unknown key(s) sweeps"),
    ({"seeds": 0}, "'seeds' must be a count"),
    ({"seeds": [0, 0]}, "'seeds' must be a count"),
    ({"seeds": "3"}, "'seeds' must be a count"),
    ({"seeds": 2, "base": {"arch": "llama3.2-1b", "seed": 1}}, "'seed' in 'base' and top-level 'seeds'"),
    ({"jobs": 0}, "'jobs' must be an integer"),
    ({"lr_sweep": []}, "'lr_sweep' must be a non-empty list"),
    ({"lr_sweep": [1e-3, -1]}, "'lr_sweep' must be a non-empty list of positive numbers"),
    ({"lr_sweep": [1e-3, 1e-3]}, "lists a learning rate twice"),
    ({"baseline": "B"}, "'baseline' 'B' is not a variant"),
    ({"variants": [{"name": "A"}, {"name": "B", "seed": 3}]}, "'seed' in variant 2 ('B')"),
    ({"variants": [{"name": "A"}, {"name": "B", "lr_from": "A"}]}, "'lr_from' in variant 2 ('B') needs a top-level 'lr_sweep'"),
    ({**SWEEP, "variants": [{"name": "A"}, {"name": "B", "lr_from": "C"}]}, "no variant is named 'C'"),
    ({**SWEEP, "variants": [{"name": "A", "lr_from": "B"}, {"name": "B", "lr_from": "A"}]}, "is not swept itself"),
    ({**SWEEP, "variants": [{"name": "A", "lr_from": "A"}]}, "is not swept itself"),
    ({**SWEEP, "variants": [{"name": "A"}, {"name": "B", "lr": 0.01}]}, "'lr' in variant 2 ('B'): with 'lr_sweep'"),
    ({"variants": [{"name": "A", "out": "x"}]}, "'out' in variant 1: set it with the spec's top-level 'out'"),
    ({"variants": [{"name": "A"}, {"name": "B", "lr_sweep": [1e-3]}]}, "'lr_sweep' in variant 2 ('B') needs a top-level 'lr_sweep'"),
    ({**SWEEP, "variants": [{"name": "A"}, {"name": "B", "lr_from": "A", "lr_sweep": [1e-3]}]},
     "'lr_sweep' in variant 2 ('B'): a variant with 'lr_from'"),
    ({**SWEEP, "variants": [{"name": "A"}, {"name": "B", "lr_sweep": [0]}]},
     "'lr_sweep' in variant 2 ('B') must be a non-empty list of positive numbers"),
    ({**SWEEP, "variants": [{"name": "A"}, {"name": "B", "lr_sweep": [1e-2, 1e-2]}]}, "lists a learning rate twice"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_spec_is_one_error_naming_the_spot(capsys, tmp_path, data_dir, change, fragment):
    path, _ = _spec(tmp_path, data_dir, **change)
    with pytest.raises(ConfigError) as e:
        load_spec(path)
    assert fragment in str(e.value) and str(path) in str(e.value)
    rc, err = cli(capsys, "ablate", str(path))
    one_error(rc, err, fragment)
    assert not (tmp_path / "abl").exists()


def test_seeds_from_spec_base_and_command_line(tmp_path, data_dir):
    _, spec = _spec(tmp_path, data_dir)
    assert spec_seeds(spec) == [0]
    assert spec_seeds({**spec, "base": {**spec["base"], "seed": 5}}) == [5]
    assert spec_seeds({**spec, "seeds": 3}) == [0, 1, 2]
    assert spec_seeds({**spec, "seeds": [4, 2]}) == [4, 2]
    assert spec_seeds({**spec, "seeds": [4, 2]}, override=2) == [0, 1]
    with pytest.raises(ConfigError, match="--seeds must be 1 or more"):
        spec_seeds(spec, override=0)


def test_lr_choice_lowest_loss_ties_to_the_smaller_diverged_is_worst():
    assert choose_lr({1e-3: 3.0, 3e-3: 2.9, 1e-2: 3.5}) == 3e-3
    assert choose_lr({1e-2: 2.9, 1e-3: 2.9, 3e-3: 3.0}) == 1e-3  # a tie: the smaller LR
    assert choose_lr({1e-3: 3.0, 1e-2: float("nan")}) == 1e-3  # NaN (diverged) loses
    assert choose_lr({1e-3: None, 1e-2: 4.0}) == 1e-2  # unfinished runs are not candidates
    assert choose_lr({1e-3: None}) is None


def test_variants_are_parameter_matched_and_take_their_lr_source(tmp_path, data_dir):
    path, _ = _spec(tmp_path, data_dir, match="params", lr_sweep=[1e-3, 3e-3],
                    variants=[{"name": "GQA"}, {"name": "MHA", "set": {"num_kv_heads": 4}, "lr_from": "GQA"},
                              {"name": "Muon", "optimizer": "muon"}])
    spec = load_spec(path)
    (_, c0), (_, c1), (muon, c2) = variant_configs(spec, 300)
    assert c1.num_kv_heads == 4 and c1.intermediate_size < c0.intermediate_size  # MHA's extra K/V paid by the FFN
    assert abs(active_non_embedding(c1) - active_non_embedding(c0)) <= 3 * c0.hidden_size * 8
    assert muon["optimizer"] == "muon" and c2.to_dict() == c0.replace(name="Muon").to_dict()
    gqa, mha, mu = variants_of(spec, 300)
    assert gqa.swept and mu.swept and not mha.swept and mha.lr_from == "GQA"
    assert "lr" not in gqa.fields and "lr_from" not in mha.fields  # the sweep supplies the LR


def test_runs_are_keyed_by_configuration_seed_and_lr(tmp_path, data_dir):
    path, spec = _spec(tmp_path, data_dir)
    a, b = variants_of(load_spec(path), 300)
    out = tmp_path / "abl"
    ra, rb = make_run(a, 0, 3e-3, out, str(data_dir)), make_run(b, 0, 3e-3, out, str(data_dir))
    assert ra.dir != rb.dir and ra.dir.name.startswith("a-s0-lr0.003-") and rb.dir.name.startswith("a-s0-lr0.003-")
    assert make_run(a, 0, 3e-3, out, str(data_dir)) == ra  # the same run: the same folder and key
    others = [make_run(a, 1, 3e-3, out, str(data_dir)), make_run(a, 0, 1e-3, out, str(data_dir)),
              make_run(a, 0, 3e-3, out, str(data_dir), procs=2)]
    assert len({r.key for r in [ra, *others]}) == 4 and len({r.dir for r in [ra, *others]}) == 4
    # a finished run is reused only when its stored key is the run's
    ra.dir.mkdir(parents=True)
    (ra.dir / "summary.json").write_text(json.dumps({"finished": True, "final_val_loss": 5.0}))
    (ra.dir / "spec.json").write_text(json.dumps({"key": rb.key}))
    assert ablate.read_summary(ra) is None and prepare_run(ra, str(data_dir), Launch()) is not None
    (ra.dir / "spec.json").write_text(json.dumps({"key": ra.key}))
    assert ablate.final_val_loss(ra) == 5.0 and prepare_run(ra, str(data_dir), Launch()) is None


def test_a_killed_run_continues_from_its_checkpoint(tmp_path, data_dir):
    path, _ = _spec(tmp_path, data_dir)
    a, _ = variants_of(load_spec(path), 300)
    run = make_run(a, 0, 3e-3, tmp_path / "abl", str(data_dir))
    cmd = prepare_run(run, str(data_dir), Launch())
    assert cmd[1:4] == ["-m", "llmarch.cli", "train"] and cmd[-1] == "--force" and "--resume" not in cmd
    assert json.loads((run.dir / "spec.json").read_text())["key"] == run.key and (run.dir / "model.json").is_file()
    (run.dir / "checkpoint.safetensors").write_bytes(b"")  # killed after a checkpoint, before its summary
    assert prepare_run(run, str(data_dir), Launch())[4:] == ["--resume", str(run.dir), "--no-progress"]


def test_torchrun_command_splits_the_global_batch(tmp_path, data_dir):
    path, _ = _spec(tmp_path, data_dir)
    a, _ = variants_of(load_spec(path), 300)
    launch = Launch("torchrun", 2)
    run = make_run(a, 0, 3e-3, tmp_path / "abl", str(data_dir), procs=2)
    cmd = prepare_run(run, str(data_dir), launch)
    assert cmd[:10] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "llmarch.cli", "train", "--arch"]
    def opt(flag):
        return cmd[cmd.index(flag) + 1]

    assert opt("--batch-size") == "2" and opt("--eval-batches") == str(2 * 8)  # same rows and eval windows in all
    with pytest.raises(ConfigError, match="variant 'A': batch_size 4 is not divisible by --nproc 3"):
        check_variant_values([a], None, Launch("torchrun", 3))
    with pytest.raises(ConfigError, match="--nproc 2 needs --launcher torchrun"):
        Launch("local", 2).check()


def test_bad_training_values_fail_before_any_run(capsys, tmp_path, data_dir):
    path, _ = _spec(tmp_path, data_dir, variants=[{"name": "A"}, {"name": "B", "warmup": -1}])
    rc, err = cli(capsys, "ablate", str(path))
    one_error(rc, err, "variant 'B': --warmup must be 0 or more")
    assert not (tmp_path / "abl" / "runs").exists()


def test_only_nosuch_is_an_error_listing_the_variants(capsys, tmp_path, data_dir):
    path, _ = _spec(tmp_path, data_dir)
    rc, err = cli(capsys, "ablate", str(path), "--only", "nosuch")
    one_error(rc, err, "--only nosuch", "'A', 'a'")
    assert not (tmp_path / "abl" / "runs").exists()


# ----------------------------------------------------------------------------------------
# seeds: the same init and batches for every variant of a seed
# ----------------------------------------------------------------------------------------


def test_seeded_init_is_shared_by_variants_and_differs_between_seeds(tmp_path, data_dir):
    path, _ = _spec(tmp_path, data_dir, variants=[{"name": "GQA"}, {"name": "MHA", "set": {"num_kv_heads": 4}},
                                                  {"name": "MoE", "set": {"moe": {"num_experts": 4, "top_k": 2,
                                                                                  "expert_size": 32}}}])
    (_, gqa), (_, mha), (_, moe) = variant_configs(load_spec(path), 300)

    def embedding(cfg, seed):
        name, p = next(iter(seeded_model(cfg, seed).named_parameters()))
        assert "embed" in name
        return p.detach().clone()

    e = embedding(gqa, 0)
    assert torch.equal(e, embedding(mha, 0)) and torch.equal(e, embedding(moe, 0))
    assert not torch.equal(e, embedding(gqa, 1))
    assert torch.equal(e, embedding(gqa, 0))  # and it does not depend on what ran before


# ----------------------------------------------------------------------------------------
# running: jobs at once, failures
# ----------------------------------------------------------------------------------------


class _FakeRun:
    def __init__(self, d: Path, variant: str):
        self.dir, self.variant, self.seed, self.lr, self.key = d, variant, 0, 1e-3, "fake"
        d.mkdir(parents=True)


def _sleeper(d: Path) -> list[str]:
    code = ("import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); (d / 'start').write_text(repr(time.time())); "
            "time.sleep(1.5); (d / 'end').write_text(repr(time.time()))")
    return [sys.executable, "-c", code, str(d)]


def test_jobs_run_at_once_and_a_failure_does_not_stop_the_others(tmp_path):
    bad, r1, r2 = (_FakeRun(tmp_path / n, n) for n in ("bad", "one", "two"))
    done = []
    failed = run_pool([(bad, [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]),
                       (r1, _sleeper(r1.dir)), (r2, _sleeper(r2.dir))], 2, lambda r, rc: done.append((r.variant, rc)))
    assert failed == [(bad, 3)] and sorted(done) == [("bad", 3), ("one", 0), ("two", 0)]
    assert "boom" in (bad.dir / "train.log").read_text()
    t = {r.variant: [float((r.dir / f).read_text()) for f in ("start", "end")] for r in (r1, r2)}
    assert t["one"][0] < t["two"][1] and t["two"][0] < t["one"][1]  # they overlapped: two jobs at once


def test_a_stage_lists_its_failed_runs_after_the_others_finish(tmp_path, monkeypatch):
    runs = [_FakeRun(tmp_path / "good", "good"), _FakeRun(tmp_path / "bad", "bad")]
    commands = {"good": _sleeper(tmp_path / "good"), "bad": [sys.executable, "-c", "import sys; sys.exit(1)"]}
    monkeypatch.setattr(ablate, "prepare_run", lambda run, data_dir, launch: commands[run.variant])
    with pytest.raises(ConfigError) as e:
        run_stage(runs, "unused", Launch(jobs=2), "LR sweep")
    msg = str(e.value)
    assert "1 of 2 run(s) of the LR sweep failed" in msg and "'bad'" in msg and str(tmp_path / "bad" / "train.log") in msg
    assert "'good'" not in msg and (tmp_path / "good" / "end").exists()  # the other one ran to its end


# ----------------------------------------------------------------------------------------
# a whole ablation: LR sweep, lr_from, two seeds, two jobs
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ablation(data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ablation")
    spec = write_spec(d / "spec.yaml", out=str(d / "out"), data=str(data_dir), match="params", seeds=2,
                      lr_sweep=[1e-3, 3e-3], jobs=2, base=BASE,
                      variants=[{"name": "GQA"}, {"name": "MHA", "set": {"num_kv_heads": 2}, "lr_from": "GQA"}])
    assert cli_main(["ablate", str(spec)]) == 0
    out = d / "out"
    return out, json.loads((out / "results.json").read_text())


def _run_folders(out: Path) -> dict[Path, dict]:
    return {p: json.loads((p / "spec.json").read_text()) for p in (out / "runs").iterdir()}


def test_sweep_picks_the_lowest_loss_and_its_run_is_the_first_seed(ablation):
    out, results = ablation
    folders = _run_folders(out)
    assert len(folders) == 5  # GQA at 2 LRs (seed 0) + GQA seed 1 + MHA seeds 0, 1: the seed-0 sweep run is reused
    sweep = {s["lr"]: json.loads((p / "summary.json").read_text())["final_val_loss"]
             for p, s in folders.items() if s["variant"] == "GQA" and s["seed"] == 0}
    best = min(sweep, key=lambda lr: (sweep[lr], lr))
    assert results["lr_sweep"]["chosen"] == {"GQA": best} and results["lr_sweep"]["lr_from"] == {"MHA": "GQA"}
    assert results["lr_sweep"]["losses"]["GQA"] == {f"{lr:g}": loss for lr, loss in sweep.items()}
    for v in results["variants"]:
        assert v["lr"] == best and [r["seed"] for r in v["runs"]] == [0, 1] and all(r["lr"] == best for r in v["runs"])
    assert {s["lr"] for s in folders.values() if s["variant"] == "MHA"} == {best}  # MHA took GQA's LR, no sweep
    gqa0 = results["variants"][0]["runs"][0]["run_dir"]
    assert [p for p, s in folders.items() if s["variant"] == "GQA" and s["lr"] == best and s["seed"] == 0] == [Path(gqa0)]


def test_a_variant_with_its_own_grid_is_swept_over_it_and_lends_its_choice(tmp_path, data_dir):
    d = tmp_path
    spec = write_spec(d / "spec.yaml", out=str(d / "out"), data=str(data_dir), lr_sweep=[1e-3, 3e-3], jobs=2, base=BASE,
                      variants=[{"name": "GQA"}, {"name": "Muon", "optimizer": "muon", "lr_sweep": [3e-3, 1e-2]},
                                {"name": "Muon MHA", "optimizer": "muon", "set": {"num_kv_heads": 2}, "lr_from": "Muon"}])
    assert cli_main(["ablate", str(spec)]) == 0
    out = d / "out"
    results = json.loads((out / "results.json").read_text())
    runs = sorted((s["variant"], s["lr"]) for s in _run_folders(out).values())
    muon = {s["lr"]: json.loads((p / "summary.json").read_text())["final_val_loss"]
            for p, s in _run_folders(out).items() if s["variant"] == "Muon"}
    best = min(muon, key=lambda lr: (muon[lr], lr))
    assert runs == sorted([("GQA", 1e-3), ("GQA", 3e-3), ("Muon", 3e-3), ("Muon", 1e-2), ("Muon MHA", best)])
    sw = results["lr_sweep"]
    assert sw["grid"] == [1e-3, 3e-3, 1e-2] and sw["chosen"]["Muon"] == best
    assert set(sw["losses"]["GQA"]) == {"0.001", "0.003"} and set(sw["losses"]["Muon"]) == {"0.003", "0.01"}
    assert {v["name"]: v["lr"] for v in results["variants"]}["Muon MHA"] == best
    md = (out / "results.md").read_text()
    row = next(line for line in md[md.index("## LR sweep"):].splitlines() if line.startswith("| Muon |"))
    assert row.split("|")[2].strip() == ""  # 1e-3 is not in Muon's grid: an empty cell, not a missing result
    assert all(cell.strip() for cell in row.split("|")[3:5])


def test_variants_of_one_seed_saw_the_same_batches(ablation, data_dir):
    out, results = ablation
    data = TokenData.open(data_dir)
    crcs = {}
    for v in results["variants"]:
        for r in v["runs"]:
            crcs[v["name"], r["seed"]] = [m["batch_crc"] for m in read_metrics(Path(r["run_dir"]) / "metrics.jsonl")]
    assert crcs["GQA", 0] == crcs["MHA", 0] and crcs["GQA", 1] == crcs["MHA", 1]
    assert crcs["GQA", 0] != crcs["GQA", 1]
    for seed in (0, 1):  # each is the CRC-32 of the step's batch, computed here from the data
        x0 = [data.train_batch(seed, step, 0, 0, 1, 4, 1, 32)[0] for step in range(6)]
        assert crcs["GQA", seed] == [zlib.crc32(x.contiguous().numpy().astype("int64").tobytes()) for x in x0]


def test_results_json_md_csv_and_plots(ablation):
    out, results = ablation
    for key in ("command", "commit", "date", "wall_time_s", "machine", "seeds", "baseline", "lr_sweep", "ngram", "variants"):
        assert key in results, key
    assert results["command"].startswith("llmarch ablate ") and results["seeds"] == [0, 1] and results["baseline"] == "GQA"
    assert results["machine"]["cores"] >= 1 and results["machine"]["cpu"]
    assert results["commit"] == source_commit(exclude=out) or results["commit"].startswith("llmarch ")
    assert results["runs_trained_here"] == results["runs_total"] == 5
    gqa, mha = results["variants"]
    for r in gqa["runs"] + mha["runs"]:
        for key in ("run_dir", "lr", "final_val_loss", "val_loss_ctx", "loss_spikes", "max_grad_norm", "tokens_per_s",
                    "expert_load_cv_final"):
            assert key in r, key
        assert set(r["val_loss_ctx"]) == {"1", "2", "4"} and "metrics" not in r
    # the paired difference, by hand
    diffs = [m["final_val_loss"] - g["final_val_loss"] for m, g in zip(mha["runs"], gqa["runs"])]
    d = mha["stats"]["delta_vs_baseline"]
    assert d["mean"] == pytest.approx(statistics.fmean(diffs))
    half = T_975_DF1 * statistics.stdev(diffs) / math.sqrt(2)
    assert d["ci95"] == pytest.approx([statistics.fmean(diffs) - half, statistics.fmean(diffs) + half])
    assert gqa["stats"]["delta_vs_baseline"] is None and gqa["stats"]["n_seeds"] == 2
    ng = results["ngram"]
    assert ng["seq_len"] == 32 and ng["windows"] == 8 and ng["bigram"] < ng["unigram"]
    md = (out / "results.md").read_text()
    for fragment in ("- command: `llmarch ablate", "- commit: `", "- wall time: ", "- seeds: 0, 1 (2)", "- machine: ",
                     "| MHA | ", "| unigram (count model", "| bigram (count model", "## LR sweep", "| GQA | "):
        assert fragment in md, fragment
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows[:2]] == ["GQA", "MHA"] and len(rows) == 4
    assert float(rows[1]["delta_mean"]) == pytest.approx(statistics.fmean(diffs))
    for name in ("loss", "grad_norm", "length", "lr_sweep"):
        for ext in ("png", "svg"):
            assert (out / f"{name}.{ext}").stat().st_size > 0, (name, ext)
    command = (out / "runs" / Path(gqa["runs"][0]["run_dir"]).name / "command.txt").read_text()
    assert command.startswith("python -m llmarch.cli train")


# ----------------------------------------------------------------------------------------
# reproduce means reproduce: a fresh folder, --resume, --force
# ----------------------------------------------------------------------------------------


def test_a_finished_ablation_is_refused_reused_with_resume_and_replaced_with_force(capsys, tmp_path, data_dir):
    spec = write_spec(tmp_path / "spec.yaml", out=str(tmp_path / "out"), data=str(data_dir), base=BASE,
                      variants=[{"name": "only"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine")  # not the ablation's: never refused, never deleted
    assert cli_main(["ablate", str(spec)]) == 0
    (run_dir,) = (out / "runs").iterdir()
    metrics = run_dir / "metrics.jsonl"
    before = (metrics.read_bytes(), metrics.stat().st_mtime_ns)
    capsys.readouterr()

    rc, err = cli(capsys, "ablate", str(spec))
    one_error(rc, err, f"{out} already holds an ablation (", "runs/ with 1 folder(s)",
              "continue it with --resume, replace it with --force, or give another --out")
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == before

    assert cli_main(["ablate", str(spec), "--resume"]) == 0
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == before  # reused, untouched
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["runs_trained_here"] == 0 and resumed["command"].endswith("--resume")

    rc, err = cli(capsys, "ablate", str(spec), "--resume", "--force")
    one_error(rc, err, "--resume and --force exclude each other")

    assert cli_main(["ablate", str(spec), "--force"]) == 0
    assert metrics.stat().st_mtime_ns != before[1]  # trained again
    assert json.loads((out / "results.json").read_text())["runs_trained_here"] == 1
    assert (out / "README.md").read_text() == "mine"


# ----------------------------------------------------------------------------------------
# tables and plots from synthetic rows
# ----------------------------------------------------------------------------------------


def _metrics(final: float, seed: int, steps: int = 8) -> list[dict]:
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "tokens": 128 * s, "loss": final + 2.0 / s + 0.01 * seed, "grad_norm": 1.0 + 0.1 * seed + 1.0 / s}
        if s % 4 == 0:
            row["val_loss"] = final + (steps - s) * 0.1
        rows.append(row)
    return rows


def _run(seed: int, loss: float, **extra) -> dict:
    r = {"seed": seed, "lr": 3e-3, "run_dir": f"runs/x-s{seed}", "final_val_loss": loss,
         "val_loss_ctx": {"1": loss, "2": loss + 0.01, "4": loss + 0.05}, "loss_spikes": 1, "max_grad_norm": 2.0 + seed,
         "tokens_per_s": 1000.0 + seed, "expert_load_cv_final": None, "metrics": _metrics(loss, seed)}
    r.update(extra)
    return r


def synthetic_results(n_variants: int = 4) -> dict:
    losses = {"A": [3.00, 3.10], "B": [2.90, 3.02], "C": [3.50, 3.61]}
    variants = [{"name": n, "lr": 3e-3, "lr_source": "sweep", "params_active_non_embedding": 1000,
                 "runs": [_run(i, x) for i, x in enumerate(xs)]} for n, xs in losses.items()]
    # an old run: one seed, a summary without the newer keys
    old = {k: v for k, v in _run(0, 3.2).items() if k not in ("val_loss_ctx", "loss_spikes", "expert_load_cv_final")}
    variants.append({"name": "D (old summary)", "lr": 1e-3, "lr_source": "fixed", "params_active_non_embedding": 900,
                     "runs": [old]})
    for i in range(len(variants), n_variants):
        variants.append({"name": f"V{i}", "lr": 3e-3, "lr_source": "sweep", "params_active_non_embedding": 1000,
                         "runs": [_run(0, 3.0 + i / 100), _run(1, 3.05 + i / 100)]})
    results = {"command": "llmarch ablate spec.yaml --seeds 2", "commit": "abc123+dirty", "wall_time_s": 12.5,
               "date": "2026-01-01T00:00:00+00:00", "machine": {"cpu": "Test CPU", "cores": 2, "platform": "test"},
               "seeds": [0, 1], "baseline": "A", "runs_trained_here": 7, "runs_total": 7,
               "ngram": {"unigram": 5.0, "bigram": 4.0},
               "lr_sweep": {"grid": [1e-3, 3e-3], "seed": 0, "chosen": {"A": 3e-3}, "lr_from": {"B": "A"},
                            "losses": {"A": {1e-3: 3.2, 3e-3: 3.0}}},
               "variants": variants[:max(n_variants, 4)]}
    return compute_stats(results)


def _row(md: str, name: str) -> list[str]:
    """The cells of the first row named ``name`` (the main table comes before the LR sweep's)."""
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_from_synthetic_rows_against_hand_statistics(tmp_path):
    results = synthetic_results()
    write_table(results, tmp_path)
    md = (tmp_path / "results.md").read_text()
    header = _row(md, "variant")
    col = {h: i for i, h in enumerate(header)}
    assert header[:7] == ["variant", "LR", "active non-emb. params", "val loss mean ± std (n seeds)", "95% CI",
                          "Δ vs baseline [95% CI]", "exceeds seed noise?"]
    assert "val loss at 2x ctx" in col and "val loss at 4x ctx" in col and header[-1] == "tokens/s"
    a, b, c, d = (_row(md, n) for n in ("A", "B", "C", "D (old summary)"))
    # A: mean 3.05, std of [3.00, 3.10] = 0.0707; CI mean ± 12.706 * std / sqrt(2)
    half_a = T_975_DF1 * statistics.stdev([3.0, 3.1]) / math.sqrt(2)
    assert a[col["val loss mean ± std (n seeds)"]] == "3.0500 ± 0.0707 (2)"
    assert a[col["95% CI"]] == f"[{3.05 - half_a:.4f}, {3.05 + half_a:.4f}]"
    assert a[col["Δ vs baseline [95% CI]"]] == "baseline"
    # B - A per seed: -0.10, -0.08 -> mean -0.09, the interval holds 0: a wash
    half_b = T_975_DF1 * statistics.stdev([-0.10, -0.08]) / math.sqrt(2)
    assert b[col["Δ vs baseline [95% CI]"]] == f"−0.0900 [−{0.09 + half_b:.4f}, +{half_b - 0.09:.4f}]"
    assert b[col["exceeds seed noise?"]] == "no (wash)"
    # C - A: 0.50, 0.51 -> the interval excludes 0
    assert c[col["exceeds seed noise?"]] == "yes" and c[col["Δ vs baseline [95% CI]"]].startswith("+0.5050 [")
    # D: one seed, keys missing from its summary
    assert d[col["exceeds seed noise?"]] == "— (1 seed)" and d[col["Δ vs baseline [95% CI]"]] == "+0.2000"
    assert d[col["val loss at 2x ctx"]] == "—" and d[col["loss spikes"]] == "—" and d[col["expert load CV"]] == "—"
    assert a[col["val loss at 4x ctx"]] == "3.1000 ± 0.0707"
    assert a[col["loss spikes"]] == "2" and a[col["max grad norm"]] == "3.0000"
    uni = _row(md, "unigram (count model, no training)")
    assert uni[col["val loss mean ± std (n seeds)"]] == "5.0000" and set(uni[4:]) == {"—"}
    assert "| A | 3.2000 | **3.0000** | 0.003 |" in md and "B: the LR of A (0.003)" in md
    for line in ("- command: `llmarch ablate spec.yaml --seeds 2`", "- commit: `abc123+dirty`", "- seeds: 0, 1 (2)",
                 "- machine: Test CPU, 2 cores"):
        assert line in md, line
    rows = {r["variant"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert float(rows["B"]["delta_mean"]) == pytest.approx(-0.09) and rows["B"]["exceeds_seed_noise"] == "False"
    assert rows["C"]["exceeds_seed_noise"] == "True" and float(rows["bigram (count model, no training)"]["val_loss_mean"]) == 4.0
    write_json(results, tmp_path)
    back = json.loads((tmp_path / "results.json").read_text())
    assert back["lr_sweep"]["losses"]["A"] == {"0.001": 3.2, "0.003": 3.0} and "metrics" not in back["variants"][0]["runs"][0]


def test_tail_drop_is_the_fall_over_the_last_eighth_of_training():
    evals = {256 * k: 5.0 - 0.1 * k for k in range(1, 9)}  # every 256 steps to 2048
    metrics = [{"step": s, "loss": 4.0} for s in range(1, 2049)]
    for m in metrics:
        if m["step"] in evals:
            m["val_loss"] = evals[m["step"]]
    t = tail_drop(metrics)
    assert (t["from_step"], t["to_step"]) == (1792, 2048) and t["drop"] == pytest.approx(evals[1792] - evals[2048])
    # evaluations that miss 7/8 exactly: the window starts at the latest one before it (longer, never shorter)
    t = tail_drop([{"step": s, "val_loss": 4.0 - s / 1000} for s in (300, 600, 900, 1200, 1500, 1800, 2000)])
    assert (t["from_step"], t["to_step"]) == (1500, 2000) and t["drop"] == pytest.approx(0.5)
    assert tail_drop([{"step": 10, "val_loss": 3.0}]) is None  # one evaluation
    assert tail_drop([{"step": 1990, "val_loss": 3.1}, {"step": 2000, "val_loss": 3.0}]) is None  # none before 7/8


def test_flattened_means_the_tail_moved_less_than_the_seeds(tmp_path):
    results = synthetic_results()
    a, b = results["variants"][:2]  # final losses A [3.00, 3.10] (std 0.0707), B [2.90, 3.02] (std 0.0849)
    for r, drop in zip(a["runs"], (0.01, 0.03)):
        r["tail"] = {"from_step": 1792, "to_step": 2048, "drop": drop}
    for r, drop in zip(b["runs"], (0.1, 0.2)):
        r["tail"] = {"from_step": 1792, "to_step": 2048, "drop": drop}
    compute_stats(results)
    assert a["stats"]["tail_drop"]["mean"] == pytest.approx(0.02) and a["stats"]["flattened"] is True
    assert b["stats"]["tail_drop"]["mean"] == pytest.approx(0.15) and b["stats"]["flattened"] is False
    assert results["variants"][2]["stats"]["flattened"] is None  # no tails recorded
    write_table(results, tmp_path)
    md = (tmp_path / "results.md").read_text()
    col = _row(md, "variant").index("val drop, last 1/8 (flat?)")
    assert _row(md, "A")[col] == "0.0200 (yes)" and _row(md, "B")[col] == "0.1500 (no)" and _row(md, "C")[col] == "—"
    assert ("Baseline curve: validation loss fell 0.0200 (mean over 2 seeds) from step 1,792 to 2,048, the last 12.5% "
            "of training, against a seed spread (std) of the final loss of 0.0707: flattened.") in md
    rows = {r["variant"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert rows["B"]["flattened"] == "False" and float(rows["A"]["val_drop_last_eighth"]) == pytest.approx(0.02)


def _with_evals(run: dict, evals: dict[int, float]) -> None:
    run["metrics"] = [{"step": s, "loss": 4.0, **({"val_loss": evals[s]} if s in evals else {})} for s in range(1, 2049)]
    run["final_val_loss"] = evals[max(evals)]


def test_delta_path_is_the_paired_difference_at_each_evaluation_of_the_last_quarter(tmp_path):
    results = synthetic_results()
    a, b, c = results["variants"][:3]
    steps = (256, 512, 768, 1024, 1280, 1536, 1792, 2048)
    for r, off in zip(a["runs"], (0.0, 0.05)):
        _with_evals(r, {t: 5.0 - t / 1000 + off for t in steps})
    # B: better by 0.100 and 0.101 at every step (beyond the noise everywhere)
    for r, off, d in zip(b["runs"], (0.0, 0.05), (0.100, 0.101)):
        _with_evals(r, {t: 5.0 - t / 1000 + off - d for t in steps})
    # C: worse by 0.30 / 0.31 up to step 1792, then even with the baseline (a wash at the end)
    for r, off, d in zip(c["runs"], (0.0, 0.05), ((0.30, 0.0), (0.31, 0.02))):
        _with_evals(r, {t: 5.0 - t / 1000 + off + (d[0] if t < 2048 else d[1]) for t in steps})
    compute_stats(results)
    path = b["stats"]["delta_path"]
    assert [p["step"] for p in path] == [1536, 1792, 2048]  # from 3/4 of the final step on
    half = T_975_DF1 * statistics.stdev([-0.100, -0.101]) / math.sqrt(2)
    for p in path:
        assert p["mean"] == pytest.approx(-0.1005) and p["significant"] is True
        assert p["ci95"] == pytest.approx((-0.1005 - half, -0.1005 + half))
    assert b["stats"]["verdict_stable"] is True
    assert [p["significant"] for p in c["stats"]["delta_path"]] == [True, True, False]
    assert c["stats"]["verdict_stable"] is False
    assert a["stats"]["delta_path"] == [] and a["stats"]["verdict_stable"] is None  # the baseline itself
    # evaluations the runs do not share are skipped, never compared across steps
    del b["runs"][1]["metrics"][1791]["val_loss"]
    assert [p["step"] for p in delta_path(b, a)] == [1536, 2048]
    compute_stats(results)
    write_table(results, tmp_path)
    md = (tmp_path / "results.md").read_text().split("## Δ vs baseline over the last 25% of training")[1]
    assert "| variant | step 1,536 | step 1,792 | step 2,048 | same verdict at each step? |" in md
    assert _row(md, "B")[1:] == ["−0.1005 (better)", "", "−0.1005 (better)", "yes"]
    assert _row(md, "C")[1:] == ["+0.3050 (worse)", "+0.3050 (worse)", "+0.0100 (wash)", "no"]
    assert "The verdict is the same at every one of these steps for 1 of the 2 variants; it changes for: C." in md
    rows = {r["variant"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert rows["B"]["verdict_stable_last_quarter"] == "True" and rows["C"]["verdict_stable_last_quarter"] == "False"


def test_report_rewrites_the_tables_from_the_runs_and_trains_nothing(capsys, tmp_path, ablation):
    import shutil

    out0, before = ablation
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    spec = yaml.safe_load((out0.parent / "spec.yaml").read_text())
    spec_path = write_spec(tmp_path / "spec.yaml", **dict(spec, out=str(out)))
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    (out / "results.md").write_text("stale")
    assert cli_main(["ablate", str(spec_path), "--report"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")} == stamps  # nothing trained
    after = json.loads((out / "results.json").read_text())
    for k in ("command", "commit", "date", "wall_time_s", "runs_trained_here", "runs_total"):
        assert after[k] == before[k], k  # the training invocation's record is kept
    assert after["report"]["command"].endswith("--report")
    assert [v["stats"]["val_loss"] for v in after["variants"]] == [v["stats"]["val_loss"] for v in before["variants"]]
    md = (out / "results.md").read_text()
    assert md.startswith("# Ablation results") and "tables written again from these runs, training nothing" in md

    rc, err = cli(capsys, "ablate", str(spec_path), "--report", "--resume")
    one_error(rc, err, "--report trains nothing", "--resume")
    (run,) = [p for p in out.glob("runs/mha-s1-*")]
    (run / "summary.json").unlink()
    rc, err = cli(capsys, "ablate", str(spec_path), "--report")
    one_error(rc, err, "--report: 1 of 5 runs have not finished (e.g. mha-s1-", "train them with --resume")
    (out / "results.json").write_text("[1, 2]")
    rc, err = cli(capsys, "ablate", str(spec_path), "--report")
    one_error(rc, err, "results.json holds a JSON list, not an object")
    (out / "results.json").write_text(json.dumps(dict(before, wall_time_s="an hour")))
    rc, err = cli(capsys, "ablate", str(spec_path), "--report")
    one_error(rc, err, "results.json: 'wall_time_s' is 'an hour', not what an ablation writes there")
    rc, err = cli(capsys, "ablate", str(spec_path), "--report", "--out", str(tmp_path / "nothing"))
    one_error(rc, err, "holds no ablation runs")


def test_run_keys_follow_the_data_content_not_its_location(tmp_path, data_dir):
    import shutil

    spec = load_spec(_spec(tmp_path, data_dir)[0])
    v = variants_of(spec, TokenData.open(data_dir).vocab_size)[0]
    key = run_key({"seed": 0, "lr": 1e-3}, v.cfg, str(data_dir))
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(data_dir, moved)
    meta = json.loads((moved / "meta.json").read_text())
    meta["corpus"] = ["/another/checkout/src/llmarch/data/shakespeare.txt.gz"]  # prepared in another clone
    (moved / "meta.json").write_text(json.dumps(meta))
    assert run_key({"seed": 0, "lr": 1e-3}, v.cfg, str(moved)) == key
    val = bytearray((moved / "val.bin").read_bytes())
    val[0] ^= 1  # one token changed
    (moved / "val.bin").write_bytes(bytes(val))
    assert run_key({"seed": 0, "lr": 1e-3}, v.cfg, str(moved)) != key
    assert run_key({"seed": 1, "lr": 1e-3}, v.cfg, str(data_dir)) != key


def test_rekey_script_moves_runs_whose_batches_match_the_data(tmp_path, ablation, data_dir):
    import shutil
    import subprocess

    out0, _ = ablation
    runs = tmp_path / "runs"
    shutil.copytree(out0 / "runs", runs)
    right = sorted(runs.iterdir())
    old = []
    for d, bad in zip(right[:2], (False, True)):  # two runs as an older llmarch keyed them
        spec = json.loads((d / "spec.json").read_text())
        spec["key"] = "0123456789" + spec["key"][10:]
        (d / "spec.json").write_text(json.dumps(spec))
        if bad:  # and one whose batches are not this data's
            rows = read_metrics(d / "metrics.jsonl")
            rows[3]["batch_crc"] += 1
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        old.append(d.rename(d.with_name(d.name[:-10] + "0123456789")))
    script = Path(__file__).resolve().parents[1] / "scripts" / "rekey_ablation_runs.py"
    p = subprocess.run([sys.executable, str(script), str(runs), "--data", str(data_dir)], capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    assert f"{old[1].name}: left alone (step 4: batch differs)" in p.stderr
    assert not old[0].exists() and right[0].is_dir() and old[1].is_dir()
    spec = json.loads((right[0] / "spec.json").read_text())
    assert spec["rekeyed_from"].startswith("0123456789") and right[0].name.endswith(spec["key"][:10])
    assert old[0].name not in (right[0] / "command.txt").read_text()


def test_plots_from_synthetic_rows_use_distinct_colours(tmp_path):
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    written = plot(synthetic_results(), tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{n}.{e}" for n in ("loss", "grad_norm", "length", "lr_sweep")
                                                     for e in ("png", "svg"))
    assert all(p.stat().st_size > 0 for p in written)
    results = synthetic_results(n_variants=13)
    fig = loss_figure(results)
    names = [v["name"] for v in results["variants"]]
    lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    colours = [mcolors.to_hex(lines[f"{n} ({len(v['runs'])} seed{'s' * (len(v['runs']) > 1)})"].get_color())
               for n, v in zip(names, results["variants"])]
    assert len(set(colours)) == len(names) == 13
    dashed = [ln for ln in fig.axes[0].lines if ln.get_linestyle() == "--"]
    assert sorted(ln.get_ydata()[0] for ln in dashed) == [4.0, 5.0]  # the n-gram references
    plt.close(fig)
    fig = lr_sweep_figure(results)
    assert [ln.get_label() for ln in fig.axes[0].lines if not ln.get_label().startswith("_")] == ["A"]
    plt.close(fig)
    for n in (3, 11, 20, 31):
        assert len({mcolors.to_hex(c) for c in variant_colours(n)}) == n


# ----------------------------------------------------------------------------------------
# the torchrun launcher
# ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_launcher_gives_the_local_loss_curve(tmp_path, data_dir):
    base = {**BASE, "tokens": 4 * 32 * 8, "eval_every": 4}
    spec = write_spec(tmp_path / "spec.yaml", out=str(tmp_path / "local"), data=str(data_dir), base=base,
                      variants=[{"name": "tiny"}])
    local = run_spec(spec)
    dist = run_spec(spec, out=str(tmp_path / "torchrun"), launcher="torchrun", nproc=2)
    (lrun,), (drun,) = local["variants"][0]["runs"], dist["variants"][0]["runs"]
    assert "torch.distributed.run" in (Path(drun["run_dir"]) / "command.txt").read_text()
    a, b = read_metrics(Path(lrun["run_dir"]) / "metrics.jsonl"), read_metrics(Path(drun["run_dir"]) / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for key in ("loss", "grad_norm", "val_loss"):
        xs, ys = [r.get(key) for r in a], [r.get(key) for r in b]
        assert [x is None for x in xs] == [y is None for y in ys], key
        for x, y in zip(xs, ys):
            assert x is None or abs(x - y) <= 1e-4 * abs(x), (key, xs, ys)
    for m in ("1", "2", "4"):
        assert drun["val_loss_ctx"][m] == pytest.approx(lrun["val_loss_ctx"][m], rel=1e-4)
    assert dist["nproc"] == 2 and dist["launcher"] == "torchrun"


def test_run_checkpoints_are_never_committed():
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for rel in ("docs/ablations/runs/gqa-s0-lr0.003-0123456789/checkpoint.safetensors",
                "docs/ablations/runs/old-layout/checkpoint.pt", "docs/ablations/runs/a/b/checkpoint.safetensors"):
        assert subprocess.run(["git", "-C", str(root), "check-ignore", "-q", rel], check=False).returncode == 0, rel
    kept = "docs/ablations/runs/gqa-s0-lr0.003-0123456789/metrics.jsonl"
    assert subprocess.run(["git", "-C", str(root), "check-ignore", "-q", kept], check=False).returncode == 1



def test_the_committed_article_spec_loads_and_matches_parameters():
    """docs/ablations/article.yaml (what the committed results came from) is a valid spec: every
    variant resolves, the LR families point at swept variants, and matching holds each variant's
    active non-embedding parameters within 1% of the baseline's."""
    path = Path(__file__).parent.parent / "docs" / "ablations" / "article.yaml"
    spec = ablate.load_spec(path)
    variants = ablate.variants_of(spec, 1024)
    assert len(variants) == len(spec["variants"]) >= 12 and spec["seeds"] >= 3
    names = {v.name for v in variants}
    assert "post-norm + QK-norm (OLMo 2)" in names
    swept = {v.name for v in variants if v.swept}
    assert all(v.lr_from in swept for v in variants if v.lr_from)
    base = ablate.active_non_embedding(variants[0].cfg)
    for v in variants:
        assert abs(ablate.active_non_embedding(v.cfg) - base) <= 0.01 * base, v.name
