"""Where the corpora come from: a hub id or a local path, resolved to rows per split.

Design choices
- Hub or local, one rule: a `source` that exists on disk is local; one that looks like a path
  (`./`, `/`, `~`, `raw/`, more than one `/`, a data-file extension) but does not exist is an
  error; anything else is a hub id (`minigpt.hub` loads it, offline when the hub cannot answer).
- Local files use the hub's own formats and split names (docs/FORMATS.md), so a downloaded
  dataset works unchanged. JSON is parsed here line by line and text is decoded strictly, so bad
  input is one line naming `FILE:LINE`, not an Arrow traceback.
- The rows are lazy: `pretrain_rows` / `sft_records` open and check the source at once (a bad
  source fails before any work), but read it only as `minigpt.data` consumes it.
- Pre-training format by evidence (`pretrain_format`): WikiText for the Salesforce/wikitext hub
  id or a local source whose first train file starts with a ` = Title = ` heading (within
  SNIFF_CHARS / SNIFF_ROWS); else one document per JSONL/parquet/hub row or blank-line block of
  text (a block also ends past MAX_BLOCK_CHARS: a file without blank lines is never one document).
- With `max_documents`, a hub source is streamed: `minigpt.data` stops once train is full, so only
  the shards it needs are downloaded; each document's split is still its hash alone.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Optional, Sequence

from tqdm import tqdm

from minigpt.config import PretrainDataConfig, SFTDataConfig
from minigpt.files import SPLITS, FormatError, lone_surrogate, open_text, read_json, utf8_size
from minigpt.hub import HubUnreachable, load_dataset, one_line  # tests patch sources.load_dataset
from minigpt.wikitext import starts_like_wikitext

SFT_FIELDS = ("instruction", "context", "response")

# The keywords `datasets` uses to find splits in file names (datasets.data_files.SPLIT_KEYWORDS).
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
TEXT_SUFFIXES = (".txt", ".raw")
TEXT_COLUMN_HINT = " (set process.pretrain.text_column)"
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
PRETRAIN_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
SFT_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES
# Files a data directory may hold besides data: READMEs and DVC pointers.
IGNORED_SUFFIXES = (".md", ".dvc")
# Suffixes that make a missing `source` read as a mistyped path rather than a hub id.
PATH_SUFFIXES = PRETRAIN_SUFFIXES + (".csv", ".tsv", ".gz", ".zip", ".xz", ".zst", ".arrow",
                                     ".tokens")
# Hub ids whose rows are WikiText lines ("wikitext" is the id's old, redirected spelling).
WIKITEXT_HUB_IDS = ("salesforce/wikitext", "wikitext")
# `format: auto` looks at most this far into the first train file (characters / rows).
SNIFF_CHARS = 2**20
SNIFF_ROWS = 1000
# A text document (blank-line block) ends at the first line end past this many characters.
MAX_BLOCK_CHARS = 2**20


class DataError(ValueError):
    """A problem with the input data or source; the message is one line meant for the user."""


# --------------------------------------------------------------------------------------------
# Hub or local, files and their splits
# --------------------------------------------------------------------------------------------

def _looks_like_path(source: str) -> bool:
    """Would a user who wrote `source` have meant a file or directory? Hub ids are `name` or
    `owner/name`, without a data-file extension."""
    s = source.strip()
    if s.startswith(("./", "../", "/", "~", "raw/", ".\\")) or "\\" in s:
        return True
    if s.count("/") > 1:
        return True
    return s.lower().endswith(PATH_SUFFIXES)


def resolve_source(source: str) -> Optional[Path]:
    """The local path `source` names, or None when it is a hub id.

    An existing path is always local; a path-like string that does not exist is an error (a hub
    lookup of "raw/pretrain" would only fail later with a confusing message)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if _looks_like_path(source):
        raise DataError(f"source not found: {source}")
    return None


def _hub_error(source: str, exc: BaseException, example: str) -> DataError:
    if isinstance(exc, HubUnreachable):
        return DataError(f"could not load {source!r}: {exc}; `source` can also be a local path "
                         f"such as {example} (see README)")
    return DataError(
        f"could not load {source!r} from the Hugging Face hub ({one_line(exc)}); the hub may be "
        f"unreachable: `source` can also be a local path such as {example} (see README)")


