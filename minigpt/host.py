"""What a training process asks of its host OS: keep freed memory, die with the parent.

- `keep_freed_memory`: glibc otherwise returns large freed blocks to the OS, so every step's
  tensors fault their pages in again; training on CPU keeps them (the cost: the peak stays held).
- `die_with_parent`: PR_SET_PDEATHSIG, else a watcher thread, so a killed `dvc repro` or
  torchrun never leaves a trainer writing into out/ behind it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


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
