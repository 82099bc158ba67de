"""The test suite's machine-dependent checks: numbers that hold on a quiet machine, not on a loaded
CI runner, so they live here instead of in tests/.

    python bench/machine_checks.py [gemm_peak] [refaults] [offline_hub]

- gemm_peak: a 1024^3 fp32 GEMM (near this CPU's real ceiling) runs under the nominal peak that
  MFU divides by (minigpt.mfu.peak_flops, one process): MFU can read at most 100%.
- refaults: the chunked loss's step (~100 MB of logits and gradients allocated and freed) page
  faults again every step with glibc's defaults, and nearly never after
  host.keep_freed_memory() (each side in its own process). tests/test_leaks.py checks
  deterministically that large blocks then come from the heap.
- offline_hub: the process stage, given a hub id nobody cached, prints its one error line within
  5 s with HF_HUB_OFFLINE=1 and with a closed HF_ENDPOINT (retries once cost ~36 s).
  tests/test_data.py checks the line itself.
Each check prints its numbers, `ratio N.NNx` (measured / bound) and ok or FAIL; the exit status
is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gemm_peak() -> bool:
    import torch

    from minigpt.mfu import peak_flops

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    achieved = 2 * 1024**3 / best
    peak = peak_flops(torch.device("cpu"), "fp32", 1)
    ok = achieved < peak
    print(f"gemm_peak: 1024^3 fp32 GEMM {achieved / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} "
          f"threads, nominal peak {peak / 1e9:.1f}: ratio {achieved / peak:.2f}x "
          f"({'ok' if ok else 'FAIL: MFU could read over 100%'})")
    return ok


_REFAULTS = """
import resource, sys, torch
from minigpt.loss import linear_cross_entropy
from minigpt.host import keep_freed_memory
on = sys.argv[1] == "on" and keep_freed_memory()
h = torch.randn(2048, 128, requires_grad=True)
w = torch.randn(8192, 128, requires_grad=True)
t = torch.randint(0, 8192, (2048,))
def step():  # the chunked loss allocates and frees ~100 MB of logits and gradients per call
    linear_cross_entropy(h, w, t).backward()
    h.grad = w.grad = None
faults = []
for _ in range(6):  # the heap may still grow once (by a 4096-page step) after warm-up: keep the least
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(on, min(faults[2:]))
"""


def refaults() -> bool:
    if not sys.platform.startswith("linux"):
        print("refaults: skipped (glibc's mallopt, Linux only)")
        return True
    faults = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", _REFAULTS, mode], capture_output=True, text=True,
                             check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
        if mode == "on" and out[0] != "True":
            print("refaults: skipped (not glibc: mallopt unavailable)")
            return True
        faults[mode] = int(out[1])
    ok = faults["off"] > 10_000 and faults["on"] < 1_000
    print(f"refaults: minor page faults per step {faults['off']:,} with glibc's defaults, "
          f"{faults['on']:,} after keep_freed_memory: ratio {faults['off'] / max(1, faults['on']):.2f}x "
          f"({'ok' if ok else 'FAIL: want > 10,000 and < 1,000'})")
    return ok


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_hub() -> bool:
    ok = True
    for how in ("HF_HUB_OFFLINE", "closed HF_ENDPOINT"):
        with tempfile.TemporaryDirectory() as tmp:
            env = {k: v for k, v in os.environ.items() if k not in (
                   "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT") and not k.lower().endswith("_proxy")}
            env.update(HF_HOME=f"{tmp}/hf", HF_DATASETS_CACHE=f"{tmp}/hf/datasets", PYTHONPATH=str(ROOT))
            if how == "HF_HUB_OFFLINE":
                env["HF_HUB_OFFLINE"] = "1"
            else:
                env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
            Path(tmp, "params.yaml").write_text(
                "process:\n  pretrain:\n    source: minigpt-tests/not-cached\n    name: null\n")
            timer = (f"import sys, time; sys.path.insert(0, {str(ROOT / 'stages')!r}); "
                     "import datasets, process; t = time.perf_counter(); rc = process.main(['pretrain']); "
                     "print(f'{time.perf_counter() - t:.2f}'); sys.exit(rc)")
            result = subprocess.run([sys.executable, "-c", timer], cwd=tmp, env=env,
                                    capture_output=True, text=True, timeout=300)
        seconds = float(result.stdout.split()[-1])  # the stage itself, without Python's start-up
        good = result.returncode == 2 and seconds < 5
        ok &= good
        print(f"offline_hub ({how}): error line after {seconds:.2f} s, bound 5 s: ratio "
              f"{seconds / 5:.2f}x ({'ok' if good else 'FAIL'}): {result.stderr.strip()[:120]}")
    return ok


CHECKS = {"gemm_peak": gemm_peak, "refaults": refaults, "offline_hub": offline_hub}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checks", nargs="*", help=f"any of {', '.join(CHECKS)} (default: all)")
    names = ap.parse_args(argv).checks or list(CHECKS)
    for name in names:
        if name not in CHECKS:
            ap.error(f"unknown check {name!r}: choose from {', '.join(CHECKS)}")
    results = [CHECKS[name]() for name in names]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
