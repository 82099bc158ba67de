"""A training run's record: its `History` (what a resume restores besides weights and RNG), the
TSV curves written from it, and the summary metrics computed from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minigpt.files import atomic_write_bytes

# summary entries that depend on the machine and the session, not on deps and params: in the
# metrics JSON only, never in the model directory's config.json (a DVC out that other stages hash)
RUN_DEPENDENT = ("tokens_per_s", "mfu", "train_time_s", "time_s", "resumed_from_step")
TRAIN_COLUMNS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu")
VAL_COLUMNS = ("step", "tokens", "val_loss")


@dataclass
class History:
    """Everything besides weights/optimizer/RNG that a resume restores (plain values only)."""

    step: int = 0
    tokens: int = 0
    train_time: float = 0.0  # seconds inside timed training steps (evals, saves excluded)
    timed_tokens: int = 0  # tokens of those steps (a session's first step, with its
    # torch.compile / allocator warm-up, is not timed)
    wall_time: float = 0.0  # seconds of the whole loop, over all sessions
    train_rows: list = field(default_factory=list)  # rows of TRAIN_COLUMNS
    val_rows: list = field(default_factory=list)  # rows of VAL_COLUMNS
    best_val: float = math.inf
    best_step: int = -1
    evals_since_best: int = 0
    stopped_early: bool = False
    skipped_steps: int = 0  # fp16: steps skipped because the loss scale overflowed


def write_curves(h: History, curves_dir: Path) -> None:
    """curves_dir/{train,val}.tsv from the history's rows, each replaced atomically."""
    _write_tsv(curves_dir / "train.tsv", TRAIN_COLUMNS, h.train_rows)
    _write_tsv(curves_dir / "val.tsv", VAL_COLUMNS, h.val_rows)


def _write_tsv(path: Path, columns: tuple, rows: list) -> None:
    lines = ["\t".join(columns)] + ["\t".join(_fmt(v) for v in row) for row in rows]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _fmt(v: Any) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"


def run_summary(h: History, model: torch.nn.Module, flops_per_token: float, peak_flops: float,
                scaler: torch.amp.GradScaler | None, resumed_from: int | None) -> dict:
    """The run's metrics: losses, throughput, MFU (0 where the peak is unknown), size, timings."""
    tps = h.timed_tokens / h.train_time if h.train_time > 0 else 0.0
    vals = [r[2] for r in h.val_rows]
    return {
        "steps": h.step,
        "tokens": h.tokens,
        "train_loss": h.train_rows[-1][2] if h.train_rows else None,
        "first_val_loss": vals[0] if vals else None,
        "val_loss": vals[-1] if vals else None,
        "best_val_loss": h.best_val if vals else None,
        "best_step": h.best_step,
        "tokens_per_s": round(tps, 1),
        "mfu": round(flops_per_token * tps / peak_flops, 4) if peak_flops else 0.0,
        "params": model.num_params(),
        "params_non_embedding": model.num_params(non_embedding=True),
        "flops_per_token": flops_per_token,
        "train_time_s": round(h.train_time, 2),
        "time_s": round(h.wall_time, 2),
        "stopped_early": int(h.stopped_early),
        "resumed_from_step": resumed_from,
        "skipped_steps": h.skipped_steps,  # fp16 overflows (0 in bf16/fp32)
        "loss_scale": scaler.get_scale() if scaler is not None else None,
    }
