"""What every stage script shares: its summary line on success, one `error:` line on failure.

A failed stage must tell the user what to fix in one line (naming the file, field or parameter),
not dump a traceback, and exit with status 2 so DVC stops. The library's own errors subclass
ValueError (bad input) or RuntimeError (training, checkpoints), so their messages print as they
are; anything else keeps its type name. MINIGPT_DEBUG=1 re-raises for developers. Under torchrun
the failing rank is named, since every rank reports its own failure.

Training stages (`run_training_stage`) are started as `python stages/X.py` and read `nproc`
themselves: 1 runs in this process; more launch that many copies of the script through
torchrun's own launcher (`torch.distributed.run`, standalone rendezvous), in this process, so
the promise holds at the level the user sees: each worker leaves its error line in a temporary
directory instead of printing it, torchrun's failure log and ChildFailedError traceback are
kept quiet, and the first failure (by time; said as rank 0's when every rank failed alike) is
printed once, exit status 2. A worker killed by a signal is reported as such. Params are validated before any worker starts.
Started by the user's own `torchrun` (multi-node), a script just runs as a worker.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

ERROR_DIR = "MINIGPT_ERROR_DIR"  # set by run_training_stage for its workers


def run_stage(body: Callable[[], str | None]) -> int:
    """Run `body`, print the summary line it returns (None prints nothing); return an exit status."""
    try:
        line = body()
    except Exception as e:  # every failure is reported the same way: one line, status 2
        if os.environ.get("MINIGPT_DEBUG"):
            raise
        ours = isinstance(e, (ValueError, RuntimeError, OSError))
        message = str(e) if ours else f"{type(e).__name__}: {e}"
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        line = f"error{where}: {' '.join(message.split())}"
        if _leave_error(line, rank):
            return 2
        print(line, file=sys.stderr)
        return 2
    if line:
        print(line)
    return 0


def corpus_arg(argv: list[str] | None, script: str, corpora: tuple[str, ...]) -> str | None:
    """The one `pretrain|sft` argument of a foreach stage, or None after printing the usage."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in corpora:
        print(f"usage: python stages/{script} {'|'.join(corpora)}", file=sys.stderr)
        return None
    return argv[0]


def run_corpus_stage(argv: list[str] | None, script: str, corpora: tuple[str, ...],
                     run: Callable[[str], object], summary: Callable[[str, object, float], str]) -> int:
    """main() of a foreach stage (`python stages/SCRIPT pretrain|sft`): run(corpus), then print
    summary(corpus, its result, wall seconds)."""
    corpus = corpus_arg(argv, script, corpora)
    if corpus is None:
        return 2
    start = time.perf_counter()
    return run_stage(lambda: summary(corpus, run(corpus), time.perf_counter() - start))


def _leave_error(line: str, rank: str | None) -> bool:
    """A worker of run_training_stage leaves its line for the launcher; False elsewhere."""
    directory = os.environ.get(ERROR_DIR)
    if not directory or rank is None:
        return False
    try:
        Path(directory, f"{time.time():.6f}-{int(rank):06d}").write_text(line)
    except (OSError, ValueError):
        return False
    return True


def run_training_stage(script: str, body: Callable[[], str | None],
                       nproc: Callable[[], int]) -> int:
    """main() of a training stage: `body` here when nproc() is 1 (or under torchrun already),
    else nproc workers of `script` through torchrun's launcher, reported as one process."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a worker: torchrun (ours or the user's) started us
        return run_stage(body)
    n: list[int] = []
    status = run_stage(lambda: n.append(nproc()))  # bad params: one line before any worker
    if status:
        return status
    if n[0] == 1:
        return run_stage(body)
    return _torchrun(script, n[0])


def _torchrun(script: str, nproc: int) -> int:
    import logging
    import signal
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.disable(logging.ERROR)  # torchrun's own failure log: the workers' line says it
    with tempfile.TemporaryDirectory(prefix="minigpt-errors-") as errors:
        os.environ[ERROR_DIR] = errors
        try:
            run(parse_args(["--standalone", "--nproc_per_node", str(nproc), script]))
        except ChildFailedError as e:
            # A worker killed from outside (the OOM killer's SIGKILL) is the cause, not the
            # connection errors its peers then report; otherwise the first line left (by name:
            # time, then rank), else the first failure's exit status. SIGTERM is what torchrun
            # sends the other workers once one has failed.
            killed = sorted(r for r, f in e.failures.items() if f.exitcode < 0
                            and f.exitcode != -signal.SIGTERM)
            lines = [f.read_text() for f in sorted(Path(errors).iterdir())]
            if lines and not killed:  # the same error on every rank is said as rank 0's
                same = [x for x in lines if x.partition(": ")[2] == lines[0].partition(": ")[2]]
                print(min(same, key=lambda x: (x.startswith("error ("), x)), file=sys.stderr)
            else:
                rank = killed[0] if killed else e.get_first_failure()[0]
                code = e.failures[rank].exitcode
                why = (f"killed by {_signal_name(-code)}" if code < 0 else f"exit status {code}")
                print(f"error (rank {rank}): {script} {why}", file=sys.stderr)
            return 2
        except SignalException as e:  # the launcher itself was told to stop; workers are stopped
            print(f"error: stopped by {_signal_name(e.sigval)}", file=sys.stderr)
            return 128 + e.sigval
        finally:
            del os.environ[ERROR_DIR]
    return 0


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
