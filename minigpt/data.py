"""Clean deterministic splits out of a corpus: the library behind the `process` stage.

Where rows come from is `minigpt.sources` (pieces of local files: `minigpt.ranges`); WikiText
articles are `minigpt.wikitext`; where a document goes and what is counted is
`minigpt.splits`; this module cleans, routes and writes.

Design choices
- Official splits are kept; a missing validation/test split is carved out of train by a stable
  hash (SHA-256) of the raw document, not an RNG: no dependence on order, seeds, versions or
  worker count, and adding documents never moves existing ones.
- `max_documents` caps train only, after carving, so a quick experiment has the full run's
  validation and test sets; a streamed hub slice stops once train is full.
- Every core, the same bytes: local documents (no `max_documents`) go to the workers as pieces of
  the files, each read, cleaned and written to shards there; this process appends the shards in
  input order and adds up the statistics. Other sources are read here and prepared in chunks.
- SFT: fields stripped; empty instructions/responses and exact duplicates (the first copy kept, in
  input order) dropped and counted; missing splits carved by a hash of (instruction, context), so
  every answer to one prompt shares a split.
- All-or-nothing output (`minigpt.files.atomic_directory`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from tqdm import tqdm

from minigpt import sources
from minigpt.config import PretrainDataConfig, SFTDataConfig
from minigpt.files import atomic_directory, write_json
from minigpt.parallel import Workers, ordered_map, resolve_workers
from minigpt.ranges import PieceReader, absolute_error, plan_pieces
from minigpt.splits import (Measures, Prepared, SplitStats, SplitWriter, assign_split, jsonl_line,
                             measure, require_nonempty, sft_split_key, total_dropped)
from minigpt.sources import (PRETRAIN_SUFFIXES, SFT_FIELDS, SPLITS, DataError, is_streamed,
                             local_splits, pretrain_format, pretrain_rows, resolve_source,
                             sft_records)
from minigpt.wikitext import article_text, wikitext_articles

PRETRAIN_DROP_REASONS = ("empty", "max_documents")
SFT_DROP_REASONS = ("empty_instruction", "empty_response", "duplicate")
# Work goes to the workers in chunks of about this many characters (or documents): large enough
# that pickling and scheduling cost little, small enough that every worker gets several.
CHUNK_CHARS = 2**20
CHUNK_ITEMS = 4096
# Local files go to the workers in pieces of about an eighth of a worker's share, within these
# bounds (minigpt.ranges): small ones even out the last pieces' wait. At most 2 * workers pieces
# and their shards exist at once.
PIECE_BYTES = 2**25
MIN_PIECE_BYTES = 2**20


# --------------------------------------------------------------------------------------------
# Pre-training corpus
# --------------------------------------------------------------------------------------------

def pretrain_documents(rows: Iterable[str], cfg: PretrainDataConfig) -> Iterator[tuple[str, str]]:
    """(raw, text) per document: `raw` is what the split hash sees, `text` what is written."""
    for unit in pretrain_units(rows, cfg):
        yield pretrain_document(unit, cfg)


def pretrain_units(rows: Iterable[str], cfg: PretrainDataConfig) -> Iterator[Any]:
    """The source's rows grouped into one unit per document (the sequential part; cheap).
    `cfg.format` is decided (`pretrain_format`): WikiText lines are regrouped into articles; a
    documents row is one document."""
    if cfg.format not in ("wikitext", "documents"):
        raise ValueError(f"format must be decided first (got {cfg.format!r})")
    return wikitext_articles(rows) if cfg.format == "wikitext" else iter(rows)


def pretrain_document(unit: Any, cfg: PretrainDataConfig) -> tuple[str, str]:
    """(raw, text) of one unit of `pretrain_units` (the per-document work, done by workers):
    an article, detokenized if asked; a document as it is."""
    if cfg.format == "wikitext":
        return "\n".join(unit), article_text(unit, cfg.detokenize)
    return unit, unit


def _prepare_pretrain(job: tuple[PretrainDataConfig, str, Sequence[str], list]) -> list[Prepared]:
    """A worker's share: each unit of a chunk as (split, JSONL line or None when empty, measures)."""
    cfg, split, carved, units = job
    return [_prepare_unit(unit, cfg, split, carved) for unit in units]


