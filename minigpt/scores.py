"""Reference-based scores of generated answers: ROUGE-1/2/L, BLEU, chrF, and the echo baseline.

Design choices
- ROUGE F1 with stemming (rouge-score, Google's reference implementation), averaged over examples;
  BLEU and chrF at corpus level (sacrebleu, the field's standard): the numbers are comparable with
  published ones.
- The echo baseline (repeat the question and its context) is scored beside every model: answers
  that score below it say nothing about instruction following.
"""

from __future__ import annotations

from typing import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def echo_baseline(instruction: str, context: str = "") -> str:
    """The trivial answer: repeat the question (and its context). Scores below this mean nothing."""
    return f"{instruction}\n\n{context}" if context else instruction


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """ROUGE-1/2/L F1 (mean over examples, [0, 1]) and corpus BLEU / chrF ([0, 100])."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"examples": 0}
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for key in ROUGE_TYPES:
            sums[key] += scores[key].fmeasure
    out = {key: sums[key] / len(predictions) for key in ROUGE_TYPES}
    out["bleu"] = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    out["chrf"] = sacrebleu.corpus_chrf(list(predictions), [list(references)]).score
    out["examples"] = len(predictions)
    return out
