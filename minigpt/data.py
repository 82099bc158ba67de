"""Corpora in, clean deterministic splits out: the library behind the `process` stage.

Design choices
- One rule decides hub vs local: a `source` that exists on disk is local; one that looks like a
  path (starts with `./`, `../`, `/`, `~`, `raw/`, has more than one `/`, or ends in a data-file
  extension) but does not exist is an error ("source not found: PATH"); anything else is a
  Hugging Face hub id.
  A failed hub load becomes one line saying the hub could not be reached and that `source` may be a
  local path, because offline is by far the most common cause. Offline fails fast: before a hub
  load, a 2 s TCP probe of the endpoint (skipped under HF_HUB_OFFLINE=1) decides; unreachable ->
  `datasets` runs in offline mode, so a cached dataset still loads and a missing one fails at once
  (measured: 36 s of retries before against an unreachable HF_ENDPOINT).
- Local files use the hub's own formats, so a downloaded dataset works unchanged: `.txt`/`.raw` are
  read like the HF `text` builder (each line a row, newline removed, `text_column` not needed),
  `.jsonl`/`.json` (JSON lines, or one JSON array) and `.parquet` need the configured column(s).
  JSON is parsed here line by line rather than by `datasets`, so a broken line is reported as
  `FILE:LINE: invalid JSON (...)` instead of an Arrow traceback.
- In a directory, splits are recognised from file (or folder) names as `datasets` does:
  `train|training`, `validation|valid|val|dev`, `test|testing|eval|evaluation` between
  `-._ 0-9/` separators (`wiki.train.raw`, `train-00000-of-00001.parquet`). If no name carries a
  split, every file is train. A file whose split cannot be told, in a directory where others can,
  is an error rather than silently skipped. Hidden files, `*.md` and `*.dvc` are ignored.
- Official splits are kept as they are. A missing validation/test split is carved out of train by
  a stable hash (SHA-256 of the raw document, mapped to [0, 1)): the first `validation_fraction`
  of the unit interval goes to validation, the next `test_fraction` to test. No RNG, so the
  result does not depend on order, seeds, library versions or `max_documents`, and adding
  documents never moves existing ones. The hash is taken before detokenization, so switching
  `detokenize` never reshuffles the splits.
- `max_documents` caps train only, applied after carving, so the validation and test sets of a
  quick experiment are the same as those of the full run.
- WikiText (`wikitext: true`): rows are lines; an article starts at a top-level heading
  ` = Title = ` (never at ` = = Section = = `). Hub rows end in "\\n", raw-file lines do not: both
  are handled by dropping the line ending before anything else. Whitespace-only lines before the
  first heading are not a document.
- Detokenization (`detokenize: true`) turns WikiText back into ordinary prose, line by line, with
  token-level rules (see `detokenize_line`): ` @-@ ` -> `-`, ` @,@ ` -> `,`, ` @.@ ` -> `.`; no
  space before `, . ; : ! ? % ) ] }` or before `'s 't 're 'll n't` and other attached apostrophes;
  no space after `( [ {`; none around `‑` (non-breaking hyphen) and `⁄`; `"` and `'` quotes are
  re-attached to what they enclose when they pair up on a line (an unpaired one is left as it is,
  because guessing wrong would glue words together); ` ' ` after a plural (`ships ' hulls`) is a
  possessive; `3 : 04` -> `3:04`; `$ 5` -> `$5`; `50 °` -> `50°`. Dashes (`–`, `—`) keep their
  spaces: Wikipedia writes both `1996–97` and `strangers – what`, and the tokenized text cannot
  tell them apart. Whitespace inside a line is normalised to single spaces.
  An article then reads naturally: headings become plain lines (`= = Gameplay = =` -> `Gameplay`),
  each paragraph is one line, blank lines separate headings from paragraphs as in the source, runs
  of blank lines collapse to one, and leading/trailing blank lines go. With `detokenize: false`
  the article is the source lines verbatim (only leading/trailing blank lines removed), which is
  what published WikiText perplexities are measured on. The rules assume WikiText's tokenization
  (every quote and punctuation mark spaced): on ordinary text they are nearly, not exactly, a
  no-op (runs of spaces collapse; `written 'aleph` becomes `written'aleph`), so set
  `detokenize: false` for plain corpora.
- SFT: fields are stripped of surrounding whitespace; rows with an empty instruction or response,
  and exact duplicates (same instruction, context and response; the first is kept), are dropped and
  counted by reason. A local directory's named split files (`train.jsonl`, `test.jsonl`,
  `validation.jsonl`, named as above) are kept as official splits, as for pre-training; only the
  missing ones are carved out of train, by a stable hash of (instruction, context): adding rows
  never moves existing ones, and two answers to the same prompt always land in the same split (no
  leakage). A single file (Dolly) or the hub's `train` split is carved into all three. A duplicate
  is dropped wherever it recurs (the first copy, in train < validation < test order, is kept).
- stats.json: per split `documents` (`examples` for SFT), `characters`, `bytes` (UTF-8), `words`
  (whitespace split) and `dropped` counts by reason, plus totals and where the data came from. For
  SFT the text measures count the response only: it is what the loss and the reference metrics
  are computed on.
- Output is all-or-nothing: files are built in a temporary directory beside the target and renamed
  into place only when complete, so a failure leaves the previous output untouched and never a
  partial one that looks valid. Temporary directories left by a killed run (`.NAME.tmp-*`) are
  removed by the next run.
- Local text is decoded strictly: a byte that is not UTF-8 is an error naming `FILE:LINE` (and
  the byte), a leading UTF-8 byte-order mark is dropped (it is an encoding marker, not text),
  and a NUL character (U+0000, raw or `\u0000` in JSON) is refused with `FILE:LINE`: it is
  never prose, usually a binary or UTF-16 file read by mistake, and passing it on would put
  garbage in the corpus. A `.json` file may hold one (or several) pretty-printed JSON objects
  instead of lines or an array; each object is one record.
- JSONL is written with `ensure_ascii=False` (readable, compact) but with U+2028, U+2029 and U+0085
  escaped: `str.splitlines()` treats them as line breaks, and one document must stay one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Optional, Sequence

from tqdm import tqdm

from minigpt.config import PretrainDataConfig, SFTDataConfig
from minigpt.files import FormatError, atomic_directory, open_text, read_json, utf8_text

SPLITS = ("train", "validation", "test")
SFT_FIELDS = ("instruction", "context", "response")

# The keywords `datasets` uses to find splits in file names (datasets.data_files.SPLIT_KEYWORDS).
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
TEXT_SUFFIXES = (".txt", ".raw")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
PRETRAIN_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
SFT_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES
# Files a data directory may hold besides data: READMEs and DVC pointers.
IGNORED_SUFFIXES = (".md", ".dvc")
# Suffixes that make a missing `source` read as a mistyped path rather than a hub id.
PATH_SUFFIXES = PRETRAIN_SUFFIXES + (".csv", ".tsv", ".gz", ".zip", ".xz", ".zst", ".arrow",
                                     ".tokens")

PRETRAIN_DROP_REASONS = ("empty", "max_documents")
SFT_DROP_REASONS = ("empty_instruction", "empty_response", "duplicate")


class DataError(ValueError):
    """A problem with the input data or source; the message is one line meant for the user."""


def _one_line(exc: BaseException) -> str:
    """First line of an exception's message, prefixed with its type (for wrapped errors)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Stable hashing and splits
