"""What a model is evaluated on, read from the pipeline's test splits (docs/FORMATS.md paths).

The pre-training test stream is scored as stored, `<|endoftext|>` after each document included,
with one EOT prepended so the first document is predicted like every later one; its byte and word
counts come from the process stage (stats.json). SFT examples are read untruncated, with the
first `generate_examples` questions as text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minigpt.encode import read_meta, read_sft, read_tokens
from minigpt.files import read_objects, str_field
from minigpt.tokenizer import EOT, SPECIAL_TOKENS

EOT_ID = SPECIAL_TOKENS.index(EOT)  # fixed ids (FORMATS.md)


class EvalError(ValueError):
    """Inputs that cannot be evaluated; the message is one line naming the file or key."""


@dataclass
class EvalData:
    """Everything a model is evaluated on (docs/FORMATS.md paths)."""

    tokens: np.ndarray
    """Pre-training test stream with one <|endoftext|> prepended (module docstring), cut
    to the `max_tokens` it is scored on: only that much is read from the memmap."""
    n_bytes: int
    """UTF-8 bytes of the test split's text (stats.json)."""
    n_words: int
    """Whitespace words of the test split's text (stats.json)."""
    sft: list[tuple[np.ndarray, np.ndarray]]
    """Every SFT test example as (ids, mask), untruncated."""
    questions: list[dict] = field(default_factory=list)
    """The first `generate_examples` SFT test rows: instruction, context, response."""
    tokenizer_hash: str = ""
    """The tokenizer the token files were made with; the model must match it."""
    tokens_total: int = 0
    """Tokens in the whole test stream (0: as many as `tokens` holds targets)."""

    def __post_init__(self) -> None:
        self.tokens_total = self.tokens_total or len(self.tokens) - 1


def read_split_size(stats_path: Path, split: str = "test") -> tuple[int, int]:
    """(bytes, words) of a processed split from the process stage's stats.json."""
    import json

    try:
        stats = json.loads(stats_path.read_text())
        entry = stats[split]
        n_bytes, n_words = int(entry["bytes"]), int(entry["words"])
    except FileNotFoundError:
        raise EvalError(f"{stats_path}: not found (run `dvc repro process@pretrain`)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise EvalError(f"{stats_path}: no {split}.bytes / {split}.words ({e!r})") from None
    if n_bytes <= 0 or n_words <= 0:
        raise EvalError(f"{stats_path}: the {split} split is empty ({n_bytes} bytes, {n_words} words)")
    return n_bytes, n_words


def read_questions(path: Path, limit: int) -> list[dict]:
    """The first `limit` rows of a processed SFT split (the same order encode used)."""
    rows: list[dict] = []
    if limit <= 0:
        return rows
    if not path.is_file():
        raise EvalError(f"{path}: not found (run `dvc repro process@sft`)")
    for where, _, obj in read_objects(path):
        rows.append({k: str_field(where, obj, k) for k in ("instruction", "context", "response")})
        if len(rows) == limit:
            break
    return rows


def load_eval_data(tokens_dir: Path, processed_dir: Path, generate_examples: int,
                   max_tokens: int = 0) -> EvalData:
    """Read the test splits: pretrain token stream + sizes, SFT ids/masks, SFT questions.
    `max_tokens` > 0: only the stream's first max_tokens targets are read (the rest stays on disk)."""
    meta = read_meta(tokens_dir / "pretrain" / "test")
    thash = meta.get("tokenizer_hash", "")
    stream = read_tokens(tokens_dir / "pretrain" / "test", thash)
    if len(stream) == 0:
        raise EvalError(f"{tokens_dir / 'pretrain' / 'test.bin'}: no tokens")
    # condition the first document on <|endoftext|> like every other one (module docstring);
    # the EOT is the first context token, so max_tokens targets need max_tokens stream tokens
    kept = stream[:max_tokens] if max_tokens > 0 else stream
    tokens = np.concatenate([np.array([EOT_ID], dtype=stream.dtype), kept])
    n_bytes, n_words = read_split_size(processed_dir / "pretrain" / "stats.json")
    ids, mask, idx, _ = read_sft(tokens_dir / "sft", "test", thash)
    idx = idx.astype(np.int64)
    sft = [(np.asarray(ids[a:b]), np.asarray(mask[a:b])) for a, b in zip(idx[:-1], idx[1:])]
    questions = read_questions(processed_dir / "sft" / "test.jsonl", generate_examples)
    return EvalData(tokens, n_bytes, n_words, sft, questions, thash, tokens_total=len(stream))
