"""Quality at a fixed compute budget: bits/byte reached by training recipes, back to back.

    python bench/quality.py [--minutes 3] [--clock cpu|wall] [--threads N]
                            [--recipe old --recipe new --recipe new,model.qk_norm=true ...]
                            [--set pretrain.batch_size=32 ...] [--decode-dtypes int8,fp16]
    python bench/quality.py --checkpoint out/pretrain --decode-dtypes int8,fp16

Each recipe trains the quick-start model (params.yaml `model` + `pretrain`, with the recipe's
overrides) through the real `minigpt.train.fit` loop on the same token files, for the same budget:
`old` is the recipe params.yaml shipped before issue 14 (AdamW lr 1e-3, cosine, SwiGLU, 4x4x128),
`new` is params.yaml as it is now; `NAME,key=value,...` adds overrides to a recipe and `--set` adds
them to every recipe. The budget is turned into max_steps by timing a few real steps of each
recipe first, so the schedule ends where the budget does.

Data (read from ../shared/data, see its README.md): train = WikiText-2 raw train (its first 1,000
lines: all that is local) + the first 50 articles of wiki.valid.raw + extra/wiki_demo.txt;
validation = the last 10 articles of wiki.valid.raw; test = wiki.test.raw, untouched. WikiText
articles are regrouped and detokenized like `process` does. The BPE is trained on the train text
with minigpt.tokenizer (tokenizer.vocab_size); tokenizer and token files are cached under
bench/results/quality/ (git-ignored), keyed by the inputs' hash.

Clock: `cpu` (default) is this process's CPU time (time.process_time), which other users of a
shared machine barely disturb; `wall` is time.perf_counter. Evaluations are not counted. Output:
per recipe the validation curve against tokens and seconds, final validation and test bits/byte
(every token of the split, non-overlapping windows), and for each recipe after the first the
ratio of its test bits/byte to the first's and the time at which its validation loss first reached
the first recipe's final one.

`--decode-dtypes int8,fp16` also measures what CPU decoding in those dtypes (`--dtype`,
minigpt.quant) costs on each trained model against fp32: test perplexity taken through the decode
path itself (tokens fed one at a time through the KV cache, the full forward's windows), how often
its argmax equals fp32's, and how far greedy continuations agree (`decode_quality`);
`--checkpoint DIR` measures a model directory instead of training one. `--steps N` trains a fixed
number of steps instead of a budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
from minigpt import optim, runtime, train, windows  # noqa: E402
from minigpt.config import ConfigError, parse_params  # noqa: E402
from minigpt.wikitext import article_text, wikitext_articles  # noqa: E402
from minigpt.encode import flatten_with_eot, read_tokens, token_dtype  # noqa: E402
from minigpt.perplexity import sliding_window_nll, window_plan  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.tokenizer import EOT, load_tokenizer, save_tokenizer, special_id, train_tokenizer  # noqa: E402

# ../shared/data next to the checkout, or next to any folder above it (git worktrees)
DATA = next((d / "shared" / "data" for d in ROOT.parents if (d / "shared" / "data").is_dir()),
            ROOT.parent / "shared" / "data")
CACHE = ROOT / "bench" / "results" / "quality"
HELD_OUT = 10  # last articles of wiki.valid.raw kept for validation
# The quick-start recipe before issue 14 (params.yaml at 0241e81), frozen here for comparisons.
OLD = {"model.n_layer": 4, "model.n_head": 4, "model.n_embd": 128, "model.block_size": 256,
       "model.mlp": "swiglu", "model.qk_norm": False, "model.zero_init": False,
       "model.logit_softcap": 0.0, "pretrain.batch_size": 16, "pretrain.grad_accum": 1,
       "pretrain.lr": 1e-3, "pretrain.min_lr_ratio": 0.1, "pretrain.warmup_steps": 20,
       "pretrain.weight_decay": 0.1, "pretrain.beta1": 0.9, "pretrain.beta2": 0.95,
       "pretrain.grad_clip": 1.0, "pretrain.schedule": "cosine", "pretrain.optimizer": "adamw"}


# --- data -------------------------------------------------------------------------------------


def wikitext_docs(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [t for t in (article_text(a, detokenized=True) for a in wikitext_articles(lines)) if t]


def corpus(data: Path) -> dict[str, list[str]]:
    raw = data / "wikitext-2-raw"
    valid = wikitext_docs(raw / "wiki.valid.raw")
    extra = [ln.strip() for ln in (data / "extra" / "wiki_demo.txt").read_text(encoding="utf-8").splitlines()]
    return {"train": wikitext_docs(raw / "wiki.train.first1000lines.raw") + valid[:-HELD_OUT]
            + [t for t in extra if t],
            "validation": valid[-HELD_OUT:], "test": wikitext_docs(raw / "wiki.test.raw")}


def prepare(data: Path, vocab_size: int) -> dict:
    """Tokenizer + token files (cached) -> {"tokenizer", split: (path, n_bytes)}."""
    docs = corpus(data)
    key = hashlib.sha256(json.dumps([docs, vocab_size]).encode()).hexdigest()[:12]
    out = CACHE / key
    info = {"tokenizer": out / "tokenizer.json"}
    for split in docs:
        info[split] = (out / f"{split}.bin", sum(len(d.encode()) for d in docs[split]))
    if (out / "done").exists():
        return info
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(docs["train"], vocab_size)
    save_tokenizer(tok, info["tokenizer"])
    dtype = token_dtype(tok.get_vocab_size())
    for split, texts in docs.items():
        ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        arr = flatten_with_eot(ids, special_id(tok, EOT), dtype)
        arr.tofile(out / f"{split}.bin")
        (out / f"{split}.json").write_text(json.dumps(
            {"dtype": dtype.name, "count": int(arr.size), "documents": len(texts), "bytes": info[split][1]}))
    (out / "done").write_text(key + "\n")
    return info


# --- recipes ----------------------------------------------------------------------------------


def parse_value(text: str):
    return yaml.safe_load(text)  # true -> True, 0.02 -> 0.02, muon -> "muon"


def recipe_params(spec: str, common: list[str]):
    """params.yaml with recipe `spec` (NAME[,key=value...]) and the --set overrides applied."""
    name, *pairs = spec.split(",")
    if name not in ("old", "new"):
        raise SystemExit(f"error: --recipe {spec}: name must be old or new")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = dict(OLD) if name == "old" else {}
    for pair in pairs + common:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"error: override {pair!r}: expected section.key=value")
        overrides[key] = parse_value(value)
    for key, value in overrides.items():
        section, field = key.split(".", 1)
        params.setdefault(section, {})[field] = value
    try:
        return parse_params(params)
    except ConfigError as e:
        raise SystemExit(f"error: --recipe {spec}: {e}") from None


def build(p, vocab: int) -> GPT:
    torch.manual_seed(p.pretrain.seed)
    return GPT(GPTConfig.from_params(p.model, vocab))


# --- timing -----------------------------------------------------------------------------------


class Clock:
    """Training time on the chosen clock, with evaluations left out."""

    def __init__(self, kind: str):
        self.now = time.process_time if kind == "cpu" else time.perf_counter
        self.start, self.paused = self.now(), 0.0

    def elapsed(self) -> float:
        return self.now() - self.start - self.paused


class TimedVal:
    """Validation batches for `fit` that note the training clock at each evaluation."""

    def __init__(self, batches: list, clock: Clock):
        self.batches, self.clock, self.times = batches, clock, []

    def __iter__(self):
        self.times.append(self.clock.elapsed())
        t = self.clock.now()
        yield from self.batches
        self.clock.paused += self.clock.now() - t


def seconds_per_step(p, info: dict, vocab: int, clock: str, steps: int = 3) -> float:
    """Median time of a few real `train_step`s of this recipe (after one warm-up step)."""
    cfg = dataclasses.replace(p.pretrain, max_steps=10**6, device="cpu", dtype="fp32")
    model = build(p, vocab)
    src = windows.TokenWindows(info["train"][0], p.model.block_size, cfg.batch_size, cfg.seed)
    run = train._Run(raw=model, model=model, optimizer=optim.build_optimizer(model, cfg, "cpu"),
                     cfg=cfg, rt=runtime.Runtime(torch.device("cpu"), "fp32"), source=src, val=[],
                     identity={}, h=train.History())
    now = time.process_time if clock == "cpu" else time.perf_counter
    times = []
    for i in range(steps + 1):
        t = now()
        train.train_step(run)
        if i:
            times.append(now() - t)
    return sorted(times)[len(times) // 2]


def bits_per_byte(model: GPT, path: Path, n_bytes: int, block: int, max_tokens: int = 0) -> float:
    """Bits per UTF-8 byte over the split (non-overlapping windows); with max_tokens, over its
    first max_tokens tokens, the bytes prorated by the token count."""
    tokens = read_tokens(path)
    nll, n = sliding_window_nll(model, tokens, block, block, 16, max_tokens=max_tokens)
    return nll / math.log(2) / (n_bytes * n / (len(tokens) - 1))


@torch.inference_mode()
def decode_quality(model: GPT, tokens, dtypes: list[str], max_tokens: int, prompts: int = 16,
                   new_tokens: int = 64) -> dict:
    """The cost of each lower-precision decode dtype (minigpt.quant) against fp32, measured through
    the real CPU decode path: the first `max_tokens` tokens are fed one at a time through the KV
    cache in the full forward's non-overlapping windows of block_size (teacher forcing; the last
    window ends at the last token), giving the perplexity and,
    per position, whether the argmax equals fp32's; then `prompts` greedy continuations of
    `new_tokens` tokens (prompts of 32 tokens taken along the slice) are compared with fp32's
    position by position. fp32 is also checked against the full forward's perplexity."""
    from minigpt.sample import generate

    block = model.config.block_size
    ids = torch.from_numpy(tokens[: max_tokens + 1].astype("int64"))
    step = max(1, (len(ids) - 32) // prompts)
    starts = list(range(0, len(ids) - 32, step))[:prompts]
    results, ref_argmax, ref_greedy = {}, None, None
    for dtype in ["fp32"] + [d for d in dtypes if d != "fp32"]:
        model.decode_dtype = dtype
        nll, argmax = 0.0, []
        width = min(block, len(ids) - 1)
        for begin, first in window_plan(len(ids) - 1, block, block):  # the full forward's windows
            x, y = ids[begin : begin + width], ids[begin + 1 : begin + width + 1]
            cache = model.new_cache(1)
            for t in range(width):
                logits, _ = model(x[t : t + 1].view(1, 1), cache=cache)
                if t >= first:
                    logits = logits.view(-1).float()
                    nll += float(torch.logsumexp(logits, 0) - logits[y[t]])
                    argmax.append(int(logits.argmax()))
        greedy = [generate(model, ids[s : s + 32].tolist(), new_tokens, temperature=0.0) for s in starts]
        r = {"tokens": len(argmax), "ppl": math.exp(nll / len(argmax))}
        if ref_argmax is None:
            ref_argmax, ref_greedy = argmax, greedy
            full, n = sliding_window_nll(model, ids.numpy(), block, block, 16)
            r["ppl_full_forward"] = math.exp(full / n)
        else:
            base = results["fp32"]["ppl"]
            r["ppl_ratio"] = r["ppl"] / base
            r["argmax_agree"] = sum(a == b for a, b in zip(argmax, ref_argmax)) / len(argmax)
            same = [sum(a == b for a, b in zip(g, f)) / max(1, len(f)) for g, f in zip(greedy, ref_greedy)]
            prefix = [next((i for i, (a, b) in enumerate(zip(g, f)) if a != b), min(len(g), len(f)))
                      for g, f in zip(greedy, ref_greedy)]
            r["greedy_agree"] = sum(same) / len(same)
            r["greedy_identical"] = sum(g == f for g, f in zip(greedy, ref_greedy)) / len(greedy)
            r["greedy_prefix"] = sum(prefix) / len(prefix)
        results[dtype] = r
    model.decode_dtype = "fp32"
    return results


def print_decode_quality(name: str, q: dict, new_tokens: int = 64) -> None:
    print(f"\n== decode dtypes, {name}: test perplexity through the decode path "
          f"({q['fp32']['tokens']:,} tokens, teacher-forced) and greedy agreement with fp32")
    f = q["fp32"]
    print(f"  fp32  ppl {f['ppl']:.3f} (full forward {f['ppl_full_forward']:.3f})")
    for dtype, r in q.items():
        if dtype != "fp32":
            print(f"  {dtype:5s} ppl {r['ppl']:.3f} ({100 * (r['ppl_ratio'] - 1):+.2f}% vs fp32) | "
                  f"argmax = fp32's at {100 * r['argmax_agree']:.2f}% of positions | greedy "
                  f"{new_tokens} tokens: {100 * r['greedy_agree']:.1f}% of tokens equal, "
                  f"{100 * r['greedy_identical']:.0f}% of continuations identical, first "
                  f"difference after {r['greedy_prefix']:.1f} tokens on average", flush=True)


def checkpoint_decode_quality(args) -> None:
    """--checkpoint: the decode dtypes' cost on a model directory, over WikiText-2 test encoded
    with its own tokenizer."""
    from minigpt.checkpoint import load_model

    model, tok, _ = load_model(args.checkpoint, "cpu")
    model.eval()
    docs = corpus(args.data)["test"]
    ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    tokens = flatten_with_eot(ids, special_id(tok, EOT), token_dtype(tok.get_vocab_size()))
    q = decode_quality(model, tokens, args.decode_dtypes, args.decode_tokens)
    print_decode_quality(str(args.checkpoint), q)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(q, indent=1) + "\n")


