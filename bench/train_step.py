"""Training-step throughput: minigpt's GPT vs transformers' GPT2LMHeadModel of the same size.

    python bench/train_step.py [--dtype bf16|fp32] [--steps 8] [--batch 8] [--tiny] [--compile]

Seed config by default (6 layers, 6 heads, 384 wide, block 256, vocab 30000). One step = forward,
backward, AdamW update. Both models run in one process, interleaved, so machine noise hits both;
prints median tokens/s and the ratio. Needs transformers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from minigpt.model import GPT, GPTConfig


def step_fn(model, opt, x, y, dtype, ours):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = model(x, y)[1] if ours else model(input_ids=x, labels=y).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="4 layers, 4 heads, 256 wide, vocab 8192, batch 16")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--onednn", action="store_true", help="route fp32 matmuls to oneDNN (mkldnn fp32_precision=bf16)")
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.onednn:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    L, H, C, T, V, B = (4, 4, 256, 256, 8192, 16) if args.tiny else (6, 6, 384, 256, 30000, args.batch)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=V, n_layer=L, n_head=H, n_embd=C, block_size=T))
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_layer=L, n_head=H, n_embd=C, n_positions=T,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                    attn_implementation="sdpa"))
    print(f"params: ours {ours.num_params() / 1e6:.2f}M, gpt2 {hf.num_parameters() / 1e6:.2f}M; "
          f"threads {torch.get_num_threads()}, {args.dtype}, batch {B}x{T}")
    runs = {"minigpt": (ours, True), "gpt2": (hf, False)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True) for k, (m, _) in runs.items()}
    steppers = {k: (torch.compile(m) if args.compile else m, o) for k, ((m, o)) in runs.items()}
    x = torch.randint(0, V, (B, T))
    times = {k: [] for k in runs}
    for i in range(args.steps + 2):  # two warm-up steps
        for k, (m, is_ours) in runs.items():
            t0 = time.perf_counter()
            step_fn(steppers[k][0], opts[k], x, x, args.dtype, is_ours)
            if i >= 2:
                times[k].append(time.perf_counter() - t0)
    tps = {k: B * T / statistics.median(v) for k, v in times.items()}
    for k, v in tps.items():
        print(f"{k:8s} {v:8.0f} tok/s  ({statistics.median(times[k]) * 1000:.0f} ms/step)")
    print(f"ratio minigpt/gpt2: {tps['minigpt'] / tps['gpt2']:.2f}x")


if __name__ == "__main__":
    main()
