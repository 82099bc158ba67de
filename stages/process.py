"""DVC stage `process@{pretrain,sft}`: load a corpus, clean it, split it.

    python stages/process.py pretrain|sft

Reads `process.<corpus>` and `process.num_proc` (worker processes, 0 = all cores) from
params.yaml (in the current directory) and writes
`data/processed/<corpus>/{train,validation,test}.jsonl` + `stats.json` (docs/FORMATS.md), all at
once or not at all. Any error is one line `error: ...` on stderr and exit status 2; set
MINIGPT_DEBUG=1 to get the traceback instead.

A local source outside `raw/` (the only local path dvc.yaml declares as a dependency) gets one
`warning:` line: DVC does not track it, so editing it would leave stale outputs. Copy it under raw/
and `dvc add` it, or `dvc import-url` it to a path under raw/ (raw/README.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minigpt: the code DVC tracks

from minigpt.config import load_params  # noqa: E402
from minigpt.data import process_pretrain, process_sft  # noqa: E402
from minigpt.sources import SPLITS, resolve_source  # noqa: E402
from minigpt.stage import run_corpus_stage  # noqa: E402

CORPORA = ("pretrain", "sft")
OUT_ROOT = Path("data/processed")
RAW = Path("raw")  # the process stages' dependency for local sources (dvc.yaml)


def untracked_warning(corpus: str, source: str) -> str | None:
    """The warning for a local source DVC does not track (outside raw/), else None."""
    path = resolve_source(source)
    if path is None:
        return None  # a hub id: pinned by `revision`, not a file
    raw = os.path.abspath(RAW)
    if os.path.commonpath([os.path.abspath(path), raw]) == raw:
        return None
    return (f"warning: process.{corpus}.source {source} is outside raw/, so DVC does not track it: "
            f"editing it will not re-run process@{corpus} (copy it under raw/ and `dvc add` it, or "
            "`dvc import-url` it to raw/; see raw/README.md)")


def run(corpus: str) -> dict:
    """Process one corpus into its fixed output directory; return its statistics."""
    params = load_params().process
    warning = untracked_warning(corpus, getattr(params, corpus).source)
    if warning:
        print(warning, file=sys.stderr)
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
