"""An ordered map over worker processes: how `process` and `encode` use every core.

Design choices
- Standard library only (`concurrent.futures.ProcessPoolExecutor`): the data stages are chunks
  of documents in, chunks of results out, in input order, so the files they write are
  byte-identical for 1 and N workers. With one worker nothing is forked: the same function runs
  in this process, which keeps tracebacks and profiling simple.
- Bounded: at most `2 * workers` chunks are in flight (`Executor.map` and `Pool.imap` read the
  whole input ahead and would hold a 50 GB corpus in the task queue). While the workers
  transform, this process reads the next chunks and writes the finished ones: reading,
  transforming and writing overlap.
- Workers are spawned, not forked: the parent may already hold threads (the `tokenizers` Rust
  pool, `datasets`), and forking a threaded process can deadlock the child.
- A worker exits within WATCH_S of its parent's death (`kill -9` of a stage included): the
  queue it waits on would otherwise keep it alive forever.
- An error raised in a worker is re-raised here when its chunk's turn comes, so the error a run
  reports is the first one in input order, whatever the worker count; the other workers are
  cancelled.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator


WATCH_S = 0.5  # how often a worker checks that the process that started it is alive


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, so `taskset` and cgroup cpusets count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_workers(num_proc: int) -> int:
    """`num_proc` as a worker count: 0 = every core this process may use."""
    return num_proc if num_proc > 0 else cpu_count()


def _start_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """A worker's first act: exit when `parent` is gone (a killed stage must not leave workers
    behind, blocked forever on their queue), then the caller's initializer."""
    def watch() -> None:
        while True:
            time.sleep(WATCH_S)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


class Workers:
    """`workers` processes (1 = this one) that map functions over chunks, in order:

        with Workers(n, init, args) as pool:
            for result in pool.map(fn, chunks): ...

    `initializer(*initargs)` runs once per worker before its first chunk (in this process when
    workers == 1). One pool serves many maps (the splits of a corpus): each worker is started
    once. `fn`, `initializer`, `initargs` and every chunk must be picklable when workers > 1."""

    def __init__(self, workers: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple = ()):
        self.workers, self.initializer, self.initargs = workers, initializer, initargs
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "Workers":
        if self.workers > 1:
            spawn = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(self.workers, mp_context=spawn, initializer=_start_worker,
                                            initargs=(os.getpid(), self.initializer, self.initargs))
        elif self.initializer is not None:
            self.initializer(*self.initargs)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def map(self, fn: Callable[[Any], Any], chunks: Iterable[Any]) -> Iterator[Any]:
        """fn(chunk) for every chunk, in input order, at most 2 * workers chunks in flight."""
        if self.pool is None:
            yield from map(fn, chunks)
            return
        pending: deque = deque()
        try:
            for chunk in chunks:
                pending.append(self.pool.submit(fn, chunk))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # an error or an abandoned generator: stop queued work
                future.cancel()


def ordered_map(fn: Callable[[Any], Any], chunks: Iterable[Any], workers: int,
                initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator[Any]:
    """`Workers(workers, initializer, initargs).map(fn, chunks)` with a pool of its own."""
    with Workers(workers, initializer, initargs) as pool:
        yield from pool.map(fn, chunks)
