"""What fine-tuning adds around `train.fit`: the base model's checks, its dropout, the data report.

Design choices
- The architecture (block_size included) comes from the base model's config.json; only dropout
  is re-set (`with_dropout`), by rebuilding the GPT with that config and loading the weights, so
  the shipped model's config.json says the dropout it was tuned with.
- The SFT tokens must have been encoded with the base model's tokenizer (same hash);
  anything else would train on ids that mean other strings, so `check_tokenizer` refuses.
- The metrics hold what the data side did next to fit's summary (`data_report`): examples used /
  dropped / truncated per split, and the padding fraction of both batching strategies on the
  train split (`sft.batching_stats`), so the choice of `finetune.packing` is measured, not guessed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from minigpt import sft
from minigpt.config import FinetuneConfig
from minigpt.model import GPT


class FinetuneError(ValueError):
    """The inputs cannot be fine-tuned together; the message is one line."""


def check_tokenizer(base: dict, sidecars: dict[str, dict], tokens_dir: Path, base_dir: Path) -> str:
    """The base model's tokenizer hash, if every SFT split was encoded with it; else refuse."""
    want = base.get("tokenizer_hash")
    for split, meta in sidecars.items():
        got = meta.get("tokenizer_hash")
        if got != want:
            raise FinetuneError(
                f"{tokens_dir / split}.json was encoded with tokenizer {got}, but {base_dir} was "
                f"trained with tokenizer {want}; re-run `dvc repro` so both use data/tokenizer")
    return want


def with_dropout(model: GPT, dropout: float) -> GPT:
    """The same weights in a GPT whose config has `dropout` (on attention and MLP outputs)."""
    tuned = GPT(dataclasses.replace(model.config, dropout=dropout))
    tuned.load_state_dict(model.state_dict())
    return tuned


def data_report(splits: dict[str, sft.SFTSplit], cfg: FinetuneConfig) -> dict:
    """Per-split example counts and both strategies' padding on the train split."""
    report: dict = {name: split.stats() for name, split in splits.items()}
    train = splits["train"]
    report["batching"] = {
        "packing": cfg.packing,
        "pad": sft.batching_stats(train, cfg.batch_size, packing=False, seed=cfg.seed),
        "pack": sft.batching_stats(train, cfg.batch_size, packing=True, seed=cfg.seed),
    }
    used = report["batching"]["pack" if cfg.packing else "pad"]
    report["padding_fraction"] = used["padding_fraction"]
    return report
