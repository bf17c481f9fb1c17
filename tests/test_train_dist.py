"""The trainer under ``torchrun`` with 2 CPU processes (gloo): DDP and FSDP2 equal one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmarch.training.loop import read_metrics

SRC = str(Path(__file__).resolve().parents[1] / "src")

pytestmark = pytest.mark.slow  # torchrun with 2 processes, several runs


@pytest.fixture(scope="module")
def data_dir(token_data):
    return token_data(200_000, 512)


def run(out: Path, data_dir: Path, nproc: int, *extra: str) -> list[dict]:
    args = ["-m", "llmarch.cli", "train", "--arch", "qwen3-0.6b", "--data", str(data_dir), "--tokens", "1024",
            "--seq-len", "32", "--warmup", "2", "--eval-every", "4", "--eval-batches", "2", "--no-progress",
            "--out", str(out), *extra]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl")


def assert_same(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for key in ("loss", "grad_norm", "val_loss"):
        xs = [r.get(key) for r in a]
        ys = [r.get(key) for r in b]
        assert [x is None for x in xs] == [y is None for y in ys]
        for x, y in zip(xs, ys):
            assert x is None or abs(x - y) < tol, (key, xs, ys)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_equal_one(kind, data_dir, tmp_path):
    # one process: 4 rows as 2 micro-batches of 2; two processes: 2 rows each, no accumulation
    one = run(tmp_path / "one", data_dir, 1, "--batch-size", "2", "--grad-accum", "2")
    two = run(tmp_path / kind, data_dir, 2, "--batch-size", "2", "--dist", kind)
    assert_same(one, two)


def test_fsdp_resume_equals_uninterrupted(data_dir, tmp_path):
    full = run(tmp_path / "full", data_dir, 2, "--batch-size", "2", "--dist", "fsdp")
    run(tmp_path / "cut", data_dir, 2, "--batch-size", "2", "--dist", "fsdp", "--stop-at", "4")
    env_args = ["--batch-size", "2", "--dist", "fsdp", "--resume", str(tmp_path / "cut")]
    cut = run(tmp_path / "cut", data_dir, 2, *env_args)
    assert_same(full, cut, tol=1e-6)
