"""Where one CPU decode step's time goes: weight matmuls vs everything else, and the op count.

    python bench/decode_step.py [--dtype fp32|fp16|int8] [--threads N] [--steps 20] [--pos 100]
                                [--tiny] [--layouts]

Seed config by default (6 layers, 6 heads, 384 wide, vocab 30000), random init, batch 1. A
prompt of `--pos` tokens is prefilled, then `--steps` decode steps (`GPT.forward` with a cache,
i.e. `minigpt.decode._step`) run under torch.profiler. Prints the top-level ops per step (what
the Python step dispatches), the profiler's time in the weight matmuls (bmm over the slabs, or
the fp16/int8 linear), in attention's two bmm, and in everything else, then the ops by time.
The profiler adds its own cost per op, so read the split as relative; the wall time per step
without the profiler follows. `--tiny` (6 layers, 48 wide, vocab 64) leaves almost nothing but
the per-op cost.

`--layouts` times the one-row matmul of each weight shape of the model over both memory layouts
of a slab, out of cache (copies cycled through ~128 MB): (in, out) row-major and (out, in) read
transposed; `minigpt.decode._slabs` keeps the longer side of each matrix along memory.

Measured (2-core AMD EPYC Milan, avx2, 1 thread, thread CPU time on a box loaded by other jobs,
2026-12-07): fp32 step 193 ops (255 before the per-cache buffers of `decode._Plan`); with
the weight matmuls stubbed out the rest of a step took ~1.0 ms of ~6.0 (at 216 ops). One-row
matmuls, (in, out) vs (out, in): qkv 384x1152 100 vs 147 us, gate_up 384x2048 157 vs 266 (then (in, out)), down
1024x384 145 vs 96 (then (out, in)), proj 384x384 54 vs 52, head 384x30000 1731 vs 3751 us.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from minigpt.model import GPT, GPTConfig  # noqa: E402

WEIGHT_OPS = ("quantized::linear_dynamic", "quantized::linear_dynamic_fp16")


def profile_steps(model: GPT, steps: int, pos: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    c = model.config
    weight_widths = {c.n_embd, c.intermediate_size}
    with torch.inference_mode():
        cache = model.new_cache(1)
        logits, _ = model(torch.randint(0, c.vocab_size, (1, pos)), cache=cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True)

        def step():
            nonlocal logits, nxt
            if cache.pos >= cache.max_len:
                cache.pos = pos
            logits, _ = model(nxt, cache=cache)
            nxt = logits[:, -1].argmax(-1, keepdim=True)

        for _ in range(3):  # warm-up: the weights and the step's buffers are made once
            step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                step()
        top = [e for e in prof.events() if e.cpu_parent is None]
        by: dict[str, list] = {}
        split = {"weight matmuls": 0.0, "attention bmm": 0.0, "everything else": 0.0}
        for e in top:
            by.setdefault(e.name, [0, 0.0])
            by[e.name][0] += 1
            by[e.name][1] += e.cpu_time_total
            if e.name in WEIGHT_OPS or (e.name == "aten::bmm" and e.input_shapes[0][-1] in weight_widths):
                split["weight matmuls"] += e.cpu_time_total
            elif e.name == "aten::bmm":
                split["attention bmm"] += e.cpu_time_total
            else:
                split["everything else"] += e.cpu_time_total
        total = sum(split.values())
        print(f"{len(top) / steps:.0f} ops per step (top level), {total / steps / 1000:.2f} ms profiled per step")
        for k, v in split.items():
            print(f"  {k:16s} {v / steps / 1000:6.2f} ms ({v / total:.0%})")
        print("ops by time (per step):")
        for name, (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1]):
            print(f"  {name:34s} {n / steps:5.1f} calls {t / steps:8.1f} us {t / n:7.1f} us/call")
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps * 1000
        print(f"without the profiler: {wall:.2f} ms per step (wall)")
        floor(model, cache.plan, len(top) / steps, wall, steps)


def cheapest_op_us(reps: int = 20000) -> float:
    """The least time one eager op takes here: an in-place add of one element to another (the
    Python call and torch's dispatch, almost no work), best of 5, in microseconds."""
    x, one, best = torch.zeros(1), torch.ones(1), float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            x.add_(one)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e6


def floor(model: GPT, plan, ops: float, wall: float, steps: int) -> None:
    """The weight matmuls of a step alone (the step's own calls, in its order) and the least time
    its number of eager ops can take: the lowest this step can go without fewer ops or kernels."""
    matmuls = [f for layer in plan.layers for f in (layer[1], layer[2], layer[4], layer[5])] + [plan.head]
    for f in matmuls:  # warm
        f()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            for f in matmuls:
                f()
        best = min(best, (time.perf_counter() - t0) / steps * 1000)
    size = {"fp32": 4, "fp16": 2, "int8": 1}[model.decode_dtype]
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))
    op_us = cheapest_op_us()
    print(f"weight matmuls alone: {best:.2f} ms per step, {weights * size / best / 1e6:.1f} GB/s of "
          f"{model.decode_dtype} weights ({len(matmuls)} calls)")
    print(f"cheapest eager op here: {op_us:.2f} us; {ops:.0f} ops x that = {ops * op_us / 1000:.2f} ms")
    print(f"floor of this step: {best + ops * op_us / 1000:.2f} ms (weight matmuls + ops x cheapest op), "
          f"measured {wall:.2f} ms")


def layouts(model: GPT) -> None:
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))})
    print("one-row matmul per weight shape (out, in), out of cache, best of 5, thread CPU time:")
    for out, c_in in shapes:
        n = max(2, int(128e6 / (out * c_in * 4)))
        rowmajor = [torch.randn(1, c_in, out) for _ in range(n)]  # (in, out)
        transposed = [w.mT.contiguous().mT for w in rowmajor]  # (out, in) in memory
        x = torch.randn(1, 1, c_in)
        times = []
        for ws in (rowmajor, transposed):
            best = float("inf")
            for _ in range(5):
                t0 = time.thread_time()
                for w in ws:
                    torch.bmm(x, w)
                best = min(best, (time.thread_time() - t0) / n)
            times.append(best * 1e6)
        print(f"  ({out:6d}, {c_in:5d}): (in, out) {times[0]:8.1f} us | (out, in) {times[1]:8.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pos", type=int, default=100, help="prompt tokens before the profiled steps")
    ap.add_argument("--tiny", action="store_true", help="6 layers, 48 wide, vocab 64")
    ap.add_argument("--layouts", action="store_true", help="time both slab layouts per weight shape")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    width, vocab = (48, 64) if args.tiny else (384, 30000)
    model = GPT(GPTConfig(vocab_size=vocab, n_layer=6, n_head=6, n_embd=width, block_size=256)).eval()
    model.decode_dtype = args.dtype
    if not 0 < args.pos < model.config.block_size:
        raise SystemExit(f"error: --pos {args.pos}: must be in 1..{model.config.block_size - 1}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}, "
          f"{'tiny' if args.tiny else 'seed'} shape, prompt {args.pos} tokens")
    profile_steps(model, args.steps, args.pos)
    if args.layouts:
        layouts(model)


if __name__ == "__main__":
    main()
