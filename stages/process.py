"""DVC stage `process@{pretrain,sft}`: load a corpus, clean it, split it.

    python stages/process.py pretrain|sft

Reads `process.<corpus>` and `process.num_proc` (worker processes, 0 = all cores) from
params.yaml (in the current directory) and writes
`data/processed/<corpus>/{train,validation,test}.jsonl` + `stats.json` (docs/FORMATS.md), all at
once or not at all. Any error is one line `error: ...` on stderr and exit status 2; set
MINIGPT_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minigpt: the code DVC tracks

from minigpt.config import load_params  # noqa: E402
from minigpt.data import process_pretrain, process_sft  # noqa: E402
from minigpt.sources import SPLITS  # noqa: E402
from minigpt.stage import run_corpus_stage  # noqa: E402

CORPORA = ("pretrain", "sft")
OUT_ROOT = Path("data/processed")


def run(corpus: str) -> dict:
    """Process one corpus into its fixed output directory; return its statistics."""
    params = load_params().process
    process = process_pretrain if corpus == "pretrain" else process_sft
    return process(getattr(params, corpus), OUT_ROOT / corpus, params.num_proc)


def summary(corpus: str, stats: dict, seconds: float) -> str:
    unit = "documents" if corpus == "pretrain" else "examples"
    parts = [f"{s} {stats[s][unit]:,} {unit} / {stats[s]['bytes']:,} bytes" for s in SPLITS]
    dropped = ", ".join(f"{k} {v:,}" for k, v in stats["dropped"].items() if v) or "none"
    return (f"process@{corpus}: {'; '.join(parts)}; dropped: {dropped} "
            f"-> {OUT_ROOT / corpus} ({seconds:.1f}s)")


def main(argv: list[str] | None = None) -> int:
    return run_corpus_stage(argv, "process.py", CORPORA, run, summary)


if __name__ == "__main__":
    sys.exit(main())
