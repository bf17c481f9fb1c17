"""Prefill and decode speed: llmarch vs transformers (and llama.cpp when available).

Every library loads the same GGUF file, gets the same prompt token ids and decodes greedily
for the same number of new tokens (EOS ignored, so every run makes exactly that many). Runs
alternate between the libraries in one process, so a machine whose load changes over time
penalises them alike; the median of the rounds is reported.

    PYTHONPATH=src python benchmarks/decode.py                      # both models, bfloat16 + float32
    PYTHONPATH=src python benchmarks/decode.py --models gemma-3-270m --dtypes bfloat16 --rounds 5

llama.cpp runs through llama-cpp-python when it is importable, else through its own
``llama-bench`` binary when one is found (``benchmarks/build_llama_cpp.sh`` builds it from
the llama.cpp sources on PyPI); llama.cpp computes in the file's own quantised types, so its
ratio is "as it stands", not the same arithmetic.

transformers' prefill/decode split comes from a streamer that timestamps the first new
token; llmarch's from its own generation stats (same definition: prefill = prompt forward +
first token, decode = the remaining tokens). llmarch runs as ``llmarch generate`` does, with
its linear layers pre-packed for oneDNN (``llmarch.inference.packed``); transformers as it comes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmarch.checkpoints.assets import resolve_model
from llmarch.checkpoints.formats import open_checkpoint
from llmarch.checkpoints.tokenizer import Tokenizer
from llmarch.inference import native, step
from llmarch.inference.generate import GenerationConfig, generate, load_model

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press. Explain how this changed"
)


@dataclass
class Run:
    prefill_tps: float
    decode_tps: float
    tokens: list[int]
    decode_empty_tps: float | None = None  # llama-bench: generation from an empty context as well


# ----------------------------------------------------------------------------------------
# one run per library
# ----------------------------------------------------------------------------------------


def run_llmarch(model, ids: list[int], new_tokens: int) -> Run:
    res = generate(model, None, ids, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True))
    return Run(res.stats.prefill_tps, res.stats.decode_tps, res.token_ids[0])


def run_llmarch_torch_kernels(model, ids: list[int], new_tokens: int) -> Run:
    with native.disabled():
        return run_llmarch(model, ids, new_tokens)


def run_llmarch_modules(model, ids: list[int], new_tokens: int) -> Run:
    """The native kernels, but each decoding step's layers module by module (``--no-native-step``)."""
    with step.disabled():
        return run_llmarch(model, ids, new_tokens)


