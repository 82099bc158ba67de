"""Evaluation: sliding-window perplexity, bits per byte, masked SFT loss, ROUGE/BLEU/chrF, samples.

Design choices (and why)
- Perplexity uses HF's sliding window ("perplexity of fixed-length models"): windows of block_size
  advance by `stride`, each scoring only targets not yet seen, so every token is predicted once with
  at least `block_size - stride` of context. The last window is moved back to end at the last token
  (one batched shape, more context for the tail).
- The pre-training test stream is scored as stored, `<|endoftext|>` after each document included,
  with one EOT prepended so the first document is predicted like every later one.
- Bits per byte = total NLL / ln 2 / UTF-8 bytes; word perplexity = exp(total NLL / words), counts
  from the process stage: both independent of the tokenizer. Words are those of the detokenized
  text, so published WikiText word perplexities are close to ours, not identical. A `max_tokens`
  cap scales bytes and words by the fraction scored (flagged `settings.sizes_scaled`).
- Losses go through `model(idx, targets)` (-100 ignored, skipped before the head). CPUs stay fp32,
  so a metric does not move with the evaluating machine's instruction set.
- SFT loss is fine-tuning's response-only loss over the SFT test split, each example cut as
  fine-tuning cuts it (`sft.build_split`); dropped examples are counted.
- Generation is greedy (deterministic), same chat prompt for both models, a long prompt cut like a
  training example; an echo baseline (answer = instruction + context) is the floor. Scores keep
  their libraries' scales: ROUGE F1 in [0, 1] (`rouge_score`), BLEU and chrF in [0, 100] (sacrebleu).
- Speed on CPU: one worker thread per core over the windows (`summed_batches`), the answers as one
  ragged batch (`sample.greedy_batch`); timings in bench/eval_throughput.py. `eval.max_tokens` caps
  the scored stream by default (WikiText's test split is scored whole) so a carved test split of a
  large corpus costs a bounded time; only the scored prefix is read. One model per call and per
  DVC stage (`eval@pretrain`, `eval@finetune`): a fine-tuning experiment re-scores only that model.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from minigpt.template import encode_prompt, truncate_example
from minigpt.config import EvalConfig
from minigpt.encode import read_meta, read_sft, read_tokens
from minigpt.precision import autocast, eval_dtype
from minigpt.runtime import DeviceError, one_cpu_thread, resolve_device
from minigpt.sample import greedy_batch
from minigpt.scores import echo_baseline, text_scores
from minigpt.model import IGNORE
from minigpt.sft import build_split, collate
from minigpt.files import read_objects, str_field
from minigpt.tokenizer import EOT, PAD, SPECIAL_TOKENS, decode, same_tokenizer

LN2 = math.log(2.0)
EOT_ID, PAD_ID = SPECIAL_TOKENS.index(EOT), SPECIAL_TOKENS.index(PAD)  # fixed ids (FORMATS.md)
TOKENS_PER_BATCH = {"cpu": 1024, "cuda": 65536, "mps": 16384}  # window batch size, in tokens
SFT_BATCH = 16  # examples per batch for the SFT loss


# ----------------------------------------------------------------------------- errors


class EvalError(ValueError):
    """Inputs that cannot be evaluated; the message is one line naming the file or key."""


# ----------------------------------------------------------------------------- perplexity


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


# ----------------------------------------------------------------------------- SFT loss


def sft_rows(examples: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(x, y) rows for next-token prediction: y = -100 wherever the loss mask is 0.

    mask[j] == 1 means token j is a target (the response and its closing EOT), so the target
    y[j - 1] = ids[j] counts exactly when mask[j] is 1, as in fine-tuning (`minigpt.sft`)."""
    rows = []
    for ids, mask in examples:
        ids = np.asarray(ids, dtype=np.int64)
        rows.append((ids[:-1], np.where(np.asarray(mask[1:], dtype=bool), ids[1:], IGNORE)))
    return rows


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
    batches = (collate(sft_rows([examples[i] for i in order[s : s + batch_size]]), pad_id) for s in starts)
    batches = ((x.to(device), y.to(device)) for x, y in batches)
    total, count = summed_batches(model, batches, len(starts), device, "sft loss", progress)
    return total, count, len(order)


def loss_metrics(total_nll: float, n_tokens: int) -> dict:
    """Mean loss and perplexity of a (sum, count) pair."""
    loss = total_nll / n_tokens if n_tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if n_tokens else float("nan")}


def rounded(obj, digits: int = 6):
    """Floats rounded to `digits` significant digits, recursively: readable, stable git diffs.

    NaN/inf become None (null): strict JSON has no NaN, and `dvc metrics` would choke on it."""
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    return obj


# ----------------------------------------------------------------------------- generation


