"""Will a training micro-batch fit in memory: refuse it in one line before allocating it.

What autograd keeps for backward is measured on one and two sequences of the real model (eval mode,
no RNG drawn) and scaled to `batch_size`, plus a gradient and one optimizer moment per parameter:
a lower bound of a step's peak, compared with what the device has free (`available_memory`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from minigpt.checkpoint import unwrap
from minigpt.train import TrainingError, section

if TYPE_CHECKING:
    from minigpt.config import TrainConfig
    from minigpt.runtime import Runtime


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate on `device`, or None where that is unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def _saved_bytes(model: torch.nn.Module, rows: int, rt: Runtime) -> int:
    """Bytes of the tensors autograd keeps for backward after a forward of `rows` full sequences
    (parameters excluded: they exist already)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    T = model.config.block_size
    x = torch.zeros((rows, T), dtype=torch.long, device=rt.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rt.autocast():
        model(x, x)
    return sum(seen.values())


def check_batch_fits(model: torch.nn.Module, cfg: TrainConfig, rt: Runtime) -> None:
    """Refuse a micro-batch whose activations cannot fit in memory, before allocating them.

    What autograd keeps per sequence is measured on 1 and 2 sequences (eval mode: no RNG drawn;
    the difference excludes per-step constants such as autocast's weight copies), scaled to
    batch_size, plus a gradient and one optimizer moment per parameter: a lower bound of a step's
    peak. CPU ranks of one node share its memory."""
    available = available_memory(rt.device)
    if available is None:
        return
    was_training = model.training
    model.eval()
    try:
        one, two = _saved_bytes(model, 1, rt), _saved_bytes(model, 2, rt)
    finally:
        model.train(was_training)
    per_seq = max(two - one, 0)
    need = max(one - per_seq, 0) + per_seq * cfg.batch_size + 8 * unwrap(model).num_params()
    if rt.device.type == "cpu":
        need *= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if need > available:
        key = section(cfg)
        raise TrainingError(
            f"{key}.batch_size: {cfg.batch_size} sequences of {model.config.block_size} tokens "
            f"need at least {need / 2**30:.1f} GiB on {rt.device}, {available / 2**30:.1f} GiB is "
            f"available; lower it (raise {key}.grad_accum to keep the batch)")
