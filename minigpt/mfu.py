"""The peak FLOP/s behind MFU = flops_per_token * tokens/s / peak.

GPU peaks are vendor data sheets (`peak_flops`); a CPU core's peak is FLOPs per cycle from its
flags (`minigpt.hardware`) times a fixed nominal CPU_GHZ, because a VM's /proc/cpuinfo shows the
base clock while its cores boost. Unknown accelerators get 0 (MFU logged as 0).
"""

from __future__ import annotations

import re

import torch

from minigpt import hardware
from minigpt.precision import HALF


CPU_GHZ = 3.75  # nominal clock for CPU peaks: VMs show the base clock, cores boost (docstring)


def cpu_peak_per_core(dtype: str) -> float:
    """Nominal FLOP/s of one CPU core in `dtype` (fp32 or bf16), from its instruction set."""
    flags = hardware.cpu_flags()
    per_cycle = 2 * 2 * (16 if "avx512f" in flags else 8)  # 2 FMA pipes x 2 FLOPs x fp32 lanes
    if dtype == "bf16" and hardware.cpu_has_bf16():
        per_cycle = 1024 if "amx_bf16" in flags else 2 * per_cycle
    return per_cycle * CPU_GHZ * 1e9


def peak_flops(device: torch.device, dtype: str, world_size: int) -> float:
    """Dense peak FLOP/s of the whole job, for MFU: vendor data sheets (bf16 = fp16 tensor cores)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for chip, (half, fp32) in {"H100": (989e12, 494e12), "H200": (989e12, 494e12),
                                   "A100": (312e12, 156e12), "L4": (121e12, 60e12),
                                   "V100": (125e12, 15.7e12), "T4": (65e12, 8.1e12)}.items():
            if re.search(rf"\b{chip}\b", name):  # "NVIDIA L4", not "NVIDIA L40S"
                return (half if dtype in HALF else fp32) * world_size
        return 0.0
    if device.type == "cpu":
        return cpu_peak_per_core(dtype) * torch.get_num_threads() * world_size
    return 0.0
