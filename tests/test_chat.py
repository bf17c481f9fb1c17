"""``llmarch chat`` driven through a pseudo-terminal: streamed replies with the chat template and
the history, /system, /reset, Ctrl-C, /exit."""

import os
import sys
from pathlib import Path

import pytest
from test_serve import tiny_checkpoint

import llmarch
from llmarch.checkpoints.tokenizer import Tokenizer
from llmarch.inference.generate import GenerationConfig, generate

SRC = Path(__file__).resolve().parents[1] / "src"


def _reply(model, tokenizer, messages, max_new: int) -> str:
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    return generate(model, tokenizer, [ids], GenerationConfig(max_new_tokens=max_new)).text


@pytest.mark.slow
def test_chat_repl(tmp_path, tiny_reference):
    pexpect = pytest.importorskip("pexpect")
    d = tiny_checkpoint(tiny_reference("llama")[0], tmp_path / "tiny")
    model, tokenizer = llmarch.from_pretrained(d), Tokenizer.from_file(d)
    child = pexpect.spawn(sys.executable, ["-m", "llmarch", "chat", "--model", str(d), "--max-new-tokens", "8",
                                           "--dtype", "float32", "--threads", "1"],
                          env={**os.environ, "PYTHONPATH": str(SRC)}, encoding="utf-8", timeout=120)
    child.expect_exact(f"chatting with {d}")
    child.expect_exact("> ")
    child.sendline("hello")
    first = _reply(model, tokenizer, [{"role": "user", "content": "hello"}], 8)
    child.expect_exact(first)
    child.expect_exact("> ")
    child.sendline("and you")  # the second turn sees the first
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "and you"}]
    child.expect_exact(_reply(model, tokenizer, history, 8))
    child.expect_exact("> ")
    child.sendline("/system be brief")
    child.expect_exact("(system message set)")
    child.sendline("/reset")
    child.expect_exact("(history cleared)")
    child.expect_exact("> ")
    child.sendline("hi")
    child.expect_exact(_reply(model, tokenizer, [{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "hi"}], 8))
    child.expect_exact("> ")
    child.sendintr()  # Ctrl-C at the prompt (or during a reply) does not end the program
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("flag, decoding", [([], True), (["--no-fast-kernels"], False), (["--no-fast-head"], False)])
def test_chat_packs_the_fast_kernels_unless_told_not_to(flag, decoding, monkeypatch, capsys):
    from llmarch.cli import chat, main
    from llmarch.errors import GenerationError

    seen = []

    def fake_load(args, decoding=False):
        seen.append(decoding)
        raise GenerationError("stop here")

    monkeypatch.setattr(chat, "load_chat_model", fake_load)
    assert main(["chat", *flag]) == 2
    assert seen == [decoding] and "stop here" in capsys.readouterr().err
