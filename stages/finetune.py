"""DVC stage `finetune`: instruction-tune the pre-trained model on the encoded SFT data.

    torchrun --standalone --nproc_per_node N stages/finetune.py     (or: python stages/finetune.py)

Reads `finetune` from params.yaml, the model directory out/pretrain/ and data/tokens/sft/{train,
validation}, and writes out/finetune/ (a model directory whose config.json says `stage: finetune`,
`chat_template: minigpt-v1`), metrics/finetune.json and metrics/finetune/{train,val}.tsv
(docs/FORMATS.md). out/ckpt/finetune/ is undeclared scratch (resumable state), resumed only by a
run with the same fingerprint (params, base weights and SFT token-file hashes).

Design choices
- Thin: the data logic is `minigpt.sft`, the loop is `minigpt.train.fit` (the pretrain stage's own
  loop: optimizer, schedule, precision, DDP, atomic checkpoints, resume), with keep_best=True and
  `finetune.patience`, so the shipped weights are the best by masked validation loss.
- The architecture (block_size included) comes from out/pretrain/config.json; only dropout is
  re-set, from `finetune.dropout`, by rebuilding the GPT with that config and loading the weights.
- The SFT tokens must have been encoded with the pre-trained model's tokenizer (same hash);
  anything else would train on ids that mean other strings, so the stage refuses.
- The resume fingerprint holds the SHA-256 of the base weights and of every SFT token file used,
  so a re-trained base model or re-encoded data starts fine-tuning afresh instead of resuming.
- metrics/finetune.json is fit's summary plus what the data side did: examples used / dropped /
  truncated per split, and the padding fraction of both batching strategies on the train split.
- Any error is one line `error: ...` on stderr and exit status 2; MINIGPT_DEBUG=1 shows the
  traceback instead.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minigpt: the code DVC tracks

from minigpt import sft  # noqa: E402
from minigpt.template import TEMPLATE_NAME  # noqa: E402
from minigpt.checkpoint import atomic_write_json, load_model, sha256_file  # noqa: E402
from minigpt.config import FinetuneConfig, load_params  # noqa: E402
from minigpt.encode import read_meta  # noqa: E402
from minigpt.stage import run_stage  # noqa: E402
from minigpt.model import GPT  # noqa: E402
from minigpt.tokenizer import PAD  # noqa: E402
from minigpt.train import file_digests, fit, setup_runtime, teardown  # noqa: E402

PRETRAINED = Path("out/pretrain")
TOKENS = Path("data/tokens/sft")
MODEL_DIR = Path("out/finetune")
CKPT_DIR = Path("out/ckpt/finetune")
METRICS = Path("metrics/finetune.json")
CURVES = Path("metrics/finetune")
SPLITS = ("train", "validation")


class FinetuneError(ValueError):
    """The inputs cannot be fine-tuned together; the message is one line."""


def check_tokenizer(base: dict, sidecars: dict[str, dict]) -> str:
    """The base model's tokenizer hash, if every SFT split was encoded with it; else refuse."""
    want = base.get("tokenizer_hash")
    for split, meta in sidecars.items():
        got = meta.get("tokenizer_hash")
        if got != want:
            raise FinetuneError(
                f"{TOKENS / split}.json was encoded with tokenizer {got}, but {PRETRAINED} was "
                f"trained with tokenizer {want}; re-run `dvc repro` so both use data/tokenizer")
    return want


def with_dropout(model: GPT, dropout: float) -> GPT:
    """The same weights in a GPT whose config has `dropout` (attention and residual)."""
    tuned = GPT(dataclasses.replace(model.config, dropout=dropout))
    tuned.load_state_dict(model.state_dict())
    return tuned


