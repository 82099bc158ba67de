"""The decoding loops over a KV cache (`minigpt.decode`), and the sampling filters.

Design choices (timings: bench/generate_throughput.py and docs/EXPERIMENTS.md)
- One prefill of the prompt, then one token per step: the loop adds as little as it can (no
  re-allocation, no sort when greedy, one host sync per token). Steps run on all threads or on
  one, whichever was faster when last timed (`StepThreads`): beside a busy process one thread wins.
- `generate_batch` draws N samples of one prompt as one batch (prefilled once, its keys/values
  copied to every row): a step for N rows reads the weights once, like a step for one.
  `generate` is the N = 1 case. `greedy_batch` answers many prompts at once (the eval stage):
  each is prefilled alone, exactly as `generate` would, then all decode together, ragged.
- Positions never exceed block_size. When the context fills up, the most recent 3/4 of the window
  is re-prefilled (one batched prefill every block_size/4 tokens, not a full forward per token),
  with one warning per call (`warnings.warn`, or `on_window`).
- A diverged model (NaN/inf logits) is an error, greedy or sampled (`DIVERGED`), checked within
  the step's one host sync: argmax over a NaN row would pick an arbitrary id.
- Filters follow Hugging Face's semantics (temperature, then CTRL repetition penalty on the raw
  logits, then top-k, then top-p, keeping at least one token), so temperature 0, top_k 1 and a
  tiny top_p are all greedy. A sampled step draws from the kept candidates only (`candidates`,
  `sample_next`): no full-vocabulary sort or mask, one uniform number per row.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Iterable

import torch
from torch import Tensor


KEEP_FRACTION = 0.75  # of block_size, kept when the window slides
NUCLEUS_CANDIDATES = (1024, 8192)  # most likely tokens top-p tries before sorting them all
PROBE_EVERY = 64  # decode steps between two timings of one thread vs all (`StepThreads`)


class StepThreads:
    """Runs decode steps on one intra-op thread or on all of torch's, whichever was faster when
    last timed: every PROBE_EVERY steps one step runs on each. All threads stream the weight
    slabs in parallel, but each matmul waits for its slowest thread, so while another process
    holds a core they are much slower than one (docs/EXPERIMENTS.md). `restore()` puts the
    count back."""

    def __init__(self, device: torch.device):
        self.all = torch.get_num_threads() if device.type == "cpu" else 1
        self.best, self.times, self.step, self.now = self.all, {}, 0, self.all

    def restore(self) -> None:
        torch.set_num_threads(self.all)
        self.now = self.all

    def __call__(self, model, *args, **kwargs):
        if self.all == 1:
            return model(*args, **kwargs)
        probe = self.step % PROBE_EVERY
        n = 1 if probe == 0 else self.all if probe == 1 else self.best
        self.step += 1
        if n != self.now:  # only on a change: most steps keep the count
            torch.set_num_threads(n)
            self.now = n
        start = time.perf_counter()
        out = model(*args, **kwargs)  # CPU ops are synchronous: this is the step's time
        if probe < 2:
            self.times[n] = time.perf_counter() - start
            if probe == 1:
                self.best = min(self.times, key=self.times.get)
        return out


DIVERGED = "the logits hold NaN or inf (has the model diverged?)"


def _greedy(x: Tensor) -> Tensor:
    """argmax per row, (B, 1); -1 where the row's maximum is not finite (see DIVERGED). max
    picks a NaN or +inf when the row holds one, so checking the B picked values is enough: no
    second pass over the vocabulary per step (v - v is 0 for a finite v, else NaN)."""
    values, ids = x.max(-1, keepdim=True)  # the first maximal index, as argmax
    return ids.masked_fill_(values.sub_(values).ne(0), -1)


def _check(temperature, top_k, top_p, repetition_penalty, max_new_tokens) -> None:
    if not (0 <= temperature < float("inf")):  # NaN fails too
        raise ValueError(f"temperature must be >= 0 and finite (got {temperature})")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None (got {top_k})")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p})")
    if not (0 < repetition_penalty < float("inf")):
        raise ValueError(f"repetition_penalty must be > 0 and finite (got {repetition_penalty})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL penalty: divide positive logits of seen ids by `penalty`, multiply negative ones."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits (ties with the k-th are kept), others -inf."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the smallest set of top tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


@torch.inference_mode()
def generate(model, ids: list[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             stop_ids: Iterable[int] = (), generator: torch.Generator | None = None,
             on_token: Callable[[int], None] | None = None,
             on_window: Callable[[str], None] | None = None) -> list[int]:
    """Continue `ids` by up to max_new_tokens tokens; returns the new tokens only.

    Greedy when temperature == 0. Stops after emitting any id in stop_ids (that id is included).
    on_token(id) is called for each new token as it is chosen (streaming). on_window(message) is
    called once instead of warnings.warn when the context first exceeds block_size.
    Runs in eval mode (dropout off) and restores the model's mode afterwards.
    """
    return generate_batch(model, ids, max_new_tokens, 1, temperature=temperature, top_k=top_k,
                          top_p=top_p, repetition_penalty=repetition_penalty, stop_ids=stop_ids,
                          generator=generator, on_token=on_token, on_window=on_window)[0]


def candidates(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None
               ) -> tuple[Tensor | None, Tensor]:
    """(ids, weights): the tokens softmax(logits / temperature) keeps after top-k, then top-p,
    as `filter_top_k` and `filter_top_p` define them, with unnormalised probabilities (B, K).
    ids (B, K) is None when the weights span the whole vocabulary in id order.

    Without their full-vocabulary sort and mask: top-k takes `torch.topk`'s k candidates
    (already in order for top-p); top-p alone takes the 1,024 (then 8,192) most likely, weighed
    against the whole row's logsumexp, and sorts everything only when they hold less than p
    (a topk of them is several times cheaper than the full sort: docs/EXPERIMENTS.md)."""
    x = logits / temperature
    V = x.shape[-1]
    ids, log_z = None, None  # log_z: the log normaliser when x is only part of its row
    if top_k is not None and top_k < V:
        vals, ids = torch.topk(x, top_k)
        if bool(((x >= vals[:, -1:]).sum(-1) > top_k).any()):  # ties with the k-th: keep them all
            ids, x = None, filter_top_k(x, top_k)
        else:
            x = vals
    p = top_p if top_p is not None and top_p < 1.0 else None
    if p is not None and ids is None:
        row_z = torch.logsumexp(x, -1, keepdim=True)
        for n in (n for n in NUCLEUS_CANDIDATES if n < V):
            vals, cand = torch.topk(x, n)
            if bool(((vals - row_z).exp().sum(-1) >= p).all()):  # every nucleus lies in them
                x, ids, log_z = vals, cand, row_z
                break
    if p is not None and ids is None:
        x = filter_top_p(x, p)  # a flat distribution: the full sort
    probs = x.softmax(-1) if log_z is None else (x - log_z).exp()
    if p is not None and ids is not None:  # in order: drop what follows a mass of p
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= p, 0.0)  # never the first (p > 0)
    return ids, probs


def sample_next(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token per row, (B, 1), from the `candidates` of (B, V) logits: one uniform number per
    row against their cumulative weights (inverse CDF; torch.multinomial over the whole
    vocabulary costs a sizeable share of a decode step on CPU)."""
    ids, weights = candidates(logits, temperature, top_k, top_p)
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all()):  # torch.multinomial raised here too
        raise ValueError(f"cannot sample: {DIVERGED}")
    u = torch.rand(total.shape, generator=generator, device=total.device) * total
    # the first index whose cdf exceeds u is never a zero-weight one; the clamp (to the last index
    # that adds weight) only matters when rounding lets u reach the total
    j = torch.minimum(torch.searchsorted(cdf, u, right=True), (cdf < total).sum(-1, keepdim=True))
    return j if ids is None else ids.gather(-1, j)