def split_of(relative: str | PurePosixPath) -> Optional[str]:
    """The split a file belongs to, from the words in its path relative to the source directory
    (`wiki.valid.raw` -> validation), or None when no split keyword appears."""
    path = PurePosixPath(relative)
    stem = str(path.with_suffix("")) if path.suffix else str(path)
    words = set(re.split(r"[-._ 0-9/]+", stem.lower()))
    found = [split for split, keywords in SPLIT_KEYWORDS.items() if words & set(keywords)]
    if len(found) > 1:
        raise DataError(f"{relative}: name matches several splits ({', '.join(found)}); rename it")
    return found[0] if found else None


def data_files(path: Path, suffixes: Sequence[str]) -> list[Path]:
    """The data files of a local source: the file itself, or every data file under a directory
    (sorted, so the row order never depends on the file system)."""
    if path.is_file():
        _check_suffix(path, suffixes)
        return [path]
    files = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IGNORED_SUFFIXES:
            continue
        _check_suffix(p, suffixes)
        files.append(p)
    if not files:
        raise DataError(f"{path}: no data files ({', '.join(suffixes)})")
    return files


def _check_suffix(path: Path, suffixes: Sequence[str]) -> None:
    if path.suffix.lower() not in suffixes:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r} "
                        f"(use {', '.join(suffixes)})")


def local_splits(path: Path, suffixes: Sequence[str]) -> dict[str, list[Path]]:
    """Group a local source's files by split. One file, or no split words in any name: all train."""
    files = data_files(path, suffixes)
    if path.is_file():
        return {"train": files}
    tagged = {f: split_of(f.relative_to(path).as_posix()) for f in files}
    if all(split is None for split in tagged.values()):
        return {"train": files}
    untagged = [f for f, split in tagged.items() if split is None]
    if untagged:
        raise DataError(f"{untagged[0]}: cannot tell its split; name files like wiki.train.raw, "
                        f"wiki.valid.raw, wiki.test.raw (train / valid|validation|dev / test)")
    splits = {s: [f for f, t in tagged.items() if t == s] for s in SPLITS}
    splits = {s: fs for s, fs in splits.items() if fs}
    if "train" not in splits:
        raise DataError(f"{path}: no train file (found {', '.join(splits)}); name one like "
                        f"wiki.train.raw")
    return splits


# --------------------------------------------------------------------------------------------
# Reading local files
# --------------------------------------------------------------------------------------------

def _as_text(value: Any, where: str, column: str) -> str:
    """A cell as a string: null means empty; anything else that is not a string is an error."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} is not a string (got {type(value).__name__})")
    if "\x00" in value:
        raise DataError(f"{where}: column {column!r} holds a NUL character (U+0000); remove it")
    if (at := lone_surrogate(value)) is not None:
        raise DataError(f"{where}: column {column!r} holds a lone surrogate "
                        f"(U+{ord(value[at]):04X}), not valid Unicode")
    return value


def _select(record: Any, columns: Sequence[str], where: str, hint: str) -> dict[str, str]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for column in columns:
        if column not in record:
            found = ", ".join(map(str, record)) or "none"
            raise DataError(f"{where}: no column {column!r} (found: {found}){hint}")
    return {c: _as_text(record[c], where, c) for c in columns}


def _parquet_records(path: Path, columns: Sequence[str], hint: str,
                     row_group: Optional[tuple[int, int]] = None) -> Iterator[tuple[str, dict]]:
    """(where, record) per row; `row_group` (index, rows before it): that row group only."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a non-parquet file
        raise DataError(f"{path}: not a readable parquet file ({one_line(e)})") from None
    names = pf.schema_arrow.names
    for column in columns:
        if column not in names:
            raise DataError(f"{path}: no column {column!r} (found: {', '.join(names)}){hint}")
    groups, row = ([row_group[0]], row_group[1]) if row_group else (None, 0)
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=list(columns)):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", record


def read_records(path: Path, columns: Sequence[str], hint: str = "",
                 row_group: Optional[tuple[int, int]] = None) -> Iterator[dict[str, str]]:
    """Rows of a local .jsonl/.json/.parquet file, reduced to `columns` (all strings; null -> "");
    `row_group` (index, rows before it): one row group of a parquet file.

    Errors name the file and, for JSON lines, the line: `FILE:LINE: invalid JSON (...)`."""
    suffix = path.suffix.lower()
    try:
        if suffix in PARQUET_SUFFIXES:
            for where, record in _parquet_records(path, columns, hint, row_group):
                yield {c: _as_text(record[c], where, c) for c in columns}
        else:
            for where, _, record in read_json(path):
                yield _select(record, columns, where, hint)
    except UnicodeDecodeError as e:  # parquet strings are decoded by pyarrow
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except FormatError as e:
        raise DataError(str(e)) from None


