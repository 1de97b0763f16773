"""Command-line plumbing shared by every `jdecode` subcommand: rich consoles that keep lines
and tables whole when the output is not a terminal, and one-line errors with exit code 2."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from typer.core import TyperGroup

# Width given to output that is not a terminal (a pipe, a log file, a test): rich would
# otherwise wrap lines and squeeze tables into 80 columns.
UNWRAPPED_WIDTH = 1000
# The UsageError of the click that typer runs on (recent typer vendors its own copy of click,
# whose exceptions are not the installed click's); typer exports BadParameter, its subclass.
UsageError = typer.BadParameter.__bases__[0]


class CliConsole(Console):
    """A rich Console that never wraps a line (soft_wrap) and, off a terminal, renders tables
    at their natural width."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(soft_wrap=True, **kwargs)

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(UNWRAPPED_WIDTH, size.height)


def stdout() -> CliConsole:
    return CliConsole()


def stderr() -> CliConsole:
    return CliConsole(stderr=True)


class PrefillNotice:
    """`Generator.stream(on_prefill=...)` for the command line: once a prefill has run for
    AFTER_S, a live status line on a terminal, or one plain line elsewhere (a log then says
    why nothing happens for a while). `done()` clears it when the reply starts."""

    AFTER_S = 3.0

    def __init__(self, console: Console | None) -> None:
        self.console, self.status, self.said = console, None, False

    def __call__(self, prompt_tokens: int, elapsed_s: float) -> None:
        if self.console is None or elapsed_s < self.AFTER_S:
            return
        text = f"prefill: {prompt_tokens:,} prompt tokens, {elapsed_s:.0f} s"
        if not self.console.is_terminal:
            if not self.said:
                self.console.print(f"{text} so far (a long prompt takes a while on CPU)...",
                                   highlight=False)
                self.said = True
        elif self.status is None:
            self.status = self.console.status(text)
            self.status.start()
        else:
            self.status.update(text)

    def done(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def fail(message: str) -> NoReturn:
    """Prints a one-line error (no traceback) to stderr and exits 2."""
    stderr().print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(2)


class OneLineErrors(TyperGroup):
    """The `jdecode` group: a bad flag or argument is one line on stderr and exit code 2, as
    every other error of the command line (click would print a usage block and a framed
    message)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra: Any) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            stderr().print(f"[bold red]error:[/] {escape(e.format_message())}{hint}",
                           highlight=False)
            code = 2
        except typer.Abort:  # Ctrl-C or Ctrl-D at a prompt
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)
