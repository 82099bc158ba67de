"""Decoding throughput: minigpt.sample.generate vs transformers generate() on the same weights.

    python bench/generate_throughput.py [--new 200] [--prompt 20] [--repeats 5] [--tiny] [--threads N]
                                        [--num_samples 8] [--device cpu|cuda]
    python bench/generate_throughput.py --vs-llamacpp DIR [--pairs fp32:f32,int8:q8_0] [...]

Seed config by default (6 layers, 6 heads, 384 wide, block 256, vocab 30000), random init. The
model is exported with minigpt.export to a temporary directory and reloaded as LlamaForCausalLM,
so both sides run identical weights in one process. Batch 1, greedy, KV cache on both sides
(`use_cache=True`); prints new tokens/s, `ratio N.NNx` and whether the tokens agree. The two sides
alternate within each repeat and the medians are compared, so load from other jobs on a shared
machine hits both alike. bf16 runs the same comparison with weights cast to bfloat16.
`--num_samples N` (> 1) also times one batched `generate_batch` of N sampled continuations
against N separate `generate` calls (`batch ratio`). Needs transformers.

`--vs-llamacpp DIR` (DIR holds a llama.cpp build's `llama-completion`, or `llama-cli` in older
versions) compares against llama.cpp instead of transformers: the model is exported with
minigpt.export_gguf once per llama.cpp type, and each `--pairs` entry OURS:THEIRS (our `--dtype`
against a GGUF type: fp32:f32, int8:q8_0, bf16:f16) runs both sides on the same weights and thread
count, alternating, greedy, `--new` tokens. Both report decode time per token after the first
(llama.cpp's `eval time`; ours from the first to the last token of `generate`), so neither
counts the prompt, which is the same `--prompt` tokens of text on both sides. Prints the medians and
`ratio` = llama.cpp's ms/token over ours (> 1: we are faster). Not run in CI.

Measured (2-core AMD EPYC, AVX2 only, no AVX-512/bf16; `--repeats 3 --new 100 --dtypes fp32`):
- seed config, weights as one slab per thread (`GPT.decode_weights`): minigpt 12.0-13.4
  ms/token, transformers 27.3-30.2, ratio 2.25-2.27x, same tokens 100/100; `--num_samples 8`:
  one batch 5.00 s vs 8 calls 13.56 s (2.71x); `--tiny`: 4.89 vs 10.16 ms/token (2.08x).
  Same box, same day: one (in, out) copy on one thread 14.8 vs 27.1 ms/token (1.83x); an
  older main over nn.Linear's rows 19.6 vs 23.6 (1.20x). With the thread-invariant decode
  attention (plain matmuls instead of the flash kernel): 12.93 vs 26.08 ms/token, 2.02x.
- Floors here: a plain read streams at 9.3 GB/s on one core, 16.7 on two; all fp32 weights
  (88 MB) stream through MKL's GEMV in 11.9 ms over one (in, out) copy (on one thread whatever
  the thread count) and in 6.7 ms as two slabs in one bmm. The same ops on a model of trivial
  width (6 layers, 48 wide, vocab 64) take 3.6 ms/token: per-op dispatch, ~60 ops per layer at
  5-15 us each here (reductions such as RMSNorm's mean ~10 us). bf16 weights would halve the
  bytes, but AVX2 has no bf16 math, so fp32 stays the CPU decode dtype here.
- 2-core AMD EPYC Zen 5 (avx512f, avx512_bf16; `--repeats 3 --new 100 --num_samples 8`): fp32
  10.11 vs 16.50 ms/token (1.63x; before the cache's (in, out) weight copies 12.67 vs 16.26,
  1.28x), bf16 8.27 vs 11.10 (1.34x; before, on one thread, 0.96x); 8 samples as one batch:
  2.74x (fp32) and 3.92x (bf16) faster than 8 calls. Floors: a plain read streams at 25 GB/s on
  one core, 45 on two (2 ms per token for fp32 weights, 1 ms bf16), but MKL's fp32 GEMV reaches
  9 GB/s over nn.Linear's (out, in) layout and 17-20 over (in, out), oneDNN's bf16 GEMV 8-15:
  the matmuls take ~5-7 ms of the 8-10 ms per token, and the rest is ~400 small ops. (Measured
  before the per-thread slabs; not yet re-measured there.)
- 2-core AMD EPYC Zen 5 again (avx512f, avx512_bf16; L3 32 MiB), 2026-12-06, with the
  per-thread slabs (`--repeats 3-5 --new 100`): fp32 4.83 vs 12.73 ms/token (2.64x), 4.75 vs
  11.77 (2.48x), a busier moment 6.36 vs 13.24 (2.08x); bf16 6.75 vs 7.95 (1.18x), 6.91 vs
  7.94 (1.15x); same tokens 100/100; `--num_samples 8`: 2.83x (fp32). Where a fp32 step goes
  (timed in place): 6 blocks 3.4-3.6 ms, of which streaming their 42 MB of slabs ~2.2 ms; the
  head's 46 MB 1.1-1.4 ms; argmax + sync 0.05 ms. Floors: all weights as two slabs in one bmm
  each 3.2 ms, a plain 88 MB read 2.1-2.25 ms, the same ops at trivial width 0.96 ms/token
  (so ~3.7 ms/token, 3.2-3.4x transformers, is the eager floor here). bf16 weights stream no
  faster (all of them: F.linear 3.05 ms, slabs 3.12, (in, out) 2.96), and bf16's small ops and
  attention matmuls cost more than fp32's (a bf16 step 6.8 ms), so CPU decoding stays fp32.
  Tried without gain: MKL/oneDNN packed weights (4.2-5.2 ms for all weights), 4 or 8 slabs
  (3.6-4.1 ms), 2 MB pages for the slabs (madvise; 3-8% on the weights alone, 4.82 -> 4.71
  ms/token in the loop: not worth an mmap allocator), bmm over (B*H) views for
  the decode attention instead of 4-D matmuls (4.69 vs 4.69 ms/token).
  With `GPT._decode_step` (the blocks' math as plain ops, no module calls): 4.62 vs 12.19
  ms/token (2.64x, `--repeats 9`), 4.70 vs 11.92 (2.54x); bf16 (module path) 6.50 vs 7.91
  (1.22x); `--num_samples 8` 2.61x fp32, 3.71x bf16; `--tiny` 1.48 vs 4.13 ms/token (2.79x).
  Paired in one process against the module path: 4.40 vs 4.65, 5.69 vs 5.93, 5.15 vs 5.83
  ms/token; a profile of the step is then 82% bmm (the weights).
- 2-core AMD EPYC Milan (cpu family 25 model 1; avx2 fma only), 2026-12-06, `--repeats 3 --new
  100 --dtypes fp32 --num_samples 8`: 4.49 vs 10.03 ms/token (2.23x; 4.86 vs 10.79, 2.22x in a
  second run), same tokens 100/100. Floors: all weights as two slabs 2.51 ms, a plain 88 MB
  read 1.91 ms. 8 samples (top-k 50, top-p 0.95, as the CLI's defaults): 2.06 s batched vs 5.02
  s for 8 calls (2.44x) with the old filters; with `sample.candidates` (topk instead of a
  full-vocabulary sort and mask, one uniform draw instead of torch.multinomial) 1.30 vs 4.27 s
  (3.28x), as fast as 8 greedy rows (1.27 s): filtering cost 1.67 ms per row before, 0.27 now
  (one thread; 8 rows 18.0 -> 1.8 ms). What is left of a batch of 8 is MKL's bmm at 8 rows
  (the head's slabs 4.3 ms vs 1.1 for one row: ~43 GFLOP/s). Tried without gain: a compiled
  decode step (inductor C++; static cache, position as a tensor, masked attention over the
  whole cache): 15.8 s to compile, then 9.91 vs 4.67 ms/token eager; over F.linear weights with
  `freezing` (prepacked) 19.5 s, 6.37 vs 4.45 ms; `torch.compile(model._decode_step,
  dynamic=True)` recompiles for every cache position (7.48 vs 4.82 ms).
- 2-core Intel Xeon with AMX (amx_bf16, avx512_bf16, avx512_fp16), 2026-12-02 (`--repeats 3
  --new 100 --dtypes fp32,bf16 --num_samples 8`): fp32 8.22 vs 12.76 ms/token (1.55x), bf16
  11.25 vs 14.27 (1.27x), same tokens 100/100; 8 samples as one batch 2.71x (fp32) and 3.82x
  (bf16) faster than 8 calls. Floors: all fp32 weights as slabs 4.3-4.8 ms (a plain 88 MB read
  4.9 ms), the same ops at trivial width 2.5 ms/token. bf16 GEMV at one row is slower than fp32
  here (all weights: F.linear 5.9 ms, (in, out) or slabs 6.9-8.5 ms vs fp32 slabs 4.3 ms), so
  bf16 decode weights would not pay on this CPU either.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from minigpt.export import export_hf  # noqa: E402
from minigpt.hardware import cpu_has_bf16  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.sample import generate, generate_batch  # noqa: E402


def tiny_tokenizer(path: Path) -> None:
    """A throwaway byte-level BPE: export needs a tokenizer.json; the benchmark never decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from minigpt.tokenizer import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a tiny corpus for a throwaway tokenizer"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))


