"""Throughput, CPU time and peak memory of the data stages (process, tokenizer, encode) on a
corpus of any size, with one worker against every core.

    python bench/data_throughput.py [--mb 1000] [--format jsonl|wikitext|both] [--vocab 30000]
                                    [--workers 0] [--data ../shared/data] [--tmp DIR] [--keep]
                                    [--process-only]

Builds `--mb` MB of pre-training text in a temporary project (never in the repo) from the real
text in `--data` (shared/data: the WikiText-2 raw files and extra/wiki_demo.txt): documents of
20-60 real sentences drawn with a fixed seed, plus a long tail of rare made-up words (about one
sentence in eight ends with one; the tail is Zipf-like) so that the tokenizer meets a growing
vocabulary as in real corpora rather than the same few thousand words repeated.
- `jsonl`: `raw/pretrain/train.jsonl`, one `{"text"}` document per line (detokenized);
- `wikitext`: `raw/pretrain/wiki.train.raw` in WikiText's raw layout (` = Title = ` headings,
  ` @-@ ` tokens), regrouped and detokenized by `process`.
Validation and test are carved out of train by `process`, as for any single-file source.

Then runs the stage scripts as `dvc repro` would, each in its own subprocess: `process` with
`process.num_proc` 1 and then `--workers` (0 = every core), `tokenizer` once, `encode` with
`encode.num_proc` 1 and then `--workers`. Per run it prints wall seconds, MB/s (input bytes over
wall time), CPU-s (user + system of the stage and its workers, from `getrusage(RUSAGE_CHILDREN)`)
and peak RSS: the sum of the resident sizes of the stage's process tree, sampled every 0.1 s
from /proc (an upper bound: pages the processes share are counted in each). For process and
encode it prints `ratio N.NNx` (wall time with 1 worker / with all) and checks that the outputs
of both runs are byte-identical (exit status 1 if not).
The machines are shared and noisy: run it on a quiet machine, and trust the ratio within a run
more than the absolutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt.parallel import cpu_count  # noqa: E402
from minigpt.wikitext import detokenize  # noqa: E402

WIKITEXT = ["wiki.train.first1000lines.raw", "wiki.valid.raw", "wiki.test.raw"]
SYLLABLES = "ka lo mi ne ru ta vo shi an el or ux be di fu go".split()
# A sentence ends at ". " (WikiText raw: " . ") followed by a capital letter.
SENTENCE_END = re.compile(r"(?<=\.)\s+(?=[A-Z])")


# ----------------------------------------------------------------------------- the corpus


def real_sentences(data: Path) -> list[str]:
    """Every sentence of the WikiText-2 raw files (WikiText-tokenized) and of wiki_demo.txt."""
    out = []
    for name in WIKITEXT:
        for line in (data / "wikitext-2-raw" / name).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("="):
                out += [s for s in SENTENCE_END.split(line) if len(s) > 20]
    for line in (data / "extra" / "wiki_demo.txt").read_text(encoding="utf-8").splitlines():
        out += [s for s in SENTENCE_END.split(line.strip()) if len(s) > 20]
    return out


def rare_word(rng: random.Random) -> str:
    """A made-up word from a Zipf-like tail: most are from a few thousand, some from millions."""
    i = min(int(rng.paretovariate(0.7)), 10**7)
    word = ""
    while True:
        word += SYLLABLES[i % 16]
        i //= 16
        if not i:
            return word


def documents(sentences: list[str], rng: random.Random) -> Iterator[list[list[str]]]:
    """Endless documents, each a list of paragraphs, each a list of sentences."""
    while True:
        paragraphs = []
        for _ in range(rng.randint(3, 8)):
            para = []
            for _ in range(rng.randint(4, 10)):
                s = rng.choice(sentences)
                if rng.random() < 0.125:
                    s = s[:-1] + f" {rare_word(rng)} ." if s.endswith(".") else f"{s} {rare_word(rng)}"
                para.append(s)
            paragraphs.append(para)
        yield paragraphs


def build_corpus(data: Path, fmt: str, megabytes: float, raw_dir: Path, seed: int = 0) -> int:
    """Write `megabytes` MB of documents in `fmt` into `raw_dir`; returns the file's size."""
    rng = random.Random(seed)
    sentences = real_sentences(data)
    if fmt == "jsonl":
        sentences = [detokenize(s) for s in sentences]
    raw_dir.mkdir(parents=True, exist_ok=True)
    path = raw_dir / ("train.jsonl" if fmt == "jsonl" else "wiki.train.raw")
    size = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for n, doc in enumerate(documents(sentences, rng)):
            if size >= megabytes * 1e6:
                break
            if fmt == "jsonl":
                text = json.dumps({"text": "\n\n".join(" ".join(p) for p in doc)}, ensure_ascii=False) + "\n"
            else:
                lines = [f" = {rare_word(rng).title()} {n} = ", " "]
                for i, para in enumerate(doc):
                    if i and i % 3 == 0:
                        lines += [f" = = {rare_word(rng).title()} = = ", " "]
                    lines += [" " + " ".join(para) + " ", " "]
                text = "\n".join(lines) + "\n"
            f.write(text)
            size += len(text.encode("utf-8"))
    return size


