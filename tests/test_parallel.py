"""The ordered worker map behind `process` and `encode`: order, bounded read-ahead, first error."""

from __future__ import annotations

import pytest

from minigpt.files import FormatError
from minigpt.parallel import Workers, ordered_map, resolve_workers


def test_results_come_in_input_order_for_any_worker_count():
    items = [str(i) for i in range(50)]
    for workers in (1, 3):
        assert list(ordered_map(int, items, workers)) == list(range(50))
    assert resolve_workers(0) >= 1 and resolve_workers(5) == 5


def test_read_ahead_is_bounded():
    # Executor.map would read every chunk before the first result: a corpus-sized queue.
    read = []

    def chunks():
        for i in range(100):
            read.append(i)
            yield str(i)

    with Workers(2) as pool:
        results = pool.map(int, chunks())
        assert next(results) == 0
        assert len(read) <= 2 * 2 + 1
        assert list(results) == list(range(1, 100))


def test_the_first_error_in_input_order_is_raised():
    for workers in (1, 2):
        with pytest.raises(ValueError, match="'x'"):
            list(ordered_map(int, ["1", "2", "x", "4", "y"] + ["5"] * 20, workers))


def test_format_errors_survive_the_trip_from_a_worker():
    import pickle

    e = pickle.loads(pickle.dumps(FormatError("f.jsonl:3", "invalid JSON", "column 2")))
    assert str(e) == "f.jsonl:3: invalid JSON (column 2)" and e.where == "f.jsonl:3"


SCRIPT = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from minigpt.parallel import Workers

def report_and_wait(x):
    os.write(1, b"%d\\n" % os.getpid())  # one write: two workers' lines never interleave
    time.sleep(60)

if __name__ == "__main__":
    with Workers(2) as pool:
        list(pool.map(report_and_wait, range(4)))
"""


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "parent.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE,
                              text=True)
    try:
        workers: set[int] = set()
        while len(workers) < 2:  # the first two pids the workers write
            line = parent.stdout.readline()
            assert line, "the parent exited before its workers reported"
            if line.strip():
                workers.add(int(line))
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return False
        return state != "Z"

    deadline = time.monotonic() + 10
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:  # do not leave them behind even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived their parent"
