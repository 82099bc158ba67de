"""Safe file writes and the one JSONL reader: the bottom layer every other module writes through.

Design choices
- A file is written under a unique hidden sibling name (`.NAME.PID-HEX.tmp`, same directory, so
  the rename is atomic), fsynced, then `os.replace`d: a reader sees the old file or the new one,
  never a torn one. The directory entry is fsynced too, so the rename survives a power cut.
- A directory is built complete in a sibling temporary directory (`.NAME.tmp-PID-HEX`) and swapped
  in with two renames (old -> `.NAME.old-PID-HEX`, new -> final); it cannot be swapped in one. A
  crash between the two leaves the final path missing, never half-written. On an exception the
  temporary directory is removed and the target is left exactly as it was.
- Leftovers of a killed writer are swept by the next one: `.NAME.tmp-PID-*` / `.NAME.old-PID-*`
  whose writer is dead (or that carry no pid), and `.NAME.*.tmp` / `.NAME.*.old` directories (the
  names model and export directories used before). A live writer's temporary directory is kept.
- Outputs get the permissions an ordinary write would give (0666/0777 minus the umask):
  `mkdtemp` and safetensors alone create them private.
- One reader for JSON lines (`read_json`): strict UTF-8 (a bad byte names `FILE:LINE` and the
  column), a leading byte-order mark dropped, blank lines skipped, a broken line reported as
  `FILE:LINE: invalid JSON (...)`. A `.json` file may instead hold one array or pretty-printed
  objects. Errors are `FormatError` (a ValueError); callers wrap it in their own error type.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

SPLITS = ("train", "validation", "test")  # the split files every stage writes and reads


class FormatError(ValueError):
    """A file that is not what it must be; the message is one line, `WHERE: PROBLEM (DETAIL)`."""

    def __init__(self, where: str, problem: str, detail: str = ""):
        self.where, self.problem, self.detail = where, problem, detail
        super().__init__(f"{where}: {problem}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # picklable, so that a worker process can raise it (minigpt.parallel)
        return type(self), (self.where, self.problem, self.detail)


# --- files -------------------------------------------------------------------------------------


def fsync_dir(path: str | Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public(path: str | Path) -> None:
    """Give a file the permissions an ordinary write would (safetensors creates them 0600)."""
    os.chmod(path, 0o666 & ~_umask())


def tmp_name(path: Path) -> Path:
    """A unique hidden sibling of `path`: same directory, so the final rename is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def atomic_save(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to produce the file under a temporary name, fsync it, rename it to `path`."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same directory + fsync + os.replace)."""
    atomic_save(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """JSON as every output here writes it (indent 2, UTF-8 kept readable), atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """JSON as every output here writes it (indent 2, UTF-8 kept readable), for files inside a
    directory that `atomic_directory` renames into place as a whole."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- directories -------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(target: Path) -> list[Path]:
    """Remove the temporary/trash siblings of `target` left by killed writers; returns them."""
    removed = []
    for p in target.parent.glob(f".{target.name}.*"):
        if not p.is_dir():
            continue
        kind, _, rest = p.name[len(target.name) + 2:].partition("-")
        if kind in ("tmp", "old"):
            pid = rest.split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue  # another writer is still at work
            if pid.isdigit() and int(pid) == os.getpid() and kind == "tmp":
                continue  # this process's own
        elif p.suffix not in (".tmp", ".old"):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


@contextmanager
def atomic_directory(target: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success it replaces `target`.

    `durable`: fsync every file and the directories, for outputs a crash must not tear (model
    directories); stage outputs that DVC re-creates after a crash skip that cost."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = target.with_name(f".{target.name}.tmp-{tag}")
    tmp.mkdir()
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if durable:
            for p in tmp.iterdir():
                if p.is_file():
                    fsync_file(p)
            fsync_dir(tmp)
        trash = target.with_name(f".{target.name}.old-{tag}")
        if target.exists() or target.is_symlink():
            os.replace(target, trash)
        os.replace(tmp, target)
        if durable:
            fsync_dir(target.parent)
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed


# --- reading JSON lines ------------------------------------------------------------------------


def lone_surrogate(s: str) -> int | None:
    """Index of the first lone surrogate in `s` (what JSON's "\\ud800" escape decodes to, and
    what cannot be written as UTF-8), or None."""
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def utf8_size(line: str, where: str) -> int:
    """The size in UTF-8 bytes of a line read with errors="surrogateescape", which checks it:
    a byte that was not UTF-8 raises FormatError naming the column."""
    if line.isascii():
        return len(line)
    try:
        return len(line.encode("utf-8"))
    except UnicodeEncodeError as e:
        byte = ord(line[e.start]) - 0xDC00 if 0xDC80 <= ord(line[e.start]) <= 0xDCFF else None
        what = f"byte 0x{byte:02x}" if byte is not None else "a surrogate"
        raise FormatError(where, "not UTF-8 text", f"{what} at column {e.start + 1}") from None


def open_text(path: Path):
    """Open for reading as UTF-8 with a leading BOM dropped; undecodable bytes are kept as
    surrogates so that `utf8_size` can report them with their line."""
    return path.open(encoding="utf-8-sig", errors="surrogateescape")


def _invalid(where: str, e: json.JSONDecodeError) -> FormatError:
    return FormatError(where, "invalid JSON", f"{e.msg}, column {e.colno}")


def _json_values(path: Path, text: str) -> Iterator[tuple[str, int, Any]]:
    """Each JSON value of `text`: one array -> its items; (pretty-printed) objects -> each."""
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return
        lineno = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _invalid(f"{path}:{e.lineno}", e) from None
        if isinstance(value, list):
            for i, record in enumerate(value, 1):
                yield f"{path}: record {i}", 0, record
        else:
            yield f"{path}:{lineno}", 0, value


def _complete_first_line(head: str) -> bool:
    """Is the first line of `head` a whole JSON value (JSON lines) rather than the start of a
    pretty-printed object? (A line longer than `head` is taken to be JSON lines.)"""
    line, newline, _ = head.partition("\n")
    if not newline:
        return True
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def read_json(path: str | Path) -> Iterator[tuple[str, int, Any]]:
    """(where, size in bytes, value) per record: JSON lines (`where` is `FILE:LINE`), or for a
    `.json` file also one JSON array or pretty-printed objects (size 0: read whole)."""
    path = Path(path)
    try:
        f = open_text(path)
    except OSError as e:
        raise FormatError(str(path), "cannot open", e.strerror or "") from None
    with f:
        # .jsonl is always JSON lines; a .json file may be either (Alpaca files are one array).
        head = "" if path.suffix.lower() != ".json" else f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("[") or (head.startswith("{") and not _complete_first_line(head)):
            text = f.read()
            for lineno, line in enumerate(text.split("\n"), 1):
                utf8_size(line, f"{path}:{lineno}")  # for its check: not UTF-8 raises
            yield from _json_values(path, text)
            return
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            parsed = json_line(line, where)
            if parsed is not None:
                yield where, *parsed


def json_line(line: str, where: str) -> tuple[int, Any] | None:
    """(size in UTF-8 bytes, value) of one line of JSON lines read with `open_text` (or bytes
    decoded with errors="surrogateescape"); None for a blank line (a trailing one is common and
    harmless). Errors name `where` (`FILE:LINE`)."""
    size = utf8_size(line, where)
    if not line.strip():
        return None
    try:
        return size, json.loads(line)
    except json.JSONDecodeError as e:
        raise _invalid(where, e) from None


def read_objects(path: str | Path) -> Iterator[tuple[str, int, dict]]:
    """`read_json`, each record required to be a JSON object."""
    for where, size, value in read_json(path):
        if not isinstance(value, dict):
            raise FormatError(where, f"expected a JSON object, got {type(value).__name__}")
        yield where, size, value


def str_field(where: str, obj: dict, key: str) -> str:
    """`obj[key]`, which must be a string; the error names the file, line and key."""
    value = obj.get(key)
    if not isinstance(value, str):
        raise FormatError(where, f"field {key!r} must be a string (got {value!r:.40})")
    return value
