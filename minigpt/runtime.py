"""Where a process computes: device, DDP from torchrun's env, one resolved `Runtime` per trainer.

Design choices
- One device picker (`resolve_device`) for training, evaluation, CLI and server: `auto` is
  cuda > mps > cpu; an explicit device must exist (a one-line `DeviceError` naming the setting).
- `setup_runtime` resolves the device and the precision (`minigpt.precision`), the MFU peak
  (`minigpt.mfu`), tunes the process (`minigpt.host`) and seeds it.
- DDP from torchrun's env only when WORLD_SIZE > 1; nccl on CUDA, gloo on CPU, where ranks split
  the cores. A trainer dies with its parent (`host.die_with_parent`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from minigpt import hardware
from minigpt.host import die_with_parent, keep_freed_memory
from minigpt.mfu import peak_flops
from minigpt.precision import autocast, probe_onednn_fp32, resolve_dtype

if TYPE_CHECKING:
    from minigpt.config import TrainConfig


class DeviceError(ValueError):
    """The requested device does not exist here; the message is one line naming the setting."""


@dataclass
class Runtime:
    """Where and how this process trains."""

    device: torch.device
    dtype: str  # resolved: "bf16" / "fp16" (autocast) or "fp32"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    peak_flops: float = 0.0  # whole job (all ranks); 0 = unknown, MFU logged as 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """bf16/fp16 autocast when dtype is one of them, else a no-op context."""
        return autocast(self.device, self.dtype)


def resolve_device(name: str, local_rank: int | None = None, where: str = "device") -> torch.device:
    """`auto` -> cuda > mps > cpu; an explicit device must exist, else DeviceError naming `where`.

    local_rank (training under torchrun) picks the GPU for `auto` and a bare `cuda`; without it
    they stay index-less (`cuda`), as the CLI and evaluation use them."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
        return torch.device("mps" if has_mps else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{where} {name}: CUDA is not available on this machine")
        index = name.partition(":")[2]
        if index.isdigit() and int(index) >= torch.cuda.device_count():
            raise DeviceError(f"{where} {name}: only {torch.cuda.device_count()} CUDA device(s)")
        if not index and local_rank is not None:
            return torch.device("cuda", local_rank)
    if name == "mps" and not has_mps:
        raise DeviceError(f"{where} mps: MPS is not available on this machine")
    return torch.device(name)


def setup_runtime(cfg: TrainConfig, section: str = "pretrain") -> Runtime:
    """Resolve device/dtype, init DDP from torchrun's env when WORLD_SIZE > 1, seed everything.
    `section` (pretrain / finetune) names the params key in a warning or a device error.

    All ranks get the same seed here, so models built right after are identical everywhere.
    Arms `die_with_parent`: a trainer never outlives the command that started it."""
    die_with_parent()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = resolve_device(cfg.device, local_rank, where=f"{section}.device")
    dtype = resolve_dtype(cfg.dtype, device, f"{section}.dtype")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that remain
    if device.type == "cpu" and world_size > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // local_world))
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cpu" and dtype == "fp32" and "avx512f" in hardware.cpu_flags():
        probe_onednn_fp32()  # only AVX-512 CPUs ever won with it (docs/EXPERIMENTS.md)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)
    return Runtime(device=device, dtype=dtype, rank=rank, local_rank=local_rank,
                   world_size=world_size, peak_flops=peak_flops(device, dtype, world_size))


def teardown(rt: Runtime) -> None:
    """Leave the process group (no-op without DDP). No barrier: after an error on one rank the
    others may never arrive; torchrun stops the remaining workers when one fails."""
    if rt.ddp and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run on one intra-op thread on CPU, restoring the setting after: the eval workers, one per
    core, each running small ops whose parallel regions would wait for a second thread to be
    scheduled (perplexity.summed_batches). Decoding chooses per step instead (sample.StepThreads)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