def prompt_budget(block_size: int, max_new_tokens: int) -> int:
    """Prompt tokens allowed: room for the whole answer in the context, but at least half of it."""
    return max(block_size - max_new_tokens, block_size // 2)


def fit_prompt(ids: Sequence[int], max_len: int) -> list[int]:
    """A chat prompt cut to `max_len` tokens exactly the way training cuts examples.

    `encode_prompt` ends with `<|assistant|>`, "\\n"; that "\\n" plays the response for
    `template.truncate_example`, which then keeps the template tokens and drops the end of the
    context, then of the instruction. Long Dolly contexts would otherwise push the instruction
    out of the sampler's sliding window."""
    ids = list(ids)
    if len(ids) <= max_len:
        return ids
    cut = truncate_example(ids, [0] * (len(ids) - 1) + [1], max_len)
    if cut is None:
        raise EvalError(f"a prompt cannot be cut to {max_len} tokens (context too small)")
    return [int(i) for i in cut[0]]


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


# ----------------------------------------------------------------------------- the eval stage


@dataclass
class EvalData:
    """Everything a model is evaluated on (docs/FORMATS.md paths)."""

    tokens: np.ndarray
    """Pre-training test stream with one <|endoftext|> prepended (see the module docstring), cut
    to the `max_tokens` it is scored on: only that much is read from the memmap."""
    n_bytes: int
    """UTF-8 bytes of the test split's text (stats.json)."""
    n_words: int
    """Whitespace words of the test split's text (stats.json)."""
    sft: list[tuple[np.ndarray, np.ndarray]]
    """Every SFT test example as (ids, mask), untruncated."""
    questions: list[dict] = field(default_factory=list)
    """The first `generate_examples` SFT test rows: instruction, context, response."""
    tokenizer_hash: str = ""
    """The tokenizer the token files were made with; the model must match it."""
    tokens_total: int = 0
    """Tokens in the whole test stream (0: as many as `tokens` holds targets)."""

    def __post_init__(self) -> None:
        self.tokens_total = self.tokens_total or len(self.tokens) - 1


def read_split_size(stats_path: Path, split: str = "test") -> tuple[int, int]:
    """(bytes, words) of a processed split from the process stage's stats.json."""
    import json

    try:
        stats = json.loads(stats_path.read_text())
        entry = stats[split]
        n_bytes, n_words = int(entry["bytes"]), int(entry["words"])
    except FileNotFoundError:
        raise EvalError(f"{stats_path}: not found (run `dvc repro process@pretrain`)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise EvalError(f"{stats_path}: no {split}.bytes / {split}.words ({e!r})") from None
    if n_bytes <= 0 or n_words <= 0:
        raise EvalError(f"{stats_path}: the {split} split is empty ({n_bytes} bytes, {n_words} words)")
    return n_bytes, n_words


def read_questions(path: Path, limit: int) -> list[dict]:
    """The first `limit` rows of a processed SFT split (the same order encode used)."""
    rows: list[dict] = []
    if limit <= 0:
        return rows
    if not path.is_file():
        raise EvalError(f"{path}: not found (run `dvc repro process@sft`)")
    for where, _, obj in read_objects(path):
        rows.append({k: str_field(where, obj, k) for k in ("instruction", "context", "response")})
        if len(rows) == limit:
            break
    return rows


def load_eval_data(tokens_dir: Path, processed_dir: Path, generate_examples: int,
                   max_tokens: int = 0) -> EvalData:
    """Read the test splits: pretrain token stream + sizes, SFT ids/masks, SFT questions.
    `max_tokens` > 0: only the stream's first max_tokens targets are read (the rest stays on disk)."""
    meta = read_meta(tokens_dir / "pretrain" / "test")
    thash = meta.get("tokenizer_hash", "")
    stream = read_tokens(tokens_dir / "pretrain" / "test", thash)
    if len(stream) == 0:
        raise EvalError(f"{tokens_dir / 'pretrain' / 'test.bin'}: no tokens")
    # condition the first document on <|endoftext|> like every other one (see the module docstring);
    # the EOT is the first context token, so max_tokens targets need max_tokens stream tokens
    kept = stream[:max_tokens] if max_tokens > 0 else stream
    tokens = np.concatenate([np.array([EOT_ID], dtype=stream.dtype), kept])
    n_bytes, n_words = read_split_size(processed_dir / "pretrain" / "stats.json")
    ids, mask, idx, _ = read_sft(tokens_dir / "sft", "test", thash)
    idx = idx.astype(np.int64)
    sft = [(np.asarray(ids[a:b]), np.asarray(mask[a:b])) for a, b in zip(idx[:-1], idx[1:])]
    questions = read_questions(processed_dir / "sft" / "test.jsonl", generate_examples)
    return EvalData(tokens, n_bytes, n_words, sft, questions, thash, tokens_total=len(stream))


def window_batch(block_size: int, device: torch.device) -> int:
    """Windows per forward pass: a fixed token budget per device type."""
    return max(1, TOKENS_PER_BATCH.get(device.type, 8192) // block_size)


def evaluate_lm(model: Callable, data: EvalData, cfg: EvalConfig, device: torch.device) -> dict:
    """Sliding-window loss, perplexity, bits per byte and word perplexity on the test stream."""
    block = model.config.block_size  # eval.stride fits: check_model, before the model loaded
    nll, n = sliding_window_nll(model, data.tokens, block, cfg.stride, window_batch(block, device),
                                device, cfg.max_tokens, progress=True)
    # A capped run scores a prefix of the stream: scale its size by the share of tokens scored.
    share = n / data.tokens_total
    return lm_metrics(nll, n, data.n_bytes * share, data.n_words * share)


def evaluate_sft_loss(model: Callable, data: EvalData, device: torch.device) -> dict:
    """Response-only loss over the SFT test split, cut to the model's context as in fine-tuning."""
    split = build_split("test", iter(data.sft), model.config.block_size, allow_empty=True)
    examples = list(zip(split.ids, split.masks))
    nll, n, scored = masked_nll(model, examples, SFT_BATCH, device, PAD_ID, progress=True)
    return {**loss_metrics(nll, n), "examples": scored, "tokens": n, "dropped": split.dropped,
            "truncated": split.truncated}


def evaluate_model(model: Callable, tok, data: EvalData, cfg: EvalConfig, device: torch.device,
                   seconds: dict | None = None) -> tuple[dict, list[str], list[str]]:
    """(metrics, answers to the SFT questions, answers to cfg.prompts) for one model.

    `seconds`, when given, receives the wall time of each phase (lm, sft, generate): timings
    stay out of the metrics, which must be identical from run to run."""
    model.eval()  # no dropout (a fine-tuned config keeps its training dropout)
    seconds = {} if seconds is None else seconds
    start = time.perf_counter()
    metrics = {"lm": evaluate_lm(model, data, cfg, device)}
    seconds["lm"], start = time.perf_counter() - start, time.perf_counter()
    metrics["sft"] = evaluate_sft_loss(model, data, device)
    seconds["sft"], start = time.perf_counter() - start, time.perf_counter()
    questions = [(q["instruction"], q["context"]) for q in data.questions]
    # the test questions and the fixed prompts in one batch
    replies = greedy_answers(model, tok, questions + [(p, "") for p in cfg.prompts], cfg.max_new_tokens)
    answers, samples = replies[: len(questions)], replies[len(questions) :]
    if answers:
        metrics["gen"] = text_scores(answers, [q["response"] for q in data.questions])
    seconds["generate"] = time.perf_counter() - start
    return metrics, answers, samples


def baseline_scores(data: EvalData) -> dict:
    """The echo baseline, scored like the models: what repeating the question earns."""
    if not data.questions:
        return {}
    echoes = [echo_baseline(q["instruction"], q["context"]) for q in data.questions]
    return {"gen": text_scores(echoes, [q["response"] for q in data.questions])}


def check_model(config: dict, data: EvalData, cfg: EvalConfig, where: Path) -> None:
    """The model must speak the test files' tokenizer and have room for the stride."""
    got = config.get("tokenizer_hash")
    same_tokenizer(got, data.tokenizer_hash, f"{where}: trained with tokenizer {got}, but the test "
                   f"tokens were encoded with {data.tokenizer_hash} (re-run the pipeline: `dvc repro`)",
                   EvalError)
    block = config.get("block_size")
    if isinstance(block, int) and cfg.stride > block:
        raise EvalError(f"eval.stride: {cfg.stride} exceeds the model's block_size ({block}, {where})")


def run_eval(cfg: EvalConfig, model_dir: Path, tokens_dir: Path, processed_dir: Path,
             seconds: dict | None = None) -> tuple[dict, dict]:
    """Evaluate one model directory -> (metrics for its eval json, {prompt: answer}).

    One model per call (the eval stage is a foreach over the two models), so an experiment that
    changes only fine-tuning re-scores only the fine-tuned model: DVC skips the other.
    `seconds`, when given, receives {phase: wall seconds}."""
    from minigpt.checkpoint import load_model, read_config

    try:
        device = resolve_device(cfg.device, where="eval.device")
    except DeviceError as e:
        raise EvalError(str(e)) from None
    data = load_eval_data(tokens_dir, processed_dir, cfg.generate_examples, cfg.max_tokens)
    check_model(read_config(model_dir), data, cfg, model_dir)  # fail before minutes of work
    model, tok, _ = load_model(model_dir, device)
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:  # its losses would be NaN and its greedy answers arbitrary ids: nothing to score
        raise EvalError(f"{model_dir}: weights hold NaN or inf ({bad[0]}; the training run "
                        "diverged), not scoring it")
    metrics, _, answers = evaluate_model(model, tok, data, cfg, device, seconds)
    metrics["baseline"] = baseline_scores(data)
    n_targets = data.tokens_total
    scored = min(n_targets, cfg.max_tokens) if cfg.max_tokens else n_targets
    metrics["settings"] = {  # strings and booleans show in `dvc metrics show` too
        "method": "sliding_window",
        "window": model.config.block_size,
        "stride": cfg.stride,
        "eot_scored": True,
        "tokens_scored": scored,
        "tokens_total": n_targets,
        "fraction_scored": scored / n_targets,
        "sizes_scaled": scored < n_targets,  # bytes/words below are the scored share's estimate
        "bytes": data.n_bytes * scored / n_targets,
        "words": data.n_words * scored / n_targets,
        "generate_examples": len(data.questions),
    }
    return rounded(metrics), dict(zip(cfg.prompts, answers))
