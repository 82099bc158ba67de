"""The model card (README.md) that `minigpt export --format hf` writes, and `--push-to-hub`.

Design choices
- The card is built from what the pipeline already wrote, nothing typed by hand: the model
  directory's config.json (architecture, stage, `training` summary) and, when present, the
  project's fixed artifact paths (docs/FORMATS.md): data/processed/{pretrain,sft}/stats.json
  (source, revision, sizes), data/tokens/{pretrain,sft}/{split}.json (token counts) and
  metrics/{pretrain,finetune}.json and metrics/eval/{pretrain,finetune}.json. Missing files leave
  their section saying so.
- Those files are untrusted input: only these fixed names under the project directory are read
  (never a path named inside a file), each at most 1 MB, and only plain numbers and short strings
  are rendered (markdown-escaped), so a hostile stats file cannot inject a link or a huge card.
- Dataset licenses are known for the pipeline's default sources (WikiText and Dolly: CC BY-SA
  3.0); any other source is named with "see the dataset's own license".
- Upload is `huggingface_hub.HfApi`: create_repo(exist_ok) then upload_folder of the export.
- The card's last line is an HTML comment (invisible on the Hub) with the SHA-256 of the text
  above it, so a re-export can tell a card the user edited (`card_edited`) from one it wrote:
  an edited card is kept as it is, and the user is told, rather than replaced.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

MAX_FILE = 1 << 20
LICENSES = {"wikitext": "CC BY-SA 3.0", "dolly": "CC BY-SA 3.0"}
METRIC_KEYS = ("steps", "tokens", "train_loss", "val_loss", "best_val_loss", "best_step",
               "tokens_per_s")
EVAL_KEYS = (("lm", "perplexity"), ("lm", "bits_per_byte"), ("lm", "word_perplexity"),
             ("sft", "loss"), ("gen", "rougeL"), ("gen", "bleu"), ("gen", "chrf"))


STAMP = re.compile(r"<!-- minigpt model card, sha256 ([0-9a-f]{64}) of the text above[^\n]* -->")


def _stamp(card: str) -> str:
    digest = hashlib.sha256(card.encode("utf-8")).hexdigest()
    return (f"{card}<!-- minigpt model card, sha256 {digest} of the text above (an edited card is "
            "kept by a re-export) -->\n")


def card_edited(data: bytes) -> bool:
    """Is README.md `data` anything but a card exactly as `model_card` wrote it?"""
    body, _, last = data.rstrip(b"\n").rpartition(b"\n")
    m = STAMP.fullmatch(last.decode("utf-8", "replace"))
    return m is None or hashlib.sha256(body + b"\n").hexdigest() != m[1]


def _read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing, too big or not an object."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_FILE:
            return None
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _text(value, limit: int = 120) -> str:
    """A scalar as safe markdown: numbers formatted, strings cut short and escaped."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)[:limit].replace("\n", " ")
    return re.sub(r"([\\`*_{}\[\]()<>#+!|])", r"\\\1", text)


def _license(source: str) -> str:
    for key, lic in LICENSES.items():
        if key in source.lower():
            return lic
    return "see the dataset's own license"


def _hub_id(source: str) -> str | None:
    """A Hugging Face dataset id (owner/name), or None for a local path."""
    return source if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not Path(source).exists() else None


STAGES = (("pretrain", "Pre-training", "documents"), ("sft", "Instruction tuning", "examples"))


def model_card(config: dict, num_params: int, name: str, project_dir: str | Path = ".") -> str:
    """The README.md of an exported model directory."""
    project = Path(project_dir)
    stats = {k: _read_json(project / "data/processed" / k / "stats.json") for k, _, _ in STAGES}
    sources = [str(s.get("source")) for s in stats.values() if s and s.get("source")]
    lines = (_front_matter(sources) + _model_section(config, num_params, name)
             + _data_section(project, stats) + _training_section(project, config)
             + _limits_section(config) + _licenses_section(sources))
    return _stamp("\n".join(lines) + "\n")


def _front_matter(sources: list[str]) -> list[str]:
    """The Hub's YAML header: library, tags, license (when every source's is known), datasets."""
    datasets = [h for s in sources if (h := _hub_id(s))]
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [minigpt, llama]"]
    if {_license(s) for s in sources} == {"CC BY-SA 3.0"}:
        front.append("license: cc-by-sa-3.0")
    if datasets:
        front.append("datasets: [" + ", ".join(datasets) + "]")
    front.append("---")
    return front


