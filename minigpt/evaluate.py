"""The eval stage for one model: perplexity and bits per byte, SFT loss, answers and their scores.

Design choices (and why)
- The pieces: `perplexity` (summed NLL and the metrics made of it), `evaldata` (the test splits),
  `answers` (prompts cut to fit, greedy answers), `scores` (ROUGE/BLEU/chrF, the echo baseline).
- Bits per byte = total NLL / ln 2 / UTF-8 bytes; word perplexity = exp(total NLL / words), counts
  from the process stage: both independent of the tokenizer. Words are those of the detokenized
  text, so published WikiText word perplexities are close to ours, not identical. A `max_tokens`
  cap scales bytes and words by the fraction scored (flagged `settings.sizes_scaled`).
- SFT loss is fine-tuning's response-only loss over the SFT test split, each example cut as
  fine-tuning cuts it (`sft.build_split`); dropped examples are counted.
- An echo baseline (answer = instruction + context) is the floor. Scores keep their libraries'
  scales: ROUGE F1 in [0, 1] (`rouge_score`), BLEU and chrF in [0, 100] (sacrebleu).
- `eval.max_tokens` caps the scored stream by default (WikiText's test split is scored whole) so
  a carved test split of a large corpus costs a bounded time; only the scored prefix is read. One
  model per call and per DVC stage (`eval@pretrain`, `eval@finetune`): a fine-tuning experiment
  re-scores only that model.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from minigpt.answers import greedy_answers
from minigpt.config import EvalConfig
from minigpt.evaldata import EvalData, EvalError, load_eval_data
from minigpt.perplexity import PAD_ID, lm_metrics, loss_metrics, masked_nll, sliding_window_nll
from minigpt.runtime import DeviceError, resolve_device
from minigpt.scores import echo_baseline, text_scores
from minigpt.sft import build_split
from minigpt.tokenizer import same_tokenizer

TOKENS_PER_BATCH = {"cpu": 1024, "cuda": 65536, "mps": 16384}  # window batch size, in tokens
SFT_BATCH = 16  # examples per batch for the SFT loss


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


# ----------------------------------------------------------------------------- the eval stage


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
