"""DVC stage `eval`: both models -> metrics/eval.json and metrics/samples.json.

    python stages/eval.py

Reads `eval` from params.yaml, the model directories out/pretrain and out/finetune, the test splits
data/tokens/{pretrain,sft}/test.* and data/processed/{pretrain/stats.json, sft/test.jsonl}, and
writes (each atomically):
- metrics/eval.json: {"pretrain": {"lm", "sft", "gen"}, "finetune": {...}, "baseline": {"gen"},
  "settings": {...}}, nested so `dvc metrics show/diff` lists e.g. `finetune.gen.rougeL`;
- metrics/samples.json: {prompt: {"pretrain": answer, "finetune": answer}} in params order,
  pretty-printed, so `git diff` shows how the answers changed.
What each number means is in `minigpt/evaluate.py`. Any error is one line `error: ...` on stderr
and exit status 2; MINIGPT_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minigpt: the code DVC tracks

from minigpt.files import atomic_write_json  # noqa: E402
from minigpt.config import load_params  # noqa: E402
from minigpt.evaluate import run_eval  # noqa: E402
from minigpt.stage import run_stage  # noqa: E402

MODELS = {"pretrain": Path("out/pretrain"), "finetune": Path("out/finetune")}
TOKENS = Path("data/tokens")
PROCESSED = Path("data/processed")
METRICS = Path("metrics/eval.json")
SAMPLES = Path("metrics/samples.json")


def summary(m: dict, phases: dict, seconds: float) -> str:
    parts = []
    for name in MODELS:
        lm, sft, gen = m[name]["lm"], m[name]["sft"], m[name].get("gen", {})
        part = (f"{name} ppl {lm['perplexity']:.2f}, {lm['bits_per_byte']:.3f} bits/byte, "
                f"word ppl {lm['word_perplexity']:.1f}, sft loss {sft['loss']}")
        if gen:
            part += f", rougeL {gen['rougeL']:.3f}, bleu {gen['bleu']:.2f}"
        part += " [" + ", ".join(f"{k} {v:.0f}s" for k, v in phases.get(name, {}).items()) + "]"
        parts.append(part)
    base = m["baseline"].get("gen")
    if base:
        parts.append(f"echo baseline rougeL {base['rougeL']:.3f}, bleu {base['bleu']:.2f}")
    s = m["settings"]
    return (f"eval: {'; '.join(parts)} ({s['tokens_scored']:,} tokens, window {s['window']}, "
            f"stride {s['stride']}) -> {METRICS}, {SAMPLES} ({seconds:.1f}s)")


def run(start: float) -> str:
    cfg = load_params().eval
    phases: dict = {}
    metrics, samples = run_eval(cfg, MODELS, TOKENS, PROCESSED, phases)
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(METRICS, metrics)  # pretty-printed: readable `git diff`s
    atomic_write_json(SAMPLES, samples)
    return summary(metrics, phases, time.perf_counter() - start)


def main() -> int:
    start = time.perf_counter()
    return run_stage(lambda: run(start))


if __name__ == "__main__":
    sys.exit(main())
