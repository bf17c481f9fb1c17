"""``llmarch serve``: an OpenAI-compatible HTTP server with continuous batching.

    llmarch serve                                   # Qwen2.5-Coder-0.5B-Instruct on 127.0.0.1:8000
    llmarch serve --model path/or/alias --port 8080 --api-key secret
    # then, e.g.: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
"""

from __future__ import annotations

import argparse
import sys

from .options import add_device, add_runtime, load_on_device, runtime_choice

CHAT_MODEL = "qwen2.5-coder-0.5b"  # instruction-tuned: the default of serve and chat


def add_model(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--model", default=None,
                    help=f"alias, .gguf file, HF directory or Hub id org/name[@revision][:file.gguf] (default {CHAT_MODEL}, "
                         "instruction-tuned)")


def load_chat_model(args: argparse.Namespace, decoding: bool = False):
    """(model, tokenizer, name) of ``--model`` or the default chat model; says which on stderr.
    ``decoding``: see :func:`load_on_device` (a server's batched steps are not)."""
    name = args.model or CHAT_MODEL
    device, dtype, why = runtime_choice(args)
    print(f"loading {name} ({why}) ...", file=sys.stderr, flush=True)
    model, tokenizer = load_on_device(args, name, device, dtype, decoding)
    print(f"model: {name}", file=sys.stderr, flush=True)
    return model, tokenizer, name


def register(sub: argparse._SubParsersAction) -> None:
    """Register the ``serve`` subcommand on the CLI's subparsers."""
    sp = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (default model: Qwen2.5-Coder-0.5B-Instruct)",
        description="Serve /v1/models, /v1/completions, /v1/chat/completions (streamed or not) and /health, "
                    "with continuous batching and prefix reuse. Ctrl-C / SIGTERM finish the requests in flight, then exit.",
    )
    add_model(sp)
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    sp.add_argument("--max-batch", type=int, default=16, help="sequences computed together (KV-cache rows)")
    sp.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond which the server answers 503")
    sp.add_argument("--context", type=int, default=4096, help="longest prompt + completion (capped by the model's)")
    sp.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step between decode steps")
    add_runtime(sp)
    add_device(sp)
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from ..errors import GenerationError
    from ..serving.app import create_app
    from ..serving.scheduler import Scheduler

    for flag in ("max_batch", "max_queue", "context", "prefill_chunk"):
        if getattr(args, flag) < 1:
            raise GenerationError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    model, tokenizer, name = load_chat_model(args)
    scheduler = Scheduler(model, tokenizer, slots=args.max_batch, context=args.context,
                          max_queue=args.max_queue, prefill_chunk=args.prefill_chunk)
    app = create_app(scheduler, name, args.api_key)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 (context {scheduler.context}, "
          f"{args.max_batch} sequences at once)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=600)
