"""Atomic save/load of model directories and of resumable training state.

Design choices
- Nothing is ever unpickled: weights are safetensors, configs are JSON, and the resume state
  (`state.pt`) holds only tensors and plain Python values, loaded with `torch.load(weights_only=True)`.
- Every file is written to a temporary name in its final directory, fsynced, then `os.replace`d,
  so a reader sees the old file or the new one, never a torn one.
- Model directory (`save_model`): built complete in a sibling temporary directory, then swapped in
  with two renames (old -> trash, new -> final). A crash between the two leaves the final path
  missing (never half-written); `save_model` sweeps such leftovers next time. DVC deletes the
  directory before a stage runs anyway, so "absent or complete" is the property that matters.
- Resume state (`save_state`) keeps the flat layout of docs/FORMATS.md (`model.safetensors`,
  `state.pt`, `meta.json`) and makes it crash-safe with a tiny journal: the two payload files are
  written under unique temporary names, then `meta.json` is replaced atomically. That rename is
  the commit point: `meta.json` records the SHA-256 and the temporary name of each payload file.
  Only then are the payloads renamed into place. A reader (`load_state`) takes each payload from
  its final name if the hash matches, else from the recorded temporary name (a commit interrupted
  after the meta rename), else the checkpoint is invalid. So a `kill -9` at any instant leaves
  the previous checkpoint (crash before the meta rename: old meta, old payloads untouched) or the
  new one (crash after it), never a mix. The next `save_state` first finishes a pending commit.
- Tied weights: `safetensors.torch.save_model`/`load_model` store a shared tensor once and
  re-tie on load, so the model file never duplicates the embedding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
STATE_FORMAT = "minigpt-ckpt-v1"


class CheckpointError(RuntimeError):
    """A missing, torn or foreign checkpoint; the message is one line naming the path."""


# --- atomic file primitives -------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _tmp_name(path: Path) -> Path:
    """A unique hidden sibling of `path`: same directory, so the final rename is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def atomic_save(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to produce the file under a temporary name, fsync it, rename it to `path`."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same directory + fsync + os.replace)."""
    atomic_save(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


# --- model directory --------------------------------------------------------------------------


def save_model(model: torch.nn.Module, directory: str | Path, *, tokenizer_file: str | Path,
               meta: dict) -> None:
    """Write a self-contained model directory: model.safetensors, config.json, tokenizer.json.

    config.json = the architecture (`asdict(model.config)`) + `meta` (tokenizer_hash, stage,
    chat_template, training summary). Built in a temporary sibling, then swapped in."""
    model = unwrap(model)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _sweep_siblings(directory)
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        st_save_model(model, str(tmp / MODEL_FILE))
        config = {**dataclasses.asdict(model.config), **meta}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        for name in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        trash = directory.with_name(f".{directory.name}.{os.getpid()}-{secrets.token_hex(4)}.old")
        if directory.exists():
            os.replace(directory, trash)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
        shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sweep_siblings(directory: Path) -> None:
    """Remove temporary/trash siblings left by a save that was killed mid-way."""
    for p in directory.parent.glob(f".{directory.name}.*"):
        if p.suffix in (".tmp", ".old") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def read_config(directory: str | Path) -> dict:
    """config.json of a model directory, checked to be one; CheckpointError otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model directory not found")
    for name in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: not a model directory ({name} missing)")
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def load_model(directory: str | Path, device: str | torch.device = "cpu"):
    """Load a model directory -> (GPT, tokenizers.Tokenizer, config dict). Never unpickles.

    Raises CheckpointError (one line, naming the path) for a missing directory or file, a config
    that does not describe a GPT, weights that do not fit it, or a tokenizer whose hash differs
    from the one recorded in config.json."""
    from tokenizers import Tokenizer

    from minigpt.model import GPT, GPTConfig
    from minigpt.tokenizer import tokenizer_hash

    directory = Path(directory)
    config = read_config(directory)
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    try:
        gpt_config = GPTConfig(**{k: v for k, v in config.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: not a GPT config ({e})") from None
    model = GPT(gpt_config).to(device)  # plain init (~0.1 s at seed size): buffers stay right
    try:
        st_load_model(model, str(directory / MODEL_FILE), strict=True, device=str(device))
    except (SafetensorError, RuntimeError, OSError) as e:
        first = (str(e).splitlines() or ["unreadable"])[0]
        raise CheckpointError(f"{directory / MODEL_FILE}: weights do not load ({first})") from None
    model.eval()
    tok_path = directory / TOKENIZER_FILE
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as e:  # tokenizers raises bare Exceptions
        raise CheckpointError(f"{tok_path}: not a valid tokenizer ({str(e).splitlines()[0]})") from None
    want = config.get("tokenizer_hash")
    got = tokenizer_hash(tok_path)
    if want is not None and want != got:
        raise CheckpointError(f"{tok_path}: tokenizer hash {got} differs from config.json's {want}")
    return model, tok, config


# --- resumable training state -----------------------------------------------------------------


def save_state(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               state: dict, meta: dict, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Commit a resumable checkpoint: model.safetensors + state.pt + meta.json (+ `extra` weights).

    `state` must hold only tensors and plain Python values (torch.load(weights_only=True) must
    read it back); the optimizer's state_dict is stored under "optimizer". `meta` is what the run
    was configured with (compared on resume). `extra` maps file names to extra state dicts saved
    as safetensors (e.g. the best weights so far). See the module docstring for the commit order."""
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
    try:
        for name, write in writers.items():
            tmp = ckpt_dir / f".{name}.{tag}.tmp"
            write(tmp)
            _fsync_file(tmp)
            payload[name] = {"sha256": sha256_file(tmp), "tmp": tmp.name}
        record = {"format": STATE_FORMAT, "step": int(state.get("step", 0)), "files": payload,
                  "meta": meta}
        atomic_write_json(ckpt_dir / META_FILE, record)  # the commit point
    except BaseException:
        for entry in payload.values():
            (ckpt_dir / entry["tmp"]).unlink(missing_ok=True)
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
        _fsync_dir(ckpt_dir)
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
    return record


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
    except (SafetensorError, RuntimeError, OSError) as e:
        first = (str(e).splitlines() or ["unreadable"])[0]
        raise CheckpointError(f"{ckpt_dir}: checkpoint does not load ({first})") from None
    opt_state = state.pop("optimizer", None)
    if optimizer is not None and opt_state is not None:
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{paths[STATE_FILE]}: optimizer state does not fit ({e})") from None
    state["extra"] = {name: load_file(str(p)) for name, p in paths.items()
                      if name not in (MODEL_FILE, STATE_FILE)}
    return state, record["meta"]