# --------------------------------------------------------------------------------------------

def stable_fraction(key: str) -> float:
    """Map a string to [0, 1) with SHA-256: the same on every machine, run and Python version
    (unlike `hash()`, which is salted per process)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    # The top 53 bits: exactly representable in a float, so the result is always < 1.0.
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53


def assign_split(key: str, validation_fraction: float, test_fraction: float,
                 candidates: Sequence[str] = ("validation", "test")) -> str:
    """The split of a document or example, by a stable hash of `key`.

    [0, validation_fraction) -> validation, then [.., + test_fraction) -> test, else train.
    `candidates` lists the splits that may be carved (those the source lacks); the bands stay
    where they are either way, so carving only test never moves documents into validation."""
    u = stable_fraction(key)
    if u < validation_fraction:
        return "validation" if "validation" in candidates else "train"
    if u < validation_fraction + test_fraction:
        return "test" if "test" in candidates else "train"
    return "train"


def sft_split_key(instruction: str, context: str) -> str:
    """What an SFT example's split is hashed on: the prompt only, so every answer to one prompt
    lands in the same split. JSON makes the pair unambiguous (no separator can collide)."""
    return json.dumps([instruction, context], ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Sources: hub or local, files and their splits
# --------------------------------------------------------------------------------------------

def load_dataset(*args: Any, **kwargs: Any) -> Any:
    """`datasets.load_dataset`, imported lazily: `datasets` takes seconds to import and local
    sources never need it. (Tests monkeypatch this name.) Offline first: see `hub_offline`."""
    offline = hub_offline()
    import datasets

    if offline:  # the hub libraries read the flag at import time: set it where they keep it
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:
        if offline and _OFFLINE_WHY:
            raise HubUnreachable(_OFFLINE_WHY) from e
        raise


class HubUnreachable(ConnectionError):
    """The hub could not be reached and the dataset is not in the local cache."""


_OFFLINE_WHY = ""  # why `hub_offline` went offline (empty when the user asked for it)


def hub_offline(timeout: float = 2.0) -> bool:
    """True when hub loads must use the local cache only: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is
    set, or a TCP connection to the endpoint (HF_ENDPOINT, default huggingface.co) fails within
    `timeout` seconds (not probed behind an HTTP(S) proxy). Offline, `datasets` loads a cached dataset or fails at once, instead of
    retrying HTTP requests for ~30 s; a user who downloaded once can work without a network."""
    global _OFFLINE_WHY
    from urllib.parse import urlsplit

    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if any(v.strip().upper() in ("1", "ON", "YES", "TRUE") for v in flags):
        _OFFLINE_WHY = ""
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                       "ALL_PROXY", "all_proxy")):
        return False  # behind a proxy a direct connection proves nothing: let `datasets` try
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as e:
        _OFFLINE_WHY = (f"the hub ({endpoint}) is unreachable ({_one_line(e)}) and the dataset "
                        f"is not in the local cache")
        os.environ["HF_HUB_OFFLINE"] = "1"  # for any hub library imported later in this process
        return True
    return False


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
        f"could not load {source!r} from the Hugging Face hub ({_one_line(exc)}); the hub may be "
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
    return value


def _select(record: Any, columns: Sequence[str], where: str, hint: str) -> dict[str, str]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for column in columns:
        if column not in record:
            found = ", ".join(map(str, record)) or "none"
            raise DataError(f"{where}: no column {column!r} (found: {found}){hint}")
    return {c: _as_text(record[c], where, c) for c in columns}


def _parquet_records(path: Path, columns: Sequence[str], hint: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a non-parquet file
        raise DataError(f"{path}: not a readable parquet file ({_one_line(e)})") from None
    names = pf.schema_arrow.names
    for column in columns:
        if column not in names:
            raise DataError(f"{path}: no column {column!r} (found: {', '.join(names)}){hint}")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=list(columns)):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", record


def read_records(path: Path, columns: Sequence[str], hint: str = "") -> Iterator[dict[str, str]]:
    """Rows of a local .jsonl/.json/.parquet file, reduced to `columns` (all strings; null -> "").

    Errors name the file and, for JSON lines, the line: `FILE:LINE: invalid JSON (...)`."""
    suffix = path.suffix.lower()
    try:
        if suffix in PARQUET_SUFFIXES:
            for where, record in _parquet_records(path, columns, hint):
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
        for lineno, line in enumerate(f, 1):
            try:
                utf8_text(line, f"{path}:{lineno}")
            except FormatError as e:
                raise DataError(str(e)) from None
            if "\x00" in line:
                raise DataError(f"{path}:{lineno}: NUL character (U+0000) in text; remove it "
                                "(is this a binary or UTF-16 file?)")
            yield line.rstrip("\n")


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Records of a JSONL file such as `data/processed/*/train.jsonl` (for later stages)."""
    try:
        for _, _, record in read_json(path):
            yield record
    except FormatError as e:
        raise DataError(str(e)) from None


