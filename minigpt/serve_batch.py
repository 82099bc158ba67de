"""`minigpt serve`'s model thread: concurrent requests decoded as one batch (`--parallel N`).

Design choices
- One thread owns the model and the tokenizer. Its loop takes work from one inbox: calls (a prompt
  to tokenize) run between two decode steps; a new request (`Row`) joins the running batch at the
  next step boundary while fewer than N rows decode, else waits in arrival order (N = 1: one
  request at a time, as before batching).
- A joining row's prompt is prefilled alone in a one-row cache (`generate`'s numbers), and its keys
  and values copied into a free row of the batch cache (N rows of block_size, made on first use).
  A row leaves when it ends (<|endoftext|>, max_tokens, a stop string, its client gone, an error);
  a row from the end moves into its place, so the batch is always the cache's first b rows.
- One forward per step for all rows: a step reads the weights once, whatever b is. Each row then
  samples from its own logits with its own settings and generator, through `sample`'s functions.
  A request alone in the server gets exactly `generate`'s tokens (one row takes the same fast step);
  with several rows the step is ragged (`KVCache.lengths`), equal up to float rounding of the
  batched matmuls, as in `greedy_batch`.
- A full context slides as in `generate`: the most recent KEEP_FRACTION is re-prefilled alone and
  copied back into the row (alone, with its newest token, as `generate`; in a batch, without it:
  that token then steps with the others). A failing forward ends every row with its error, a
  failing row (diverged logits) only itself; the loop goes on serving.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError

import torch

from minigpt.engine import Loaded, UsageError, make_generator
from minigpt.sample import DIVERGED, StepThreads, _pick, _Window
from minigpt.serve_jobs import Job

log = logging.getLogger("minigpt.serve")


def cache_bytes(m: Loaded, rows: int) -> int:
    """Bytes of a KV cache of `rows` rows of block_size (the batch's, plus the one-row prefill)."""
    c = m.model.config
    return rows * c.n_layer * 2 * c.n_embd * c.block_size * m.model.tok_emb.weight.element_size()


def check_parallel(m: Loaded, parallel: int) -> None:
    """Refuse a --parallel whose batch cache cannot fit in memory, before allocating it."""
    from minigpt.memory import available_memory

    need, free = cache_bytes(m, parallel + 1), available_memory(m.device)
    if free is not None and need > free:
        raise UsageError(f"--parallel {parallel}: the KV cache of {parallel} rows of "
                         f"{m.model.config.block_size} tokens needs {need / 2**30:.2f} GiB, more "
                         f"than the {free / 2**30:.2f} GiB free")


class Row:
    """One request in the batch: its job, its sampler, its context and its cache row's length."""

    def __init__(self, job: Job, m: Loaded):
        self.job, self.s = job, job.sampling()
        self.generator = make_generator(self.s.seed, m.device)
        self.window = _Window(m.model.config.block_size, m.warn_slide)
        self.context = list(job.ids)  # prompt and tokens so far: what a slide keeps the end of
        self.length = 0  # positions written in its cache row
        self.logits: torch.Tensor | None = None  # (1, 1, vocab): for its next token
        self.future: Future = Future()
        self.closed = False

    def close(self, error: BaseException | None = None) -> None:
        """Out of the batch: the request's future is done (or failed with `error`)."""
        self.closed = True
        try:
            if error is None:
                self.future.set_result(None)
            else:
                self.future.set_exception(error)
        except InvalidStateError:  # the waiting side cancelled it: nobody is listening
            pass


def pick(row: Row) -> int:
    """The row's next token from its logits: `generate`'s choice (greedy or sampled)."""
    s = row.s
    try:
        token = int(_pick(row.logits, None, 1.0, s.temperature, s.top_k or None, s.top_p,
                          row.generator))
    except ValueError as e:  # cannot sample: the logits are not finite
        raise UsageError(str(e)) from None
    if token < 0:
        raise UsageError(f"cannot decode: {DIVERGED}")
    return token


class Batcher:
    """The model thread: runs calls and decodes rows, up to `parallel` at a time. It is a thread
    of its own, or (`thread=False`) whichever calls `run`: `minigpt serve` runs it on the main
    thread, where the model was loaded, so that torch's OpenMP runtime keeps one team of workers
    (with a team per thread, libgomp manages more threads than CPUs and stops spinning between
    parallel regions: every matmul then waits for its workers to wake; docs/EXPERIMENTS.md)."""

    def __init__(self, m: Loaded, parallel: int, thread: bool = True):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1 (got {parallel})")
        self.m, self.parallel = m, parallel
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Row] = deque()
        self.rows: list[Row] = []  # rows[i]'s keys and values are row i of the batch cache
        self.batch = self.one = self.all = None  # caches, made by the first row (`_caches`)
        self.step = StepThreads(m.device)
        self.thread: threading.Thread | None = None
        if thread:
            self.thread = threading.Thread(target=self.run, name="minigpt-model", daemon=True)
            self.thread.start()

    def call(self, fn, *args) -> Future:
        """fn(*args) on the model thread, between two decode steps."""
        future: Future = Future()
        self.inbox.put((future, fn, args))
        return future

    def submit(self, job: Job) -> Future:
        """Decode `job` (it joins the batch at the next step boundary); done when it has ended."""
        row = Row(job, self.m)
        self.inbox.put(row)
        return row.future

    def load(self) -> dict:
        """How busy it is (read from another thread: a snapshot, for /health)."""
        return {"parallel": self.parallel, "decoding": len(self.rows), "waiting": len(self.waiting)}

    def stop(self) -> None:
        """Ask `run` to return (at the next step boundary); rows still running end with an error."""
        self.inbox.put(None)

    def close(self) -> None:
        """Stop, and wait for the loop's own thread to end."""
        self.stop()
        if self.thread is not None:
            self.thread.join()

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """The loop, on the calling thread, until `stop` (or an exception such as Ctrl-C)."""
        try:
            with torch.inference_mode():
                while self._take(block=not (self.rows or self.waiting)):
                    if self.rows:
                        self._advance()
        finally:
            for row in [*self.rows, *self.waiting]:
                row.close(RuntimeError("the server is shutting down"))

    def _take(self, block: bool) -> bool:
        """Run the calls and queue the rows in the inbox, then let waiting rows join; False on
        close. Blocks for the first item when `block` (nothing to decode)."""
        while True:
            try:
                item = self.inbox.get(block=block)
            except queue.Empty:
                break
            block = False
            if item is None:
                return False
            if isinstance(item, Row):
                self.waiting.append(item)
                continue
            future, fn, args = item
            try:
                future.set_result(fn(*args))
            except Exception as e:  # the caller's to handle (an API error, say)
                future.set_exception(e)
        while self.waiting and len(self.rows) < self.parallel:
            self._join(self.waiting.popleft())
        return True

    def _caches(self) -> None:
        model = self.m.model
        self.batch = model.new_cache(self.parallel)
        self.one = model.new_cache(1)  # where each prompt (and each slide) is prefilled
        self.all = self.batch.kv  # every row; the batch's cache sees the first b of them

    def _prefill(self, row: Row, ids: list[int]) -> None:
        """`ids` prefilled alone into the one-row cache, then copied to the row's place (after
        the rows in the batch when it is joining); its logits are the last position's."""
        self.step.restore()  # a prefill on all threads, as in `generate`
        self.one.reset()
        if ids:
            logits, _ = self.m.model(torch.tensor([ids], device=self.m.device), cache=self.one)
            row.logits = logits
        slot = self.rows.index(row) if row in self.rows else len(self.rows)
        self.batch.kv = self.all
        self.batch.copy_prefix(self.one, slice(slot, slot + 1))
        row.length = self.one.pos

    def _join(self, row: Row) -> None:
        if row.job.cancel.is_set() or row.future.cancelled():
            return row.close()
        if self.batch is None:
            self._caches()
        try:
            ids, block = row.context, self.m.model.config.block_size
            self._prefill(row, ids if len(ids) <= block else row.window(ids))
        except Exception as e:
            log.exception("prefill failed")
            return row.close(e)
        self.rows.append(row)

    def _advance(self) -> None:
        """One step: every row picks its next token, rows that ended leave, full contexts slide,
        and one forward gives every row its next logits."""
        for row in self.rows:
            self._next_token(row)
        self._compact()
        if not self.rows:
            return
        if self._slide():
            return  # one row, re-prefilled with its newest token: its logits are ready
        b, device = len(self.rows), self.m.device
        idx = torch.tensor([[row.context[-1]] for row in self.rows], device=device)
        self.batch.kv = self.all[:, :, :b]
        if b == 1:  # `generate`'s step (the fast path of `minigpt.decode`)
            self.batch.lengths, self.batch.pos = None, self.rows[0].length
        else:
            lengths = [row.length for row in self.rows]
            self.batch.lengths, self.batch.pos = torch.tensor(lengths, device=device), max(lengths)
        try:
            logits, _ = self.step(self.m.model, idx, cache=self.batch)
        except Exception as e:
            log.exception("decode step failed (%d rows)", b)
            for row in self.rows:
                row.close(e)
            self.rows = []
            return
        for i, row in enumerate(self.rows):
            row.logits, row.length = logits[i:i + 1], row.length + 1

    def _next_token(self, row: Row) -> None:
        job = row.job
        if job.cancel.is_set() or row.future.cancelled():
            log.info("client disconnected: stopped after %d tokens", job.completion_tokens)
            return row.close()
        try:
            token = pick(row)
            row.context.append(token)
            if job.take(token):
                job.finish()
                row.close()
        except Exception as e:  # this row's alone (diverged logits, its client's stream gone)
            row.close(e)

    def _compact(self) -> None:
        """Rows that ended leave; rows past the new end move into the places they left."""
        n = sum(not row.closed for row in self.rows)
        free = [i for i, row in enumerate(self.rows[:n]) if row.closed]
        movers = [(i, row) for i, row in enumerate(self.rows) if i >= n and not row.closed]
        for dst, (src, row) in zip(free, movers):
            self.all[:, :, dst, :, :row.length] = self.all[:, :, src, :, :row.length]
            self.rows[dst] = row
        del self.rows[n:]

    def _slide(self) -> bool:
        """Re-prefill the rows whose cache is full; True when there is no step to take: the one
        row left was re-prefilled with its newest token (as `generate` does), or none is left."""
        block, alone = self.m.model.config.block_size, len(self.rows) == 1
        slid = False
        for row in self.rows:
            if row.length < block:
                continue
            kept = row.window(row.context)
            try:
                self._prefill(row, kept if alone else kept[:-1])
                slid = True
            except Exception as e:
                log.exception("prefill failed")
                row.close(e)
        self._compact()
        return (alone and slid) or not self.rows
