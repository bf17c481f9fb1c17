"""``llmarch generate``: stream text from a model to the terminal.

    llmarch generate "The capital of France is"                 # Gemma 3 270M, greedy
    llmarch generate "Write a haiku" --chat --temperature 0.8 --top-p 0.95 --seed 1
    llmarch generate "def fib(n):" --model qwen2.5-coder-0.5b --stop "\\n\\n"
    llmarch generate "Hi" --model path/to/model.gguf            # or an HF directory
"""

from __future__ import annotations

import argparse
import sys

from ..errors import GenerationError
from .options import add_device, add_runtime, load_on_device, runtime_choice


def register(sub: argparse._SubParsersAction) -> None:
    """Register the ``generate`` subcommand on the CLI's subparsers."""
    sp = sub.add_parser(
        "generate",
        help="generate text (default model: Gemma 3 270M)",
        description="Generate text, streamed as it is produced; speed is reported on stderr.",
    )
    sp.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (several: generated as one batch)")
    sp.add_argument("--model", default=None, help="alias (gemma-3-270m, qwen2.5-coder-0.5b), .gguf file or HF directory")
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    sp.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    sp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: off)")
    sp.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    sp.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1: off)")
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    sp.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    sp.add_argument("--system", default=None, help="system message (with --chat)")
    sp.add_argument("--max-context", type=int, default=None, help="cap on prompt + new tokens")
    sp.add_argument("--no-stream", action="store_true", help="print the text at the end")
    sp.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS: exactly --max-new-tokens (benchmarks)")
    sp.add_argument("--fast-kernels", "--fast-head", dest="fast_kernels", action="store_true",
                    help="where llmarch's native int8 kernel is not built (no C compiler; the load line says): large "
                         "int8 layers get a copy packed for fbgemm's int8 kernel, about 1.2-1.3x faster decoding for "
                         "their size in memory again (chat always does it)")
    add_runtime(sp)
    add_device(sp)
    sp.set_defaults(func=run, quick_exit=True)  # reads a model, writes nothing: see cli.entry


def run(args: argparse.Namespace) -> None:
    from ..checkpoints.assets import DEFAULT_MODEL
    from ..inference.generate import (
        GenerationConfig,
        chat_prompt,
        check_text,
        stream,
    )

    if not args.prompts:
        raise GenerationError('no prompt given (usage: llmarch generate "your prompt")')
    if any(not p for p in args.prompts):
        raise GenerationError("the prompt is empty")
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=list(args.stop),
        max_context=args.max_context,
        ignore_eos=args.ignore_eos,
    )
    config.validate()  # before the (slow) model load
    check_text(args.prompts, "prompt")
    check_text([args.system], "system message")
    device, dtype, why = runtime_choice(args)
    print(f"loading {args.model or DEFAULT_MODEL} ({why}) ...", file=sys.stderr, flush=True)
    model, tokenizer = load_on_device(args, args.model, device, dtype, decoding=args.fast_kernels)
    prompts = [chat_prompt(tokenizer, p, args.system) for p in args.prompts] if args.chat else list(args.prompts)
    generation = stream(model, tokenizer, prompts, config)
    if len(prompts) == 1 and not args.no_stream:
        for step in generation:
            sys.stdout.write(step.texts[0])
            sys.stdout.flush()
        sys.stdout.write("\n")
        result = generation.result()
    else:
        result = generation.run()
        for i, text in enumerate(result.texts):
            if len(prompts) > 1:
                print(f"--- [{i}] {args.prompts[i]}")
            print(text)
    print(result.stats.summary(), file=sys.stderr)
