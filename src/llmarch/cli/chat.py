"""``llmarch chat``: talk to a model in the terminal.

    llmarch chat                                # Qwen2.5-Coder-0.5B-Instruct
    llmarch chat --model org/name --system "You are terse."

The history is sent with the model's chat template each turn; replies stream as they come.
``/reset`` clears the history, ``/system TEXT`` sets the system message, ``/exit`` (or Ctrl-D)
quits; Ctrl-C stops a reply (what was said so far stays in the history), not the program.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import GenerationError
from .options import add_device, add_runtime
from .serve import add_model, load_chat_model

HELP = "/reset clears the history, /system TEXT sets the system message, /exit quits; Ctrl-C stops a reply"


def register(sub: argparse._SubParsersAction) -> None:
    """Register the ``chat`` subcommand on the CLI's subparsers."""
    sp = sub.add_parser("chat", help="interactive chat in the terminal (default model: Qwen2.5-Coder-0.5B-Instruct)",
                        description="Chat with a model: history, chat template, streamed replies. " + HELP + ".")
    add_model(sp)
    sp.add_argument("--system", default=None, help="system message")
    sp.add_argument("--max-new-tokens", type=int, default=512, help="longest reply")
    sp.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--no-fast-kernels", "--no-fast-head", dest="no_fast_kernels", action="store_true",
                    help="where llmarch's native int8 kernel is not built (no C compiler): do not pack the large int8 "
                         "layers for fbgemm's int8 kernel (it costs 2-4 s of one core and their size in memory again, "
                         "while you type; replies decode about 1.2-1.3x faster with it)")
    add_runtime(sp)
    add_device(sp)
    sp.set_defaults(func=run, quick_exit=True)  # reads a model, writes nothing: see cli.entry


def run(args: argparse.Namespace) -> None:
    from ..inference.generate import GenerationConfig, model_context, stream

    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p).validate()
    model, tokenizer, name = load_chat_model(args, decoding=not args.no_fast_kernels)  # packed while the user types
    if tokenizer.chat_template is None:
        raise GenerationError(f"{name} has no chat template; chat needs an instruction-tuned model")
    context = model_context(model, GenerationConfig())
    system, history = args.system, []
    print(f"chatting with {name}: {HELP}", flush=True)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history.clear()
            print("(history cleared)")
        elif line.split(" ", 1)[0] == "/system":
            system = line[len("/system") :].strip() or None
            print(f"(system message {'set' if system else 'removed'})")
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}")
        elif line:
            history.append({"role": "user", "content": line})
            messages = ([{"role": "system", "content": system}] if system else []) + history
            ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
            room = min(args.max_new_tokens, context - len(ids))
            if room < 1:
                history.pop()
                print(f"(the conversation fills the model's context of {context} tokens; /reset to start over)")
                continue
            config = GenerationConfig(max_new_tokens=room, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
            history.append({"role": "assistant", "content": reply(stream(model, tokenizer, [ids], config))})


def reply(generation) -> str:
    """Print the reply as it streams; Ctrl-C ends it early. Returns its text."""
    pieces = []
    try:
        for step in generation:
            pieces.append(step.texts[0])
            sys.stdout.write(step.texts[0])
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    return "".join(pieces)
