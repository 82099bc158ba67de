"""DVC stage `pretrain`: train the GPT on the pre-training token stream.

    python stages/pretrain.py      (`pretrain.nproc` > 1: DDP workers through torchrun's launcher)
    torchrun --nnodes ... stages/pretrain.py                       (your own torchrun: multi-node)

Reads `model` and `pretrain` from params.yaml, the tokenizer and data/tokens/pretrain/{train,
validation}.bin, and writes out/pretrain/ (model directory), metrics/pretrain.json and
metrics/pretrain/{train,val}.tsv (docs/FORMATS.md). out/ckpt/pretrain/ is undeclared scratch
(resumable state): it is resumed only when its fingerprint (params, tokenizer and token-file
hashes) equals this run's, i.e. to finish an interrupted run of the same command. Any error
is one line `error: ...` on stderr and exit status 2
(a diverged loss included); MINIGPT_DEBUG=1 shows the traceback instead.

The model's vocabulary is exactly the tokenizer's (no rounding up to a multiple of 64): padded ids
would be sampleable, un-decodable and a mismatch for exported tokenizers, and the tokenizer stage
already hits round targets such as 8192 on real corpora.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's minigpt: the code DVC tracks

from minigpt.files import atomic_write_json  # noqa: E402
from minigpt.config import load_params  # noqa: E402
from minigpt.encode import check_tokenizer_hash, read_meta  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.stage import run_training_stage  # noqa: E402
from minigpt.tokenizer import load_tokenizer, tokenizer_hash  # noqa: E402
from minigpt.runtime import setup_runtime, teardown  # noqa: E402
from minigpt.memory import check_batch_fits  # noqa: E402
from minigpt.resume import file_digests  # noqa: E402
from minigpt.train import fit  # noqa: E402
from minigpt.windows import TokenWindows, val_windows  # noqa: E402

TOKENIZER = Path("data/tokenizer/tokenizer.json")
TOKENS = Path("data/tokens/pretrain")
MODEL_DIR = Path("out/pretrain")
CKPT_DIR = Path("out/ckpt/pretrain")
METRICS = Path("metrics/pretrain.json")
CURVES = Path("metrics/pretrain")


def run() -> str | None:
    start = time.perf_counter()
    params = load_params()
    cfg, shape = params.pretrain, params.model
    tok = load_tokenizer(TOKENIZER)
    thash = tokenizer_hash(TOKENIZER)
    sidecars = {}
    for split in ("train", "validation"):
        sidecars[split] = read_meta(TOKENS / split)
        check_tokenizer_hash(sidecars[split], thash, TOKENS / f"{split}.json")
    rt = setup_runtime(cfg)
    try:
        model = GPT(GPTConfig.from_params(shape, tok.get_vocab_size())).to(rt.device)
        check_batch_fits(model, cfg, rt)  # before the batches (and the validation set) exist
        source = TokenWindows(TOKENS / "train.bin", shape.block_size, cfg.batch_size, cfg.seed,
                              rt.rank, rt.world_size)
        val = val_windows(TOKENS / "validation.bin", shape.block_size, cfg.batch_size,
                          cfg.eval_batches, rt.rank, rt.world_size)
        meta = {"stage": "pretrain", "tokenizer_hash": thash, "chat_template": None,
                "tokenizer_vocab_size": tok.get_vocab_size(), "data": sidecars}
        if rt.is_main:
            print(f"pretrain: {model.num_params() / 1e6:.2f}M params "
                  f"({model.num_params(non_embedding=True) / 1e6:.2f}M without embeddings), "
                  f"{model.flops_per_token() / 1e6:.1f} MFLOP/token; {rt.device} {rt.dtype}, "
                  f"{rt.world_size} process(es), {sidecars['train']['count']:,} train tokens")
        summary = fit(model, cfg, rt, source, val, model_dir=MODEL_DIR, ckpt_dir=CKPT_DIR,
                      curves_dir=CURVES, meta=meta, tokenizer_file=TOKENIZER,
                      inputs=file_digests([TOKENIZER, TOKENS / "train.bin", TOKENS / "validation.bin"],
                                          rt))
        if not rt.is_main:  # every rank trains; rank 0 writes and speaks
            return None
        atomic_write_json(METRICS, summary)
        return report(summary, time.perf_counter() - start)
    finally:
        teardown(rt)


def report(s: dict, seconds: float) -> str:
    return (f"pretrain: val loss {s['first_val_loss']:.4f} (step 0) -> {s['val_loss']:.4f} "
            f"(step {s['steps']}, best {s['best_val_loss']:.4f} at step {s['best_step']}); "
            f"train loss {s['train_loss']:.4f}; {s['tokens']:,} tokens, {s['tokens_per_s']:,.0f} tok/s, "
            f"mfu {100 * s['mfu']:.1f}% -> {MODEL_DIR} ({seconds:.1f}s)")


def main() -> int:
    return run_training_stage(__file__, run, lambda: load_params().pretrain.nproc)


if __name__ == "__main__":
    sys.exit(main())