def _model_section(c: dict, num_params: int, name: str) -> list[str]:
    """The title, what the model is, its shape and (chat models) its prompt format."""
    chat = c.get("chat_template") is not None
    lines = [
        "", f"# {_text(name)}", "",
        f"A small {'instruction-tuned' if chat else 'base (pre-trained only)'} GPT trained from "
        "scratch with minigpt (a reproducible DVC pipeline), exported as a "
        "Hugging Face `LlamaForCausalLM` (the architecture is Llama-shaped: RMSNorm, RoPE, SwiGLU, "
        "tied embeddings).", "",
        "## Model", "",
        "| | |", "|---|---|",
        f"| parameters | {_text(num_params)} |",
        f"| layers / heads / width | {_text(c.get('n_layer'))} / {_text(c.get('n_head'))} / "
        f"{_text(c.get('n_embd'))} |",
        f"| SwiGLU hidden width | {_text(c.get('intermediate_size'))} |",
        f"| context | {_text(c.get('block_size'))} tokens |",
        f"| vocabulary | {_text(c.get('vocab_size'))} (byte-level BPE) |",
        f"| RoPE theta | {_text(c.get('rope_theta'))} |",
        f"| chat template | {_text(c.get('chat_template') or 'none')} |",
        f"| tokenizer hash | {_text(c.get('tokenizer_hash'))} |", "",
    ]
    if chat:
        lines += ["Prompt format (also in `tokenizer_config.json` as `chat_template`):", "",
                  "```", "<|user|>", "{instruction}", "<|assistant|>", "{response}<|endoftext|>",
                  "```", ""]
    return lines


def _data_section(project: Path, stats: dict[str, dict | None]) -> list[str]:
    """Per corpus: its source, revision, license and split sizes (with token counts)."""
    lines = ["## Data", ""]
    for key, title, unit in STAGES:
        s = stats[key]
        if s is None:
            lines += [f"- {title}: no `data/processed/{key}/stats.json` found.", ""]
            continue
        source = str(s.get("source"))
        lines += [f"### {title}: {_text(source)}", "",
                  f"- revision: {_text(s.get('revision') or 'not pinned')}",
                  f"- license: {_license(source)}", "",
                  f"| split | {unit} | words | bytes | tokens |", "|---|---:|---:|---:|---:|"]
        for split in ("train", "validation", "test"):
            row = s.get(split)
            if not isinstance(row, dict):
                continue
            tokens = _read_json(project / "data/tokens" / key / f"{split}.json") or {}
            lines.append(f"| {split} | {_text(row.get(unit))} | {_text(row.get('words'))} | "
                         f"{_text(row.get('bytes'))} | {_text(tokens.get('count'))} |")
        lines.append("")
    return lines


def _training_section(project: Path, c: dict) -> list[str]:
    """This directory's training summary, the runs' metrics and the evaluation table."""
    lines = ["## Training", ""]
    training = c.get("training") if isinstance(c.get("training"), dict) else {}
    if training:
        lines += [f"This directory's weights: stage `{_text(c.get('stage'))}`, "
                  f"{_text(training.get('steps'))} steps, {_text(training.get('tokens'))} tokens, "
                  f"on {_text(training.get('device'))} ({_text(training.get('dtype'))}, "
                  f"world size {_text(training.get('world_size'))}).", ""]
    metrics = {k: _read_json(project / "metrics" / f"{k}.json") for k in ("pretrain", "finetune")}
    if any(metrics.values()):
        lines += ["| run | " + " | ".join(METRIC_KEYS) + " |",
                  "|---|" + "---:|" * len(METRIC_KEYS)]
        for k, m in metrics.items():
            if m:
                lines.append(f"| {k} | " + " | ".join(_text(m.get(x)) for x in METRIC_KEYS) + " |")
        lines.append("")
    else:
        lines += ["No `metrics/*.json` found.", ""]
    return lines + _eval_table(project)


def _eval_table(project: Path) -> list[str]:
    """metrics/eval/*.json as one table, with the echo baseline when an eval recorded it."""
    evals = {k: _read_json(project / "metrics" / "eval" / f"{k}.json") for k in ("pretrain", "finetune")}
    rows = [(k, m) for k, m in evals.items() if m]
    baseline = next((m["baseline"] for _, m in rows if isinstance(m.get("baseline"), dict)), None)
    if baseline:
        rows.append(("echo baseline", baseline))
    if not rows:
        return []
    lines = ["Evaluation (`metrics/eval/*.json`: WikiText test split, Dolly test split):", "",
             "| model | " + " | ".join(".".join(k) for k in EVAL_KEYS) + " |",
             "|---|" + "---:|" * len(EVAL_KEYS)]
    for k, m in rows:
        cells = [m.get(a).get(b) if isinstance(m.get(a), dict) else None for a, b in EVAL_KEYS]
        lines.append(f"| {k} | " + " | ".join(_text(v) for v in cells) + " |")
    return lines + [""]


def _limits_section(c: dict) -> list[str]:
    return [
        "## Intended use and limits", "",
        "A teaching and research model: for learning how a GPT is trained end to end, for testing "
        "tools (transformers, llama.cpp, OpenAI-compatible clients) and for experiments. It is "
        "small and trained on little data, so it makes up facts, repeats itself and loses track "
        f"after a few sentences; its context is {_text(c.get('block_size'))} tokens. It has had "
        "no safety tuning. Do not use it for decisions or facts that matter, or in products "
        "facing users.", "",
    ]


def _licenses_section(sources: list[str]) -> list[str]:
    lines = ["## Licenses", ""]
    if not sources:
        return lines + ["Training data sources unknown (no stats.json found)."]
    lines += [f"- {_text(s)}: {_license(s)}" for s in sources]
    return lines + ["", "Text the model produces may reproduce its training data; CC BY-SA data "
                    "asks for attribution and share-alike."]


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported directory to the Hugging Face Hub; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="Upload minigpt export")
    return str(url)