class _Window:
    """The most recent KEEP_FRACTION of block_size tokens of a context that outgrew it; warns
    once (`warnings.warn`, or `on_window` when given) the first time."""

    def __init__(self, block: int, on_window: Callable[[str], None] | None):
        self.block, self.keep = block, max(1, int(block * KEEP_FRACTION))
        self.on_window, self.warned = on_window, False

    def __call__(self, context: list[int]) -> list[int]:
        if not self.warned:
            msg = (f"context of {len(context)} tokens exceeds block_size={self.block}: "
                   f"keeping the most recent {self.keep} tokens (older ones are forgotten)")
            if self.on_window is not None:
                self.on_window(msg)
            else:
                warnings.warn(msg, stacklevel=4)
            self.warned = True
        return context[-self.keep:]


def _check_samples(ids: list[int], num_samples: int, on_token) -> None:
    if len(ids) == 0:
        raise ValueError("ids must hold at least one token")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 (got {num_samples})")
    if on_token is not None and num_samples != 1:
        raise ValueError("on_token streams one sample: it needs num_samples == 1")


def _prefill(model, prompt: list[int], rows: int):
    """(cache, logits (rows, 1, V)): `prompt` prefilled once, its keys/values copied to every row."""
    device = model.tok_emb.weight.device
    cache = model.new_cache(rows, device=device)
    one = cache if rows == 1 else model.new_cache(1, device=device)
    logits, _ = model(torch.tensor([prompt], device=device), cache=one)
    if rows > 1:
        cache.copy_prefix(one)
        cache.pos = one.pos
        logits = logits.expand(rows, -1, -1)
    return cache, logits


def _pick(logits: Tensor, seen: Tensor | None, repetition_penalty: float, temperature: float,
          top_k: int | None, top_p: float | None, generator: torch.Generator | None) -> Tensor:
    """The next token of each row, (B, 1), from the last position's logits (B, T, V)."""
    x = logits[:, -1].float()
    if seen is not None:
        x = apply_repetition_penalty(x, seen, repetition_penalty)
    if temperature == 0 or top_k == 1:
        return _greedy(x)
    return sample_next(x, temperature, top_k, top_p, generator)


