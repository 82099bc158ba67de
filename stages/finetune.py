"""DVC stage `finetune`: instruction-tune the pre-trained model on the encoded SFT data.

    python stages/finetune.py      (`finetune.nproc` > 1: DDP workers through torchrun's launcher)
    torchrun --nnodes ... stages/finetune.py                       (your own torchrun: multi-node)

Reads `finetune` from params.yaml, the model directory out/pretrain/ and data/tokens/sft/{train,
validation}, and writes out/finetune/ (a model directory whose config.json says `stage: finetune`,
`chat_template: minigpt-v1`), metrics/finetune.json and metrics/finetune/{train,val}.tsv
(docs/FORMATS.md). out/ckpt/finetune/ is undeclared scratch (resumable state), resumed only by a
run with the same fingerprint (params, base weights and SFT token-file hashes).

Design choices
- Thin: the data logic is `minigpt.sft`, the base-model checks and data report
  `minigpt.finetune`, the loop `minigpt.train.fit` (the pretrain stage's own loop: optimizer,
  schedule, precision, DDP, atomic checkpoints, resume), with keep_best=True and
  `finetune.patience`, so the shipped weights are the best by masked validation loss.
- The architecture comes from out/pretrain/config.json; only dropout is re-set, from
  `finetune.dropout`. The SFT tokens must share the base model's tokenizer (same hash).
- metrics/finetune.json: fit's summary plus the data side's report (`finetune.data_report`).
- Any error is one line `error: ...` on stderr, exit status 2 (`minigpt.stage`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minigpt: the code DVC tracks

from minigpt import sft  # noqa: E402
from minigpt.template import TEMPLATE_NAME  # noqa: E402
from minigpt.checkpoint import load_model  # noqa: E402
from minigpt.files import atomic_write_json, sha256_file  # noqa: E402
from minigpt.config import load_params  # noqa: E402
from minigpt.encode import read_meta  # noqa: E402
from minigpt.finetune import check_tokenizer, data_report, with_dropout  # noqa: E402
from minigpt.runtime import setup_runtime, teardown  # noqa: E402
from minigpt.stage import run_training_stage  # noqa: E402
from minigpt.tokenizer import PAD  # noqa: E402
from minigpt.memory import check_batch_fits  # noqa: E402
from minigpt.resume import file_digests  # noqa: E402
from minigpt.train import fit  # noqa: E402

PRETRAINED = Path("out/pretrain")
TOKENS = Path("data/tokens/sft")
MODEL_DIR = Path("out/finetune")
CKPT_DIR = Path("out/ckpt/finetune")
METRICS = Path("metrics/finetune.json")
CURVES = Path("metrics/finetune")
SPLITS = ("train", "validation")


def run() -> str | None:
    start = time.perf_counter()
    cfg = load_params().finetune
    model, tok, base = load_model(PRETRAINED)
    sidecars = {split: read_meta(TOKENS / split) for split in SPLITS}
    thash = check_tokenizer(base, sidecars, TOKENS, PRETRAINED)
    block = model.config.block_size
    splits = {name: sft.load_split(TOKENS, name, block) for name in SPLITS}
    pad_id = tok.token_to_id(PAD)
    rt = setup_runtime(cfg, "finetune")
    try:
        model = with_dropout(model, cfg.dropout).to(rt.device)
        check_batch_fits(model, cfg, rt)  # before the batches exist
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
                      curves_dir=CURVES, meta=meta,
                      tokenizer_file=PRETRAINED / "tokenizer.json", keep_best=True,
                      patience=cfg.patience,
                      inputs=file_digests([PRETRAINED / "model.safetensors", *sorted(
                          p for split in SPLITS for p in TOKENS.glob(f"{split}.*"))], rt))
        if not rt.is_main:  # every rank trains; rank 0 writes and speaks
            return None
        summary = {**summary, "data": data}
        atomic_write_json(METRICS, summary)
        return report(summary, time.perf_counter() - start)
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


def report(s: dict, seconds: float) -> str:
    return (f"finetune: masked val loss {s['first_val_loss']:.4f} (base) -> best "
            f"{s['best_val_loss']:.4f} at step {s['best_step']} (last {s['val_loss']:.4f}, step "
            f"{s['steps']}{', stopped early' if s['stopped_early'] else ''}); train loss "
            f"{s['train_loss']:.4f}; {s['tokens']:,} tokens, {s['tokens_per_s']:,.0f} tok/s "
            f"-> {MODEL_DIR} ({seconds:.1f}s)")


def main() -> int:
    return run_training_stage(__file__, run, lambda: load_params().finetune.nproc)


if __name__ == "__main__":
    sys.exit(main())