def read_text_lines(path: Path) -> Iterator[str]:
    """Lines of a text file without their line ending, like the HF `text` builder's rows
    (a leading BOM dropped; bad UTF-8 and NUL characters are errors naming the line)."""
    with open_text(path) as f:
        yield from checked_text_lines(f, path)


def checked_text_lines(lines: Iterable[str], path: Path) -> Iterator[str]:
    """`lines` (of `path`, numbered from 1) checked and without their line ending."""
    for lineno, line in enumerate(lines, 1):
        check_text_line(line, f"{path}:{lineno}")
        line = line.rstrip("\n")  # rebound: a huge line is not held twice while in use
        yield line


def check_text_line(line: str, where: str) -> None:
    """A line read with `open_text` must be UTF-8 without NUL characters; errors name `where`."""
    try:
        utf8_size(line, where)  # for its check: not UTF-8 raises
    except FormatError as e:
        raise DataError(str(e)) from None
    if "\x00" in line:
        raise DataError(f"{where}: NUL character (U+0000) in text; remove it "
                        "(is this a binary or UTF-16 file?)")


def text_blocks(lines: Iterable[str], max_chars: Optional[int] = None) -> Iterator[str]:
    """Blank-line-separated blocks of lines, each joined with "\n"; a block also ends at the
    first line end past `max_chars` (MAX_BLOCK_CHARS) characters. Whitespace-only lines separate,
    never start, blocks."""
    max_chars = max_chars or MAX_BLOCK_CHARS
    block: list[str] = []
    size = 0
    for line in lines:
        if not line or line.isspace():  # (not strip(): no copy of a huge line)
            if block:
                yield "\n".join(block)
                block, size = [], 0
            continue
        block.append(line)
        size += len(line) + 1
        if size > max_chars:
            yield "\n".join(block)
            block, size = [], 0
    if block:
        yield "\n".join(block)


def _first_rows(path: Path, column: str, hint: str) -> list[str]:
    """The rows `format: auto` looks at: the complete lines among the first SNIFF_CHARS
    characters of a text file, or the first SNIFF_ROWS records of a JSON/parquet file."""
    if path.suffix.lower() in TEXT_SUFFIXES:
        with open_text(path) as f:
            head = f.read(SNIFF_CHARS)
            more = bool(f.read(1))
        lines = head.split("\n")
        return lines[:-1] if more else lines  # the last line may be cut off
    rows = read_records(path, [column], hint)
    return [r[column] for _, r in zip(range(SNIFF_ROWS), rows)]


def pretrain_format(cfg: PretrainDataConfig) -> str:
    """`cfg.format`, with `auto` decided on evidence: "wikitext" or "documents" (module docstring)."""
    if cfg.format != "auto":
        return cfg.format
    path = resolve_source(cfg.source)
    if path is None:
        return "wikitext" if cfg.source.strip().lower() in WIKITEXT_HUB_IDS else "documents"
    first = local_splits(path, PRETRAIN_SUFFIXES)["train"][0]
    rows = _first_rows(first, cfg.text_column, " (set process.pretrain.text_column)")
    return "wikitext" if starts_like_wikitext(rows) else "documents"


def is_streamed(cfg: PretrainDataConfig) -> bool:
    """Is this pre-training source streamed (a hub id with `max_documents` set)?"""
    return cfg.max_documents > 0 and resolve_source(cfg.source) is None


def progress(rows: Iterable, desc: str, total: Optional[int] = None) -> Iterator:
    """`rows` with a progress bar that appears when iteration starts (one bar at a time).
    disable=None: a bar on a terminal, silence in logs and tests (no carriage-return noise)."""
    yield from tqdm(rows, desc=desc, total=total, unit=" rows", disable=None, mininterval=0.5)


# --------------------------------------------------------------------------------------------
# Rows per split
# --------------------------------------------------------------------------------------------

def pretrain_rows(cfg: PretrainDataConfig) -> dict[str, Iterable[str]]:
    """The source's rows (strings) per split it provides, lazily: `train` always, plus
    `validation`/`test` when the source has them. `cfg.format` must be decided (not auto): a
    text file's rows are its lines for wikitext, its blank-line blocks for documents."""
    if cfg.format not in ("wikitext", "documents"):
        raise ValueError(f"format must be decided before reading rows (got {cfg.format!r})")
    path = resolve_source(cfg.source)
    if path is None:
        return _hub_pretrain_rows(cfg)
    hint = TEXT_COLUMN_HINT
    blocks = cfg.format == "documents"
    out: dict[str, Iterable[str]] = {}
    for split, files in local_splits(path, PRETRAIN_SUFFIXES).items():
        out[split] = progress(_local_rows(files, cfg.text_column, hint, blocks), desc=f"{split}")
    return out


