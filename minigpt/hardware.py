"""What the hardware at hand runs natively: CPU instruction-set flags, bf16/fp16 units, GPU
generations. Both the precision choice (`minigpt.precision`) and the MFU peak (`minigpt.mfu`)
read these probes, so a test that fakes a CPU patches them here once."""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the only CPUs where bf16 autocast beats fp32 (`minigpt.precision`)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_fp16() -> bool:
    """AVX512-FP16 or AMX-FP16: CPUs with fp16 arithmetic (elsewhere it is converted in software)."""
    return bool({"avx512_fp16", "amx_fp16"} & cpu_flags())


def cuda_has_bf16(device: torch.device) -> bool:
    """bf16 tensor cores: compute capability 8.0 (Ampere) and later. Not `is_bf16_supported()`,
    which also answers True where bf16 is only emulated (sm_75, T4)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def mps_has_grad_scaler() -> bool:
    """GradScaler runs on MPS from torch 2.8 (its unscale used float64 before)."""
    return torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)
