"""Training throughput of minigpt's real loop step vs transformers' GPT2LMHeadModel, one process.

    python bench/train_throughput.py [--dtype fp32 bf16 fp16] [--steps 10] [--batch 8] [--tiny]
                                     [--compile] [--device cpu|cuda] [--profile]

Seed config by default (6 layers, 6 heads, 384 wide, block 256, vocab 30000, batch 8). "Ours" is
`minigpt.train.train_step`, exactly what `fit` runs per optimizer step: LR set, forward under the
runtime's autocast, backward, grad-norm clip, the loss/norm sync, AdamW step (fused). "Theirs"
is GPT2LMHeadModel (attn sdpa, dropout 0) with the same clip and the same fused AdamW.
Both models step alternately, so machine noise hits both; after warm-up steps we report the median
step time as tokens/s, MFU (each model's 6N + 12LCT FLOPs/token over the peak, see
minigpt.mfu) and the ratio ours/theirs. `--profile` prints the top ops of one step of each.

Measured (seed config, fp32, batch 8, `--steps 8 --warmup 2`):
- 2-core AMD EPYC, AVX2 only (no AVX-512, no bf16), quiet: ours 554 tok/s (MFU 64.6% of 60
  GFLOP/s per core), GPT-2 480 tok/s, ratio 1.15x. Matmuls are ~75% of our step and run at the
  speed of a plain sgemm of the same shapes here, so the remaining headroom is small.
  `torch.compile` on this CPU: 69 s to compile for a step 2% faster (3.97 vs 4.06 s), so
  `compile: false` stays the CPU default. bf16 cannot be measured on AVX2 (emulated).
  Later main, both sides with fused AdamW (`--dtype fp32 --steps 8 --warmup 2`): ours 643
  tok/s (MFU 75.0%), GPT-2 650 (75.8%), 0.99x: both are matmul-bound at this size here.
- 2-core AMD EPYC Zen 5 (avx512f/bw/vl, avx512_bf16, avx512_vnni; no AMX), both sides with fused
  AdamW: fp32 994 vs 964 tok/s (1.03x), bf16 1,663 vs 1,675 (0.99x, MFU 24.2% of 960 GFLOP/s);
  with `--keep-freed-memory` fp32 1,021 vs 1,028 (0.99x), bf16 1,738 vs 1,717 (1.01x). Before
  the chunked loss's softmax blocks, 64M-logit chunks and fused AdamW, the same box gave ours
  915 fp32 / 1,350 bf16 tok/s. The ratio moves with the VM's page-fault cost: while first touch
  of fresh memory was slow, GPT-2's full-logits step fell to 755-850 bf16 tok/s and the ratio
  read 1.5-1.75x; equal allocators on both sides are the fair comparison. Limits here: a bf16
  GEMM of these shapes runs at 350-430 GFLOP/s on both cores (~40% of the nominal peak), so
  matmuls alone cap MFU near 40%; matmuls are ~60% of our bf16 step. `--compile` (bf16,
  inductor C++): ours 1,481 vs GPT-2 1,809 tok/s after ~2 min of compiling: no gain for ours,
  so `compile: false` stays the CPU default.
- 2-core AMD EPYC Zen 5 again (avx512f/bw/vl, avx512_bf16, avx512_vnni; no AMX; L2 2 MiB/core,
  L3 32 MiB), 2026-12-06, `--steps 8 --warmup 2 --keep-freed-memory`: at this session's start
  fp32 1,160 vs 1,138 tok/s (1.02x), bf16 1,854 vs 1,921 (0.96x); after the plain bf16 attention
  (`model.causal_attention`) and the softmax-based loss blocks: fp32 1,262 vs 1,213 (1.04x, MFU
  36.0%), bf16 2,139 vs 1,961 (1.09x, MFU 31.2%); `--tiny` fp32 4,158 vs 3,794 (1.10x), bf16
  7,633 vs 6,530 (1.17x). Paired in one process (ours old vs new): bf16 attention 1.10x,
  loss blocks 1.02x (seed) / 1.09x bf16 and 1.11x fp32 (quick-start shape). The ceiling: a
  bf16 GEMM of these shapes runs at 400-430 GFLOP/s on both cores here (205 on one; a 2048^3
  bf16 GEMM 398), fp32 through MKL 143-187 (oneDNN 156-212, but no faster in the whole step:
  1,126 vs 1,131 tok/s); aten::mm is 74% of our bf16 step and 82% of fp32, with the same GEMMs
  on GPT-2's side, so 1.3x over it would need the rest of our step near zero.
- 2-core AMD EPYC Milan (cpu family 25 model 1; avx2 fma, no AVX-512, no bf16; L2 1 MiB/core,
  L3 32 MiB), 2026-12-06, fp32 `--steps 8 --warmup 2`: 1,101 vs 1,061 tok/s (1.04x); with
  `--keep-freed-memory` 1,030 vs 941 (1.09x, MFU 60.0% of the 3.75 GHz nominal peak: the old
  fixed 60 GFLOP/s per AVX2 core printed 128% here); `--tiny` 3,460 vs 3,199 (1.08x). A 1024^3
  sgemm runs at ~163 GFLOP/s on both cores. The quick-start step (4x2x64, vocab 8192, batch 16,
  Muon) is 266 ms: aten::mm 57%, of which the LM head's three K=64 products ~105-140 GFLOP/s
  (logits 41 ms, grad_h 30, grad_w 38 per 4,096 rows) against ~163 for square ones; 128- to
  2,048-row loss chunks were no faster (141-153 vs 136 ms); the plain bf16-style attention in
  fp32 is slower than flash here too (quick-start shape 18.9 vs 10.4 ms fwd+bwd, seed 34 vs 24).
  RoPE on q|k only (not v): 3.8 vs 5.1 ms fwd+bwd per quick-start layer but 7.0 vs 5.6 at seed:
  not kept. Fine-tuning's dropout (0.1) made a quick-start step 259 -> 399 ms, mostly inside
  attention (SDPA's math path, and `bernoulli_` at 10.8 ns per element over 2M scores a layer);
  dropping only the attention and MLP outputs (`model.GPTConfig.dropout`) makes it 239 -> 261
  ms. A mask from 16-bit lanes of int64 random words was only 1.7-2x faster than `bernoulli_`
  (9.6 vs 17 ms per 2M elements), so F.dropout stays.
- 2-core Intel Xeon with AMX (amx_bf16/amx_tile, avx512_bf16, avx512_fp16), 2026-12-02
  (`--dtype fp32 bf16 --steps 8 --warmup 2`): fp32 893 vs 877 tok/s (1.02x), bf16 1,628 vs
  1,606 (1.01x). Profile (bf16): aten::mm 47% of our step, the flash-attention kernel 16% (its
  backward 28 ms per layer in bf16 vs 17.5 in fp32, forward 2.9 vs 8.0), copies 9%; GPT-2's
  step has the same mm and attention time. A bf16 GEMM of these shapes runs at 430-800 GFLOP/s
  on both cores here (noisy; padding the head to 30720 rows gave no stable gain); a hand-written
  attention backward (flash forward's logsumexp, batched matmuls) was slower: 42 vs 28 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from minigpt import hardware, host, optim, precision, runtime, train  # noqa: E402
from minigpt.config import TrainConfig  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402


class RandomTokens:
    """A batch source of fixed random tokens (the data path is not what is measured)."""

    def __init__(self, batch: int, block: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (batch, block), generator=g)
        self.y = torch.randint(0, vocab, (batch, block), generator=g)

    def next(self):
        return self.x, self.y

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def gpt2(L: int, H: int, C: int, T: int, V: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_layer=L, n_head=H, n_embd=C, n_positions=T,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attn_implementation="sdpa"))


def gpt2_flops_per_token(model, L: int, C: int, T: int, V: int) -> float:
    wpe = model.transformer.wpe.weight.numel()
    return 6.0 * (model.num_parameters() - wpe) + 12.0 * L * C * T  # wte counted once, as the head


def their_step(model, opt, x, y, rt: runtime.Runtime, clip: float, scaler=None) -> float:
    with rt.autocast():
        loss = model(input_ids=x, labels=y).loss
    if scaler is not None:  # fp16: the same loss scaling as ours (train.train_step)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    value = loss.item() + 0 * norm.item()  # the same two syncs as ours
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return value


def bench(dtype: str, args) -> dict:
    L, H, C, T, V, B = (args.shape or ((4, 4, 256, 256, 8192, 16) if args.tiny
                                       else (6, 6, 384, 256, 30000, args.batch)))
    cfg = TrainConfig(device=args.device, dtype=dtype, batch_size=B, lr=1e-4, warmup_steps=0,
                      max_steps=10**6, compile=args.compile)
    rt = runtime.setup_runtime(cfg)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=V, n_layer=L, n_head=H, n_embd=C, block_size=T)).to(rt.device)
    theirs = gpt2(L, H, C, T, V).to(rt.device)
    source = RandomTokens(B, T, V)
    opt = optim.adamw(ours.parameters(), 0.1, 1e-4, (0.9, 0.95), rt.device.type)
    run = train._Run(raw=ours, model=torch.compile(ours) if args.compile else ours, optimizer=opt,
                     cfg=cfg, rt=rt, source=source, val=[], identity={}, h=train.History(),
                     scaler=precision.grad_scaler(rt.device, rt.dtype))
    their_scaler = precision.grad_scaler(rt.device, rt.dtype)
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  fused=True)  # as ours (optim.adamw) on CPU and CUDA
    their_model = torch.compile(theirs) if args.compile else theirs
    x, y = source.x.to(rt.device), source.y.to(rt.device)
    steps = {"ours": lambda: train.train_step(run),
             "theirs": lambda: their_step(their_model, their_opt, x, y, rt, cfg.grad_clip, their_scaler)}
    times = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    if args.profile:
        profile(steps, rt)
    flops = {"ours": ours.flops_per_token(), "theirs": gpt2_flops_per_token(theirs, L, C, T, V)}
    out = {"dtype": rt.dtype, "device": str(rt.device), "threads": torch.get_num_threads(),
           "params_ours": ours.num_params(), "params_theirs": theirs.num_parameters()}
    for name, ts in times.items():
        tps = B * T / statistics.median(ts)
        out[f"tok_s_{name}"] = tps
        out[f"mfu_{name}"] = flops[name] * tps / rt.peak_flops if rt.peak_flops else 0.0
    out["ratio"] = out["tok_s_ours"] / out["tok_s_theirs"]
    return out


def profile(steps: dict, rt: runtime.Runtime) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.device.type == "cuda" else [])
    for name, step in steps.items():
        with torch_profile(activities=acts) as prof:
            step()
        key = "self_cuda_time_total" if rt.device.type == "cuda" else "self_cpu_time_total"
        print(f"--- {name}: top ops by self time")
        print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=40))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="4 layers, 4 heads, 256 wide, vocab 8192, batch 16")
    ap.add_argument("--shape", type=int, nargs=6, metavar=("L", "H", "C", "T", "V", "B"),
                    help="any other size (bench/gpu_check.py's dry run)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="host.keep_freed_memory() first, as the training stages do (both sides)")
    args = ap.parse_args()
    kept = args.keep_freed_memory and host.keep_freed_memory()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, bf16 CPU instructions: "
          f"{hardware.cpu_has_bf16()}, compile {args.compile}, freed memory kept: {kept}")
    for dtype in args.dtype:
        r = bench(dtype, args)
        print(f"{r['device']} {r['dtype']}: ours {r['tok_s_ours']:,.0f} tok/s (mfu {100 * r['mfu_ours']:.1f}%, "
              f"{r['params_ours'] / 1e6:.1f}M params) | gpt2 {r['tok_s_theirs']:,.0f} tok/s "
              f"(mfu {100 * r['mfu_theirs']:.1f}%, {r['params_theirs'] / 1e6:.1f}M) | "
              f"ours/theirs {r['ratio']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
