"""Where a document goes and what is counted: stable hash splits, the split files' JSONL
lines and their statistics. Shared by the `process` stage's pre-training and SFT paths
(`minigpt.data`) and its workers.

- Splits are carved by a stable hash (SHA-256) of the document, never an RNG: no dependence on
  order, seeds, versions or worker count; adding documents never moves existing ones.
- JSONL escapes U+2028, U+2029 and U+0085, where `str.splitlines()` would break a line.
- Statistics add up across pieces (`SplitStats.merge`), so N workers report what one does.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from minigpt.sources import DataError


# --------------------------------------------------------------------------------------------
# Stable hashing and splits
# --------------------------------------------------------------------------------------------

def stable_fraction(key: str) -> float:
    """Map a string to [0, 1) with SHA-256: the same on every machine, run and Python version
    (unlike `hash()`, which is salted per process)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    # The top 53 bits: exactly representable in a float, so the result is always < 1.0.
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53


def assign_split(key: str, validation_fraction: float, test_fraction: float,
                 candidates: Sequence[str] = ("validation", "test")) -> str:
    """The split of a document or example, by a stable hash of `key`.

    [0, validation_fraction) -> validation, then [.., + test_fraction) -> test, else train.
    `candidates` lists the splits that may be carved (those the source lacks); the bands stay
    where they are either way, so carving only test never moves documents into validation."""
    u = stable_fraction(key)
    if u < validation_fraction:
        return "validation" if "validation" in candidates else "train"
    if u < validation_fraction + test_fraction:
        return "test" if "test" in candidates else "train"
    return "train"


def sft_split_key(instruction: str, context: str) -> str:
    """What an SFT example's split is hashed on: the prompt only, so every answer to one prompt
    lands in the same split. JSON makes the pair unambiguous (no separator can collide)."""
    return json.dumps([instruction, context], ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Output: split files and statistics
# --------------------------------------------------------------------------------------------

def jsonl_line(record: dict) -> str:
    # ensure_ascii=False keeps text readable; these three are escaped because splitlines()
    # would break a line at them (json already escapes every control character below U+0020).
    line = json.dumps(record, ensure_ascii=False)
    return line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")


Measures = tuple[int, int, int]  # characters, UTF-8 bytes, whitespace words
Prepared = tuple[str, Optional[str], Measures]  # split, JSONL line (None: empty), measures


def measure(text: str) -> Measures:
    return len(text), len(text.encode("utf-8")), count_words(text)


@dataclass
class SplitStats:
    """Running totals for one split."""

    count: int = 0
    characters: int = 0
    bytes: int = 0
    words: int = 0
    dropped: Counter = field(default_factory=Counter)

    def add(self, measures: Measures) -> None:
        self.count += 1
        self.characters += measures[0]
        self.bytes += measures[1]
        self.words += measures[2]

    def merge(self, other: "SplitStats") -> None:
        self.count += other.count
        self.characters += other.characters
        self.bytes += other.bytes
        self.words += other.words
        self.dropped.update(other.dropped)

    def to_dict(self, unit: str, reasons: Sequence[str]) -> dict:
        return {unit: self.count, "characters": self.characters, "bytes": self.bytes,
                "words": self.words, "dropped": {r: self.dropped[r] for r in reasons}}


def count_words(text: str, chunk: int = 2**20) -> int:
    """`len(text.split())` without building the list of words (a 100 MB document's list alone
    is ~1 GB): count chunk by chunk, minus the words a chunk boundary cut in two."""
    if len(text) <= chunk:
        return len(text.split())
    n = 0
    for i in range(0, len(text), chunk):
        n += len(text[i:i + chunk].split())
        if i and not text[i - 1].isspace() and not text[i].isspace():
            n -= 1
    return n


class SplitWriter:
    """Writes one split's JSONL file and keeps its statistics."""

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("w", encoding="utf-8", newline="\n")
        self.stats = SplitStats()

    def write_line(self, line: str, measures: Measures) -> None:
        """Write one JSONL line (`jsonl_line`); `measures`: of the text the statistics count."""
        self.file.write(line)
        self.file.write("\n")  # not `+ "\n"`: that would copy a huge document's line once more
        self.stats.add(measures)

    def drop(self, reason: str) -> None:
        self.stats.dropped[reason] += 1

    def close(self) -> None:
        self.file.close()


def require_nonempty(stats: dict[str, SplitStats], source: str, unit: str,
                      hashed: Sequence[str], cfg: Any) -> None:
    """Later stages cannot train or evaluate on an empty split: fail here, naming the cause.
    A split filled by hashing (`hashed`) may be empty only when its fraction is 0 (asked for)."""
    total = sum(st.count for st in stats.values())
    for split, st in stats.items():
        if st.count:
            continue
        fraction = getattr(cfg, f"{split}_fraction", None)
        if split in hashed and fraction == 0:
            continue
        dropped = sum(st.dropped.values())
        why = f"; {dropped} dropped" if dropped else ""
        if split in hashed:
            why += (f"; {total} {unit} in all are too few for {split}_fraction={fraction}: "
                    f"raise it or add data")
        raise DataError(f"{source}: no {unit} in the {split} split{why}")


def total_dropped(stats: dict[str, SplitStats], reasons: Sequence[str]) -> dict[str, int]:
    return {r: sum(st.dropped[r] for st in stats.values()) for r in reasons}
