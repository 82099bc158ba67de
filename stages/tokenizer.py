"""DVC stage `tokenizer`: train the byte-level BPE on the processed pre-training train split.

    python stages/tokenizer.py

Reads `tokenizer` from params.yaml (in the current directory), streams
`data/processed/pretrain/train.jsonl` (never loaded whole; within `max_chars` /
`max_doc_chars`, a hash-drawn sample: `minigpt.tokenizer.TrainingSample`) and writes
`data/tokenizer/tokenizer.json` atomically (docs/FORMATS.md). Only pre-training text is used, so a
change to the SFT corpus never retrains the tokenizer. Any error is one line `error: ...` on stderr
and exit status 2; set MINIGPT_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minigpt: the code DVC tracks

from minigpt.config import load_params  # noqa: E402
from minigpt.stage import run_stage  # noqa: E402
from minigpt.tokenizer import (TokenizerError, TrainingSample, iter_texts, save_tokenizer,  # noqa: E402
                               train_tokenizer)

SOURCE = Path("data/processed/pretrain/train.jsonl")
OUT = Path("data/tokenizer/tokenizer.json")


def run() -> str:
    """Train and save; return the summary line."""
    cfg = load_params().tokenizer
    if not SOURCE.is_file():
        raise TokenizerError(f"{SOURCE}: not found (run `dvc repro process@pretrain`)")
    start = time.perf_counter()
    # A file within the budget in bytes is within it in characters: no counting pass.
    fits = SOURCE.stat().st_size <= cfg.max_chars
    sample = TrainingSample(lambda: iter_texts(SOURCE), cfg.max_chars, cfg.max_doc_chars, fits)
    tok = train_tokenizer(sample, cfg.vocab_size, cfg.min_frequency)
    save_tokenizer(tok, OUT)
    seconds = time.perf_counter() - start
    vocab = tok.get_vocab_size()
    short = f" (corpus too small for {cfg.vocab_size:,})" if vocab < cfg.vocab_size else ""
    of = f" (a sample of {sample.total:,})" if sample.sampled else ""
    return (f"tokenizer: vocab {vocab:,}{short}, trained on {sample.documents:,} documents, "
            f"{sample.characters:,} characters{of} in {seconds:.1f}s -> {OUT}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        print("usage: python stages/tokenizer.py", file=sys.stderr)
        return 2
    return run_stage(run)


if __name__ == "__main__":
    sys.exit(main())
