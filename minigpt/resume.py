"""Resumable training state in a scratch directory: a crash-safe journal, and one writer at a time.

Design choices
- Nothing is ever unpickled: safetensors weights and a `state.pt` of tensors and plain values
  loaded with `torch.load(weights_only=True)`.
- Crash-safe by a tiny journal (`save_state`, the flat layout of docs/FORMATS.md): payloads go to
  temporary names, then the atomic replace of `meta.json`, which records each payload's SHA-256
  and temporary name, commits; `load_state` takes each payload from its final or recorded
  temporary name by hash. A `kill -9` at any instant leaves the old or the new checkpoint.
- Untrusted input: a checkpoint may come from someone else. `meta.json` may only name plain files
  of the expected shapes (`model.safetensors`, `state.pt`, `*.safetensors` and their
  `.NAME.PID-HEX.tmp` temporaries), so nothing outside the directory is ever opened, renamed or
  deleted.
- `lock_scratch` holds an exclusive `flock` on a training scratch directory for the life of a run,
  so two trainers can never interleave writes there.
- A checkpoint is resumed only under its own run's fingerprint (`run_identity`, compared by
  `identity_mismatch`): config, architecture, runtime and input file digests (`file_digests`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from minigpt.checkpoint import MODEL_FILE, CheckpointError, unwrap
from minigpt.files import atomic_write_json, fsync_dir, fsync_file, public, sha256_file

if TYPE_CHECKING:
    from minigpt.config import TrainConfig
    from minigpt.runtime import Runtime

STATE_FILE = "state.pt"
META_FILE = "meta.json"
STATE_FORMAT = "minigpt-ckpt-v1"
LOCK_FILE = ".lock"


def save_state(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               state: dict, meta: dict, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Commit a resumable checkpoint: model.safetensors + state.pt + meta.json (+ `extra` weights).

    `state` must hold only tensors and plain Python values (torch.load(weights_only=True) must
    read it back); the optimizer's state_dict is stored under "optimizer". `meta` is what the run
    was configured with (compared on resume). `extra` maps file names to extra state dicts saved
    as safetensors (e.g. the best weights so far).

    Commit order: a pending commit is finished first; the payloads are written under unique
    temporary names; `meta.json` (their SHA-256 and temporary names) is replaced atomically, the
    commit point; only then are the payloads renamed into place. A crash before the meta rename
    leaves the old checkpoint untouched, one after it the new one (`load_state` finds each
    payload by hash under its final or temporary name)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    try:
        finish_commit(ckpt_dir)
    except CheckpointError:  # an unreadable/foreign meta.json: the caller already chose to overwrite
        pass
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    payload = {}
    writers: dict[str, Callable[[Path], None]] = {
        MODEL_FILE: lambda p: st_save_model(unwrap(model), str(p)),
        STATE_FILE: lambda p: torch.save(
            {**state, "optimizer": optimizer.state_dict() if optimizer is not None else None}, p),
    }
    for name, tensors in (extra or {}).items():
        writers[name] = lambda p, t=tensors: _save_tensors(t, p)
    name = META_FILE
    try:
        for name, write in writers.items():
            tmp = ckpt_dir / f".{name}.{tag}.tmp"
            payload[name] = {"sha256": "", "tmp": tmp.name}  # listed first: removed on failure
            write(tmp)
            public(tmp)
            fsync_file(tmp)
            payload[name]["sha256"] = sha256_file(tmp)
        name = META_FILE
        record = {"format": STATE_FORMAT, "step": int(state.get("step", 0)), "files": payload,
                  "meta": meta}
        atomic_write_json(ckpt_dir / META_FILE, record)  # the commit point
    except BaseException as e:
        for entry in payload.values():
            (ckpt_dir / entry["tmp"]).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError, SafetensorError)):  # a full disk, a quota
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{ckpt_dir}: checkpoint of step {state.get('step', 0)} not "
                                  f"saved (writing {name}: {first}); the previous checkpoint is "
                                  "kept") from None
        raise
    finish_commit(ckpt_dir)
    for stale in ckpt_dir.glob("*.safetensors"):  # e.g. best.safetensors of an earlier keep_best run
        if stale.name not in payload:
            stale.unlink(missing_ok=True)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # clone: tied entries share storage, which save_file refuses; contiguous for the same reason
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def finish_commit(ckpt_dir: str | Path) -> None:
    """Roll a committed-but-unrenamed checkpoint forward, then drop stale temporary files."""
    ckpt_dir = Path(ckpt_dir)
    record = _read_record(ckpt_dir)
    if record is not None:
        for name, entry in record["files"].items():
            tmp = ckpt_dir / entry["tmp"]
            if tmp.exists() and sha256_file(tmp) == entry["sha256"]:
                os.replace(tmp, ckpt_dir / name)
        fsync_dir(ckpt_dir)
    for p in ckpt_dir.glob(".*.tmp"):  # payloads of saves killed before their commit
        p.unlink(missing_ok=True)


def _read_record(ckpt_dir: Path) -> dict | None:
    path = ckpt_dir / META_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a {STATE_FORMAT} checkpoint")
    files = record.get("files")
    if not isinstance(files, dict) or not isinstance(record.get("step"), int) \
            or not isinstance(record.get("meta", {}), dict):
        raise CheckpointError(f"{path}: not a {STATE_FORMAT} checkpoint (bad files/step/meta)")
    for name, entry in files.items():
        _check_entry(path, name, entry)
    return record


# The only names meta.json may mention: plain files of this directory, never a path.
_PAYLOAD_NAME = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_-]*\.safetensors|state\.pt)\Z")
_TMP_NAME = re.compile(r"\.(?P<name>[A-Za-z0-9_.-]+)\.[0-9]+-[0-9a-f]{8}\.tmp\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def _check_entry(path: Path, name: Any, entry: Any) -> None:
    """A meta.json `files` entry must name a payload file and its own temporary, nothing else."""
    tmp = entry.get("tmp") if isinstance(entry, dict) else None
    m = _TMP_NAME.match(tmp) if isinstance(tmp, str) else None
    if not (isinstance(name, str) and _PAYLOAD_NAME.match(name) and m and m["name"] == name
            and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])):
        raise CheckpointError(f"{path}: refusing unsafe or malformed file entry "
                              f"{name!r:.80}: {entry!r:.120}")


def read_state_meta(ckpt_dir: str | Path) -> dict | None:
    """The committed checkpoint's record ({format, step, files, meta}), or None if there is none."""
    return _read_record(Path(ckpt_dir))


