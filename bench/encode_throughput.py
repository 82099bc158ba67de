"""Throughput and peak memory of the pretrain encode path, against a naive loop in the same process.

    python bench/encode_throughput.py [--mb 64] [--vocab 8192] [--threads 0] [--batch-size 1000]

Builds a processed `train.jsonl` of real text (the WikiText-2 raw files regrouped into articles,
plus extra/wiki_demo.txt, from shared/data; repeated to `--mb` MB) in a temporary directory,
trains a tokenizer on one copy of the text, then encodes the file twice, alternating:
- `minigpt`: `minigpt.encode.encode_pretrain_split` in this process (batched `encode_batch` on
  the Rust thread pool, numpy conversion per batch, streamed to disk): the encode stage's path
  with one worker (bench/data_throughput.py compares one worker with all);
- `naive`: one `tok.encode(text)` per document in a Python loop, written per document.
Both write the same format and the bench checks the files are identical. Prints tokens/s, MB/s
(JSONL input), CPU/wall (how many cores it kept busy: under 1 means other processes took the
cores) and tokens per CPU-second for each, the ratio, and the peak RSS of
the process (`ru_maxrss`, an upper bound for the encode path since nothing else is big here).
The machines are shared and noisy: trust the ratio within a run more than the absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt.encode import encode_pretrain_split, set_threads, token_dtype  # noqa: E402
from minigpt.files import read_objects  # noqa: E402
from minigpt.tokenizer import EOT, save_tokenizer, special_id, train_tokenizer  # noqa: E402

SHARED = Path(os.environ.get("MINIGPT_SHARED_DATA", ROOT.parent / "shared" / "data"))
WIKITEXT = ["wiki.train.first1000lines.raw", "wiki.valid.raw", "wiki.test.raw"]


def articles(path: Path) -> list[str]:
    """WikiText raw lines regrouped into articles at ` = Title = ` lines (as process does)."""
    docs: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        is_title = line.startswith(" = ") and not line.startswith(" = = ")
        if is_title or not docs:
            docs.append([])
        docs[-1].append(line)
    return ["".join(d).strip() for d in docs if "".join(d).strip()]


def real_documents() -> list[str]:
    docs = [a for name in WIKITEXT for a in articles(SHARED / "wikitext-2-raw" / name)]
    docs += [line for line in (SHARED / "extra" / "wiki_demo.txt").read_text(encoding="utf-8")
             .splitlines() if line.strip()]
    return docs


def write_corpus(docs: list[str], path: Path, megabytes: float) -> int:
    """Repeat `docs` into a JSONL file of at least `megabytes` MB; return its size."""
    lines = [(json.dumps({"text": d}, ensure_ascii=False) + "\n").encode() for d in docs]
    size = 0
    with path.open("wb") as f:
        while size < megabytes * 1e6:
            for line in lines:
                f.write(line)
                size += len(line)
    return size


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def naive_encode(tok, src: Path, dst: Path) -> int:
    """The peer: a Python loop of `tok.encode`, one document at a time."""
    import numpy as np

    eot, dtype, tokens = special_id(tok, EOT), token_dtype(tok.get_vocab_size()), 0
    tok.encode_special_tokens = True  # the same ordinary-text encoding as minigpt's path
    try:
        with dst.open("wb") as out:
            for _, _, obj in read_objects(src):
                ids = tok.encode(obj["text"], add_special_tokens=False).ids
                ids.append(eot)
                np.array(ids, dtype=dtype).tofile(out)
                tokens += len(ids)
    finally:
        tok.encode_special_tokens = False
    return tokens


def timed(fn, *args) -> tuple[int, float, float]:
    start, cpu = time.perf_counter(), cpu_s()
    tokens = fn(*args)
    wall = time.perf_counter() - start
    return tokens, wall, (cpu_s() - cpu) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=64, help="size of the encoded JSONL (MB)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=0, help="tokenizer threads in this one process (0 = all cores)")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of both")
    args = ap.parse_args()
    set_threads(args.threads)  # before anything builds the Rust thread pool (training does)

    with tempfile.TemporaryDirectory(prefix="encode-bench-") as tmp:
        tmp = Path(tmp)
        docs = real_documents()
        size = write_corpus(docs, tmp / "train.jsonl", args.mb)
        start = time.perf_counter()
        tok = train_tokenizer(docs, args.vocab, 2)
        save_tokenizer(tok, tmp / "tokenizer.json")
        print(f"corpus: {len(docs)} real documents, {sum(len(d.encode()) for d in docs) / 1e6:.1f} MB, "
              f"repeated to {size / 1e6:.1f} MB JSONL; tokenizer vocab {tok.get_vocab_size()} "
              f"trained in {time.perf_counter() - start:.1f}s; cores {os.cpu_count()}, "
              f"threads {args.threads or 'all'}, batch {args.batch_size}; "
              f"load average {os.getloadavg()[0]:.1f}; peak RSS so far {rss_mb():.0f} MB")
        dtype = token_dtype(tok.get_vocab_size())
        results: dict[str, list[tuple[int, float, float]]] = {"minigpt": [], "naive": []}
        for _ in range(args.rounds):
            results["minigpt"].append(timed(
                lambda: encode_pretrain_split(tok, tmp / "train.jsonl", tmp / "a.bin",
                                              args.batch_size, dtype).tokens))
            rss_after_minigpt = rss_mb()
            results["naive"].append(timed(naive_encode, tok, tmp / "train.jsonl", tmp / "b.bin"))
        same = (tmp / "a.bin").read_bytes() == (tmp / "b.bin").read_bytes()

    best = {}
    for name, runs in results.items():
        tokens, wall, busy = min(runs, key=lambda r: r[1])  # best of the rounds: least disturbed
        best[name] = tokens / wall
        print(f"{name:8s} {tokens / wall / 1e6:6.2f}M tokens/s  {size / wall / 1e6:6.1f} MB/s  "
              f"cpu/wall {busy:.2f}  {tokens / (wall * busy) / 1e6:.2f}M tokens per CPU-second  "
              f"({tokens:,} tokens in {wall:.1f}s)")
    print(f"ratio minigpt/naive: {best['minigpt'] / best['naive']:.2f}x; identical output: {same}")
    print(f"peak RSS: {rss_after_minigpt:.0f} MB after the minigpt path, {rss_mb():.0f} MB at the end")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
