"""Processed JSONL -> token files (`data/tokens/{pretrain,sft}/`), and the readers training uses.

Formats (docs/FORMATS.md): `{split}.bin` flat little-endian ids (`uint16`, or `uint32` past 65535)
read with `np.memmap`, a `{split}.json` sidecar; SFT adds `{split}.mask.bin` and `{split}.idx.bin`.

Design choices
- Streaming on every core: raw lines go in chunks to `encode.num_proc` worker processes
  (`minigpt.parallel`), each with its own one-thread tokenizer, which parse, encode and return
  numpy ids; this process appends them in input order. Reading, encoding and writing overlap,
  memory is bounded by the chunks in flight, and the files are the same for any worker count.
- A document longer than PIECE_CHARS is encoded in pieces cut where the byte-level pre-tokenizer
  splits anyway (`split_text`): exactly the whole document's ids, without holding them at once.
- Text is encoded as ordinary text: the only EOT ids in a pretrain stream are the ones appended
  here, one after every document.
- A corpus is written into a temporary directory beside its destination, then renamed into place:
  the old tokens or the new ones, never a mix. Readers check the sidecar against the file and the
  tokenizer hash, failing with one line that says what to re-run.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from minigpt.template import encode_examples
from minigpt.files import SPLITS, FormatError, atomic_directory, json_line, str_field, write_json
from minigpt.parallel import Workers, resolve_workers
from minigpt.tokenizer import (EOT, PIECE_CHARS, encode_texts, load_tokenizer, same_tokenizer,
                               special_id, split_text, tokenizer_hash)

CORPORA = ("pretrain", "sft")
MASK_DTYPE = np.dtype("u1")
IDX_DTYPE = np.dtype("<u8")
# A batch also ends at this much JSONL: an encoded batch costs hundreds of bytes per token until
# its ids are written (`tokenizers` Encoding objects with token strings, then Python int lists),
# so 1000 book-sized documents would need many GB; 8 MB still holds hundreds of articles
# (docs/EXPERIMENTS.md).
BATCH_BYTES = 8 * 2**20
# What one worker gets at a time (a batch also ends here): bounded memory in flight per worker,
# and enough chunks to keep every worker busy.
CHUNK_BYTES = 2 * 2**20


class EncodeError(ValueError):
    """Bad token files or inputs; the message is one line naming the file."""


@dataclass
class TokenStats:
    """What encoding one split produced (also the sidecar's content)."""

    split: str
    tokens: int
    items: int  # documents (pretrain) or examples (sft)
    bytes_in: int  # JSONL bytes read
    seconds: float


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 while every id fits (vocab <= 65535, as FORMATS.md says), else uint32."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def set_threads(num_threads: int) -> None:
    """Size the `tokenizers` (Rust rayon) thread pool: 0 = all cores, 1 = no parallelism.

    Must run before the first batch encode in this process: rayon reads the variable once.
    """
    if num_threads > 0:
        os.environ["RAYON_NUM_THREADS"] = str(num_threads)
    # tokenizers turns itself off after a fork when this is unset; say what we want explicitly.
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if num_threads == 1 else "true"


def _chunks(path: Path, batch_size: int, max_bytes: int = CHUNK_BYTES
            ) -> Iterator[tuple[str, int, list[bytes], int]]:
    """The raw lines of a JSONL file as (path, number of the first line, lines, their bytes):
    `batch_size` lines at a time, or fewer once they reach `max_bytes`. Only this much is read
    here; the workers decode and parse (`_objects`)."""
    lines: list[bytes] = []
    size, first = 0, 1
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # a byte-order mark, as open_text drops
                size += 3
                line = line[3:]
            lines.append(line)
            size += len(line)
            if len(lines) == batch_size or size >= max_bytes:
                yield str(path), first, lines, size
                lines, size, first = [], 0, lineno + 1
    if lines:
        yield str(path), first, lines, size


def _objects(path: str, first: int, lines: list[bytes]) -> Iterator[tuple[str, dict]]:
    """(FILE:LINE, object) per non-blank line, with `files.read_objects`' checks and errors."""
    for lineno, raw in enumerate(lines, first):
        where = f"{path}:{lineno}"
        parsed = json_line(raw.decode("utf-8", "surrogateescape"), where)
        if parsed is None:
            continue
        if not isinstance(parsed[1], dict):
            raise FormatError(where, f"expected a JSON object, got {type(parsed[1]).__name__}")
        yield where, parsed[1]


# The tokenizer of this process (a worker's, or this one's when encoding without workers),
# with its token dtype and end-of-text id: set once by the pool initializer, not per chunk.
_ENCODER: tuple[Tokenizer, np.dtype, int] | None = None


def _use_tokenizer(tok: Tokenizer) -> None:
    global _ENCODER
    _ENCODER = tok, token_dtype(tok.get_vocab_size()), special_id(tok, EOT)


def _init_worker(tokenizer_path: str) -> None:
    """A worker process: one tokenizer thread (the workers are the parallelism), its own tokenizer."""
    set_threads(1)
    _use_tokenizer(load_tokenizer(tokenizer_path))


def encoders(tok: Tokenizer, tokenizer_path: str | Path | None, workers: int) -> Workers:
    """`workers` processes that each load `tokenizer_path` (one tokenizer thread each), or this
    process with `tok` when workers == 1 or there is no path to load."""
    if workers > 1 and tokenizer_path is not None:
        return Workers(workers, _init_worker, (str(tokenizer_path),))
    return Workers(1, _use_tokenizer, (tok,))


def _entered(pool: Workers | None, tok: Tokenizer):
    """`pool`, already entered by the caller; or, without one, this process encoding with `tok`."""
    return nullcontext(pool) if pool is not None else encoders(tok, None, 1)


def _encode_pretrain_chunk(chunk: tuple[str, int, list[bytes], int]) -> tuple[np.ndarray, int, int]:
    """(ids with EOT after every document, documents, bytes) of one chunk of `{"text"}` lines."""
    tok, dtype, eot = _ENCODER
    path, first, lines, size = chunk
    texts = [str_field(where, obj, "text") for where, obj in _objects(path, first, lines)]
    return flatten_with_eot(encode_documents(tok, texts, dtype), eot, dtype), len(texts), size


def _encode_sft_chunk(chunk: tuple[str, int, list[bytes], int]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(ids, loss mask, length per example, bytes) of one chunk of SFT lines."""
    tok, dtype, _ = _ENCODER
    path, first, lines, size = chunk
    triples = [tuple(str_field(where, obj, k) for k in ("instruction", "context", "response"))
               for where, obj in _objects(path, first, lines)]
    encoded = encode_examples(tok, triples)
    lengths = np.fromiter((len(ids) for ids, _ in encoded), np.int64, count=len(encoded))
    total = int(lengths.sum())
    return (_concat((ids for ids, _ in encoded), total, dtype),
            _concat((mask for _, mask in encoded), total, MASK_DTYPE), lengths, size)


def _byte_bar(path: Path, desc: str) -> tqdm:
    """A byte-based progress bar, shown only on a terminal."""
    return tqdm(total=path.stat().st_size, desc=desc, unit="B", unit_scale=True,
                disable=None, leave=False, mininterval=0.5)


def flatten_with_eot(id_lists: list[list[int]], eot: int, dtype: np.dtype) -> np.ndarray:
    """One array of every list followed by `eot` (a batch of documents, ready to append)."""
    out = np.empty(sum(map(len, id_lists)) + len(id_lists), dtype=dtype)
    pos = 0
    for ids in id_lists:  # slice assignment converts a whole list in C; ~1 call per document
        n = len(ids)
        out[pos:pos + n] = ids
        out[pos + n] = eot
        pos += n + 1
    return out


def encode_documents(tok: Tokenizer, texts: list[str], dtype: np.dtype,
                     max_chars: int | None = None, batch_chars: int | None = None) -> list[np.ndarray]:
    """Ids of each text (as `dtype` arrays), encoding long texts in pieces of `max_chars`
    (PIECE_CHARS) and at most about `batch_chars` (BATCH_BYTES) characters per `encode_batch`
    call, so memory follows bytes, not documents."""
    max_chars, batch_chars = max_chars or PIECE_CHARS, batch_chars or BATCH_BYTES
    out: list[list[np.ndarray]] = [[] for _ in texts]
    group: list[tuple[int, str]] = []
    size = 0

    def flush() -> None:
        for (owner, _), ids in zip(group, encode_texts(tok, [p for _, p in group])):
            out[owner].append(np.array(ids, dtype=dtype))
        group.clear()

    for i, text in enumerate(texts):
        for piece in split_text(text, max_chars):
            group.append((i, piece))
            size += len(piece)
            if size >= batch_chars:
                flush()
                size = 0
    if group:
        flush()
    return [parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in out]


def encode_pretrain_split(tok: Tokenizer, src: Path, dst: Path, batch_size: int,
                          dtype: np.dtype, pool: Workers | None = None) -> TokenStats:
    """Encode `{"text"}` JSONL `src` into the flat token file `dst` (EOT after every document),
    on `pool` (`encoders`; None: here, with `tok`)."""
    start = time.perf_counter()
    tokens = docs = size_in = 0
    with dst.open("wb") as out, _byte_bar(src, f"encode {src.parent.name}/{src.stem}") as bar, \
            _entered(pool, tok) as pool:
        for arr, n, size in pool.map(_encode_pretrain_chunk, _chunks(src, batch_size)):
            assert arr.dtype == dtype
            arr.tofile(out)
            tokens, docs, size_in = tokens + arr.size, docs + n, size_in + size
            bar.update(size)
    return TokenStats(src.stem, tokens, docs, size_in, time.perf_counter() - start)


def encode_sft_split(tok: Tokenizer, src: Path, dst: Path, batch_size: int,
                     dtype: np.dtype, pool: Workers | None = None) -> TokenStats:
    """Encode `{"instruction","context","response"}` JSONL into ids, loss mask and offsets
    (`pool` as for `encode_pretrain_split`)."""
    start = time.perf_counter()
    tokens = examples = size_in = 0
    prefix = dst.with_suffix("")
    with dst.open("wb") as f_ids, open(f"{prefix}.mask.bin", "wb") as f_mask, \
            open(f"{prefix}.idx.bin", "wb") as f_idx, \
            _byte_bar(src, f"encode {src.parent.name}/{src.stem}") as bar, \
            _entered(pool, tok) as pool:
        np.zeros(1, IDX_DTYPE).tofile(f_idx)  # offsets start at 0
        for ids, mask, lengths, size in pool.map(_encode_sft_chunk, _chunks(src, batch_size)):
            assert ids.dtype == dtype
            ids.tofile(f_ids)
            mask.tofile(f_mask)
            (tokens + np.cumsum(lengths)).astype(IDX_DTYPE).tofile(f_idx)
            tokens, examples, size_in = tokens + ids.size, examples + len(lengths), size_in + size
            bar.update(size)
    return TokenStats(src.stem, tokens, examples, size_in, time.perf_counter() - start)


def _concat(lists: Iterator[list[int]], total: int, dtype: np.dtype) -> np.ndarray:
    """The concatenation of `lists` (`total` values) as one `dtype` array."""
    out = np.empty(total, dtype=dtype)
    pos = 0
    for values in lists:
        out[pos:pos + len(values)] = values
        pos += len(values)
    return out


def encode_corpus(corpus: str, processed_dir: str | Path, tokenizer_path: str | Path,
                  out_dir: str | Path, batch_size: int = 1000,
                  splits: tuple[str, ...] = SPLITS, num_proc: int = 1) -> list[TokenStats]:
    """Encode every split of one corpus into `out_dir`, written elsewhere then renamed into place;
    `num_proc` worker processes (0 = every core), the same files for any number."""
    if corpus not in CORPORA:
        raise EncodeError(f"corpus must be one of {', '.join(CORPORA)} (got {corpus!r})")
    processed_dir, out_dir = Path(processed_dir), Path(out_dir)
    sources = [processed_dir / f"{split}.jsonl" for split in splits]
    for src in sources:  # fail before any work, not after encoding train
        if not src.is_file():
            raise EncodeError(f"{src}: not found (run `dvc repro process@{corpus}`)")
    tok = load_tokenizer(tokenizer_path)
    meta_common = {"tokenizer_hash": tokenizer_hash(tokenizer_path)}
    dtype = token_dtype(tok.get_vocab_size())
    encode_split = encode_pretrain_split if corpus == "pretrain" else encode_sft_split
    count_key = "documents" if corpus == "pretrain" else "examples"

    with atomic_directory(out_dir) as tmp, \
            encoders(tok, tokenizer_path, resolve_workers(num_proc)) as pool:
        stats = []
        for src in sources:
            s = encode_split(tok, src, tmp / f"{src.stem}.bin", batch_size, dtype, pool)
            write_json(tmp / f"{src.stem}.json", {"dtype": dtype.name, "count": s.tokens,
                                                  count_key: s.items, **meta_common})
            stats.append(s)
    return stats


# ----------------------------------------------------------------------------- readers


def _prefix(path: str | Path) -> Path:
    """`data/tokens/pretrain/train` from that prefix or from `.../train.bin` / `.../train.json`."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".bin", ".json") else path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The sidecar of a token file (given its prefix, .bin or .json path)."""
    meta_path = _prefix(path).with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise EncodeError(f"{meta_path}: sidecar not found (run `dvc repro encode`)") from None
    except ValueError as e:
        raise EncodeError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("dtype") not in ("uint16", "uint32") \
            or not isinstance(meta.get("count"), int):
        raise EncodeError(f"{meta_path}: expected dtype uint16/uint32 and an integer count")
    return meta


def check_tokenizer_hash(meta: dict, expected: str, where: str | Path) -> None:
    """Fail unless token files were made with the tokenizer whose hash is `expected`."""
    got = meta.get("tokenizer_hash")
    same_tokenizer(got, expected, f"{where}: encoded with tokenizer {got}, but the tokenizer is "
                   f"{expected} (run `dvc repro encode`)", EncodeError)


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """Read-only memmap of exactly `count` values; the file size must agree."""
    if not path.is_file():
        raise EncodeError(f"{path}: not found (run `dvc repro encode`)")
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise EncodeError(f"{path}: {size} bytes, but the sidecar says {count} x {dtype.name} "
                          f"({count * dtype.itemsize} bytes)")
    if count == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def read_tokens(path: str | Path, expected_hash: str | None = None) -> np.ndarray:
    """Memmap of a token file (prefix, .bin or .json path), checked against its sidecar."""
    prefix = _prefix(path)
    meta = read_meta(prefix)
    if expected_hash is not None:
        check_tokenizer_hash(meta, expected_hash, prefix.with_suffix(".json"))
    return _memmap(prefix.with_suffix(".bin"), np.dtype(meta["dtype"]).newbyteorder("<"),
                   meta["count"])


def read_sft(directory: str | Path, split: str, expected_hash: str | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(ids memmap, mask memmap, offsets, sidecar) of an SFT split; example i is ids[idx[i]:idx[i+1]]."""
    prefix = Path(directory) / split
    meta = read_meta(prefix)
    ids = read_tokens(prefix, expected_hash)
    mask = _memmap(Path(f"{prefix}.mask.bin"), MASK_DTYPE, meta["count"])
    examples = meta.get("examples")
    if not isinstance(examples, int):
        raise EncodeError(f"{prefix}.json: missing integer 'examples'")
    idx = np.array(_memmap(Path(f"{prefix}.idx.bin"), IDX_DTYPE, examples + 1))
    if idx[0] != 0 or idx[-1] != meta["count"] or np.any(np.diff(idx.astype(np.int64)) < 0):
        raise EncodeError(f"{prefix}.idx.bin: offsets must rise from 0 to {meta['count']}")
    return ids, mask, idx, meta