class _Clock:
    """transformers streamer: the prompt is pushed first, then each new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        self.times.append(time.perf_counter())


def run_transformers(model, ids: list[int], new_tokens: int) -> Run:
    x = torch.tensor([ids])
    clock = _Clock()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, streamer=clock, top_p=None, top_k=None, temperature=None,
        )
    first = clock.times[1]  # [prompt, token 1, ..., token n, end]
    return Run(len(ids) / (first - t0), (new_tokens - 1) / (clock.times[-1] - first), out[0, len(ids):].tolist())


def run_llama_bench(cmd: list[str], ids: list[int], new_tokens: int) -> Run:
    """llama.cpp's own ``llama-bench`` (built by benchmarks/build_llama_cpp.sh): prompt
    processing of len(ids) tokens and generation of ``new_tokens``, one repetition, in a
    subprocess between the other libraries' runs. It reports speeds, not tokens.

    Its generation test starts from an empty context unless given a depth, while the other
    libraries decode after the prompt (attending over it: the sliding layers' whole window
    after a 512-token prompt). So generation runs at depth len(ids) too (``-d``), the decode
    figure compared; the empty-context figure is kept beside it."""
    n = len(ids)
    out = subprocess.run(cmd + ["-p", str(n), "-n", str(new_tokens), "-d", f"0,{n}", "-r", "1", "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    tests = json.loads(out)
    pp = next(t["avg_ts"] for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0 and t.get("n_depth", 0) == 0)
    tg0 = next(t["avg_ts"] for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0 and t.get("n_depth", 0) == 0)
    tg = next((t["avg_ts"] for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0 and t.get("n_depth") == n), None)
    if tg is None:  # a llama-bench too old for -d: its empty-context figure, marked as such in the table
        return Run(pp, tg0, [], tg0)
    return Run(pp, tg, [], tg0)


def find_llama_bench(explicit: str | None) -> Path | None:
    candidates = [explicit, os.environ.get("LLAMA_BENCH"), shutil.which("llama-bench"),
                  str(Path.home() / ".cache" / "llmarch" / "llama.cpp" / "bin" / "llama-bench")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


def run_llama_cpp(llm, ids: list[int], new_tokens: int) -> Run:
    llm.reset()
    t0 = time.perf_counter()
    times, tokens = [], []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter())
        tokens.append(tok)
        if len(tokens) == new_tokens:
            break
    return Run(len(ids) / (times[0] - t0), (new_tokens - 1) / (times[-1] - times[0]), tokens)


# ----------------------------------------------------------------------------------------


def load_all(alias: str, dtype: torch.dtype, threads: int, llama_bench: Path | None):
    import transformers

    path = resolve_model(alias)
    runners = {"llmarch": (run_llmarch, load_model(open_checkpoint(path), dtype))}  # as load() does: CLI's --quant auto
    if native.library() is not None:  # the same model on torch's int8 kernel, for the native kernels' share
        runners["llmarch --no-native-step"] = (run_llmarch_modules, runners["llmarch"][1])
        with native.disabled():  # loaded as it loads without them (GGUF blocks as int8 with one scale a row)
            runners["llmarch torch-int8"] = (run_llmarch_torch_kernels, load_model(open_checkpoint(path), dtype))
    else:  # where they are not built: generate --fast-kernels (and chat), fbgemm's; packed before the rounds
        runners["llmarch --fast-kernels"] = (run_llmarch, load_model(open_checkpoint(path), dtype, fast=True))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    runners["transformers"] = (run_transformers, hf.eval())
    try:
        import llama_cpp
    except ImportError:
        pass
    else:
        runners["llama.cpp"] = (run_llama_cpp, llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, verbose=False))
    if llama_bench is not None and "llama.cpp" not in runners:
        runners["llama-bench"] = (run_llama_bench, [str(llama_bench), "-m", str(path), "-t", str(threads)])
    return Tokenizer.from_gguf(path), runners


def bench(alias: str, dtype: torch.dtype, args) -> list[tuple]:
    tokenizer, runners = load_all(alias, dtype, args.threads, args.llama_bench)
    ids = tokenizer.encode(args.prompt)
    if args.prompt_tokens:  # a long prompt: the bundled Shakespeare's first tokens
        import gzip
        from importlib import resources

        with resources.files("llmarch.data").joinpath("shakespeare.txt.gz").open("rb") as fh:
            text = gzip.decompress(fh.read()).decode("utf-8")[200_000 : 200_000 + 40 * args.prompt_tokens]
        ids = tokenizer.encode(text)[: args.prompt_tokens]
    runs: dict[str, list[Run]] = {name: [] for name in runners}
    for name, (fn, model) in runners.items():  # warm-up
        fn(model, ids, 4)
    for _ in range(args.rounds):
        for name, (fn, model) in runners.items():
            runs[name].append(fn(model, ids, args.new_tokens))
    ref = runs["transformers"][0].tokens
    rows = []
    for name, rs in runs.items():
        pre = statistics.median(r.prefill_tps for r in rs)
        dec = statistics.median(r.decode_tps for r in rs)
        same = sum(a == b for a, b in zip(rs[0].tokens, ref)) if rs[0].tokens else None
        # llama.cpp computes in the file's own (quantised) tensor types, whatever --dtypes says
        kind = "gguf" if name in ("llama.cpp", "llama-bench") else str(dtype).replace("torch.", "")
        rows.append((alias, kind, name, len(ids), pre, dec, same))
        empty = [r.decode_empty_tps for r in rs if r.decode_empty_tps is not None]
        if empty:  # llama-bench's generation from an empty context (its default test), for reference
            rows.append((alias, kind, f"{name} (depth 0)", 0, float("nan"), statistics.median(empty), None))
    return rows


# Started by a small interpreter (python -S, about 10 MB): a child's peak RSS as the kernel counts
# it includes the memory of the process that forked it (Linux keeps the larger high-water mark
# across exec), so a command started straight from this process, which holds torch, would never
# count less than this process does (`import torch` measured 227 MiB this way, 218 on its own).
_LAUNCH = """import os, sys
fd = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.close(fd)
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
os.write(fd, b"%d %d" % (os.waitstatus_to_exitcode(status), usage.ru_maxrss))
"""


def _first_output(cmd: list[str]) -> tuple[float, float, int]:
    """Run ``cmd``; seconds to its first byte on stdout, seconds to its exit, and its peak RSS
    (bytes, from the kernel's accounting of that one child, started by a small launcher)."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCH, str(w), *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, pass_fds=(w,))
    os.close(w)
    proc.stdout.read(1)
    first = time.perf_counter() - t0
    proc.stdout.read()
    proc.wait()
    with os.fdopen(r, "rb") as f:
        code, maxrss = (int(v) for v in f.read().split())
    if code != 0 or proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {code}")
    return first, time.perf_counter() - t0, maxrss * 1024


def startup(alias: str, args) -> None:
    """A warm start as a user sees it: ``llmarch generate`` with the CLI's defaults, one new token,
    a second run after a first that fills the caches (tokenizer, int8 requantisations); against
    ``python -c "import torch"`` (the runtime's own start and base memory), alternating."""
    path = resolve_model(alias)
    llmarch = [sys.executable, "-m", "llmarch.cli", "generate", args.prompt, "--model", alias,
               "--max-new-tokens", "1", "--ignore-eos", "--threads", str(args.threads)]
    torch_only = [sys.executable, "-c", "import torch; print(1)"]
    _first_output(llmarch)  # the first run: caches filled, file in the page cache
    ours, base = [], []
    for _ in range(args.rounds):
        base.append(_first_output(torch_only))
        ours.append(_first_output(llmarch))
    first = statistics.median(r[0] for r in ours)
    torch_s = statistics.median(r[0] for r in base)
    rss = max(r[2] for r in ours)
    base_rss = statistics.median(r[2] for r in base)
    size = path.stat().st_size
    bound = 1.5 * size + base_rss
    print(f"{alias}: warm start to the first token {first:.2f} s (exit {statistics.median(r[1] for r in ours):.2f} s), "
          f"import torch {torch_s:.2f} s: +{first - torch_s:.2f} s (target <= +1.5 s); peak RSS {rss / 2**20:.0f} MiB, "
          f"file {size / 2**20:.0f} MiB, import torch {base_rss / 2**20:.0f} MiB: {(rss - base_rss) / size:.2f}x the file "
          f"above the runtime (target <= 1.5x, {bound / 2**20:.0f} MiB)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["gemma-3-270m", "qwen2.5-coder-0.5b"])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="instead of --prompt, this many tokens of the bundled Shakespeare (e.g. 512 for the prefill target)")
    p.add_argument("--llama-bench", default=None,
                   help="llama.cpp's llama-bench binary (default: $LLAMA_BENCH, PATH, or where "
                        "benchmarks/build_llama_cpp.sh puts it); runs when found")
    p.add_argument("--startup-only", action="store_true", help="only the warm start and peak RSS")
    args = p.parse_args()
    args.llama_bench = find_llama_bench(args.llama_bench)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.new_tokens} new tokens, "
          f"median of {args.rounds} alternating rounds")
    header = f"{'model':<20} {'dtype':<9} {'library':<19} {'prompt':>6} {'prefill tok/s':>14} {'decode tok/s':>13} " \
             f"{'decode vs HF':>13} {'same tokens':>12}"
    for alias in args.models:
        startup(alias, args)
    if args.startup_only:
        return
    for alias in args.models:
        for name in args.dtypes:
            rows = bench(alias, getattr(torch, name), args)
            hf_decode = next(r[5] for r in rows if r[2] == "transformers")
            print(header)
            for a, d, lib, n, pre, dec, same in rows:
                same = f"{same:>5}/{args.new_tokens}" if same is not None else f"{'n/a':>8}"
                print(f"{a:<20} {d:<9} {lib:<19} {n:>6} {pre:>14.1f} {dec:>13.2f} {dec / hf_decode:>12.2f}x "
                      f"{same}", flush=True)


if __name__ == "__main__":
    main()