# --------------------------------------------------------------------------------------------
# WikiText: articles and detokenization
# --------------------------------------------------------------------------------------------

_TITLE = re.compile(r"= (?!=)(.*\S) =")              # "= Title =", not "= = Section = ="
_HEADING = re.compile(r"(=(?: =)*) (.*?) ((?:= )*=)")  # any level: "= = = Sub = = ="
_NUMBER_SEPARATORS = {"@-@": "-", "@,@": ",", "@.@": "."}
_CLOSING = re.compile(r"[,.;:!?%)\]}…]+")            # never a space before these
_OPENING = {"(", "[", "{", "“", "‘"}                   # never a space after these
_CLOSERS = {"”", "°", "′", "″"}                        # `50 ° 3 ′ N` -> `50° 3′ N`
_JOINERS = {"‑", "⁄"}                                  # non-breaking hyphen; fraction slash
_CURRENCY = {"$", "£", "€", "¥", "₹", "₱", "₤"}
_ATTACHED_APOSTROPHE = re.compile(r"'[^\W\d_]")       # 's 't 're O 'Neil d 'Italia
_CONTRACTION_TAILS = {"s", "t", "m", "d", "re", "ve", "ll"}
_DECADE = re.compile(r"\d0s")
# Words ending in "s" after which a lone ' is a quote, not a plural possessive.
_NOT_PLURAL = {"as", "is", "was", "has", "his", "its", "this", "thus", "us", "yes", "does",
               "whereas", "always", "perhaps", "less", "unless", "across", "towards", "plus",
               "hers", "ours", "yours", "theirs", "'s"}


