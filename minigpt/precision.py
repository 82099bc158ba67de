"""Which precision a process computes in: autocast dtype, fp16 loss scaling, oneDNN for fp32.

Design choices (the measurements behind them: docs/EXPERIMENTS.md, bench/train_throughput.py)
- dtype `auto` is bf16 autocast only where the hardware runs bf16 natively (CUDA compute >= 8.0,
  CPUs with AVX512-BF16/AMX): an emulated bf16 matmul is orders of magnitude slower than fp32.
  Older CUDA GPUs and MPS (where torch supports GradScaler) get fp16 with dynamic loss scaling
  (`grad_scaler`); other CPUs fp32. An explicit bf16/fp16 without hardware support warns once
  (`warn_emulated`). Evaluation (`eval_dtype`) keeps CPUs in fp32 so a metric does not move
  with the machine's instruction set.
- CPU fp32 matmuls go to oneDNN only after a short probe shows it faster *and* fp32-exact on the
  machine at hand (`probe_onednn_fp32`): on some CPUs it is faster but does bf16 math.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext

import torch

from minigpt.hardware import cpu_has_bf16, cpu_has_fp16, cuda_has_bf16, mps_has_grad_scaler

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the autocast dtypes


def autocast(device: torch.device, dtype: str):
    """bf16/fp16 autocast when dtype is one of them, else a no-op context."""
    if dtype not in HALF:
        return nullcontext()
    return torch.autocast(device.type, dtype=HALF[dtype])


def grad_scaler(device: torch.device, dtype: str) -> torch.amp.GradScaler | None:
    """Dynamic loss scaling for fp16 (its 5-bit exponent underflows small gradients); None else."""
    return torch.amp.GradScaler(device.type) if dtype == "fp16" else None



def resolve_dtype(name: str, device: torch.device, where: str = "dtype") -> str:
    """`auto` -> the fastest precision this hardware runs natively (module docstring); an explicit
    one is kept, with one warning line (`warn_emulated`) when the hardware only emulates it."""
    if name != "auto":
        warn_emulated(name, device, where)
        return name
    if device.type == "cuda":
        return "bf16" if cuda_has_bf16(device) else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    if device.type == "mps":
        return "fp16" if mps_has_grad_scaler() else "fp32"
    return "fp32"


_warned: set[str] = set()


def warn_emulated(dtype: str, device: torch.device, where: str = "dtype") -> None:
    """One stderr line (once per process and setting) when `dtype` is asked for on hardware that
    only emulates it: bf16/fp16 on a CPU without their instructions (a bf16 matmul on an AVX2 CPU
    runs far slower than fp32: docs/EXPERIMENTS.md), bf16 on a CUDA GPU before compute 8.0."""
    if device.type == "cpu" and dtype == "bf16" and not cpu_has_bf16():
        why, better = "this CPU has no native bf16 (no avx512_bf16/amx_bf16 flags)", "fp32 or auto"
    elif device.type == "cpu" and dtype == "fp16" and not cpu_has_fp16():
        why, better = "this CPU has no native fp16 (no avx512_fp16/amx_fp16 flags)", "fp32 or auto"
    elif device.type == "cuda" and dtype == "bf16" and not cuda_has_bf16(device):
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        why, better = f"this GPU (compute capability {cap}) has no native bf16", "fp16 or auto"
    else:
        return
    if where in _warned or int(os.environ.get("RANK", 0)) != 0:
        return
    _warned.add(where)
    print(f"warning: {where} {dtype}: {why}, so it is emulated and runs much slower; "
          f"set {where}: {better}", file=sys.stderr, flush=True)


def eval_dtype(device: torch.device) -> str:
    """Evaluation's precision: bf16 on CUDA GPUs that run it natively, fp32 everywhere else (CPUs
    too, so a metric does not move because the machine has another instruction set; no fp16,
    whose range a forward pass without loss scaling could overflow)."""
    return "bf16" if device.type == "cuda" and cuda_has_bf16(device) else "fp32"


def _median_time(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2]


def probe_onednn_fp32() -> bool:
    """Enable oneDNN for CPU fp32 matmuls iff it is faster here AND still fp32-exact."""
    backend = torch.backends.mkldnn.matmul
    if not hasattr(backend, "fp32_precision"):
        return False
    before = backend.fp32_precision
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 768, generator=g), torch.randn(768, 1024, generator=g)
    ref = a.double() @ b.double()
    default = _median_time(lambda: a @ b)
    backend.fp32_precision = "bf16"
    try:
        onednn = _median_time(lambda: a @ b)
        err = ((a @ b).double() - ref).abs().max().item() / ref.abs().max().item()
    finally:
        backend.fp32_precision = before
    if onednn < 0.8 * default and err < 1e-4:
        backend.fp32_precision = "bf16"
        return True
    return False
