"""Summed negative log-likelihood, and the metrics made of it: sliding-window perplexity over a
token stream, the masked loss over (ids, mask) examples, bits per byte, word perplexity.

- Perplexity uses HF's sliding window ("perplexity of fixed-length models"): windows of block_size
  advance by `stride`, each scoring only targets not yet seen, so every token is predicted once with
  at least `block_size - stride` of context. The last window is moved back to end at the last token
  (one batched shape, more context for the tail).
- Losses go through `model(idx, targets)` (-100 ignored, skipped before the head); CPUs stay fp32
  (`precision.eval_dtype`), so a metric does not move with the machine's instruction set.
- Speed on CPU: one worker thread per core over the batches (`summed_batches`); timings in
  bench/eval_throughput.py. Batches are summed in order: the same total every run.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from minigpt.model import IGNORE
from minigpt.precision import autocast, eval_dtype
from minigpt.runtime import one_cpu_thread
from minigpt.sft import collate, example_xy
from minigpt.tokenizer import PAD, SPECIAL_TOKENS

LN2 = math.log(2.0)
PAD_ID = SPECIAL_TOKENS.index(PAD)  # fixed ids (FORMATS.md)


def window_plan(n_targets: int, block_size: int, stride: int) -> list[tuple[int, int]]:
    """Sliding windows over a stream whose targets are positions 1..n_targets.

    Returns (begin, first_scored) pairs: the window's inputs are tokens[begin : begin + W] with
    W = min(block_size, n_targets), its targets tokens[begin + 1 : begin + W + 1], and it scores
    window positions first_scored..W-1. Together the windows score every target exactly once.
    """
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}] (got {stride})")
    if n_targets <= 0:
        return []
    width = min(block_size, n_targets)
    plan, scored_to, begin = [], 0, 0  # scored_to: targets 1..scored_to are already scored
    while scored_to < n_targets:
        begin = min(begin, n_targets - width)  # the last window ends at the last target, full length
        plan.append((begin, scored_to - begin))
        scored_to = begin + width
        begin += stride
    return plan


def summed_loss(model: Callable, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(sum of NLL in nats, number of targets) over the targets of y that are not -100."""
    n = int((y != IGNORE).sum())
    if n == 0:
        return 0.0, 0
    _, loss = model(x, y)
    return float(loss) * n, n


def sliding_window_nll(model: Callable, tokens, block_size: int, stride: int, batch_size: int,
                       device: torch.device | str = "cpu", max_tokens: int = 0,
                       progress: bool = False, workers: int = 0) -> tuple[float, int]:
    """Total NLL (nats) of tokens[1:] under `model`, and how many tokens that is.

    `tokens` is a 1-D array/tensor (a memmap is fine: windows are copied one batch at a time).
    `max_tokens` > 0 scores only the first max_tokens targets. Windows are batched `batch_size`
    at a time; all have the same length, so a batch is one (B, W) tensor. `workers`: see
    `summed_batches`.
    """
    device = torch.device(device)
    tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
    n_targets = len(tokens) - 1
    if max_tokens > 0:
        n_targets = min(n_targets, max_tokens)
    plan = window_plan(n_targets, block_size, stride)
    width = min(block_size, n_targets)
    offsets = np.arange(width + 1)

    def batch(chunk: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([tokens[b + offsets] for b, _ in chunk]).astype(np.int64)
        xy = torch.from_numpy(rows).to(device)
        x, y = xy[:, :-1], xy[:, 1:].clone()
        for i, (_, first) in enumerate(chunk):
            y[i, :first] = IGNORE  # already scored by an earlier window
        return x, y

    chunks = [plan[i : i + batch_size] for i in range(0, len(plan), batch_size)]
    return summed_batches(model, map(batch, chunks), len(chunks), device, "perplexity", progress,
                          workers)


def summed_batches(model: Callable, batches: Iterator, n: int, device: torch.device, desc: str,
                   progress: bool, workers: int = 0) -> tuple[float, int]:
    """(sum of NLL, targets) over (x, y) batches, summed in order (the same total every run).

    On CPU the batches are spread over one worker thread per core, each running its ops on one
    intra-op thread (torch releases the GIL inside ops): at this model size a batch's ops are
    too small for two threads to share well (timings: bench/eval_throughput.py's docstring).
    `workers` 0 = one per intra-op
    thread on CPU, 1 on other devices; 1 = the batches in turn on torch's intra-op threads."""
    if workers <= 0:
        workers = torch.get_num_threads() if device.type == "cpu" else 1

    def score(xy: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, int]:
        with torch.inference_mode(), autocast(device, eval_dtype(device)):  # both are per thread
            return summed_loss(model, *xy)

    bar = tqdm(total=n, desc=desc, unit="batch", leave=False,
               disable=None if progress else True)  # None: only on a terminal
    results: list[tuple[float, int]] = []
    with bar, one_cpu_thread(device) if workers > 1 else nullcontext(), \
            ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()  # a few batches in flight, not the whole split in memory
        for xy in batches:
            pending.append(pool.submit(score, xy))
            if len(pending) > 2 * workers:
                results.append(pending.popleft().result())
                bar.update()
        for future in pending:
            results.append(future.result())
            bar.update()
    return sum(r[0] for r in results), sum(r[1] for r in results)


def lm_metrics(total_nll: float, n_tokens: int, n_bytes: float, n_words: float) -> dict:
    """Mean token loss, token perplexity, bits per byte and word-level perplexity."""
    loss = total_nll / n_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nll / LN2 / n_bytes,
        "word_perplexity": math.exp(total_nll / n_words),
    }


def masked_nll(model: Callable, examples: Sequence[tuple[np.ndarray, np.ndarray]], batch_size: int,
               device: torch.device | str = "cpu", pad_id: int = PAD_ID,
               progress: bool = False) -> tuple[float, int, int]:
    """(total response NLL in nats, response tokens, examples scored) over (ids, mask) examples.

    Examples must already fit the model (len(ids) <= block_size + 1). They are batched in order
    of length, so padding is small; the causal model never lets padding on the right leak into
    earlier positions. An example with no target left after truncation is not counted.
    """
    device = torch.device(device)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    order = [i for i in order if len(examples[i][0]) >= 2 and np.asarray(examples[i][1][1:]).any()]
    starts = range(0, len(order), batch_size)
    batches = (collate([example_xy(*examples[i]) for i in order[s : s + batch_size]], pad_id)
               for s in starts)
    batches = ((x.to(device), y.to(device)) for x, y in batches)
    total, count = summed_batches(model, batches, len(starts), device, "sft loss", progress)
    return total, count, len(order)


def loss_metrics(total_nll: float, n_tokens: int) -> dict:
    """Mean loss and perplexity of a (sum, count) pair."""
    loss = total_nll / n_tokens if n_tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if n_tokens else float("nan")}