def alternate(fns: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Median wall seconds, median CPU seconds of this process, and the last output of each
    function, run in turn `repeats` times after a warm-up. On a crowded machine the CPU seconds
    show the work done, the wall seconds mostly the queue."""
    wall, cpu, outs = {k: [] for k in fns}, {k: [] for k in fns}, {}
    for k, fn in fns.items():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            outs[k] = fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    med = statistics.median
    return {k: med(v) for k, v in wall.items()}, {k: med(v) for k, v in cpu.items()}, outs


def llamacpp_binary(directory: Path) -> Path:
    for name in ("llama-completion", "llama-cli"):
        if (directory / name).is_file():
            return directory / name
    raise SystemExit(f"error: --vs-llamacpp {directory}: no llama-completion or llama-cli in it")


def llamacpp_ms_per_token(binary: Path, gguf_file: Path, prompt: str, new: int, threads: int) -> float:
    """llama.cpp's decode time per token (its `eval time`: every token after the first)."""
    cmd = [str(binary), "-m", str(gguf_file), "-p", prompt, "-n", str(new), "-t", str(threads),
           "-tb", str(threads), "--temp", "0", "--ignore-eos", "-c", "256", "-s", "0", "-no-cnv",
           "--no-warmup"]
    for _ in range(3):  # once, on a loaded machine, it exited 0 after loading, printing nothing more
        run = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
        m = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", run.stderr)
        if run.returncode != 0 or m is not None:
            break
    if run.returncode != 0 or m is None:
        tail = " | ".join(run.stderr.strip().splitlines()[-3:])
        raise SystemExit(f"error: {binary.name} failed (exit {run.returncode}): {tail}")
    return float(m.group(1)) / int(m.group(2))


def vs_llamacpp(ours: GPT, args) -> None:
    """Each --pairs entry: our decode dtype against a llama.cpp GGUF type, same weights and threads."""
    from minigpt.export_gguf import export_gguf

    binary = llamacpp_binary(Path(args.vs_llamacpp))
    threads = torch.get_num_threads()
    pairs = [p.split(":") for p in args.pairs.split(",")]
    from minigpt.export_gguf import TYPES
    from minigpt.quant import DTYPES

    for pair in pairs:
        if len(pair) != 2 or pair[0] not in DTYPES or pair[1] not in TYPES:
            raise SystemExit(f"error: --pairs {':'.join(pair)}: expected OURS:THEIRS, ours one of "
                             f"{', '.join(DTYPES)}, theirs one of {', '.join(TYPES)}")
    with tempfile.TemporaryDirectory() as tmp:
        tiny_tokenizer(Path(tmp) / "tokenizer.json")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
        words = "a tiny corpus for a throwaway tokenizer".split()
        prompt = words[0]
        while len(tok.encode(prompt).ids) < args.prompt:  # the same prompt tokens on both sides
            prompt += " " + words[len(prompt.split()) % len(words)]
        ids = tok.encode(prompt).ids
        files = {}
        for _, theirs in pairs:
            if theirs not in files:
                files[theirs] = export_gguf(ours, Path(tmp) / "tokenizer.json", Path(tmp) / f"m-{theirs}.gguf",
                                            dtype=theirs, name="bench", chat_template=None, eos_id=0,
                                            pad_id=1, bos_id=None)
        print(f"vs llama.cpp ({binary}): {threads} threads both sides, prompt {len(ids)} tokens, "
              f"{args.new} new tokens, greedy")
        for mine, theirs in pairs:
            ours.decode_dtype = mine

            def run_ours() -> float:
                stamps = []
                generate(ours, ids, args.new, temperature=0.0, on_token=lambda t: stamps.append(time.perf_counter()))
                return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

            mine_ms, theirs_ms = [], []
            run_ours()  # warm-up: makes the decode weights
            for _ in range(args.repeats):
                mine_ms.append(1000 * run_ours())
                theirs_ms.append(llamacpp_ms_per_token(binary, files[theirs], prompt, args.new, threads))
            a, b = statistics.median(mine_ms), statistics.median(theirs_ms)
            print(f"minigpt {mine} {a:.2f} ms/token  llama.cpp {theirs} {b:.2f} ms/token  ratio {b / a:.2f}x  "
                  f"(ours {min(mine_ms):.2f}-{max(mine_ms):.2f}, theirs {min(theirs_ms):.2f}-{max(theirs_ms):.2f})",
                  flush=True)
        ours.decode_dtype = "fp32"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=200, help="new tokens")
    ap.add_argument("--prompt", type=int, default=20, help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="4 layers, 4 heads, 256 wide, vocab 8192")
    ap.add_argument("--shape", type=int, nargs=4, metavar=("L", "H", "C", "V"),
                    help="any other size (bench/gpu_check.py's dry run)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtypes", default="auto", help="comma list of fp32,bf16,fp16; auto: bf16 only if fast here")
    ap.add_argument("--num_samples", type=int, default=0, help="also time batched sampling of N")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: both sides on it (tokens come back each step)")
    ap.add_argument("--vs-llamacpp", metavar="DIR", help="compare with llama.cpp's binaries in DIR")
    ap.add_argument("--pairs", default="fp32:f32,int8:q8_0",
                    help="with --vs-llamacpp: OURS:THEIRS dtype pairs (ours fp32|int8|bf16, theirs f32|f16|q8_0)")
    args = ap.parse_args()
    if args.vs_llamacpp:
        if args.threads:
            torch.set_num_threads(args.threads)
        L, H, C, V = args.shape or ((4, 4, 256, 8192) if args.tiny else (6, 6, 384, 30000))
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=V, n_layer=L, n_head=H, n_embd=C, block_size=256)).eval()
        print(f"{L} layers, {H} heads, {C} wide, vocab {V}; batch 1")
        return vs_llamacpp(model, args)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    L, H, C, V = args.shape or ((4, 4, 256, 8192) if args.tiny else (6, 6, 384, 30000))
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=V, n_layer=L, n_head=H, n_embd=C, block_size=256)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tiny_tokenizer(Path(tmp) / "tokenizer.json")
        export_hf(ours, Path(tmp) / "tokenizer.json", Path(tmp) / "hf", chat_template=None,
                  eos_id=0, pad_id=1)
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf").eval()
    ours, hf = ours.to(args.device), hf.to(args.device)
    prompt = torch.randint(5, V, (args.prompt,)).tolist()
    x = torch.tensor([prompt], device=args.device)
    print(f"{L} layers, {H} heads, {C} wide, vocab {V}; batch 1, prompt {args.prompt}, "
          f"{args.new} new tokens, {args.device}, {torch.get_num_threads()} threads")
    fast_bf16 = args.device != "cpu" or cpu_has_bf16()
    dtypes = args.dtypes if args.dtypes != "auto" else "fp32,bf16" if fast_bf16 else "fp32"
    for name in dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        ours.to(dtype)
        hf.to(dtype)

        def run_ours():
            return generate(ours, prompt, args.new, temperature=0.0)

        def run_hf():
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = hf.generate(x, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                  use_cache=True, pad_token_id=1, eos_token_id=None)
            return out[0, len(prompt):].tolist()

        t, c, out = alternate({"ours": run_ours, "hf": run_hf}, args.repeats)
        t_ours, t_hf, tok_ours, tok_hf = t["ours"], t["hf"], out["ours"], out["hf"]
        same = sum(a == b for a, b in zip(tok_ours, tok_hf))
        print(f"{name}: minigpt {args.new / t_ours:7.1f} tok/s ({1000 * t_ours / args.new:.2f} ms/token)  "
              f"transformers {args.new / t_hf:7.1f} tok/s ({1000 * t_hf / args.new:.2f} ms/token)  "
              f"ratio {t_hf / t_ours:.2f}x  (cpu seconds ratio {c['hf'] / c['ours']:.2f}x)  "
              f"same tokens {same}/{args.new}")
        if args.num_samples > 1:
            n, kw = args.num_samples, dict(temperature=1.0, top_k=50, top_p=0.95)
            t, c, _ = alternate({"batch": lambda: generate_batch(ours, prompt, args.new, n, **kw),
                              "loop": lambda: [generate(ours, prompt, args.new, **kw) for _ in range(n)]},
                             args.repeats)
            print(f"{name}: {n} samples batched {t['batch']:.2f} s, {n} separate calls {t['loop']:.2f} s "
                  f"({t['batch'] / t['loop'] * n:.2f} single-sample runs)  batch ratio {t['loop'] / t['batch']:.2f}x  "
                  f"(cpu seconds {c['loop'] / c['batch']:.2f}x)")


if __name__ == "__main__":
    main()