def _prepare_unit(unit: Any, cfg: PretrainDataConfig, split: str, carved: Sequence[str]) -> Prepared:
    raw, text = pretrain_document(unit, cfg)
    if split == "train" and carved:
        split = assign_split(raw, cfg.validation_fraction, cfg.test_fraction, carved)
    return split, jsonl_line({"text": text}) if text.strip() else None, measure(text)


def _unit_chars(unit: Any) -> int:
    return len(unit) if isinstance(unit, str) else sum(map(len, unit))


def chunked(items: Iterable[Any], size: Callable[[Any], int]) -> Iterator[list]:
    """`items` in lists of at most CHUNK_ITEMS, each closed once its `size` total reaches CHUNK_CHARS."""
    max_size, max_items = CHUNK_CHARS, CHUNK_ITEMS
    chunk: list = []
    total = 0
    for item in items:
        chunk.append(item)
        total += size(item)
        if total >= max_size or len(chunk) >= max_items:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk


def process_pretrain(cfg: PretrainDataConfig, out_dir: str | Path, num_proc: int = 1) -> dict:
    """Build `out_dir/{train,validation,test}.jsonl` and `stats.json` from the pre-training
    source; returns the statistics. Raises DataError on bad input (`out_dir` is then untouched).
    `num_proc` worker processes (0 = every core) share the work; the output is the same for any
    number. Local documents without `max_documents` go to the workers as pieces of the files
    (`minigpt.ranges`); everything else is read here and handed out in chunks."""
    path = resolve_source(cfg.source)
    cfg = dataclasses.replace(cfg, format=pretrain_format(cfg))
    workers = resolve_workers(num_proc)
    streamed = is_streamed(cfg)
    if path is not None and cfg.format == "documents" and not cfg.max_documents and workers > 1:
        files = local_splits(path, PRETRAIN_SUFFIXES)
        official = [s for s in SPLITS if s in files]
        write = lambda tmp, carved: _write_pieces(cfg, files, carved, tmp, workers)  # noqa: E731
    else:
        splits = pretrain_rows(cfg)
        official = [s for s in SPLITS if s in splits]
        write = lambda tmp, carved: _write_rows(cfg, splits, carved, tmp, workers)  # noqa: E731
    carved = [s for s in ("validation", "test") if s not in official]
    with atomic_directory(out_dir) as tmp:
        split_stats = write(tmp, carved)
        require_nonempty(split_stats, cfg.source, "documents", carved, cfg)
        stats = {
            "source": cfg.source,
            "name": None if path is not None else cfg.name,  # a hub config; meaningless locally
            "revision": cfg.revision,
            "wikitext": cfg.format == "wikitext",
            "detokenized": cfg.detokenize and cfg.format == "wikitext",
            **({"streamed": True} if streamed else {}),
            "official_splits": official,
            "carved_splits": carved,
            **{s: st.to_dict("documents", PRETRAIN_DROP_REASONS) for s, st in split_stats.items()},
            "dropped": total_dropped(split_stats, PRETRAIN_DROP_REASONS),
        }
        write_json(tmp / "stats.json", stats)
    return stats


def _write_rows(cfg: PretrainDataConfig, splits: dict[str, Iterable[str]], carved: Sequence[str],
                tmp: Path, workers: int) -> dict[str, SplitStats]:
    """Read the rows here, have the workers prepare them chunk by chunk, write them here."""
    streamed = is_streamed(cfg)
    source_of: deque[str] = deque()  # the source split of each job, in order
    train_full = False  # set on a streamed slice once train holds max_documents

    def jobs() -> Iterator[tuple]:
        for split in (s for s in SPLITS if s in splits):
            for units in chunked(pretrain_units(splits[split], cfg), _unit_chars):
                if split == "train" and train_full:
                    break
                source_of.append(split)
                yield cfg, split, carved, units

    writers = {s: SplitWriter(tmp / f"{s}.jsonl") for s in SPLITS}
    try:
        for prepared in ordered_map(_prepare_pretrain, jobs(), workers):
            if source_of.popleft() == "train" and train_full:
                continue  # read ahead by the workers, past the end of a streamed slice
            for split, line, measures in prepared:
                _route_document(split, line, measures, cfg, writers)
                if streamed and split == "train" \
                        and writers["train"].stats.count >= cfg.max_documents:
                    train_full = True  # a stream: the rest of train is never downloaded
                    break
    finally:
        for w in writers.values():
            w.close()
    return {s: w.stats for s, w in writers.items()}


