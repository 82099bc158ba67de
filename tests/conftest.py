"""Every test leaves the pytest process as it found it.

A training stage sets process-wide state meant for a trainer's own process (minigpt.host):
the parent-death watchdog (a thread and PR_SET_PDEATHSIG, so pytest itself would die with its
parent) and glibc's malloc tuning (mallopt, which cannot be undone). Tests that run a stage's
main() in this process take the `stage_in_process` fixture, which keeps both out (the stages run
them for real under `dvc repro` in tests/test_pipeline.py and tests/test_hostile.py).
`_leaves_process_as_found`, on every test, fails the test that changes either, or the torch thread
count, without restoring it.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from minigpt import host, runtime

ROOT = Path(__file__).resolve().parents[1]
_LINUX = sys.platform.startswith("linux")
_libc = ctypes.CDLL(None, use_errno=True) if _LINUX else None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                      "usmblks", "fsmblks", "uordblks", "fordblks",
                                                      "keepcost")]


def pdeathsig() -> int | None:
    """The signal this process gets when its parent dies (0: none); None off Linux."""
    if not _LINUX:
        return None
    sig = ctypes.c_int(0)
    _libc.prctl(2, ctypes.byref(sig))  # PR_GET_PDEATHSIG
    return sig.value


def large_malloc_is_mmapped() -> bool | None:
    """Whether glibc serves a 64 MiB allocation by mmap, as it does by default and no longer does
    after runtime.keep_freed_memory(); None where that cannot be seen (no glibc mallinfo2)."""
    try:
        mallinfo2 = _libc.mallinfo2
    except (AttributeError, TypeError):
        return None
    mallinfo2.restype = _Mallinfo2
    _libc.malloc.restype = ctypes.c_void_p
    _libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB): mmapped by default
    before = mallinfo2().hblkhd
    block = _libc.malloc(size)  # untouched: no page is faulted in
    try:
        return mallinfo2().hblkhd - before >= size
    finally:
        _libc.free(block)


def process_state() -> dict:
    return {"torch threads": torch.get_num_threads(),
            "die-with-parent thread": any(t.name == "die-with-parent" for t in threading.enumerate()),
            "die_with_parent armed": getattr(host.die_with_parent, "armed", False),
            "parent-death signal": pdeathsig(),
            "64 MiB malloc is mmapped": large_malloc_is_mmapped()}


@pytest.fixture(autouse=True)
def _leaves_process_as_found():
    before = process_state()
    yield
    after = process_state()
    leaked = {k: (before[k], after[k]) for k in before if after[k] != before[k]}
    assert not leaked, f"this test changed the pytest process (before, after): {leaked}"


@pytest.fixture
def stage_in_process(monkeypatch):
    """For a test that calls a training stage's main(): no watchdog, no malloc tuning, and the
    thread count restored."""
    monkeypatch.setattr(runtime, "die_with_parent", lambda: None)
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread, for modules of tiny models (`pytestmark = pytest.mark.usefixtures(...)`):
    with tiny matmuls, threads only add contention, and spin while a loaded CI box runs others."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_stage_script(stage: str, cwd, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """`python stages/STAGE.py ARGS` in `cwd`, as DVC runs it, with this checkout's minigpt."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MINIGPT_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
