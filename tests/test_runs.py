"""Run folders are safe: nothing in them runs, nothing is lost, bad arguments fail before any work.

* resuming a run folder never unpickles (a crafted ``checkpoint.pt`` runs nothing);
* a run is never overwritten without ``--resume`` / ``--force``; writes are atomic; a torn
  metrics line and stale temporary files from a killed process are handled on resume;
* ``kill -9`` at random moments never leaves a run that resumes to another loss curve;
* every bad argument of ``train`` / ``data prepare`` is one ``llmarch: error:`` line, exit 2.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmarch.cli import main as cli_main
from llmarch.training import loop
from llmarch.training.checkpointing import CHECKPOINT, TRAIN_CONFIG, read_checkpoint
from llmarch.training.config import TrainConfig
from llmarch.training.data import prepare
from llmarch.training.loop import read_metrics, train

SRC = str(Path(__file__).resolve().parents[1] / "src")
STEPS = 12
KEYS = ("loss", "grad_norm", "lr", "val_loss")


@pytest.fixture(scope="module")
def data_dir(token_data):
    return token_data(100_000, 300)


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(data_dir, out, **kw) -> TrainConfig:
    base = {"arch": "llama3.2-1b", "data": str(data_dir), "out": str(out), "tokens": 4 * 32 * STEPS, "batch_size": 4, "seq_len": 32,
                "warmup": 2, "eval_every": 4, "eval_batches": 2, "save_every": 1, "progress": False}
    return TrainConfig(**{**base, **kw})


def train_argv(data_dir, out) -> list[str]:
    c = cfg_for(data_dir, out)
    return ["train", "--arch", c.arch, "--data", c.data, "--out", c.out, "--tokens", str(c.tokens), "--batch-size", "4",
            "--seq-len", "32", "--warmup", "2", "--eval-every", "4", "--eval-batches", "2", "--save-every", "1",
            "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The metrics of the uninterrupted run that every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    train(cfg_for(data_dir, out))
    return read_metrics(out / "metrics.jsonl")


def assert_same_curve(rows, reference):
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in KEYS:
        assert [r.get(key) for r in rows] == [r.get(key) for r in reference], key


def cli(capsys, *argv):
    rc = cli_main(list(argv))
    return rc, capsys.readouterr().err.strip()


def one_error(rc, err, *fragments):
    assert rc == 2 and err.startswith("llmarch: error: ") and len(err.splitlines()) == 1, (rc, err)
    for fragment in fragments:
        assert fragment in err, err


# ----------------------------------------------------------------------------------------
# nothing runs
# ----------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this object opens (creates) the marker file: a stand-in for any code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_of_a_pickled_checkpoint_runs_nothing(capsys, tmp_path, data_dir):
    run = tmp_path / "shared_run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "model": _Payload(marker)}, run / "checkpoint.pt")
    (run / TRAIN_CONFIG).write_text(json.dumps(cfg_for(data_dir, run).to_dict()))
    rc, err = cli(capsys, "train", "--resume", str(run), "--no-progress")
    one_error(rc, err, "checkpoint.pt", "pickle", "does not read it", "--force")
    assert not marker.exists()
    # the payload is live: what llmarch used to do runs it
    torch.load(run / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_checkpoint_holds_no_pickle_and_checks_its_tensors(tmp_path, data_dir):
    train(cfg_for(data_dir, tmp_path, tokens=4 * 32 * 2))
    f = tmp_path / CHECKPOINT
    assert not (tmp_path / "checkpoint.pt").exists() and f.read_bytes()[8:9] == b"{"  # a safetensors JSON header
    ck = read_checkpoint(tmp_path)
    assert ck["step"] == 2 and ck["rng"]["torch"].dtype == torch.uint8 and ck["optimizer"][0]["state"]
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the last tensor
    f.write_bytes(bytes(data))
    with pytest.raises(Exception, match="checksum"):
        read_checkpoint(tmp_path)


# ----------------------------------------------------------------------------------------
# nothing is lost
# ----------------------------------------------------------------------------------------


def test_train_out_holding_a_run_is_refused_unless_resume_or_force(capsys, tmp_path, data_dir):
    out = tmp_path / "run"
    argv = [*train_argv(data_dir, out)]
    argv[argv.index("--tokens") + 1] = str(4 * 32 * 2)
    assert cli_main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    rc, err = cli(capsys, *argv)
    one_error(rc, err, "already holds a run", f"--resume {out}", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert cli_main([*argv, "--force"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_failed_resume_keeps_metrics_beside_the_checkpoint(tmp_path, data_dir, reference, monkeypatch):
    train(cfg_for(data_dir, tmp_path, stop_at=3))

    def broken(*a, **k):
        raise RuntimeError("evaluation failed")

    with monkeypatch.context() as m:
        m.setattr(loop, "evaluate", broken)
        with pytest.raises(RuntimeError):
            train(cfg_for(data_dir, tmp_path), resume=str(tmp_path))  # fails at step 4's evaluation
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]  # kept up to the checkpoint
    assert read_checkpoint(tmp_path)["step"] == 3
    train(cfg_for(data_dir, tmp_path), resume=str(tmp_path))
    assert_same_curve(read_metrics(tmp_path / "metrics.jsonl"), reference)


def test_resume_tolerates_a_torn_last_metrics_line_and_cleans_stale_temp_files(tmp_path, data_dir, reference):
    train(cfg_for(data_dir, tmp_path, stop_at=5, save_every=0))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "tokens": 7')  # a write cut short by a kill
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = tmp_path / f".{CHECKPOINT}.{dead.pid}.llmarch-tmp"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".{CHECKPOINT}.{os.getppid()}.llmarch-tmp"  # a writer that still runs
    live.write_bytes(b"being written")
    train(cfg_for(data_dir, tmp_path), resume=str(tmp_path))
    assert_same_curve(read_metrics(tmp_path / "metrics.jsonl"), reference)
    assert not stale.exists() and live.exists()


def test_data_prepare_replaces_a_data_folder_whole_and_refuses_other_folders(capsys, tmp_path, data_dir):
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 200)
    out = tmp_path / "d"
    prepare(corpus, out, str(data_dir / "tokenizer.json"), progress=False)
    first = json.loads((out / "meta.json").read_text())
    corpus.write_text("Now is the winter of our discontent.\n" * 300)
    prepare(corpus, out, str(data_dir / "tokenizer.json"), progress=False)
    assert json.loads((out / "meta.json").read_text())["train_tokens"] != first["train_tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "d"]  # no temporary sibling left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    rc, err = cli(capsys, "data", "prepare", "--corpus", str(corpus), "--out", str(tmp_path / "mine"))
    one_error(rc, err, "is not a prepared data folder")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ----------------------------------------------------------------------------------------
# kill -9
# ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_at_random_moments_never_changes_the_resumed_curve(tmp_path, data_dir, reference):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    rng = random.Random(0)
    kills = 0
    # kill moments are set by progress, not by the clock (a resumed run has less left to do, and
    # a fast machine finishes before a fixed delay): a random step still to come, then a random
    # fraction of a step's time, so a kill lands anywhere in a step, checkpoint writes included
    t0 = time.monotonic()
    probe = subprocess.run([sys.executable, "-m", "llmarch.cli", *train_argv(data_dir, tmp_path / "probe"), "--force"],
                           env=env, capture_output=True, text=True, timeout=300, check=False)
    assert probe.returncode == 0, probe.stderr[-2000:]
    whole = time.monotonic() - t0
    deadline = time.monotonic() + max(45.0, 12 * whole)

    def command():
        if (out / TRAIN_CONFIG).exists():  # started: continue it, as a user would
            return [sys.executable, "-m", "llmarch.cli", "train", "--resume", str(out), "--no-progress"]
        return [sys.executable, "-m", "llmarch.cli", *train_argv(data_dir, out), "--force"]

    steps = len(reference)
    per_step = whole / steps  # an upper bound: start-up is in `whole` too

    def logged() -> int:  # complete metrics lines written so far
        try:
            return (out / "metrics.jsonl").read_bytes().count(b"\n")
        except OSError:
            return 0

    while kills < 5 and time.monotonic() < deadline and logged() < steps - 1:
        target = rng.randint(logged() + 1, steps - 1)
        proc = subprocess.Popen(command(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            start, first, t_first = logged(), None, None
            while proc.poll() is None and logged() < target and time.monotonic() < deadline:
                if first is None and logged() > start:
                    first, t_first = logged(), time.monotonic()
                time.sleep(0.002)
            # a step's time as this process steps (start-up excluded where it could be seen)
            step_time = (time.monotonic() - t_first) / max(1, logged() - first) if first is not None else per_step
            time.sleep(rng.uniform(0.0, 1.0) * step_time)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
            else:
                assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
                break
        finally:
            proc.stderr.close()
        if (out / CHECKPOINT).exists():  # whatever is there loads whole, and the metrics reach it
            step = read_checkpoint(out)["step"]
            assert len(read_metrics(out / "metrics.jsonl")) >= step
    assert kills >= 2
    final = subprocess.run(command(), env=env, capture_output=True, text=True, timeout=120, check=False)
    assert final.returncode == 0, final.stderr[-2000:]
    assert_same_curve(read_metrics(out / "metrics.jsonl"), reference)
    assert not [p for p in out.iterdir() if p.name.endswith(".llmarch-tmp")]


# ----------------------------------------------------------------------------------------
# argument checks before any work: one named test per case
# ----------------------------------------------------------------------------------------


def _bad_arch_json(tmp_path):
    f = tmp_path / "arch.json"
    f.write_text("{not json")
    return f


def _corrupt_meta(tmp_path, data_dir):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    (d / "meta.json").write_text('{"vocab_size": 300, "dtype"')
    return d


def _read_only_dir(tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits; /sys refuses even root
        return Path("/sys/llmarch-test-run")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d / "run"


TRAIN_CASES = {
    "lr_negative": (lambda t, d: ["--lr", "-1"], "--lr must be a positive number"),
    "lr_nan": (lambda t, d: ["--lr", "nan"], "--lr must be a positive number, got nan"),
    "threads_negative": (lambda t, d: ["--threads", "-1"], "--threads must be at least 1"),
    "device_bogus": (lambda t, d: ["--device", "bogus"], "--device 'bogus' is not a device"),
    "device_cuda_without_gpu": (lambda t, d: ["--device", "cuda"], "no CUDA GPU"),
    "arch_missing_json": (lambda t, d: ["--arch", str(t / "nowhere.json")], "no such file"),
    "arch_invalid_json": (lambda t, d: ["--arch", str(_bad_arch_json(t))], "is not a readable JSON file"),
    "set_hidden_size_abc": (lambda t, d: ["--set", "hidden_size=abc"], "hidden_size takes an integer"),
    "warmup_negative": (lambda t, d: ["--warmup", "-1"], "--warmup must be 0 or more"),
    "grad_clip_negative": (lambda t, d: ["--grad-clip", "-1"], "--grad-clip must be a finite number, 0 or more"),
    "weight_decay_negative": (lambda t, d: ["--weight-decay", "-0.1"], "--weight-decay must be a finite number"),
    "eval_every_0": (lambda t, d: ["--eval-every", "0"], "--eval-every must be a positive integer"),
    "corrupt_data_meta_json": (lambda t, d: ["--data", str(_corrupt_meta(t, d))], "meta.json is damaged"),
    "out_is_a_file": (lambda t, d: ["--out", str(t / "run.txt")], "is a file, not a folder"),
    "out_read_only": (lambda t, d: ["--out", str(_read_only_dir(t))], "cannot be written"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_argument(case, capsys, tmp_path, data_dir):
    if case == "device_cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "run.txt").write_text("a file")
    make_args, fragment = TRAIN_CASES[case]
    argv = [*train_argv(data_dir, tmp_path / "run"), *make_args(tmp_path, data_dir)]
    rc, err = cli(capsys, *argv)
    one_error(rc, err, fragment)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_data_prepare_vocab_size_negative(capsys, tmp_path):
    rc, err = cli(capsys, "data", "prepare", "--vocab-size", "-1", "--out", str(tmp_path / "d"))
    one_error(rc, err, "--vocab-size must be at least 257")
    assert not (tmp_path / "d").exists()


def test_data_prepare_out_is_a_file(capsys, tmp_path):
    (tmp_path / "d").write_text("a file")
    rc, err = cli(capsys, "data", "prepare", "--out", str(tmp_path / "d"))
    one_error(rc, err, "is not a prepared data folder")
    assert (tmp_path / "d").read_text() == "a file"
