"""Supervised fine-tuning data: truncation, loss masking, batching (padding or packing).

Design choices
- One example is the chat-template ids plus the loss mask `encode` wrote (docs/FORMATS.md): 1 on
  the assistant response and its closing `<|endoftext|>`. x = ids[:-1], y = ids[1:], y = -100
  where mask[1:] == 0, so only response tokens are targets; prompts are context, padding neither.
- Too-long examples are cut with `template.truncate_example(ids, mask, block_size + 1)` (user text
  goes first, never the response); one whose response alone cannot fit is dropped. Both counted.
- Two batching strategies over one `row` abstraction: padding (one example per row) or packing (as
  many as fit in block_size + 1, first-fit in shuffled order, never split). A batch pads its rows
  to its longest with `<|pad|>` inputs and -100 targets. `batching_stats` measures the waste, so
  `finetune.packing` is chosen on numbers (docs/EXPERIMENTS.md).
- Packing trains exactly the padded set of targets (examples are separated by the EOT that closes
  every response; the next `<|user|>` target is masked), BUT attention has no document mask: a
  packed example can attend to earlier ones in its row, context generation never has
  (`cross_example_targets` reports the share). Validation always pads, so the validation loss
  measures the real task whatever `finetune.packing` says.
- Data order: epoch e is `torch.randperm` seeded with seed + e, so an exact resume needs two ints
  (epoch, row cursor). DDP: every rank walks the same global stream of batch_size * world_size
  rows per micro-batch and takes its own contiguous slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from minigpt.template import truncate_example
from minigpt.encode import read_sft
from minigpt.model import IGNORE



class SFTDataError(ValueError):
    """An SFT split that cannot be trained on; the message is one line naming the split."""


@dataclass
class SFTSplit:
    """The usable examples of one encoded split, each at most `block_size + 1` tokens."""

    name: str
    block_size: int
    ids: list[np.ndarray] = field(default_factory=list)  # int64 token ids per example
    masks: list[np.ndarray] = field(default_factory=list)  # bool loss mask per example
    total: int = 0  # examples in the file
    dropped: int = 0  # response (plus its end token) does not fit in block_size + 1 tokens
    truncated: int = 0  # kept, with the end of the user segment cut

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.array([len(a) for a in self.ids], dtype=np.int64)

    def stats(self) -> dict:
        return {"examples": self.total, "used": len(self), "dropped": self.dropped,
                "truncated": self.truncated,
                "target_tokens": int(sum(int(m[1:].sum()) for m in self.masks))}


def fit_example(ids: np.ndarray, mask: np.ndarray, block_size: int
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """Cut one example to `block_size + 1` tokens from the prompt side, or None to drop it."""
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(mask).astype(bool)
    if len(ids) <= block_size + 1:
        return ids, mask
    return truncate_example(ids, mask, block_size + 1)  # numpy in, numpy out; None = drop


def build_split(name: str, examples: Iterable[tuple[np.ndarray, np.ndarray]], block_size: int,
                *, allow_empty: bool = False) -> SFTSplit:
    """Truncate/drop each (ids, mask) example; error if nothing usable is left."""
    split = SFTSplit(name=name, block_size=block_size)
    for ids, mask in examples:
        split.total += 1
        try:
            kept = fit_example(ids, mask, block_size)
        except ValueError as e:  # not in the chat template's shape: the encoding is broken
            raise SFTDataError(f"SFT split '{name}', example {split.total - 1}: {e}") from None
        if kept is None:
            split.dropped += 1
            continue
        if len(kept[0]) < len(ids):
            split.truncated += 1
        if len(kept[0]) < 2 or not kept[1][1:].any():
            # nothing to predict: only possible with a malformed mask; count it as dropped
            split.dropped += 1
            continue
        split.ids.append(kept[0])
        split.masks.append(kept[1])
    if not split.ids and not allow_empty:
        raise SFTDataError(_empty_reason(split))
    return split


def _empty_reason(split: SFTSplit) -> str:
    if split.total == 0:
        return f"SFT split '{split.name}' has no usable examples: the split is empty"
    return (f"SFT split '{split.name}' has no usable examples: all {split.total} are too long "
            f"(the response alone does not fit in block_size={split.block_size} tokens)")


def load_split(data_dir: str | Path, name: str, block_size: int,
               *, allow_empty: bool = False) -> SFTSplit:
    """Read `{data_dir}/{name}.*` (docs/FORMATS.md) and build its usable examples."""
    ids, mask, idx, _meta = read_sft(data_dir, name)
    idx = np.asarray(idx, dtype=np.int64)
    examples = ((ids[idx[i]:idx[i + 1]], mask[idx[i]:idx[i + 1]]) for i in range(len(idx) - 1))
    return build_split(name, examples, block_size, allow_empty=allow_empty)


# ---------------------------------------------------------------------------------------------
# rows and batches


def example_xy(ids, mask) -> tuple[np.ndarray, np.ndarray]:
    """Next-token (x, y) of ids and their loss mask: x = ids[:-1], y = ids[1:] where mask[1:] is 1,
    else -100. mask[j] == 1 means token j is a target (the response and its closing EOT), so the
    target y[j - 1] = ids[j] counts exactly when mask[j] is 1. The one rule for training rows
    (`row_xy`) and evaluation's SFT loss."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids[:-1], np.where(np.asarray(mask[1:], dtype=bool), ids[1:], IGNORE)


