"""DVC stage `process@{pretrain,sft}`: load a corpus, clean it, split it.

    python stages/process.py pretrain|sft

Reads `process.<corpus>` from params.yaml (in the current directory) and writes
`data/processed/<corpus>/{train,validation,test}.jsonl` + `stats.json` (docs/FORMATS.md), all at
once or not at all. Any error is one line `error: ...` on stderr and exit status 2; set
MINIGPT_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from minigpt.config import ConfigError, load_params
from minigpt.data import SPLITS, DataError, process_pretrain, process_sft

CORPORA = ("pretrain", "sft")
OUT_ROOT = Path("data/processed")


def run(corpus: str) -> dict:
    """Process one corpus into its fixed output directory; return its statistics."""
    cfg = getattr(load_params().process, corpus)
    process = process_pretrain if corpus == "pretrain" else process_sft
    return process(cfg, OUT_ROOT / corpus)


def summary(corpus: str, stats: dict, seconds: float) -> str:
    unit = "documents" if corpus == "pretrain" else "examples"
    parts = [f"{s} {stats[s][unit]:,} {unit} / {stats[s]['bytes']:,} bytes" for s in SPLITS]
    dropped = ", ".join(f"{k} {v:,}" for k, v in stats["dropped"].items() if v) or "none"
    return (f"process@{corpus}: {'; '.join(parts)}; dropped: {dropped} "
            f"-> {OUT_ROOT / corpus} ({seconds:.1f}s)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in CORPORA:
        print(f"usage: python stages/process.py {'|'.join(CORPORA)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        stats = run(argv[0])
    except Exception as e:  # every failure is reported the same way: one line, status 2
        if os.environ.get("MINIGPT_DEBUG"):
            raise
        message = str(e) if isinstance(e, (ConfigError, DataError)) else f"{type(e).__name__}: {e}"
        print(f"error: {' '.join(message.splitlines())}", file=sys.stderr)
        return 2
    print(summary(argv[0], stats, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
