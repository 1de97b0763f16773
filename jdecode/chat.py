"""`jdecode chat`: a multi-turn conversation over `Generator.stream` with the model's chat
template. Ctrl-C stops a reply and keeps the conversation; readline gives line editing and a
history that persists between sessions."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jdecode.console import PrefillNotice

COMMANDS = {
    "/reset": "forget the conversation (the system message stays)",
    "/exit": "quit (also /quit or Ctrl-D)",
    "/help": "show these commands",
}
HISTORY_LINES = 1000


@dataclasses.dataclass
class Conversation:
    """The turns so far; `system` is kept across /reset."""

    system: str | None = None
    turns: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        """Chat-template messages: the system message (if any), then the turns."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns


def banner(model: str, cfg: Any, sampling: Any) -> str:
    """One line naming the model and how it samples, one naming the commands."""
    how = "greedy" if sampling.temperature == 0 else (
        f"temperature {sampling.temperature:g}, top-p {sampling.top_p:g}")
    cmds = ", ".join(f"{name} {what}" for name, what in COMMANDS.items())
    return (f"jdecode chat: {model} ({cfg.num_layers} layers, {cfg.dtype}, context "
            f"{cfg.max_position_embeddings:,} tokens; {how}, up to {sampling.max_new_tokens} "
            f"tokens per reply)\n{cmds}; Ctrl-C stops a reply and keeps the conversation")


def enable_line_editing(history: Path) -> Callable[[], None]:
    """Arrow keys, editing and a persistent history for `input()` (GNU readline, where the
    platform has it). Returns the function that saves the history."""
    try:
        import readline
    except ImportError:  # no readline on this platform: plain input() still works
        return lambda: None
    try:
        readline.read_history_file(history)
    except OSError:  # no history yet
        pass
    readline.set_history_length(HISTORY_LINES)

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError:  # a read-only home must not break the chat
            pass

    return save


def run_chat(gen: Any, tokenizer: Any, sampling: Any, conv: Conversation, *,
             read: Callable[[str], str] = input, write: Callable[[str], Any],
             say: Callable[[str], Any], notice: PrefillNotice | None = None) -> Conversation:
    """The read-reply loop, until /exit or end of input.

    Args:
      gen: a `Generator`. tokenizer: its model's tokenizer (chat template and encode).
      sampling: `SamplingParams` of every reply. conv: the conversation to continue.
      read: input(prompt) -> line. write: prints reply text as it streams. say: prints a
        one-line note (commands, errors). notice: shows a long prefill (a long conversation
        on CPU).
    Returns:
      the conversation as it ends.
    """
    interrupts = 0
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            write("\n")
            return conv
        except KeyboardInterrupt:  # at the prompt: a second Ctrl-C in a row quits
            interrupts += 1
            if interrupts > 1:
                write("\n")
                return conv
            say("\n(Ctrl-C again, /exit or Ctrl-D quits)")
            continue
        interrupts = 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return conv
        if text == "/reset":
            conv.turns.clear()
            say("(conversation cleared)")
            continue
        if text == "/help" or text.startswith("/"):
            if text != "/help":
                say(f"unknown command {text.split()[0]!r}")
            for name, what in COMMANDS.items():
                say(f"{name}  {what}")
            continue
        if not text:
            continue
        conv.turns.append({"role": "user", "content": line})
        reply(gen, tokenizer, sampling, conv, write=write, say=say, notice=notice)


def reply(gen: Any, tokenizer: Any, sampling: Any, conv: Conversation, *,
          write: Callable[[str], Any], say: Callable[[str], Any],
          notice: PrefillNotice | None = None) -> None:
    """Streams the assistant's answer to the last user turn and appends it to `conv`.

    Ctrl-C stops the reply: the part already shown is kept as the answer (the next turn
    continues from what the user saw); a reply stopped before its first word is dropped with
    its question. An error (a conversation longer than the cache) drops the question.
    """
    ids = tokenizer.encode(tokenizer.apply_chat_template(conv.messages()))
    notice = notice or PrefillNotice(None)
    stream = gen.stream([ids], sampling, chunk_steps=8, on_prefill=notice)
    shown = ""
    try:
        for deltas, _ in stream:
            notice.done()
            write(deltas[0])
            shown += deltas[0]
    except KeyboardInterrupt:
        stream.close()
        notice.done()
        if not shown.strip():
            conv.turns.pop()
            say("\n(stopped before the reply began; the question was dropped)")
            return
        write("\n")
        say("(stopped; the reply so far is kept)")
        conv.turns.append({"role": "assistant", "content": shown})
        return
    except ValueError as e:
        notice.done()
        conv.turns.pop()
        say(f"error: {e} (/reset starts a new conversation)")
        return
    write("\n")
    conv.turns.append({"role": "assistant", "content": shown})