def _local_rows(files: Sequence[Path], column: str, hint: str, blocks: bool) -> Iterator[str]:
    for f in files:
        if f.suffix.lower() in TEXT_SUFFIXES:
            yield from text_blocks(read_text_lines(f)) if blocks else read_text_lines(f)
        else:
            for record in read_records(f, [column], hint):
                yield record[column]


def _hub_pretrain_rows(cfg: PretrainDataConfig) -> dict[str, Iterable[str]]:
    streaming = is_streamed(cfg)  # only the shards the slice needs (see the module docstring)
    try:
        ds = load_dataset(cfg.source, cfg.name, revision=cfg.revision,
                          **({"streaming": True} if streaming else {}))
    except Exception as e:
        raise _hub_error(cfg.source, e, "raw/pretrain") from None
    out: dict[str, Iterable[str]] = {}
    for name in ds:
        split = split_of(str(name))
        if split is None or split in out:
            continue  # e.g. an "unsupervised" split: not ours to guess about
        where = f"{cfg.source} [{name}]"
        columns = ds[name].column_names  # None for a stream whose features are not declared
        if columns is not None and cfg.text_column not in columns:
            raise DataError(f"{where}: no column {cfg.text_column!r} (found: "
                            f"{', '.join(columns)}) (set process.pretrain.text_column)")
        out[split] = progress(_hub_column(ds[name], cfg.text_column, where), desc=split,
                              total=None if streaming else len(ds[name]))
    if "train" not in out:
        raise DataError(f"{cfg.source}: no train split (found: {', '.join(map(str, ds))})")
    return out


def _hub_column(dataset: Any, column: str, where: str) -> Iterator[str]:
    batches = iter(dataset.iter(batch_size=1000))
    while True:
        try:  # a stream reads (and downloads) shards here: a failure is one line, not a traceback
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"{where}: reading failed ({one_line(e)})") from None
        if column not in batch:
            raise DataError(f"{where}: no column {column!r} (found: {', '.join(batch)}) "
                            "(set process.pretrain.text_column)")
        for value in batch[column]:
            yield value or ""


def sft_records(cfg: SFTDataConfig) -> dict[str, Iterator[dict[str, str]]]:
    """Rows as {instruction, context, response} strings (context "" when not mapped or null),
    before any cleaning, per split the source provides: the hub's `train` split, or a local
    source's named split files (`train.jsonl`, `test.jsonl`, ...; one file or unnamed ones: train)."""
    columns = {f: cfg.columns[f] for f in SFT_FIELDS if f in cfg.columns}
    # Resolved and opened now, not on first iteration, so source errors surface immediately.
    path = resolve_source(cfg.source)
    if path is None:
        splits = {"train": _hub_sft_records(cfg, list(columns.values()))}
    else:
        hint = " (map it with process.sft.columns)"
        splits = {split: (r for f in files for r in read_records(f, list(columns.values()), hint))
                  for split, files in local_splits(path, SFT_SUFFIXES).items()}
    return {split: ({f: record[columns[f]] if f in columns else "" for f in SFT_FIELDS}
                    for record in progress(records, desc=f"sft {split}"))
            for split, records in splits.items()}


def _hub_sft_records(cfg: SFTDataConfig, columns: list[str]) -> Iterator[dict[str, str]]:
    try:
        ds = load_dataset(cfg.source, split="train", revision=cfg.revision)
    except Exception as e:
        raise _hub_error(cfg.source, e, "raw/sft/databricks-dolly-15k.jsonl") from None
    for column in columns:
        if column not in ds.column_names:
            raise DataError(f"{cfg.source}: no column {column!r} (found: "
                            f"{', '.join(ds.column_names)}) (map it with process.sft.columns)")
    return _hub_records(ds, columns, cfg.source)


def _hub_records(ds: Any, columns: list[str], source: str) -> Iterator[dict[str, str]]:
    for batch in ds.iter(batch_size=1000):
        for i in range(len(batch[columns[0]])):
            yield {c: _as_text(batch[c][i], source, c) for c in columns}