def is_title(line: str) -> bool:
    """Is this line a WikiText article title (` = Title = `), as opposed to a section heading?"""
    return _TITLE.fullmatch(line.strip()) is not None


def heading_text(line: str) -> Optional[str]:
    """The text of a heading line of any level (balanced `=` on both sides), else None."""
    m = _HEADING.fullmatch(line.strip())
    if m and m.group(1).count("=") == m.group(3).count("=") and m.group(2).strip():
        return m.group(2).strip()
    return None


def wikitext_articles(lines: Iterable[str]) -> Iterator[list[str]]:
    """Group WikiText lines (rows) into articles, each starting at its ` = Title = ` line.

    Line endings are removed first: hub rows end in "\\n", lines of the raw files do not."""
    article: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if is_title(line) and article:
            if any(x.strip() for x in article):
                yield article
            article = []
        article.append(line)
    if any(x.strip() for x in article):
        yield article


def _pair(indices: list[int], glue_left: list[bool], glue_right: list[bool]) -> None:
    """Attach alternate quote marks to what they enclose: odd ones open, even ones close."""
    for k, i in enumerate(indices):
        if k % 2 == 0:
            glue_right[i] = True
        else:
            glue_left[i] = True


def detokenize_line(line: str) -> str:
    """Undo WikiText's tokenization on one line (one paragraph). See the module docstring.

    Works on whitespace-separated tokens: each rule only decides whether the space before or
    after a token goes, so no rule can delete text, and rules never interact through regex
    re-matching on text another rule has already rewritten."""
    tokens = line.split()
    n = len(tokens)
    glue_left, glue_right = [False] * n, [False] * n
    double_quotes: list[int] = []
    open_single: Optional[int] = None
    for i, tok in enumerate(tokens):
        if tok.isalnum():
            continue  # most tokens are plain words, which no rule touches: skip them quickly
        prev = tokens[i - 1] if i else ""
        nxt = tokens[i + 1] if i + 1 < n else ""
        if tok in _NUMBER_SEPARATORS:  # 1 @,@ 000 -> 1,000 ; state @-@ of @-@ the @-@ art
            tokens[i] = _NUMBER_SEPARATORS[tok]
            glue_left[i] = glue_right[i] = True
        elif tok in _JOINERS:
            glue_left[i] = glue_right[i] = True
        elif _CLOSING.fullmatch(tok):
            glue_left[i] = True
            if tok == ":" and prev.isdigit() and nxt[:1].isdigit():  # times: 3 : 04 -> 3:04
                glue_right[i] = True
        elif tok in _OPENING:
            glue_right[i] = True
        elif tok in _CLOSERS:
            glue_left[i] = True
        elif tok in _CURRENCY and nxt[:1].isdigit():
            glue_right[i] = True
        elif tok == '"':
            double_quotes.append(i)
        elif tok == "’":  # curly apostrophe, spaced on both sides: don ’ t, women ’ s
            glue_left[i] = True
            glue_right[i] = nxt.lower() in _CONTRACTION_TAILS
        elif _ATTACHED_APOSTROPHE.match(tok) or tok.lower() == "n't":
            glue_left[i] = True
        elif tok == "'":
            if _DECADE.fullmatch(nxt):  # the ' 90s -> the '90s
                glue_right[i] = True
            elif nxt in _CONTRACTION_TAILS:  # a split contraction: U.S. ' s -> U.S.'s
                glue_left[i] = glue_right[i] = True
            elif open_single is not None:  # closes a quote opened earlier on the line
                glue_right[open_single] = glue_left[i] = True
                open_single = None
            elif (prev[-1:] in ("s", "S") and prev.lower() not in _NOT_PLURAL
                  and nxt[:1].isalnum()):  # the ships ' hulls -> the ships' hulls
                glue_left[i] = True
            elif nxt[:1].isalnum():  # may open a quote; glued only if a closing one follows
                open_single = i
    if len(double_quotes) % 2 == 0:  # an odd count means one is stray: leave them all spaced
        _pair(double_quotes, glue_left, glue_right)
    out = tokens[:1]
    for i in range(1, n):
        out.append(tokens[i] if glue_right[i - 1] or glue_left[i] else " " + tokens[i])
    return "".join(out)


