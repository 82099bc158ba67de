"""Autoregressive decoding with a KV cache, and the sampling filters.

Design choices
- One prefill of the prompt, then one token per step through the model's preallocated `KVCache`:
  at this model size a decode step is bound by per-step Python/dispatch overhead, not by FLOPs or
  bandwidth, so the loop does as little as possible per token: no re-allocation, no sort when
  greedy, the sampled token fed back as a tensor, one host sync (`.item()`) per token.
- Positions never exceed block_size (RoPE tables stop there). When the context fills up, the
  sampler keeps the most recent 3/4 of the window and re-prefills it, then continues token by
  token: one batched prefill every block_size/4 tokens instead of a full forward per token.
  It warns once per call (`warnings.warn`, or `on_window` if given) when that first happens.
- Filters follow Hugging Face's semantics (temperature, then repetition penalty on the raw logits
  CTRL-style over every id seen so far, prompt included, then top-k, then top-p, keeping at least
  one token), so `temperature=0`, `top_k=1` and a tiny `top_p` are all greedy.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch import Tensor

KEEP_FRACTION = 0.75  # of block_size, kept when the window slides


def _check(temperature, top_k, top_p, repetition_penalty, max_new_tokens) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None (got {top_k})")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p})")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (got {repetition_penalty})")
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
    _check(temperature, top_k, top_p, repetition_penalty, max_new_tokens)
    if len(ids) == 0:
        raise ValueError("ids must hold at least one token")
    if max_new_tokens == 0:
        return []
    block = model.config.block_size
    keep = max(1, int(block * KEEP_FRACTION))
    device = model.tok_emb.weight.device
    stop = set(int(s) for s in stop_ids)
    greedy = temperature == 0 or top_k == 1
    penalize = repetition_penalty != 1.0
    history = list(ids)  # everything so far, for the sliding window
    seen = None
    if penalize:
        seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(history, device=device)] = True
    warned = False

    def slide(context: list[int]) -> list[int]:
        nonlocal warned
        if not warned:
            msg = (f"context of {len(context)} tokens exceeds block_size={block}: "
                   f"keeping the most recent {keep} tokens (older ones are forgotten)")
            if on_window is not None:
                on_window(msg)
            else:
                warnings.warn(msg, stacklevel=3)
            warned = True
        return context[-keep:]

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(1, device=device)
        prompt = history if len(history) <= block else slide(history)
        logits, _ = model(torch.tensor([prompt], device=device), cache=cache)
        out: list[int] = []
        while True:
            x = logits[0, -1].float()
            if penalize:
                x = apply_repetition_penalty(x, seen, repetition_penalty)
            if greedy:
                nxt = x.argmax()
            else:
                x = x / temperature
                if top_k is not None:
                    x = filter_top_k(x, top_k)
                if top_p is not None:
                    x = filter_top_p(x, top_p)
                nxt = torch.multinomial(x.softmax(-1), 1, generator=generator)[0]
            token = int(nxt.item())
            out.append(token)
            history.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop or len(out) == max_new_tokens:
                return out
            if penalize:
                seen[nxt] = True
            if cache.pos < block:
                logits, _ = model(nxt.view(1, 1), cache=cache)
            else:  # window full: re-prefill the most recent tokens
                cache.reset()
                logits, _ = model(torch.tensor([slide(history)], device=device), cache=cache)
    finally:
        model.train(was_training)
