"""Typed configuration: one dataclass per `params.yaml` section, validated at load.

Design choices
- `params.yaml` is the single source of truth (DVC tracks it per section); every stage calls
  `load_params()` and reads its own section, so there are no dicts passed around.
- Validation happens once, at load: an unknown key, a wrong type or an impossible value raises
  `ConfigError` with one line naming the file, the dotted key and the offending value. Types,
  unknown keys and YAML 1.2 floats are `minigpt.schema`'s; the values' rules are here.
- Each field carries a one-line docstring-style comment, like litgpt's `args.py`.
- Dataclasses are frozen: a config is a value, not state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from minigpt.schema import ConfigError, build

BYTE_ALPHABET = 256  # byte-level BPE always holds the 256 byte symbols
PRETRAIN_FORMATS = ("auto", "wikitext", "documents")
# Keys of older params.yaml files: what took their place.
REPLACED = {"process.pretrain.wikitext": "replaced by format: auto | wikitext | documents; "
                                         "auto is WikiText only for WikiText sources",
            "eval.seed": "removed: evaluation decodes greedily and draws nothing; delete it"}


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why} (got {value!r})")


def device_problem(device: str) -> str | None:
    """Why `device` is not a device name, or None: the one rule for params' `*.device` and the
    CLI's `--device`."""
    kind, colon, index = device.partition(":")
    if device in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and colon and index.isdigit()):
        return None
    return "must be auto, cpu, cuda, cuda:N or mps"


def head_size_problem(n_embd: int, n_head: int) -> str | None:
    """Why n_embd cannot split into n_head rotary heads, or None: the one head-size rule
    (`ModelConfig` checks it at load, `model.GPTConfig` for configs read from a model dir)."""
    if n_embd % n_head:
        return f"must be divisible by n_head={n_head}"
    if (n_embd // n_head) % 2:
        return "n_embd / n_head must be even (rotary embeddings rotate pairs)"
    return None


def _fraction(cfg: Any, prefix: str) -> None:
    """Validate validation/test fractions shared by both corpora."""
    for name in ("validation_fraction", "test_fraction"):
        value = getattr(cfg, name)
        _check(0.0 <= value < 1.0, f"{prefix}.{name}", value, "must be in [0, 1)")
    total = cfg.validation_fraction + cfg.test_fraction
    _check(total < 1.0, f"{prefix}.validation_fraction + {prefix}.test_fraction", total,
           "must sum to less than 1")


@dataclass(frozen=True)
class PretrainDataConfig:
    """`process.pretrain`: where the pre-training text comes from and how it is cleaned."""

    source: str = "Salesforce/wikitext"
    """Hugging Face hub dataset id, or a local file/directory (.txt/.raw/.parquet/.jsonl with `text`)."""
    name: Optional[str] = "wikitext-2-raw-v1"
    """Hub dataset config name (ignored for local sources)."""
    revision: Optional[str] = None
    """Hub revision (commit sha or tag) to pin; null means the default branch."""
    text_column: str = "text"
    """Column holding the text."""
    format: str = "auto"
    """auto | wikitext | documents. wikitext: rows are lines, regrouped into articles at
    ` = Title = ` headings; documents: one document per JSONL/parquet row, per blank-line-separated
    block of a text file. auto: wikitext for the Salesforce/wikitext hub id or local files that
    start with a ` = Title = ` heading, else documents."""
    detokenize: bool = True
    """Undo WikiText tokenization artifacts (` @-@ `, ` @,@ `, space before punctuation);
    WikiText format only (documents are never changed)."""
    validation_fraction: float = 0.05
    """Fraction of documents carved out for validation when the source has no validation split."""
    test_fraction: float = 0.05
    """Fraction of documents carved out for test when the source has no test split."""
    max_documents: int = 0
    """Keep at most this many train documents (0 = all); for quick experiments. A hub source is
    then streamed, and read only until train holds this many."""

    def validate(self, prefix: str) -> None:
        _check(bool(self.source.strip()), f"{prefix}.source", self.source, "must not be empty")
        _check(self.max_documents >= 0, f"{prefix}.max_documents", self.max_documents, "must be >= 0")
        _check(self.format in PRETRAIN_FORMATS, f"{prefix}.format", self.format,
               f"must be one of {', '.join(PRETRAIN_FORMATS)}")
        _fraction(self, prefix)


@dataclass(frozen=True)
class SFTDataConfig:
    """`process.sft`: the instruction-tuning corpus (Dolly-15k format) and its split."""

    source: str = "databricks/databricks-dolly-15k"
    """Hub dataset id, or a local .jsonl/.json/.parquet file or directory."""
    revision: Optional[str] = None
    """Hub revision to pin; null means the default branch."""
    columns: dict = field(default_factory=lambda: {
        "instruction": "instruction", "context": "context", "response": "response"})
    """Map from our field (instruction, context, response) to the source column;
    Alpaca files use {instruction: instruction, context: input, response: output}."""
    validation_fraction: float = 0.05
    """Fraction of examples in validation, chosen by a stable hash of the example."""
    test_fraction: float = 0.05
    """Fraction of examples in test, chosen by a stable hash of the example."""

    def validate(self, prefix: str) -> None:
        _check(bool(self.source.strip()), f"{prefix}.source", self.source, "must not be empty")
        required = {"instruction", "context", "response"}
        unknown = set(self.columns) - required
        _check(not unknown, f"{prefix}.columns", sorted(unknown),
               "unknown field; allowed: instruction, context, response")
        _check({"instruction", "response"} <= set(self.columns), f"{prefix}.columns",
               self.columns, "must map at least instruction and response")
        for k, v in self.columns.items():
            _check(isinstance(v, str) and bool(v), f"{prefix}.columns.{k}", v,
                   "must be a column name")
        _fraction(self, prefix)


@dataclass(frozen=True)
class ProcessConfig:
    """`process`: one sub-section per corpus; DVC's foreach runs them independently."""

    pretrain: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)
    num_proc: int = 0
    """Worker processes (0 = all cores); the output is the same for any number, so the stages
    do not depend on it (dvc.yaml lists process.pretrain and process.sft, not the section)."""

    def validate(self, prefix: str) -> None:
        self.pretrain.validate(f"{prefix}.pretrain")
        self.sft.validate(f"{prefix}.sft")
        _check(self.num_proc >= 0, f"{prefix}.num_proc", self.num_proc, "must be >= 0")


