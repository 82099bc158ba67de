"""DVC stage `eval@{pretrain,finetune}`: one model -> metrics/eval/<model>.json and
metrics/samples/<model>.json.

    python stages/eval.py pretrain|finetune

Reads `eval` from params.yaml, the model directory out/<model>, the test splits
data/tokens/{pretrain,sft}/test.* and data/processed/{pretrain/stats.json, sft/test.jsonl}, and
writes (each atomically):
- metrics/eval/<model>.json: {"lm", "sft", "gen", "baseline": {"gen"}, "settings"}, nested so
  `dvc metrics show/diff` lists e.g. `metrics/eval/finetune.json  gen.rougeL`;
- metrics/samples/<model>.json: {prompt: answer} in params order, pretty-printed, so `git diff`
  shows how the answers changed.
One model per stage (foreach): an experiment that changes only fine-tuning re-runs
`eval@finetune`, and DVC skips `eval@pretrain`, whose deps did not change.
What each number means is in `minigpt/evaluate.py`. Any error is one line `error: ...` on stderr
and exit status 2; MINIGPT_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minigpt: the code DVC tracks

from minigpt.files import atomic_write_json  # noqa: E402
from minigpt.config import load_params  # noqa: E402
from minigpt.evaluate import run_eval  # noqa: E402
from minigpt.stage import run_corpus_stage  # noqa: E402

MODELS = ("pretrain", "finetune")
TOKENS = Path("data/tokens")
PROCESSED = Path("data/processed")
METRICS = Path("metrics/eval")
SAMPLES = Path("metrics/samples")


def run(name: str) -> tuple[dict, dict]:
    cfg = load_params().eval
    phases: dict = {}
    metrics, samples = run_eval(cfg, Path("out") / name, TOKENS, PROCESSED, phases)
    METRICS.mkdir(parents=True, exist_ok=True)
    SAMPLES.mkdir(parents=True, exist_ok=True)
    atomic_write_json(METRICS / f"{name}.json", metrics)  # pretty-printed: readable `git diff`s
    atomic_write_json(SAMPLES / f"{name}.json", samples)
    return metrics, phases


def summary(name: str, result: tuple[dict, dict], seconds: float) -> str:
    m, phases = result
    lm, sft, gen, s = m["lm"], m["sft"], m.get("gen", {}), m["settings"]
    line = (f"eval@{name}: ppl {lm['perplexity']:.2f}, {lm['bits_per_byte']:.3f} bits/byte, "
            f"word ppl {lm['word_perplexity']:.1f}, sft loss {sft['loss']}")
    if gen:
        line += f", rougeL {gen['rougeL']:.3f}, bleu {gen['bleu']:.2f}"
    base = m["baseline"].get("gen")
    if base:
        line += f" (echo baseline rougeL {base['rougeL']:.3f}, bleu {base['bleu']:.2f})"
    line += " [" + ", ".join(f"{k} {v:.0f}s" for k, v in phases.items()) + "]"
    return (f"{line} ({s['tokens_scored']:,} tokens, window {s['window']}, stride {s['stride']}) "
            f"-> {METRICS / name}.json, {SAMPLES / name}.json ({seconds:.1f}s)")


def main(argv: list[str] | None = None) -> int:
    return run_corpus_stage(argv, "eval.py", MODELS, run, summary)


if __name__ == "__main__":
    sys.exit(main())
