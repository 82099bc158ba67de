"""Where and how a process computes: device, precision, DDP, MFU peak, dying with its parent.

Design choices (the measurements behind them: docs/EXPERIMENTS.md, bench/train_throughput.py)
- One device picker (`resolve_device`) for training, evaluation, CLI and server: `auto` is
  cuda > mps > cpu; an explicit device must exist (a one-line `DeviceError` naming the setting).
- dtype `auto` is bf16 autocast only where the hardware runs bf16 natively (CUDA compute >= 8.0,
  CPUs with AVX512-BF16/AMX): an emulated bf16 matmul is orders of magnitude slower than fp32.
  Older CUDA GPUs and MPS (where torch supports GradScaler) get fp16 with dynamic loss scaling
  (`grad_scaler`); other CPUs fp32. An explicit bf16/fp16 without hardware support warns once
  (`warn_emulated`). Evaluation (`eval_dtype`) keeps CPUs in fp32 so a metric does not move
  with the machine's instruction set.
- CPU fp32 matmuls go to oneDNN only after a short probe shows it faster *and* fp32-exact on the
  machine at hand (`probe_onednn_fp32`): on some CPUs it is faster but does bf16 math.
- DDP from torchrun's env only when WORLD_SIZE > 1; nccl on CUDA, gloo on CPU, where ranks split
  the cores. A trainer dies with its parent (`die_with_parent`: PR_SET_PDEATHSIG, else a watcher).
- `keep_freed_memory`: glibc otherwise returns large freed blocks to the OS, so every step's
  tensors fault their pages in again; training on CPU keeps them (the cost: the peak stays held).
- MFU = flops_per_token * tokens/s / peak. GPU peaks are vendor data sheets (`peak_flops`); a CPU
  core's peak is FLOPs per cycle from its flags times a fixed nominal CPU_GHZ, because a VM's
  /proc/cpuinfo shows the base clock while its cores boost. Unknown accelerators get 0.
"""

from __future__ import annotations

import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from minigpt.config import TrainConfig


class DeviceError(ValueError):
    """The requested device does not exist here; the message is one line naming the setting."""


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the autocast dtypes


def autocast(device: torch.device, dtype: str):
    """bf16/fp16 autocast when dtype is one of them, else a no-op context."""
    if dtype not in HALF:
        return nullcontext()
    return torch.autocast(device.type, dtype=HALF[dtype])


def grad_scaler(device: torch.device, dtype: str) -> torch.amp.GradScaler | None:
    """Dynamic loss scaling for fp16 (its 5-bit exponent underflows small gradients); None else."""
    return torch.amp.GradScaler(device.type) if dtype == "fp16" else None


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


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the only CPUs where bf16 autocast beats fp32 (module docstring)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


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


CPU_GHZ = 3.75  # nominal clock for CPU peaks: VMs show the base clock, cores boost (docstring)


def cpu_peak_per_core(dtype: str) -> float:
    """Nominal FLOP/s of one CPU core in `dtype` (fp32 or bf16), from its instruction set."""
    flags = cpu_flags()
    per_cycle = 2 * 2 * (16 if "avx512f" in flags else 8)  # 2 FMA pipes x 2 FLOPs x fp32 lanes
    if dtype == "bf16" and cpu_has_bf16():
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


def keep_freed_memory() -> bool:
    """Have glibc serve large allocations from its heap and keep freed memory for reuse
    (mallopt: no mmap per allocation, no trimming), so tensors allocated every step do not page
    fault again (module docstring). Returns whether it took effect (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h> parameter numbers
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def die_with_parent(poll_s: float = 1.0) -> None:
    """Exit (SIGTERM) when the process that started this one goes away, so a killed `dvc repro`
    or torchrun never leaves a trainer writing into out/ behind it. Idempotent."""
    import signal
    import threading

    if getattr(die_with_parent, "armed", False):
        return
    die_with_parent.armed = True
    parent = os.getppid()
    if parent <= 1:  # already orphaned (or started by init): nothing to follow
        return
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass  # no prctl (an odd libc): the watchdog below still works
    # Under torchrun our parent is its agent, which outlives a killed `dvc repro`: then the
    # agent's own parent is watched too (it changes when the agent is orphaned).
    grandparent = _ppid_of(parent) if "TORCHELASTIC_RUN_ID" in os.environ else None

    def orphaned() -> bool:
        return os.getppid() != parent or (grandparent is not None and _ppid_of(parent) != grandparent)

    if orphaned():  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if orphaned():
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _ppid_of(pid: int) -> int | None:
    """The parent pid of `pid` from /proc (None where there is no /proc or no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])  # after "(comm)": state, then ppid


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
    if device.type == "cpu" and dtype == "fp32" and "avx512f" in cpu_flags():
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
    scheduled (evaluate.summed_batches). Decoding chooses per step instead (sample.StepThreads)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