@dataclass(frozen=True)
class TokenizerConfig:
    """`tokenizer`: byte-level BPE trained on the processed pre-training train split only.

    Only pre-training text, so a change to the SFT corpus never retrains the tokenizer and
    never re-encodes or re-trains the pre-training side of the DAG."""

    vocab_size: int = 8192
    """Target vocabulary size, special tokens included."""
    min_frequency: int = 2
    """Minimum pair frequency for a merge."""
    max_chars: int = 1_000_000_000
    """Train on at most this many characters (0 = all): a larger train split is sampled by a
    stable hash of each document (minigpt.tokenizer.TrainingSample)."""
    max_doc_chars: int = 0
    """Train on at most this many characters of each document (0 = all of it)."""

    def validate(self, prefix: str) -> None:
        from minigpt.tokenizer import SPECIAL_TOKENS  # one list of specials, defined once

        floor = BYTE_ALPHABET + len(SPECIAL_TOKENS)
        _check(self.vocab_size > floor, f"{prefix}.vocab_size", self.vocab_size,
               f"must exceed the byte alphabet plus special tokens ({floor})")
        _check(self.vocab_size <= 2**32 - 1, f"{prefix}.vocab_size", self.vocab_size, "too large")
        _check(self.min_frequency >= 1, f"{prefix}.min_frequency", self.min_frequency, "must be >= 1")
        _check(self.max_chars >= 0, f"{prefix}.max_chars", self.max_chars, "must be >= 0")
        _check(self.max_doc_chars >= 0, f"{prefix}.max_doc_chars", self.max_doc_chars,
               "must be >= 0")


