"""Continuous batching and prefix reuse of ``llmarch serve``, measured through the HTTP API.

    python benchmarks/serve.py [--model qwen2.5-coder-0.5b] [--clients 16] [--max-tokens 64]

Starts the server in this process (uvicorn in a thread), then:

* one streaming client, then ``--clients`` at once (greedy, the same output length): aggregate
  decode tokens/s, p50/p99 time to first token, and the aggregate ratio (target >= 4x);
* a 1,000-token prompt twice with different endings: the second's time to first token over the
  first's (prefix reuse; target <= 0.3).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from openai import OpenAI


def stream_one(client: OpenAI, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds in all, tokens) of one streamed completion."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first or float("nan"), time.perf_counter() - t0, tokens


def clients_at_once(client: OpenAI, model: str, n: int, max_tokens: int) -> dict:
    results = [None] * n

    def work(i):
        results[i] = stream_one(client, model, f"Write a Python function number {i} that", max_tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    return {"clients": n, "tok_s": tokens / wall, "p50_ttft": statistics.median(ttfts),
            "p99_ttft": ttfts[min(n - 1, round(0.99 * (n - 1)))]}


def main() -> None:
    import uvicorn

    from llmarch.cli.serve import CHAT_MODEL
    from llmarch.inference.generate import load
    from llmarch.serving.app import create_app
    from llmarch.serving.scheduler import Scheduler

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=CHAT_MODEL)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()

    model, tokenizer = load(args.model)
    scheduler = Scheduler(model, tokenizer, slots=args.clients, context=2048, prefill_chunk=512)
    server = uvicorn.Server(uvicorn.Config(create_app(scheduler, args.model), port=args.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none", max_retries=0, timeout=600)

    one = clients_at_once(client, args.model, 1, args.max_tokens)
    many = clients_at_once(client, args.model, args.clients, args.max_tokens)
    print("| clients | aggregate decode tok/s | p50 TTFT (s) | p99 TTFT (s) |\n|---|---|---|---|")
    for r in (one, many):
        print(f"| {r['clients']} | {r['tok_s']:.1f} | {r['p50_ttft']:.3f} | {r['p99_ttft']:.3f} |")
    print(f"aggregate ratio {args.clients} vs 1 client: {many['tok_s'] / one['tok_s']:.2f}x (target >= 4x)")

    prefix = " ".join(f"line {i}: x = {i} * 2" for i in range(1000))
    ids = tokenizer.encode(prefix)[:1000]
    shared = tokenizer.decode(ids)
    cold = stream_one(client, args.model, shared + "\n# first question", 1)[0]
    warm = stream_one(client, args.model, shared + "\n# second question", 1)[0]
    print(f"1,000-token prefix: TTFT {cold:.3f} s first, {warm:.3f} s repeated; ratio {warm / cold:.2f} (target <= 0.3)")
    server.should_exit = True


if __name__ == "__main__":
    main()
