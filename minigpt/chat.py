"""`minigpt chat`: the multi-turn conversation loop over a loaded model.

Design choices
- The conversation stays within the context: before each answer, while the encoded conversation
  plus `--max_new_tokens` exceeds `block_size`, the oldest turn is dropped for good (the system
  message stays) and the user told; the room kept for the answer is at most half the context.
- Ctrl-C stops an answer (its partial text stays in the history), Ctrl-D or `/quit` leaves,
  `/reset` starts over.
- On a terminal, input() with readline editing and history (~/.minigpt_history). Non-tty stdin is
  read line by line, as bytes (a line that is not UTF-8 is refused naming its number), and notices
  go to stderr, so the chat can be scripted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from minigpt.answers import prompt_budget
from minigpt.engine import (Loaded, Sampling, TextStream, UsageError, fit_conversation,
                            make_generator, stream_ids, utf8_text, write_out)

HISTORY_FILE = Path("~/.minigpt_history")
QUIT_COMMANDS = ("/quit", "/exit")
CHAT_HELP = "commands: /reset (start over), /quit or Ctrl-D (leave), Ctrl-C (stop the answer)"


def _stdin_reader() -> Callable[[], str]:
    """Plain line reads from a non-tty stdin; a line that is not UTF-8 is a UsageError."""
    number = 0

    def read() -> str:
        nonlocal number
        stream = getattr(sys.stdin, "buffer", sys.stdin)  # bytes: a bad line is reported
        raw = stream.readline()
        number += 1
        if not raw:
            raise EOFError
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as e:
            raise UsageError(f"stdin line {number} is not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                             f"at byte {e.start + 1})") from None
        return line.rstrip("\r\n")

    return read


def _line_reader(interactive: bool) -> Callable[[], str]:
    """input() with readline editing and history on a terminal; plain line reads otherwise."""
    if not interactive:
        return _stdin_reader()
    try:
        import atexit
        import readline  # noqa: F401  (importing it gives input() line editing and history)

        history = HISTORY_FILE.expanduser()
        try:
            readline.read_history_file(history)
        except OSError:
            pass  # first run, or an unreadable file: start without history
        readline.set_history_length(1000)
        atexit.register(_save_history, readline, history)
    except ImportError:
        pass  # Windows without pyreadline: plain input() still works
    return lambda: utf8_text(input(">>> "), "input")


def _save_history(readline, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass  # history is a convenience; never fail on exit because of it


def _reply(m: Loaded, ids: list[int], settings: Sampling, generator) -> str:
    """Stream one answer; Ctrl-C stops it and returns what was generated until then."""
    stream = TextStream(m.tok)
    try:
        stream_ids(m, ids, settings, generator, stream)
        write_out("\n")
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
    m.flush_notices()
    return stream.text()


def chat(m: Loaded, settings: Sampling, system: str | None) -> None:
    """Talk with `m` on stdin/stdout until Ctrl-D or /quit; `system` is kept on /reset."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    # Room kept free for the answer: max_new_tokens, but at most half the context, so a long
    # --max_new_tokens does not wipe the history every turn (a longer answer slides the window).
    block_size = m.model.config.block_size
    limit = prompt_budget(block_size, settings.max_new_tokens)  # the rule evaluation keeps too
    generator = make_generator(settings.seed, m.device)
    interactive = sys.stdin.isatty()
    read = _line_reader(interactive)
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            text = read().strip()
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: drop the line, like a shell; Ctrl-D leaves
            print(file=sys.stderr)
            continue
        if text in QUIT_COMMANDS:
            break
        if text == "/reset":
            messages = list(start)
            print("[conversation cleared]", file=sys.stderr)
        elif text in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
        elif text:
            messages.append({"role": "user", "content": text})
            ids, dropped = fit_conversation(m.tok, messages, limit)
            if dropped:
                print(f"[dropped the oldest {dropped} turn(s) to fit the {block_size}-token "
                      "context]", file=sys.stderr)
            messages.append({"role": "assistant", "content": _reply(m, ids, settings, generator)})
    if interactive:
        print(file=sys.stderr)  # leave the shell prompt on its own line after Ctrl-D
