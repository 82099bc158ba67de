"""Greedy answers to chat prompts, for scoring: the room kept for the answer, the prompt cut to
fit, one ragged batch decoded, the text without its closing token.

Generation is greedy (deterministic), the same chat prompt for both models; a prompt too long for
`prompt_budget` is cut like a training example, never the template tokens.
"""

from __future__ import annotations

from typing import Callable, Sequence

from minigpt.evaldata import EOT_ID, EvalError
from minigpt.precision import autocast, eval_dtype
from minigpt.sample import greedy_batch
from minigpt.template import encode_prompt, truncate_prompt
from minigpt.tokenizer import decode


def prompt_budget(block_size: int, max_new_tokens: int) -> int:
    """Prompt tokens allowed: room for the whole answer in the context, but at least half of it
    (the one rule for the room kept for an answer: evaluation, `minigpt chat`)."""
    return max(block_size - max_new_tokens, block_size // 2)


def fit_prompt(ids: Sequence[int], max_len: int) -> list[int]:
    """A chat prompt cut to `max_len` tokens the way training cuts examples
    (`template.truncate_prompt`: the end of the context goes first, then of the instruction). Long
    Dolly contexts would otherwise push the instruction out of the sampler's sliding window."""
    cut = truncate_prompt(ids, max_len)
    if cut is None:
        raise EvalError(f"a prompt cannot be cut to {max_len} tokens (context too small)")
    return [int(i) for i in cut]


def answer_text(tok, new: Sequence[int]) -> str:
    """A generated answer as text, without the closing <|endoftext|>."""
    new = list(new)
    if new and new[-1] == EOT_ID:
        new = new[:-1]
    return decode(tok, new).strip()


def greedy_answers(model: Callable, tok, prompts: Sequence[tuple[str, str]],
                   max_new_tokens: int) -> list[str]:
    """Greedy answers to (instruction, context) prompts in the chat template, decoded as one
    ragged batch (`sample.greedy_batch`: the same tokens as one prompt at a time)."""
    budget = prompt_budget(model.config.block_size, max_new_tokens)
    ids = [fit_prompt(encode_prompt(tok, instruction, context), budget) for instruction, context in prompts]
    device = model.tok_emb.weight.device
    with autocast(device, eval_dtype(device)):
        new = greedy_batch(model, ids, max_new_tokens, stop_ids=[EOT_ID])
    return [answer_text(tok, n) for n in new]
