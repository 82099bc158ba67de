"""Pre-training batches: (x, y) windows of a memory-mapped token file, for training and validation.

The pre-training side of `fit`'s batch-source protocol (minigpt.train's docstring);
`minigpt.sft` is the fine-tuning side (masked, padded or packed rows).

Design choices
- A window is `block_size + 1` consecutive tokens: x = window[:-1], y = window[1:]. Every
  position is a target (no masking): EOT separators are predicted like any other token.
- Training draws random start offsets from a torch.Generator, so a resume is exact from the
  generator's state alone (`state_dict`, safe for `torch.load(weights_only=True)`); the file is
  only memory-mapped (`encode.read_tokens`), never read whole, so a multi-GiB split costs no RSS.
- DDP: each `next()` draws the GLOBAL batch (batch_size * world_size offsets) from a generator
  seeded identically on every rank and returns this rank's slice: N ranks x B == 1 x N*B.
- Validation (`val_windows`) uses fixed, evenly spaced windows over the whole split, so every
  evaluation sees the same tokens and covers the split rather than its beginning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minigpt.encode import read_tokens


class TokenDataError(ValueError):
    """A token file too short for the requested windows; the message names the file."""


def _windows(tokens: np.ndarray, starts: list[int], block_size: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """x = tokens[s:s+T], y = tokens[s+1:s+T+1] for each start s, as int64 (B, T) tensors."""
    w = torch.from_numpy(np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class TokenWindows:
    """Endless random (x, y) windows of `block_size` tokens from a memory-mapped token file.

    Each `next()` draws the GLOBAL batch (batch_size * world_size start offsets) from a generator
    seeded identically on every rank and returns this rank's slice: N ranks x B == 1 x N*B."""

    def __init__(self, bin_path: str | Path, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens = read_tokens(bin_path)  # np.memmap, size checked against the sidecar
        if len(self.tokens) < block_size + 2:
            raise TokenDataError(f"{bin_path}: {len(self.tokens)} tokens, need at least "
                                 f"block_size + 2 = {block_size + 2}")
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        n_starts = len(self.tokens) - self.block_size  # start s needs s + block_size < len
        starts = torch.randint(0, n_starts, (self.batch_size * self.world_size,),
                               generator=self.generator)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return _windows(self.tokens, mine.tolist(), self.block_size)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def val_windows(bin_path: str | Path, block_size: int, batch_size: int, n_batches: int,
                rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's slices of `n_batches` fixed global validation batches (batch_size * world_size
    windows each, rank r taking rows [r*B, (r+1)*B)), so the union over ranks is the same set
    of windows as one process with batch_size * world_size.

    The windows are evenly spaced over the whole file, so every evaluation sees the same tokens
    and covers the split rather than its beginning."""
    tokens = read_tokens(bin_path)
    if len(tokens) < block_size + 1:
        raise TokenDataError(f"{bin_path}: {len(tokens)} tokens, need at least block_size + 1 = "
                             f"{block_size + 1}")
    per_batch = batch_size * world_size
    starts = np.linspace(0, len(tokens) - block_size - 1, n_batches * per_batch).round().astype(int)
    mine = [starts[i * per_batch + rank * batch_size:][:batch_size] for i in range(n_batches)]
    return [_windows(tokens, s.tolist(), block_size) for s in mine]
