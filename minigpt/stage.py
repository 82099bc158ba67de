"""What every stage script shares: its summary line on success, one `error:` line on failure.

A failed stage must tell the user what to fix in one line (naming the file, field or parameter),
not dump a traceback, and exit with status 2 so DVC stops. The library's own errors subclass
ValueError (bad input) or RuntimeError (training, checkpoints), so their messages print as they
are; anything else keeps its type name. MINIGPT_DEBUG=1 re-raises for developers. Under torchrun
the failing rank is named, since every rank reports its own failure.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable


def run_stage(body: Callable[[], str | None]) -> int:
    """Run `body`, print the summary line it returns (None prints nothing); return an exit status."""
    try:
        line = body()
    except Exception as e:  # every failure is reported the same way: one line, status 2
        if os.environ.get("MINIGPT_DEBUG"):
            raise
        ours = isinstance(e, (ValueError, RuntimeError, OSError))
        message = str(e) if ours else f"{type(e).__name__}: {e}"
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        print(f"error{where}: {' '.join(message.split())}", file=sys.stderr)
        return 2
    if line:
        print(line)
    return 0


def corpus_arg(argv: list[str] | None, script: str, corpora: tuple[str, ...]) -> str | None:
    """The one `pretrain|sft` argument of a foreach stage, or None after printing the usage."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in corpora:
        print(f"usage: python stages/{script} {'|'.join(corpora)}", file=sys.stderr)
        return None
    return argv[0]


def run_corpus_stage(argv: list[str] | None, script: str, corpora: tuple[str, ...],
                     run: Callable[[str], object], summary: Callable[[str, object, float], str]) -> int:
    """main() of a foreach stage (`python stages/SCRIPT pretrain|sft`): run(corpus), then print
    summary(corpus, its result, wall seconds)."""
    corpus = corpus_arg(argv, script, corpora)
    if corpus is None:
        return 2
    start = time.perf_counter()
    return run_stage(lambda: summary(corpus, run(corpus), time.perf_counter() - start))