def row_xy(split: SFTSplit, members: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate examples into one row; return its inputs and masked targets."""
    ids = np.concatenate([split.ids[i] for i in members])
    mask = np.concatenate([split.masks[i] for i in members])
    return example_xy(ids, mask)


def collate(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad rows to the longest: `pad_id` inputs, -100 targets. Returns int64 (x, y)."""
    width = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.int64)
    for r, (rx, ry) in enumerate(rows):
        x[r, :len(rx)] = torch.from_numpy(rx)
        y[r, :len(ry)] = torch.from_numpy(ry)
    return x, y


def pack(order: list[int], lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """First-fit: put each example (in `order`) into the first row with room, else open a row.

    First-fit wastes far fewer slots than next-fit (close the row as soon as the next example does
    not fit; docs/EXPERIMENTS.md). The scan over open rows is one numpy comparison per example."""
    free = np.zeros(len(order), dtype=np.int64)  # room left in each open row
    rows: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        room = free[:len(rows)] >= n
        r = int(np.argmax(room)) if len(rows) and room.any() else len(rows)
        if r == len(rows):
            rows.append([])
            free[r] = capacity
        rows[r].append(i)
        free[r] -= n
    return rows


def epoch_rows(split: SFTSplit, epoch: int, seed: int, packing: bool) -> list[list[int]]:
    """The rows of one shuffled epoch (deterministic in seed and epoch)."""
    gen = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(split), generator=gen).tolist()
    if not packing:
        return [[i] for i in order]
    rows = pack(order, split.lengths(), split.block_size + 1)
    # first-fit fills early rows with later short examples: shuffle the rows too, so batch order
    # does not follow row creation order (late rows hold the examples nothing else fitted with)
    return [rows[r] for r in torch.randperm(len(rows), generator=gen).tolist()]


class SFTBatches:
    """Endless shuffled training batches of `batch_size` rows for this rank.

    Implements the train-source protocol of `minigpt.train.fit`: `next() -> (x, y)` and an exact
    `state_dict()/load_state_dict()` of plain ints."""

    def __init__(self, split: SFTSplit, batch_size: int, pad_id: int, *, packing: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if len(split) == 0:
            raise SFTDataError(_empty_reason(split))
        self.split, self.batch_size, self.pad_id = split, batch_size, pad_id
        self.packing, self.seed, self.rank, self.world_size = packing, seed, rank, world_size
        self.epoch, self.cursor = 0, 0  # position in the global row stream
        self._rows: list[list[int]] | None = None  # rows of self.epoch, built lazily

    def _take_row(self) -> list[int]:
        if self._rows is None:
            self._rows = epoch_rows(self.split, self.epoch, self.seed, self.packing)
        if self.cursor == len(self._rows):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._rows = epoch_rows(self.split, self.epoch, self.seed, self.packing)
        row = self._rows[self.cursor]
        self.cursor += 1
        return row

    def next_rows(self) -> list[list[int]]:
        """Draw the global micro-batch (identical on every rank); return this rank's slice."""
        rows = [self._take_row() for _ in range(self.batch_size * self.world_size)]
        return rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return collate([row_xy(self.split, r) for r in self.next_rows()], self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._rows = None


def val_batches(split: SFTSplit, batch_size: int, pad_id: int, *, max_batches: int | None = None,
                rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic validation batches: the split in file order, one example per row (never
    packed, so the loss is not conditioned on other examples), first `max_batches` global batches
    or all of them. Each rank gets its slice of every global batch; a rank whose slice of the last
    global batch is empty skips it, so ranks may hold different numbers of batches only when
    the split is smaller than one global batch per rank."""
    step = batch_size * world_size
    batches = []
    for start in range(0, len(split), step):
        if max_batches is not None and len(batches) >= max_batches:
            break
        lo = start + rank * batch_size
        hi = min(lo + batch_size, start + step, len(split))
        if lo < hi:
            batches.append(collate([row_xy(split, [i]) for i in range(lo, hi)], pad_id))
        elif world_size == 1:
            break
    return batches


def batching_stats(split: SFTSplit, batch_size: int, *, packing: bool, seed: int = 0) -> dict:
    """One epoch's batches, measured: wasted slots and how much packing exposes to other examples.

    - padding_fraction: pad slots / all input slots (batches padded to their longest row)
    - target_fraction: trained targets / all input slots
    - cross_example_targets: fraction of targets whose row holds an earlier example (packing only)
    - rows, batches, examples_per_row"""
    rows = epoch_rows(split, 0, seed, packing)
    lengths = split.lengths()
    slots = tokens = targets = exposed = 0
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        widths = [int(lengths[r].sum()) - 1 for r in chunk]  # x is one shorter than the row
        slots += max(widths) * len(chunk)
        tokens += sum(widths)
        for r in chunk:
            counts = [int(split.masks[i][1:].sum()) for i in r]
            targets += sum(counts)
            exposed += sum(counts[1:])
            # the first token of every later example becomes a (masked) target of the row too,
            # and its mask is 0 by construction, so `counts` are the row's targets exactly
    return {"padding_fraction": round(1 - tokens / slots, 4),
            "target_fraction": round(targets / slots, 4),
            "cross_example_targets": round(exposed / max(targets, 1), 4),
            "rows": len(rows), "batches": -(-len(rows) // batch_size),
            "examples_per_row": round(len(split) / len(rows), 3)}