@dataclass(frozen=True)
class EncodeConfig:
    """`encode`: turning processed text into token files."""

    batch_size: int = 1000
    """Documents per `encode_batch` call (bounds memory while streaming)."""
    num_proc: int = 0
    """Worker processes (0 = all cores), one tokenizer thread each; the token files are the
    same for any number, so the stage does not depend on it (see dvc.yaml)."""

    def validate(self, prefix: str) -> None:
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")
        _check(self.num_proc >= 0, f"{prefix}.num_proc", self.num_proc, "must be >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """`model`: the GPT's shape (the vocabulary size comes from the trained tokenizer)."""

    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 2
    """Attention heads; must divide n_embd."""
    n_embd: int = 64
    """Residual stream width."""
    block_size: int = 256
    """Context length in tokens."""
    dropout: float = 0.0
    """Dropout probability used in pre-training."""
    mlp: str = "swiglu"
    """MLP activation: swiglu (Llama) or relu2 (relu(x)^2; not exportable to Llama)."""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head before attention (not exportable to Llama)."""
    zero_init: bool = False
    """Start the residual output projections (attn.proj, mlp.down) at zero (exportable)."""
    logit_softcap: float = 0.0
    """cap * tanh(logits / cap) on the output logits when > 0 (not exportable to Llama)."""

    def validate(self, prefix: str) -> None:
        _check(self.mlp in ("swiglu", "relu2"), f"{prefix}.mlp", self.mlp, "must be swiglu or relu2")
        _check(self.logit_softcap >= 0, f"{prefix}.logit_softcap", self.logit_softcap,
               "must be >= 0 (0 = off)")
        for name in ("n_layer", "n_head", "n_embd"):
            _check(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), "must be >= 1")
        heads = head_size_problem(self.n_embd, self.n_head)
        _check(heads is None, f"{prefix}.n_embd", self.n_embd, heads)
        _check(self.block_size >= 8, f"{prefix}.block_size", self.block_size, "must be >= 8")
        _check(0.0 <= self.dropout < 1.0, f"{prefix}.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """`pretrain`: the training loop's knobs (shared with `finetune`, which adds a few)."""

    device: str = "auto"
    """auto (cuda > mps > cpu), or cpu / cuda / cuda:N / mps."""
    dtype: str = "auto"
    """auto (bf16 where native, else fp16 on GPUs: minigpt.runtime), bf16, fp16 (loss-scaled), fp32."""
    compile: bool = False
    """Wrap the model in torch.compile (pays back on GPU and on long CPU runs)."""
    nproc: int = 1
    """Processes per node for DDP; 1 = plain single process. Read by the stage script
    (`minigpt.stage.run_training_stage`), which starts nproc workers through torchrun's launcher;
    under a torchrun the user started, its --nproc-per-node rules and this is not read."""
    batch_size: int = 16
    """Rows per micro-batch per process. Pre-training: windows of block_size tokens. Fine-tuning:
    one example per row when padding; with `packing`, as many whole examples as fit in
    block_size + 1 tokens (validation always pads: one example per row)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 350
    """Optimizer steps to train for (the budget)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW's; with optimizer muon, that of the embedding/head and norms)."""
    min_lr_ratio: float = 0.0
    """The schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 5
    """Linear warm-up steps."""
    schedule: str = "wsd"
    """cosine (warm-up, cosine decay) or wsd (warm-up, flat, linear decay over decay_fraction)."""
    decay_fraction: float = 0.4
    """wsd only: the share of max_steps spent decaying at the end."""
    optimizer: str = "muon"
    """adamw, or muon (Muon for the blocks' matrices, AdamW for embedding/head and norms)."""
    muon_lr: float = 0.02
    """Muon's peak learning rate (follows the same schedule as lr)."""
    muon_momentum: float = 0.95
    """Muon's (Nesterov) momentum."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    eval_interval: int = 70
    """Steps between validation-loss evaluations (and at the end)."""
    eval_batches: int = 10
    """Validation batches per evaluation."""
    save_interval: int = 175
    """Steps between resumable checkpoints (and at the end)."""
    log_interval: int = 10
    """Steps between log lines."""
    seed: int = 1337
    """Seed for init, data order and dropout."""

    def validate(self, prefix: str) -> None:
        device = device_problem(self.device)
        _check(device is None, f"{prefix}.device", self.device, device)
        _check(self.dtype in ("auto", "bf16", "fp16", "fp32"), f"{prefix}.dtype", self.dtype,
               "must be auto, bf16, fp16 or fp32")
        for name in ("nproc", "batch_size", "grad_accum", "max_steps", "eval_interval",
                     "eval_batches", "save_interval", "log_interval"):
            _check(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), "must be >= 1")
        _check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", self.warmup_steps, "must be >= 0")
        # more warm-up than steps: the lr never reaches its peak and no decay is ever run
        _check(self.warmup_steps <= self.max_steps, f"{prefix}.warmup_steps", self.warmup_steps,
               f"must be <= {prefix}.max_steps ({self.max_steps})")
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        _check(self.schedule in ("cosine", "wsd"), f"{prefix}.schedule", self.schedule,
               "must be cosine or wsd")
        _check(0.0 < self.decay_fraction <= 1.0, f"{prefix}.decay_fraction", self.decay_fraction,
               "must be in (0, 1]")
        _check(self.optimizer in ("adamw", "muon"), f"{prefix}.optimizer", self.optimizer,
               "must be adamw or muon")
        _check(self.muon_lr > 0, f"{prefix}.muon_lr", self.muon_lr, "must be > 0")
        _check(0.0 <= self.muon_momentum < 1.0, f"{prefix}.muon_momentum", self.muon_momentum,
               "must be in [0, 1)")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{prefix}.min_lr_ratio", self.min_lr_ratio,
               "must be in [0, 1]")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            _check(0.0 <= getattr(self, name) < 1.0, f"{prefix}.{name}", getattr(self, name),
                   "must be in [0, 1)")
        _check(self.grad_clip >= 0, f"{prefix}.grad_clip", self.grad_clip, "must be >= 0")


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """`finetune`: instruction tuning; the training loop's knobs plus SFT-specific ones."""

    lr: float = 1e-3
    max_steps: int = 100
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # fine-tuning keeps the pre-issue-14 recipe (not benchmarked)
    optimizer: str = "adamw"
    eval_interval: int = 25
    save_interval: int = 100
    dropout: float = 0.1
    """Dropout during fine-tuning (overrides the pre-trained model's)."""
    patience: int = 4
    """Stop after this many evaluations without a better validation loss (0 = never stop early)."""
    packing: bool = True
    """Pack several examples per window instead of padding each to the batch's longest."""

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _check(0.0 <= self.dropout < 1.0, f"{prefix}.dropout", self.dropout, "must be in [0, 1)")
        _check(self.patience >= 0, f"{prefix}.patience", self.patience, "must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """`eval`: what the eval stage measures and how much of it."""

    device: str = "auto"
    """auto, cpu, cuda or mps."""
    stride: int = 128
    """Sliding-window stride for perplexity: each window scores only its last `stride` tokens."""
    max_tokens: int = 1_000_000
    """Cap on test tokens scored for perplexity (0 = the full split): the first max_tokens of
    the stream. WikiText's test split (~300k tokens, WikiText-2 and -103 alike) fits whole."""
    generate_examples: int = 50
    """SFT test examples to generate greedy answers for (ROUGE/BLEU)."""
    max_new_tokens: int = 96
    """Generation length cap for scored answers and samples."""
    prompts: list = field(default_factory=lambda: [
        "What is the capital of France?",
        "Give me three tips for staying healthy.",
        "Explain what a neural network is in one sentence.",
    ])
    """Fixed prompts whose answers go to metrics/samples/{pretrain,finetune}.json."""

    def validate(self, prefix: str) -> None:
        device = device_problem(self.device)
        _check(device is None, f"{prefix}.device", self.device, device)
        _check(self.stride >= 1, f"{prefix}.stride", self.stride, "must be >= 1")
        for name in ("max_tokens", "generate_examples"):
            _check(getattr(self, name) >= 0, f"{prefix}.{name}", getattr(self, name), "must be >= 0")
        _check(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", self.max_new_tokens, "must be >= 1")
        _check(all(isinstance(p, str) and p.strip() for p in self.prompts), f"{prefix}.prompts",
               self.prompts, "must be a list of non-empty strings")


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml."""

    process: ProcessConfig = field(default_factory=ProcessConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        # across sections: caught here, before pretrain and finetune run, not by the eval stage
        _check(self.eval.stride <= self.model.block_size, "eval.stride", self.eval.stride,
               f"must be <= model.block_size ({self.model.block_size}): each perplexity window "
               "is one block")


def parse_params(data: Any) -> Params:
    """Build and validate `Params` from an already-parsed mapping."""
    params = build(Params, data, "", REPLACED)
    params.validate()
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate params.yaml; errors are one line naming the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({why})") from None
    try:
        return parse_params(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
