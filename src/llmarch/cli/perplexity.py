"""``llmarch perplexity``: how well a model predicts a text file (sliding windows).

    llmarch perplexity wiki.txt                                  # the default model
    llmarch perplexity wiki.txt --model qwen2.5-coder-0.5b --context 1024 --stride 512 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import GenerationError
from .options import add_device, add_runtime, load_on_device, runtime_choice


def register(sub) -> None:
    sp = sub.add_parser(
        "perplexity",
        help="perplexity of a model on a text file",
        description="Sliding-window perplexity of a model on the first --max-tokens tokens of a UTF-8 text file: "
        "windows of --context tokens whose starts advance by --stride, each scoring the tokens no earlier window "
        "scored (transformers' strided recipe).",
    )
    sp.add_argument("file", help="UTF-8 text file")
    sp.add_argument("--model", default=None, help="alias (gemma-3-270m, qwen2.5-coder-0.5b), .gguf file or HF directory")
    sp.add_argument("--context", type=int, default=512, help="window length in tokens (default 512)")
    sp.add_argument("--stride", type=int, default=None, help="window advance in tokens (default: the context, no overlap)")
    sp.add_argument("--max-tokens", type=int, default=None, help="score only the first T tokens of the text")
    sp.add_argument("--json", action="store_true", help="print a JSON object instead of a sentence")
    add_runtime(sp)
    add_device(sp)
    sp.set_defaults(func=run, quick_exit=True)  # reads a model, writes nothing: see cli.entry


def run(args: argparse.Namespace) -> None:
    from ..checkpoints.assets import DEFAULT_MODEL
    from ..inference.perplexity import check_arguments, perplexity

    check_arguments(args.context, args.stride)
    device, dtype, why = runtime_choice(args)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise GenerationError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GenerationError(f"text file not found: {path}") from None
    except IsADirectoryError:
        raise GenerationError(f"{path} is a directory, expected a text file") from None
    except UnicodeDecodeError as e:
        raise GenerationError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    print(f"loading {args.model or DEFAULT_MODEL} ({why}) ...", file=sys.stderr, flush=True)
    model, tokenizer = load_on_device(args, args.model, device, dtype)
    ids = tokenizer.encode(text)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    result = perplexity(model, ids, args.context, args.stride, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps({"model": args.model or DEFAULT_MODEL, "file": str(path), "dtype": str(dtype).removeprefix("torch."),
                          "quant": args.quant,
                          **result.to_dict()}))
    else:
        print(result.summary())