# ----------------------------------------------------------------------------- measuring


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, AttributeError):  # gone meanwhile, or a zombie without VmRSS
            continue
    return total


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclasses.dataclass
class Run:
    stage: str
    workers: int | None
    wall: float
    cpu: float
    peak_rss: int
    mb_in: float


def run_stage(project: Path, stage: str, args: list[str], mb_in: float, workers: int | None) -> Run:
    """Run `python stages/STAGE.py ARGS` in `project` and measure it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cpu, start = children_cpu(), time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu
    if proc.returncode != 0:
        sys.exit(f"{stage} {' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    print(f"  {out.strip()}", flush=True)
    return Run(stage, workers, wall, cpu, peak[0], mb_in)


def digest_dir(path: Path) -> dict[str, str]:
    out = {}
    for p in sorted(path.iterdir()):
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[p.name] = h.hexdigest()
    return out


def write_params(project: Path, fmt: str, vocab: int, workers: int) -> None:
    pre = {"source": "raw/pretrain", "name": None,
           "format": "wikitext" if fmt == "wikitext" else "documents"}
    params = {"process": {"pretrain": pre, "num_proc": workers},
              "tokenizer": {"vocab_size": vocab}, "encode": {"num_proc": workers}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def size_mb(*paths: Path) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


def bench(data: Path, fmt: str, megabytes: float, vocab: int, workers: int, tmp: Path,
          process_only: bool = False) -> bool:
    project = tmp / f"project-{fmt}"
    start = time.perf_counter()
    size = build_corpus(data, fmt, megabytes, project / "raw" / "pretrain")
    print(f"\n{fmt}: {size / 1e6:.1f} MB corpus built in {time.perf_counter() - start:.1f}s "
          f"-> {project / 'raw' / 'pretrain'}", flush=True)
    processed, tokens = project / "data" / "processed" / "pretrain", project / "data" / "tokens" / "pretrain"
    runs: list[Run] = []
    same = {}
    stages = [("process", processed)] + ([] if process_only else [("encode", tokens)])
    for stage, out in stages:
        digests = []
        for n in (1, workers):
            write_params(project, fmt, vocab, n)
            if stage == "process":
                runs.append(run_stage(project, "process", ["pretrain"], size / 1e6, n))
            else:
                splits = [processed / f"{s}.jsonl" for s in ("train", "validation", "test")]
                runs.append(run_stage(project, "encode", ["pretrain"], size_mb(*splits), n))
            digests.append(digest_dir(out))
        same[stage] = digests[0] == digests[1]
        if stage == "process" and not process_only:
            runs.append(run_stage(project, "tokenizer", [], size_mb(processed / "train.jsonl"), None))

    print(f"{'stage':10s} {'workers':>7s} {'wall s':>8s} {'MB/s':>7s} {'CPU-s':>8s} {'peak RSS MB':>11s}")
    for r in runs:
        who = "-" if r.workers is None else str(r.workers)
        print(f"{r.stage:10s} {who:>7s} {r.wall:8.1f} {r.mb_in / r.wall:7.2f} {r.cpu:8.1f} "
              f"{r.peak_rss / 2**20:11.0f}")
    for stage, _ in stages:
        one, many = [r for r in runs if r.stage == stage]
        print(f"{stage}: ratio {one.wall / many.wall:.2f}x ({workers} workers against 1); "
              f"identical output: {same[stage]}")
    return all(same.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=1000, help="corpus size in MB")
    ap.add_argument("--format", choices=("jsonl", "wikitext", "both"), default="jsonl")
    ap.add_argument("--vocab", type=int, default=30000, help="tokenizer.vocab_size")
    ap.add_argument("--workers", type=int, default=0, help="the many-worker run (0 = every core)")
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("MINIGPT_SHARED_DATA", ROOT.parent / "shared" / "data")),
                    help="real text (shared/data; default ../shared/data beside the repo, or "
                         "$MINIGPT_SHARED_DATA); read, never copied into the repo")
    ap.add_argument("--tmp", type=Path, default=None, help="where the temporary project goes")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project")
    ap.add_argument("--process-only", action="store_true", help="time only the process stage")
    args = ap.parse_args()
    workers = args.workers or cpu_count()
    if not (args.data / "wikitext-2-raw").is_dir():
        sys.exit(f"error: --data {args.data}: no wikitext-2-raw/ in it (see shared/data/README.md)")
    print(f"cores {cpu_count()}, workers 1 and {workers}; load average {os.getloadavg()[0]:.1f}")
    tmp = Path(tempfile.mkdtemp(prefix="data-bench-", dir=args.tmp))
    try:
        ok = all([bench(args.data, fmt, args.mb, args.vocab, workers, tmp, args.process_only)
                  for fmt in (("jsonl", "wikitext") if args.format == "both" else (args.format,))])
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
