"""The process-state check in tests/conftest.py sees what a training stage sets, so a test that runs
a stage in pytest's own process without `stage_in_process` fails instead of leaking it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SETUP = """
import json, sys
import conftest
from minigpt import runtime
before = conftest.process_state()
if sys.argv[1] == "setup_runtime":
    from minigpt.config import TrainConfig
    runtime.setup_runtime(TrainConfig(device="cpu", dtype="fp32"))
else:
    getattr(runtime, sys.argv[1])()
print(json.dumps([before, conftest.process_state()]))
"""


def _states(call: str) -> tuple[dict, dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    env.pop("WORLD_SIZE", None)
    out = subprocess.run([sys.executable, "-c", _SETUP, call], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return tuple(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and glibc's mallinfo2")
def test_the_check_sees_a_training_stage_setup():
    """setup_runtime arms the watchdog and keep_freed_memory (large tensors from the heap: its
    effect on page faults is measured by bench/runtime_check.py)."""
    before, after = _states("setup_runtime")
    assert before["die-with-parent thread"] is False and before["parent-death signal"] == 0
    assert after["die-with-parent thread"] is True and after["die_with_parent armed"] is True
    assert after["parent-death signal"] == 15  # SIGTERM
    if before["64 MiB malloc is mmapped"] is None:
        pytest.skip("no glibc mallinfo2: the malloc tuning cannot be seen")
    assert before["64 MiB malloc is mmapped"] is True and after["64 MiB malloc is mmapped"] is False