def run_recipe(spec: str, p, info: dict, vocab: int, args) -> dict:
    per_step = seconds_per_step(p, info, vocab, args.clock)
    steps = args.steps or max(10, int(args.minutes * 60 / per_step))
    cfg = dataclasses.replace(p.pretrain, device="cpu", dtype="fp32", max_steps=steps,
                              eval_interval=max(1, steps // args.evals), save_interval=steps,
                              log_interval=max(1, steps // args.evals), compile=False)
    cfg.validate("pretrain")
    model = build(p, vocab)
    block = p.model.block_size
    src = windows.TokenWindows(info["train"][0], block, cfg.batch_size, cfg.seed)
    clock = Clock(args.clock)
    val = TimedVal(windows.val_windows(info["validation"][0], block, cfg.batch_size, cfg.eval_batches), clock)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        summary = train.fit(model, cfg, runtime.Runtime(torch.device("cpu"), "fp32"), src, val,
                            model_dir=tmp / "model", ckpt_dir=tmp / "ckpt",
                            curves_dir=tmp / "curves", meta={"bench": "quality"},
                            tokenizer_file=info["tokenizer"])
        used = clock.elapsed()
        rows = _val_rows(tmp / "curves" / "val.tsv")
    curve = [(step, tokens, val.times[i], loss) for i, (step, tokens, loss) in enumerate(rows)]
    model.eval()
    result = {"spec": spec, "steps": steps, "per_step": per_step, "used": used, "curve": curve,
              "params": model.num_params(), "tokens": summary["tokens"],
              "val_bpb": bits_per_byte(model, *info["validation"], block),
              "test_bpb": bits_per_byte(model, *info["test"], block, args.test_tokens)}
    if args.decode_dtypes:
        result["decode"] = decode_quality(model, read_tokens(info["test"][0]), args.decode_dtypes,
                                          args.decode_tokens)
    return result


def _val_rows(path: Path) -> list[tuple[int, int, float]]:
    lines = path.read_text().splitlines()[1:]
    return [(int(a), int(b), float(c)) for a, b, c in (ln.split("\t") for ln in lines)]


def first_reach(curve: list, target: float) -> float | None:
    """Time at which the curve first reaches `target`, interpolated between evaluations."""
    for (_, _, t0, l0), (_, _, t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1) if l0 > target else t0
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="budget per recipe on --clock")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--steps", type=int, default=0, help="train this many steps instead of --minutes")
    ap.add_argument("--recipe", action="append", help="old | new, plus ,section.key=value overrides")
    ap.add_argument("--set", action="append", default=[], help="section.key=value for every recipe")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--evals", type=int, default=12, help="validation points on the curve")
    ap.add_argument("--test-tokens", type=int, default=0,
                    help="score only the first N test tokens (0 = all; a full pass costs ~1/3 of "
                         "training on that many tokens)")
    ap.add_argument("--decode-dtypes", type=lambda t: t.split(","), default=[],
                    help="e.g. int8,fp16: also measure each lower-precision decode dtype against "
                         "fp32 on the trained model (test perplexity through the decode path, "
                         "greedy agreement)")
    ap.add_argument("--decode-tokens", type=int, default=8192,
                    help="test tokens the --decode-dtypes perplexity is taken over (default 8192)")
    ap.add_argument("--checkpoint", type=Path,
                    help="with --decode-dtypes: measure this model directory instead of training")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    recipes = args.recipe or ["old", "new"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.data / "wikitext-2-raw" / "wiki.valid.raw").is_file():
        raise SystemExit(f"error: {args.data}: no WikiText-2 raw files (see ../shared/data/README.md)")
    from minigpt.quant import DTYPES

    for dtype in args.decode_dtypes:
        if dtype not in DTYPES:
            raise SystemExit(f"error: --decode-dtypes: {dtype!r} is not one of {', '.join(DTYPES)}")
    if args.checkpoint:
        if not args.decode_dtypes:
            raise SystemExit("error: --checkpoint needs --decode-dtypes")
        return checkpoint_decode_quality(args)
    params = [recipe_params(spec, args.set) for spec in recipes]
    vocab_sizes = {p.tokenizer.vocab_size for p in params}
    if len(vocab_sizes) != 1:
        raise SystemExit("error: recipes must share tokenizer.vocab_size (same tokens)")
    info = prepare(args.data, vocab_sizes.pop())
    vocab = load_tokenizer(info["tokenizer"]).get_vocab_size()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock {args.clock}, "
          f"budget {args.minutes:g} min per recipe; tokens: " + ", ".join(
              f"{s} {read_tokens(info[s][0]).size:,} ({info[s][1]:,} B)"
              for s in ("train", "validation", "test")), flush=True)
    results = []
    for spec, p in zip(recipes, params):
        r = run_recipe(spec, p, info, vocab, args)
        results.append(r)
        print(f"\n== {spec}: {r['params'] / 1e6:.2f}M params, {r['steps']} steps "
              f"({r['per_step']:.3f} s/step), {r['tokens']:,} tokens, {r['used']:.1f} s {args.clock}")
        print("   step     tokens   seconds  val_loss")
        for step, tokens, t, loss in r["curve"]:
            print(f"  {step:5d} {tokens:10,d} {t:9.1f}  {loss:.4f}")
        print(f"  validation {r['val_bpb']:.4f} bits/byte | test {r['test_bpb']:.4f} bits/byte", flush=True)
        if "decode" in r:
            print_decode_quality(spec, r["decode"])
    base = results[0]
    target = base["curve"][-1][3]
    print(f"\nsummary (clock {args.clock}; vs {base['spec']}, final val loss {target:.4f} "
          f"at {base['used']:.1f} s):")
    for r in results:
        reach = first_reach(r["curve"], target)
        at = f"{reach:.1f} s ({100 * reach / base['used']:.0f}% of {base['spec']}'s)" if reach is not None else "never"
        print(f"  {r['spec']}: test {r['test_bpb']:.4f} bits/byte, ratio {r['test_bpb'] / base['test_bpb']:.3f}x "
              f"(val {r['val_bpb']:.4f}, ratio {r['val_bpb'] / base['val_bpb']:.3f}x); "
              f"reaches {base['spec']}'s final val loss at {at}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