def _piece_bytes(files: dict[str, list[Path]], workers: int) -> int:
    """Pieces small enough that every worker gets several, large enough to cost little each."""
    total = sum(f.stat().st_size for fs in files.values() for f in fs)
    return min(PIECE_BYTES, max(MIN_PIECE_BYTES, total // (8 * workers)))


def _write_pieces(cfg: PretrainDataConfig, files: dict[str, list[Path]], carved: Sequence[str],
                  tmp: Path, workers: int) -> dict[str, SplitStats]:
    """Each worker reads, prepares and writes its own pieces of the files (per-split shard files
    and statistics in `tmp/.pieces`); here the shards are appended in input order and the
    statistics added up: the same bytes as `_write_rows`. An error is the first in input order,
    with its line numbered in the whole file."""
    size = _piece_bytes(files, workers)
    pieces = [(split, piece) for split in SPLITS if split in files
              for piece in plan_pieces(files[split], True, size)]
    shards = tmp / ".pieces"
    shards.mkdir()
    jobs = ((cfg, split, carved, piece, shards / str(i), sources.MAX_BLOCK_CHARS)
            for i, (split, piece) in enumerate(pieces))
    stats = {s: SplitStats() for s in SPLITS}
    lines_before: Counter = Counter()  # per file: the lines of its pieces done so far
    outs = {s: (tmp / f"{s}.jsonl").open("wb", buffering=0) for s in SPLITS}
    bar = tqdm(total=sum(p.size for _, p in pieces), unit="B", unit_scale=True, disable=None,
               desc="pieces", mininterval=0.5)
    try:
        with Workers(workers) as pool:
            for i, ((_, piece), (lines, piece_stats, error)) in \
                    enumerate(zip(pieces, pool.map(_prepare_piece, jobs))):
                if error is not None:
                    raise DataError(absolute_error(error[1], piece, error[0],
                                                   lines_before[piece.path]))
                lines_before[piece.path] += lines
                for split, st in piece_stats.items():
                    stats[split].merge(st)
                    _append(outs[split], shards / f"{i}.{split}.jsonl")
                bar.update(piece.size)
    finally:
        bar.close()
        for f in outs.values():
            f.close()
        shutil.rmtree(shards, ignore_errors=True)
    return stats


def _prepare_piece(job: tuple) -> tuple[int, dict[str, SplitStats], Optional[tuple[int, str]]]:
    """A worker's piece: its documents prepared and written to `shard.SPLIT.jsonl`. Returns the
    text lines it read, the statistics per split it wrote, and (line, message) of a DataError
    (returned, not raised, so that the line can be renumbered in the whole file)."""
    cfg, split, carved, piece, shard, max_block_chars = job
    reader = PieceReader(piece, cfg.text_column, True, max_block_chars)
    writers: dict[str, SplitWriter] = {}
    try:
        for unit in reader:
            where, line, measures = _prepare_unit(unit, cfg, split, carved)
            if where not in writers:
                writers[where] = SplitWriter(shard.with_name(f"{shard.name}.{where}.jsonl"))
            if line is None:
                writers[where].drop("empty")
            else:
                writers[where].write_line(line, measures)
    except DataError as e:
        return reader.lines, {}, (reader.lines, str(e))
    finally:
        for w in writers.values():
            w.close()
    return reader.lines, {s: w.stats for s, w in writers.items()}, None


def _append(out: Any, path: Path) -> None:
    """Append the file at `path` to the open binary file `out`, then delete it (in the kernel
    where it can: the shards are large and sequential)."""
    with path.open("rb") as f:
        left = os.fstat(f.fileno()).st_size
        try:
            while left > 0:
                copied = os.copy_file_range(f.fileno(), out.fileno(), left)
                if not copied:
                    break
                left -= copied
        except (AttributeError, OSError):  # no copy_file_range here: copy in user space
            shutil.copyfileobj(f, out, 2**20)
    path.unlink()


def _route_document(split: str, line: str | None, measures: Measures, cfg: PretrainDataConfig,
                    writers: dict[str, SplitWriter]) -> None:
    """Write one prepared document to its split, or count why it was dropped. In input order:
    `max_documents` keeps the first ones."""
    writer = writers[split]
    if line is None:
        writer.drop("empty")
    elif split == "train" and cfg.max_documents and writer.stats.count >= cfg.max_documents:
        writer.drop("max_documents")
    else:
        writer.write_line(line, measures)


# --------------------------------------------------------------------------------------------
# Instruction-tuning corpus
# --------------------------------------------------------------------------------------------

def clean_example(row: dict[str, str]) -> tuple[dict[str, str], Optional[str]]:
    """Strip the fields; return the example and why it must be dropped (None if kept).
    Duplicates are found by the caller, which sees all rows."""
    ex = {f: row.get(f, "").strip() for f in SFT_FIELDS}
    if not ex["instruction"]:
        return ex, "empty_instruction"
    if not ex["response"]:
        return ex, "empty_response"
    return ex, None


def _prepare_sft(job: tuple[SFTDataConfig, str, Sequence[str], list[dict[str, str]]]) -> list[tuple]:
    """A worker's share: each row of a chunk as (split, drop reason or None, duplicate digest,
    JSONL line, measures)."""
    cfg, source_split, carved, rows = job
    out = []
    for row in rows:
        ex, reason = clean_example(row)
        split = source_split
        if split == "train" and carved:  # official splits stay; missing ones are carved
            split = assign_split(sft_split_key(ex["instruction"], ex["context"]),
                                 cfg.validation_fraction, cfg.test_fraction, carved)
        digest = hashlib.sha256(json.dumps([ex[f] for f in SFT_FIELDS]).encode()).digest()
        line = jsonl_line(ex) if reason is None else None
        out.append((split, reason, digest, line, measure(ex["response"])))
    return out


def process_sft(cfg: SFTDataConfig, out_dir: str | Path, num_proc: int = 1) -> dict:
    """Build `out_dir/{train,validation,test}.jsonl` and `stats.json` from the SFT source;
    returns the statistics. Raises DataError on bad input (and leaves `out_dir` as it was).
    `num_proc` worker processes (0 = every core) clean and hash; duplicates are found here, in
    input order, so the output is the same for any number."""
    splits = sft_records(cfg)
    carved = [s for s in ("validation", "test") if s not in splits]
    jobs = ((cfg, split, carved, rows) for split in SPLITS if split in splits
            for rows in chunked(splits[split], lambda row: sum(map(len, row.values()))))
    with atomic_directory(out_dir) as tmp:
        writers = {s: SplitWriter(tmp / f"{s}.jsonl") for s in SPLITS}
        seen: set[bytes] = set()  # digests, not texts: 32 bytes per example
        try:
            for prepared in ordered_map(_prepare_sft, jobs, resolve_workers(num_proc)):
                for split, reason, digest, line, measures in prepared:
                    if reason is None and digest in seen:
                        reason = "duplicate"
                    if reason is not None:
                        writers[split].drop(reason)
                        continue
                    seen.add(digest)
                    writers[split].write_line(line, measures)
        finally:
            for w in writers.values():
                w.close()
        split_stats = {s: w.stats for s, w in writers.items()}
        if sum(st.count for st in split_stats.values()) == 0:
            dropped = total_dropped(split_stats, SFT_DROP_REASONS)
            detail = ", ".join(f"{k}: {v}" for k, v in dropped.items() if v) or "no rows"
            raise DataError(f"{cfg.source}: no examples left after cleaning ({detail})")
        require_nonempty(split_stats, cfg.source, "examples", carved, cfg)
        stats = {
            "source": cfg.source,
            "revision": cfg.revision,
            "columns": dict(cfg.columns),
            "official_splits": [s for s in SPLITS if s in splits],
            "carved_splits": carved,
            "measured": "response",  # characters/bytes/words count the response text
            **{s: st.to_dict("examples", SFT_DROP_REASONS) for s, st in split_stats.items()},
            "dropped": total_dropped(split_stats, SFT_DROP_REASONS),
        }
        write_json(tmp / "stats.json", stats)
    return stats
