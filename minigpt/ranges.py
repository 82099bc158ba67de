"""Pieces of local files that workers read on their own: how `process` uses every core.

Design choices
- A worker that reads, parses and cleans its own piece leaves the main process only the
  concatenation of the workers' outputs (`minigpt.data`); a reader handing documents to workers
  is itself one busy process on top of theirs.
- A piece is a byte range of a .jsonl file whose edges are moved to the next line start, a byte
  range of a text file whose edges are moved past the next blank line (where every blank-line
  block starts afresh; none within SCAN_BYTES: no edge), a row group of a .parquet file, or a
  whole .json file. So every document belongs to exactly one piece and is read as a whole-file
  read reads it: the same newlines (\\n, \\r\\n, \\r), a byte-order mark dropped at the start only.
- A piece does not know how many lines precede it: its errors name lines counted from its start,
  and `absolute_error` renumbers them once the pieces before it have reported their line counts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from minigpt.files import FormatError, json_line
from minigpt.sources import (PARQUET_SUFFIXES, TEXT_COLUMN_HINT, TEXT_SUFFIXES, DataError, _select,
                             checked_text_lines, read_records, text_blocks)

SCAN_BYTES = 2**26  # how far past a text range's nominal edge to look for a blank line
BLANK = b" \t\r\n\x0b\x0c"  # bytes of a line that is blank however the text lines are cut


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of `path` (end None: the whole file), or row group `group` (index,
    rows before it) of a parquet file."""

    path: Path
    start: int = 0
    end: Optional[int] = None
    group: Optional[tuple[int, int]] = None

    @property
    def size(self) -> int:
        return (self.end if self.end is not None else self.path.stat().st_size) - self.start


def plan_pieces(files: Sequence[Path], blocks: bool, piece_bytes: int) -> list[Piece]:
    """The pieces of `files`, in input order, about `piece_bytes` each. `blocks`: text files
    are blank-line blocks (documents), so their edges must follow a blank line."""
    pieces: list[Piece] = []
    for path in files:
        suffix, size = path.suffix.lower(), path.stat().st_size
        if suffix in PARQUET_SUFFIXES:
            pieces += _row_groups(path)
        elif suffix in TEXT_SUFFIXES + (".jsonl",) and size > piece_bytes:
            edges, scanned = [0], 0
            with path.open("rb") as f:
                for target in range(piece_bytes, size, piece_bytes):
                    if target > max(edges[-1], scanned):  # (no rescanning a stretch that had none)
                        edge, scanned = _edge(f, target, blocks and suffix in TEXT_SUFFIXES)
                        if edge is not None and edges[-1] < edge < size:
                            edges.append(edge)
            edges.append(size)
            pieces += [Piece(path, a, b) for a, b in zip(edges, edges[1:])]
        else:
            pieces.append(Piece(path))
    return pieces


def _row_groups(path: Path) -> list[Piece]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception:  # not parquet: the whole-file read reports it, in input order
        return [Piece(path)]
    pieces, before = [], 0
    for i in range(meta.num_row_groups):
        pieces.append(Piece(path, group=(i, before)))
        before += meta.row_group(i).num_rows
    return pieces or [Piece(path)]


def _edge(f: io.BufferedReader, target: int, after_blank: bool) -> tuple[Optional[int], int]:
    """The first line start at or past `target` (after a blank line if `after_blank`), or None
    when there is none within SCAN_BYTES; and how far the search read."""
    f.seek(target - 1)
    pos, line = target - 1, f.readline()
    while line.endswith(b"\n"):
        pos += len(line)
        if not after_blank:
            return pos, pos
        line = f.readline()
        if not line.strip(BLANK) and line.endswith(b"\n"):
            return pos + len(line), pos + len(line)
        if pos - target > SCAN_BYTES:
            return None, pos
    return None, pos + len(line)


class _Window(io.RawIOBase):
    """Bytes [start, end) of an open binary file, as a file of their own."""

    def __init__(self, f: io.RawIOBase, start: int, end: int):
        f.seek(start)
        self.f, self.left = f, end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        if n <= 0:
            return 0
        got = self.f.readinto(memoryview(buffer)[:n]) or 0
        self.left -= got
        return got


class PieceReader:
    """The documents of one piece, like `minigpt.sources.pretrain_rows` reads them whole;
    `lines` counts the text lines read so far (for `absolute_error`)."""

    def __init__(self, piece: Piece, column: str, blocks: bool, max_block_chars: int):
        self.piece, self.column, self.blocks = piece, column, blocks
        self.max_block_chars, self.lines = max_block_chars, 0

    def __iter__(self) -> Iterator[str]:
        piece, suffix = self.piece, self.piece.path.suffix.lower()
        if suffix not in TEXT_SUFFIXES + (".jsonl",):
            for record in read_records(piece.path, [self.column], TEXT_COLUMN_HINT, piece.group):
                yield record[self.column]
        elif suffix in TEXT_SUFFIXES:
            lines = self._text_lines()
            yield from text_blocks(lines, self.max_block_chars) if self.blocks else lines
        else:
            for line in self._lines():
                where = f"{piece.path}:{self.lines}"
                try:
                    parsed = json_line(line, where)
                except FormatError as e:
                    raise DataError(str(e)) from None
                if parsed is not None:
                    yield _select(parsed[1], [self.column], where, TEXT_COLUMN_HINT)[self.column]

    def _lines(self) -> Iterator[str]:
        piece = self.piece
        with piece.path.open("rb", buffering=0) as raw:
            end = piece.end if piece.end is not None else piece.path.stat().st_size
            text = io.TextIOWrapper(io.BufferedReader(_Window(raw, piece.start, end), 2**20),
                                    encoding="utf-8-sig" if piece.start == 0 else "utf-8",
                                    errors="surrogateescape")  # newline=None, as open_text
            for line in text:
                self.lines += 1
                yield line

    def _text_lines(self) -> Iterator[str]:
        return checked_text_lines(self._lines(), self.piece.path)  # numbered within the piece


def absolute_error(message: str, piece: Piece, line: int, lines_before: int) -> str:
    """An error a piece raised at its `line` (counted from the piece's start), renumbered as
    the line of the whole file."""
    local = f"{piece.path}:{line}:"
    if message.startswith(local):
        return f"{piece.path}:{line + lines_before}:" + message[len(local):]
    return message

