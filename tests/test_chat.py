"""`jdecode chat`: Ctrl-C stops a reply and keeps the conversation, /reset and /exit, the
banner, and the sampling flags of `generate` (a stub generator: the loop is the point)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from jdecode import chat
from jdecode.cli import app
from jdecode.decoding.sampling import SamplingParams
from jdecode.io import registry


class Tok:
    """Renders messages as `role:content|...` and encodes characters as ids."""

    chat_template = "x"

    def apply_chat_template(self, messages):
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    def encode(self, text):
        return [ord(c) for c in text]


class Gen:
    """Streams `replies` in two-character deltas; `interrupt_after` deltas of a reply raise
    KeyboardInterrupt (the user's Ctrl-C) in the consumer's loop. Records every prompt."""

    def __init__(self, replies, interrupt_after=None):
        self.replies, self.interrupt_after, self.prompts = list(replies), interrupt_after, []

    def stream(self, prompts, sp, chunk_steps=8, on_prefill=None):
        self.prompts.append("".join(map(chr, prompts[0])))
        text = self.replies.pop(0)
        for i in range(0, len(text), 2):
            if self.interrupt_after is not None and i // 2 == self.interrupt_after:
                self.interrupt_after = None
                raise KeyboardInterrupt
            yield [text[i:i + 2]], None
        yield [""], [text]


def converse(gen, lines, system=None):
    """Runs the chat loop over `lines` (then end of input); returns (conversation, output)."""
    inputs, out = iter(lines), []

    def read(_prompt):
        line = next(inputs, None)
        if line is None:
            raise EOFError
        if line == "^C":
            raise KeyboardInterrupt
        return line

    conv = chat.run_chat(gen, Tok(), SamplingParams(), chat.Conversation(system), read=read,
                         write=out.append, say=lambda s: out.append(s + "\n"))
    return conv, "".join(out)


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation():
    gen = Gen(["Paris is the capital.", "It has 2 million people."], interrupt_after=2)
    conv, out = converse(gen, ["Capital of France?", "How many people?"], system="brief")
    assert "Pari" in out and "(stopped; the reply so far is kept)" in out
    assert conv.turns == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Pari"},  # what was shown, no more
        {"role": "user", "content": "How many people?"},
        {"role": "assistant", "content": "It has 2 million people."}]
    # the second turn saw the first, interrupted one
    assert gen.prompts[1] == ("system:brief|user:Capital of France?|assistant:Pari|"
                              "user:How many people?")


def test_ctrl_c_before_the_first_word_drops_the_question():
    conv, out = converse(Gen(["x", "fine"], interrupt_after=0), ["first?", "second?"])
    assert conv.turns == [{"role": "user", "content": "second?"},
                          {"role": "assistant", "content": "fine"}]
    assert "question was dropped" in out


def test_reset_exit_help_and_ctrl_c_at_the_prompt():
    gen = Gen(["one", "two"])
    conv, out = converse(gen, ["hi", "/reset", "^C", "/help", "/nope", "again", "/exit",
                               "never read"], system="sys")
    assert gen.prompts == ["system:sys|user:hi", "system:sys|user:again"]  # reset kept system
    assert conv.turns == [{"role": "user", "content": "again"},
                          {"role": "assistant", "content": "two"}]
    assert "(conversation cleared)" in out and "Ctrl-C again" in out
    assert "unknown command '/nope'" in out and "/reset" in out


def test_error_drops_the_question_and_the_chat_goes_on():
    class TooLong(Gen):
        def stream(self, prompts, sp, chunk_steps=8, on_prefill=None):
            if len(self.prompts) == 0:
                self.prompts.append("x")
                raise ValueError("prompt 0 has 900 tokens; max_seq_len is 512")
            yield from super().stream(prompts, sp, chunk_steps, on_prefill)

    conv, out = converse(TooLong(["ok"]), ["long", "short"])
    assert "max_seq_len is 512" in out and "/reset starts a new conversation" in out
    assert [t["content"] for t in conv.turns] == ["short", "ok"]


def test_chat_command_banner_and_sampling_flags(monkeypatch):
    from jdecode.config import load_model_config_yaml
    from jdecode.decoding import generate as generate_mod

    cfg = load_model_config_yaml(registry.CONFIG_DIR / "tiny.yaml")
    monkeypatch.setattr(registry, "load",
                        lambda *a, **k: registry.Model("tiny-chat", cfg, None, Tok()))
    seen = {}

    def fake_generator(model, **kw):
        seen["kw"] = kw
        return Gen(["Hello!"])

    monkeypatch.setattr(generate_mod, "Generator", fake_generator)
    result = CliRunner().invoke(app, ["chat", "--temperature", "0.7", "--top-p", "0.9",
                                      "--seed", "3", "--max-new-tokens", "12", "--system",
                                      "be kind"], input="hi\n/exit\n")
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith("jdecode chat: smollm2-135m (2 layers, float32")
    assert "temperature 0.7, top-p 0.9, up to 12 tokens per reply" in first
    assert "/reset" in result.output and "/exit" in result.output and "Hello!" in result.output


@pytest.mark.parametrize("flag,value", [("--top-p", "2"), ("--temperature", "-1"),
                                        ("--top-k", "-3"), ("--dtype", "f4")])
def test_chat_flags_are_checked_before_loading(flag, value, monkeypatch):
    monkeypatch.setattr(registry, "load", lambda *a, **k: pytest.fail("loaded"))
    result = CliRunner().invoke(app, ["chat", flag, value])
    assert result.exit_code == 2
    out = result.output.strip()
    assert out.startswith("error: ") and "\n" not in out and flag in out
