"""``glmtune chat``: a multi-turn conversation in the terminal.

History is kept as (question, answer) pairs and rendered by the model
family's own template on every turn (``Predictor.prompt_ids``), so the model
sees the multi-turn format it was trained on. Answers are printed as they are
generated.

Reading from a pipe works the same as from a terminal: one message per line.
Only the decorations differ: at a terminal there are role prompts; from a pipe
stdout holds just the answers, each followed by a newline, so scripts and
tests can read it. Status lines (ready, cleared) go to stderr.
"""

from __future__ import annotations

import sys
from typing import TextIO

from glmtune.errors import GlmtuneError

HELP = "/clear forgets the conversation, /exit (or end of input) quits"


def run_chat(predictor, stdin: TextIO | None = None, stdout: TextIO | None = None,
             stderr: TextIO | None = None, interactive: bool | None = None) -> int:
    """Chat until /exit or end of input; returns the number of answers given."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if interactive is None:
        interactive = stdin.isatty()
    history: list[tuple[str, str]] = []
    answers = 0
    print(f"chat ready ({predictor.family.template} format); {HELP}", file=stderr, flush=True)
    while True:
        line = _read_message(stdin, stdout, interactive)
        if line is None:  # end of input
            break
        message = line.rstrip("\r\n")
        command = message.strip().lower()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/clear":
            history.clear()
            print("(conversation cleared)", file=stderr, flush=True)
            continue
        if command in ("/help", "/?"):
            print(HELP, file=stderr, flush=True)
            continue
        if interactive:
            print("助手> ", end="", file=stdout, flush=True)
        try:
            answer = _print_stream(predictor.stream(message, history), stdout)
        except GlmtuneError as exc:  # a message too long for the context: say so, keep chatting
            print(f"\nerror: {exc}", file=stderr, flush=True)
            continue
        history.append((message, answer))
        answers += 1
    return answers


def _read_message(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    if interactive and stdin is sys.stdin and stdout is sys.stdout:
        try:
            return input("\n用户> ")  # input() gives line editing at a terminal
        except EOFError:
            print(file=stdout)
            return None
    if interactive:
        print("\n用户> ", end="", file=stdout, flush=True)
    line = stdin.readline()
    return line or None


def _print_stream(pieces, stdout: TextIO) -> str:
    """Print pieces as they come, holding back trailing whitespace until more text follows,
    so what is printed is exactly the stripped answer that goes into the history."""
    printed, pending = [], ""
    for piece in pieces:
        text = pending + piece
        shown = text.rstrip()
        pending = text[len(shown):]
        if shown:
            printed.append(shown)
            print(shown, end="", file=stdout, flush=True)
    print(file=stdout, flush=True)
    return "".join(printed)