@torch.inference_mode()
def generate_batch(model, ids: list[int], max_new_tokens: int, num_samples: int, *,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   repetition_penalty: float = 1.0, stop_ids: Iterable[int] = (),
                   generator: torch.Generator | None = None,
                   on_token: Callable[[int], None] | None = None,
                   on_window: Callable[[str], None] | None = None) -> list[list[int]]:
    """`num_samples` independent continuations of the same prompt `ids`, decoded as one batch.

    The prompt is prefilled once and its keys/values copied to every row; each step then runs
    all rows through one forward (a batch-B step reads the weights once, like a batch-1 step).
    Each row stops at its own stop id; the call returns when all rows have stopped or reached
    max_new_tokens. Same arguments as `generate`; on_token needs num_samples == 1."""
    _check(temperature, top_k, top_p, repetition_penalty, max_new_tokens)
    _check_samples(ids, num_samples, on_token)
    if max_new_tokens == 0:
        return [[] for _ in range(num_samples)]
    B, block, device = num_samples, model.config.block_size, model.tok_emb.weight.device
    stop, window = set(int(s) for s in stop_ids), _Window(block, on_window)
    history = [list(ids) for _ in range(B)]  # everything so far per row, for the sliding window
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        seen[:, torch.tensor(ids, device=device)] = True
    was_training = model.training
    model.eval()
    step = StepThreads(device)
    try:
        cache, logits = _prefill(model, ids if len(ids) <= block else window(ids), B)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        while True:
            nxt = _pick(logits, seen, repetition_penalty, temperature, top_k, top_p, generator)
            tokens = nxt.view(-1).tolist()  # the one host sync per step
            if min(tokens) < 0:
                raise ValueError(f"cannot decode: {DIVERGED}")
            for r, token in enumerate(tokens):
                history[r].append(token)  # stopped rows too: every row keeps the same length
                if not done[r]:
                    out[r].append(token)
                    done[r] = token in stop or len(out[r]) == max_new_tokens
            if on_token is not None:
                on_token(tokens[0])
            if all(done):
                return out
            if seen is not None:
                seen.scatter_(1, nxt, True)
            if cache.pos < block:
                logits, _ = step(model, nxt, cache=cache)
            else:  # window full: re-prefill the most recent tokens (rows have equal lengths)
                cache.reset()
                step.restore()
                logits, _ = model(torch.tensor([window(h) for h in history], device=device), cache=cache)
    finally:
        step.restore()
        model.train(was_training)


@torch.inference_mode()
def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int,
                 stop_ids: Iterable[int] = ()) -> list[list[int]]:
    """Greedy continuations of several prompts, decoded as one ragged batch; `generate`'s
    tokens for each (temperature 0), up to float rounding in the batched matmuls.

    A row stops after a stop id (included) or max_new_tokens. A prompt too long to leave room
    for max_new_tokens in the context (the window would slide) is decoded alone by `generate`."""
    _check(0.0, None, None, 1.0, max_new_tokens)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    block, stop = model.config.block_size, set(int(s) for s in stop_ids)
    out: list[list[int]] = [[] for _ in prompts]
    rows = [i for i, p in enumerate(prompts) if len(p) + max_new_tokens <= block]
    for i, p in enumerate(prompts):
        if len(p) + max_new_tokens > block:
            out[i] = generate(model, p, max_new_tokens, temperature=0.0, stop_ids=stop)
    if not rows or max_new_tokens == 0:
        return out
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()
    step = StepThreads(device)
    try:
        cache = model.new_cache(len(rows), device=device)
        one = model.new_cache(1, device=device)
        firsts = []
        for r, i in enumerate(rows):  # prefill alone: the same numbers as `generate`
            one.reset()
            logits, _ = model(torch.tensor([prompts[i]], device=device), cache=one)
            cache.copy_prefix(one, slice(r, r + 1))
            firsts.append(logits[:, -1])
        nxt = _greedy(torch.cat(firsts).float())
        cache.lengths = torch.tensor([len(prompts[i]) for i in rows], device=device)
        cache.pos = max(len(prompts[i]) for i in rows)  # the model advances both per step
        while True:
            keep = []
            tokens = nxt.view(-1).tolist()  # the one host sync per step
            if min(tokens) < 0:
                raise ValueError(f"cannot decode: {DIVERGED}")
            for r, token in enumerate(tokens):
                out[rows[r]].append(token)
                if not (token in stop or len(out[rows[r]]) == max_new_tokens):
                    keep.append(r)
            if not keep:
                return out
            if len(keep) < len(rows):  # finished rows leave the batch
                index = torch.tensor(keep, device=device)
                cache.keep_rows(index)
                nxt = nxt[index]
                rows = [rows[r] for r in keep]
                # a row's cache holds its prompt and all its tokens but the newest
                cache.pos = max(len(prompts[i]) + len(out[i]) - 1 for i in rows)
            logits, _ = step(model, nxt, cache=cache)
            nxt = _greedy(logits[:, -1].float())
    finally:
        step.restore()
        model.train(was_training)
