"""DVC stage `encode@{pretrain,sft}`: processed JSONL -> token files.

    python stages/encode.py pretrain|sft

Reads `encode` (batch size, worker processes) from params.yaml (in the current directory), the
tokenizer from `data/tokenizer/tokenizer.json` and
`data/processed/<corpus>/{train,validation,test}.jsonl`, and writes `data/tokens/<corpus>/`
(docs/FORMATS.md) all at once or not at all. Any error is one line
`error: ...` on stderr and exit status 2; set MINIGPT_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minigpt: the code DVC tracks

from minigpt.config import load_params  # noqa: E402
from minigpt.encode import CORPORA, TokenStats, encode_corpus, set_threads  # noqa: E402
from minigpt.stage import run_corpus_stage  # noqa: E402

TOKENIZER = Path("data/tokenizer/tokenizer.json")
PROCESSED = Path("data/processed")
OUT_ROOT = Path("data/tokens")


def run(corpus: str) -> list[TokenStats]:
    cfg = load_params().encode
    set_threads(1)  # one tokenizer thread per process: the encode.num_proc workers use the cores
    return encode_corpus(corpus, PROCESSED / corpus, TOKENIZER, OUT_ROOT / corpus, cfg.batch_size,
                         num_proc=cfg.num_proc)


def summary(corpus: str, stats: list[TokenStats], seconds: float) -> str:
    unit = "documents" if corpus == "pretrain" else "examples"
    parts = [f"{s.split} {s.tokens:,} tokens / {s.items:,} {unit}" for s in stats]
    tokens = sum(s.tokens for s in stats)
    mb = sum(s.bytes_in for s in stats) / 1e6
    busy = sum(s.seconds for s in stats) or 1e-9
    return (f"encode@{corpus}: {'; '.join(parts)} -> {OUT_ROOT / corpus} ({seconds:.1f}s, "
            f"{tokens / busy / 1e6:.2f}M tokens/s, {mb / busy:.1f} MB/s)")


def main(argv: list[str] | None = None) -> int:
    return run_corpus_stage(argv, "encode.py", CORPORA, run, summary)


if __name__ == "__main__":
    sys.exit(main())