def detokenize(text: str) -> str:
    """Detokenize every line of `text`, keeping the line structure."""
    return "\n".join(detokenize_line(line) for line in text.split("\n"))


def _trim_blank_lines(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def article_text(lines: Sequence[str], detokenized: bool) -> str:
    """One WikiText article as a document. Detokenized: headings as plain lines, one paragraph per
    line, single blank lines where the source had blank lines. Otherwise the lines verbatim."""
    lines = [line.rstrip("\r\n") for line in lines]
    if not detokenized:
        return "\n".join(_trim_blank_lines(lines))
    out: list[str] = []
    for line in lines:
        heading = heading_text(line)
        text = detokenize_line(heading if heading is not None else line)
        if text:
            out.append(text)
        elif out and out[-1]:
            out.append("")  # one blank line, however many the source had
    return "\n".join(_trim_blank_lines(out))


# --------------------------------------------------------------------------------------------
# Output: split files, statistics, atomic directories
# --------------------------------------------------------------------------------------------

def _jsonl_line(record: dict) -> str:
    # ensure_ascii=False keeps text readable; these three are escaped because splitlines()
    # would break a line at them (json already escapes every control character below U+0020).
    line = json.dumps(record, ensure_ascii=False)
    return line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")


@dataclass
class SplitStats:
    """Running totals for one split."""

    count: int = 0
    characters: int = 0
    bytes: int = 0
    words: int = 0
    dropped: Counter = field(default_factory=Counter)

    def add(self, text: str) -> None:
        self.count += 1
        self.characters += len(text)
        self.bytes += len(text.encode("utf-8"))
        self.words += len(text.split())

    def to_dict(self, unit: str, reasons: Sequence[str]) -> dict:
        return {unit: self.count, "characters": self.characters, "bytes": self.bytes,
                "words": self.words, "dropped": {r: self.dropped[r] for r in reasons}}


class SplitWriter:
    """Writes one split's JSONL file and keeps its statistics."""

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("w", encoding="utf-8", newline="\n")
        self.stats = SplitStats()

    def write(self, record: dict, measured: str) -> None:
        """Write `record`; `measured` is the text the statistics count."""
        self.file.write(_jsonl_line(record) + "\n")
        self.stats.add(measured)

    def drop(self, reason: str) -> None:
        self.stats.dropped[reason] += 1

    def close(self) -> None:
        self.file.close()


def _write_stats(directory: Path, stats: dict) -> None:
    (directory / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")


def _progress(rows: Iterable, desc: str, total: Optional[int] = None) -> Iterator:
    """`rows` with a progress bar that appears when iteration starts (one bar at a time).
    disable=None: a bar on a terminal, silence in logs and tests (no carriage-return noise)."""
    yield from tqdm(rows, desc=desc, total=total, unit=" rows", disable=None, mininterval=0.5)


def _require_nonempty(writers: dict[str, SplitWriter], source: str, unit: str,
                      hashed: Sequence[str], cfg: Any) -> None:
    """Later stages cannot train or evaluate on an empty split: fail here, naming the cause.
    A split filled by hashing (`hashed`) may be empty only when its fraction is 0 (asked for)."""
    total = sum(w.stats.count for w in writers.values())
    for split, writer in writers.items():
        if writer.stats.count:
            continue
        fraction = getattr(cfg, f"{split}_fraction", None)
        if split in hashed and fraction == 0:
            continue
        dropped = sum(writer.stats.dropped.values())
        why = f"; {dropped} dropped" if dropped else ""
        if split in hashed:
            why += (f"; {total} {unit} in all are too few for {split}_fraction={fraction}: "
                    f"raise it or add data")
        raise DataError(f"{source}: no {unit} in the {split} split{why}")


# --------------------------------------------------------------------------------------------
# Pre-training corpus
# --------------------------------------------------------------------------------------------

def pretrain_rows(cfg: PretrainDataConfig) -> dict[str, Iterable[str]]:
    """The source's rows (strings) per split it provides, lazily: `train` always, plus
    `validation`/`test` when the source has them."""
    path = resolve_source(cfg.source)
    if path is None:
        return _hub_pretrain_rows(cfg)
    hint = " (set process.pretrain.text_column)"
    out: dict[str, Iterable[str]] = {}
    for split, files in local_splits(path, PRETRAIN_SUFFIXES).items():
        out[split] = _progress(_local_rows(files, cfg.text_column, hint), desc=f"{split}")
    return out


def _local_rows(files: Sequence[Path], column: str, hint: str) -> Iterator[str]:
    for f in files:
        if f.suffix.lower() in TEXT_SUFFIXES:
            yield from read_text_lines(f)
        else:
            for record in read_records(f, [column], hint):
                yield record[column]


def _hub_pretrain_rows(cfg: PretrainDataConfig) -> dict[str, Iterable[str]]:
    try:
        ds = load_dataset(cfg.source, cfg.name, revision=cfg.revision)
    except Exception as e:
        raise _hub_error(cfg.source, e, "raw/pretrain") from None
    out: dict[str, Iterable[str]] = {}
    for name in ds:
        split = split_of(str(name))
        if split is None or split in out:
            continue  # e.g. an "unsupervised" split: not ours to guess about
        if cfg.text_column not in ds[name].column_names:
            found = ", ".join(ds[name].column_names)
            raise DataError(f"{cfg.source} [{name}]: no column {cfg.text_column!r} (found: "
                            f"{found}) (set process.pretrain.text_column)")
        out[split] = _progress(_hub_column(ds[name], cfg.text_column), desc=split,
                               total=len(ds[name]))
    if "train" not in out:
        raise DataError(f"{cfg.source}: no train split (found: {', '.join(map(str, ds))})")
    return out


def _hub_column(dataset: Any, column: str) -> Iterator[str]:
    for batch in dataset.iter(batch_size=1000):
        for value in batch[column]:
            yield value or ""


def pretrain_documents(rows: Iterable[str], cfg: PretrainDataConfig) -> Iterator[tuple[str, str]]:
    """(raw, text) per document: `raw` is what the split hash sees, `text` what is written."""
    if cfg.wikitext:
        for lines in wikitext_articles(rows):
            yield "\n".join(lines), article_text(lines, cfg.detokenize)
    else:
        for row in rows:
            yield row, detokenize(row) if cfg.detokenize else row


def process_pretrain(cfg: PretrainDataConfig, out_dir: str | Path) -> dict:
    """Build `out_dir/{train,validation,test}.jsonl` and `stats.json` from the pre-training
    source; returns the statistics. Raises DataError on bad input (`out_dir` is then untouched)."""
    local = resolve_source(cfg.source) is not None
    splits = pretrain_rows(cfg)
    carved = [s for s in ("validation", "test") if s not in splits]
    with atomic_directory(out_dir) as tmp:
        writers = {s: SplitWriter(tmp / f"{s}.jsonl") for s in SPLITS}
        try:
            for split in (s for s in SPLITS if s in splits):
                for raw, text in pretrain_documents(splits[split], cfg):
                    _route_document(raw, text, split, carved, cfg, writers)
        finally:
            for w in writers.values():
                w.close()
        _require_nonempty(writers, cfg.source, "documents", carved, cfg)
        stats = {
            "source": cfg.source,
            "name": None if local else cfg.name,  # a hub config; meaningless for local files
            "revision": cfg.revision,
            "wikitext": cfg.wikitext,
            "detokenized": cfg.detokenize,
            "official_splits": [s for s in SPLITS if s in splits],
            "carved_splits": carved,
            **{s: w.stats.to_dict("documents", PRETRAIN_DROP_REASONS) for s, w in writers.items()},
            "dropped": _total_dropped(writers, PRETRAIN_DROP_REASONS),
        }
        _write_stats(tmp, stats)
    return stats


def _route_document(raw: str, text: str, split: str, carved: Sequence[str],
                    cfg: PretrainDataConfig, writers: dict[str, SplitWriter]) -> None:
    """Send one document to its split (carving from train), or count why it was dropped."""
    if split == "train" and carved:
        split = assign_split(raw, cfg.validation_fraction, cfg.test_fraction, carved)
    writer = writers[split]
    if not text.strip():
        writer.drop("empty")
    elif split == "train" and cfg.max_documents and writer.stats.count >= cfg.max_documents:
        writer.drop("max_documents")
    else:
        writer.write({"text": text}, text)


def _total_dropped(writers: dict[str, SplitWriter], reasons: Sequence[str]) -> dict[str, int]:
    return {r: sum(w.stats.dropped[r] for w in writers.values()) for r in reasons}


# --------------------------------------------------------------------------------------------
# Instruction-tuning corpus
# --------------------------------------------------------------------------------------------

def sft_rows(cfg: SFTDataConfig) -> dict[str, Iterator[dict[str, str]]]:
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
                    for record in _progress(records, desc=f"sft {split}"))
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


def clean_example(row: dict[str, str]) -> tuple[dict[str, str], Optional[str]]:
    """Strip the fields; return the example and why it must be dropped (None if kept).
    Duplicates are found by the caller, which sees all rows."""
    ex = {f: row.get(f, "").strip() for f in SFT_FIELDS}
    if not ex["instruction"]:
        return ex, "empty_instruction"
    if not ex["response"]:
        return ex, "empty_response"
    return ex, None


def process_sft(cfg: SFTDataConfig, out_dir: str | Path) -> dict:
    """Build `out_dir/{train,validation,test}.jsonl` and `stats.json` from the SFT source;
    returns the statistics. Raises DataError on bad input (and leaves `out_dir` as it was)."""
    splits = sft_rows(cfg)
    carved = [s for s in ("validation", "test") if s not in splits]
    with atomic_directory(out_dir) as tmp:
        writers = {s: SplitWriter(tmp / f"{s}.jsonl") for s in SPLITS}
        seen: set[bytes] = set()  # digests, not texts: 32 bytes per example
        try:
            for source_split in (s for s in SPLITS if s in splits):
                for row in splits[source_split]:
                    ex, reason = clean_example(row)
                    split = source_split
                    if split == "train" and carved:  # official splits stay; missing ones are carved
                        split = assign_split(sft_split_key(ex["instruction"], ex["context"]),
                                             cfg.validation_fraction, cfg.test_fraction, carved)
                    digest = hashlib.sha256(json.dumps([ex[f] for f in SFT_FIELDS]).encode()).digest()
                    if reason is None and digest in seen:
                        reason = "duplicate"
                    if reason is not None:
                        writers[split].drop(reason)
                        continue
                    seen.add(digest)
                    writers[split].write(ex, ex["response"])
        finally:
            for w in writers.values():
                w.close()
        if sum(w.stats.count for w in writers.values()) == 0:
            dropped = _total_dropped(writers, SFT_DROP_REASONS)
            detail = ", ".join(f"{k}: {v}" for k, v in dropped.items() if v) or "no rows"
            raise DataError(f"{cfg.source}: no examples left after cleaning ({detail})")
        _require_nonempty(writers, cfg.source, "examples", carved, cfg)
        stats = {
            "source": cfg.source,
            "revision": cfg.revision,
            "columns": dict(cfg.columns),
            "official_splits": [s for s in SPLITS if s in splits],
            "carved_splits": carved,
            "measured": "response",  # characters/bytes/words count the response text
            **{s: w.stats.to_dict("examples", SFT_DROP_REASONS) for s, w in writers.items()},
            "dropped": _total_dropped(writers, SFT_DROP_REASONS),
        }
        _write_stats(tmp, stats)
    return stats