def data_report(splits: dict[str, sft.SFTSplit], cfg: FinetuneConfig) -> dict:
    """Per-split example counts and both strategies' padding on the train split."""
    report: dict = {name: split.stats() for name, split in splits.items()}
    train = splits["train"]
    report["batching"] = {
        "packing": cfg.packing,
        "pad": sft.batching_stats(train, cfg.batch_size, packing=False, seed=cfg.seed),
        "pack": sft.batching_stats(train, cfg.batch_size, packing=True, seed=cfg.seed),
    }
    used = report["batching"]["pack" if cfg.packing else "pad"]
    report["padding_fraction"] = used["padding_fraction"]
    return report


def run() -> dict:
    cfg = load_params().finetune
    model, tok, base = load_model(PRETRAINED)
    sidecars = {split: read_meta(TOKENS / split) for split in SPLITS}
    thash = check_tokenizer(base, sidecars)
    block = model.config.block_size
    splits = {name: sft.load_split(TOKENS, name, block) for name in SPLITS}
    pad_id = tok.token_to_id(PAD)
    rt = setup_runtime(cfg)
    try:
        model = with_dropout(model, cfg.dropout)
        source = sft.SFTBatches(splits["train"], cfg.batch_size, pad_id, packing=cfg.packing,
                                seed=cfg.seed, rank=rt.rank, world_size=rt.world_size)
        val = sft.val_batches(splits["validation"], cfg.batch_size, pad_id,
                              max_batches=cfg.eval_batches, rank=rt.rank, world_size=rt.world_size)
        data = data_report(splits, cfg)
        meta = {"stage": "finetune", "tokenizer_hash": thash, "chat_template": TEMPLATE_NAME,
                "tokenizer_vocab_size": base.get("tokenizer_vocab_size"),
                "base_model": sha256_file(PRETRAINED / "model.safetensors")[:16],
                "data": sidecars}
        if rt.is_main:
            print(_intro(data, block, rt))
        summary = fit(model, cfg, rt, source, val, model_dir=MODEL_DIR, ckpt_dir=CKPT_DIR,
                      metrics_file=METRICS, curves_dir=CURVES, meta=meta,
                      tokenizer_file=PRETRAINED / "tokenizer.json", keep_best=True,
                      patience=cfg.patience,
                      inputs=file_digests([PRETRAINED / "model.safetensors", *sorted(
                          p for split in SPLITS for p in TOKENS.glob(f"{split}.*"))]))
        summary = {**summary, "data": data}
        if rt.is_main:
            atomic_write_json(METRICS, summary)  # fit wrote its summary; add the data side
        summary["is_main"] = rt.is_main
        return summary
    finally:
        teardown(rt)


def _intro(data: dict, block: int, rt) -> str:
    parts = [f"{name} {s['used']:,}/{s['examples']:,} examples ({s['dropped']} dropped, "
             f"{s['truncated']} truncated)" for name, s in data.items() if name in SPLITS]
    b = data["batching"]
    return (f"finetune: {'; '.join(parts)} at block_size {block}; padding wastes "
            f"{100 * b['pad']['padding_fraction']:.1f}% of slots, packing "
            f"{100 * b['pack']['padding_fraction']:.1f}% (using {'packing' if b['packing'] else 'padding'}); "
            f"{rt.device} {rt.dtype}, {rt.world_size} process(es)")


def report(s: dict, seconds: float) -> str | None:
    if not s["is_main"]:  # every rank trains; rank 0 speaks
        return None
    return (f"finetune: masked val loss {s['first_val_loss']:.4f} (base) -> best "
            f"{s['best_val_loss']:.4f} at step {s['best_step']} (last {s['val_loss']:.4f}, step "
            f"{s['steps']}{', stopped early' if s['stopped_early'] else ''}); train loss "
            f"{s['train_loss']:.4f}; {s['tokens']:,} tokens, {s['tokens_per_s']:,.0f} tok/s "
            f"-> {MODEL_DIR} ({seconds:.1f}s)")


def main() -> int:
    start = time.perf_counter()
    return run_stage(lambda: report(run(), time.perf_counter() - start))


if __name__ == "__main__":
    sys.exit(main())