def _payload_path(ckpt_dir: Path, name: str, entry: dict) -> Path:
    """Where the committed copy of `name` is: its final name or the journal's temporary name."""
    for path in (ckpt_dir / name, ckpt_dir / entry["tmp"]):
        if path.exists() and sha256_file(path) == entry["sha256"]:
            return path
    raise CheckpointError(f"{ckpt_dir / name}: missing or does not match {META_FILE} (torn checkpoint)")


def load_state(ckpt_dir: str | Path, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer | None = None,
               device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Restore weights (and optimizer state) in place -> (state dict, meta dict).

    Every payload file is verified against the hash recorded in meta.json first; the state also
    carries "extra": {name: state dict} for the extra weight files. Raises CheckpointError."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    record = _read_record(ckpt_dir)
    if record is None:
        raise CheckpointError(f"{ckpt_dir / META_FILE}: no checkpoint")
    paths = {name: _payload_path(ckpt_dir, name, entry) for name, entry in record["files"].items()}
    for name in (MODEL_FILE, STATE_FILE):
        if name not in paths:
            raise CheckpointError(f"{ckpt_dir / META_FILE}: lists no {name}")
    try:
        st_load_model(unwrap(model), str(paths[MODEL_FILE]), strict=True, device=str(device))
        state = torch.load(paths[STATE_FILE], map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # its message advises weights_only=False: never for us
        raise CheckpointError(f"{paths[STATE_FILE]}: refused, it holds objects other than tensors "
                              "and plain values (torch.load(weights_only=True))") from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        first = (str(e).splitlines() or ["unreadable"])[0]
        raise CheckpointError(f"{ckpt_dir}: checkpoint does not load ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{paths[STATE_FILE]}: not a training state (a {type(state).__name__})")
    opt_state = state.pop("optimizer", None)
    if optimizer is not None and opt_state is not None:
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{paths[STATE_FILE]}: optimizer state does not fit ({e})") from None
    state["extra"] = {name: load_file(str(p)) for name, p in paths.items()
                      if name not in (MODEL_FILE, STATE_FILE)}
    return state, record["meta"]


# --- one writer per scratch directory ---------------------------------------------------------


@contextlib.contextmanager
def lock_scratch(directory: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on a training scratch directory (its `.lock` file) while inside.

    A second process gets CheckpointError naming the holder's pid at once (no waiting: a stuck
    run must be seen, not queued behind). The kernel drops the lock when the holder dies, however
    it dies, so a stale `.lock` file never blocks anything. No-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; single-writer is then the user's business
        yield
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise CheckpointError(f"{directory}: another training run (pid {holder}) is writing "
                                  f"here; wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def run_identity(model: torch.nn.Module, cfg: TrainConfig, rt: Runtime, meta: dict,
                 keep_best: bool = False, patience: int = 0, inputs: dict | None = None) -> dict:
    """The run's fingerprint: what must match for a checkpoint to be resumed (meta.json's "meta")."""
    train = {**dataclasses.asdict(cfg), "keep_best": keep_best, "patience": patience}
    return {"model": dataclasses.asdict(unwrap(model).config), "train": train,
            "runtime": {"device": rt.device.type, "dtype": rt.dtype, "world_size": rt.world_size},
            "caller": meta, "inputs": inputs or {}}


def file_digests(paths: Iterable[str | Path], rt: Runtime | None = None) -> dict[str, str]:
    """{path: SHA-256} of a stage's input files, for the run fingerprint (`fit(inputs=...)`).

    Under DDP only rank 0 reads the files and the digests are broadcast: gigabytes of tokens are
    read once per start, not once per rank, and every rank decides to resume (or not) on the
    same fingerprint. A file rank 0 cannot read fails every rank with its message."""
    if rt is None or not rt.ddp:
        return {str(p): sha256_file(p) for p in paths}
    box: list = [None]
    if rt.is_main:
        try:
            box[0] = {str(p): sha256_file(p) for p in paths}
        except OSError as e:
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], OSError):
        raise box[0]
    return box[0]


def _flatten(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def identity_mismatch(saved: dict, current: dict) -> str | None:
    """A one-line reason why `saved` cannot be resumed under `current`, or None."""
    a, b = _flatten(saved), _flatten(json.loads(json.dumps(current)))  # JSON-normalise tuples
    diffs = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not diffs:
        return None
    more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
    return "; ".join(diffs[:3]) + more
