"""Atomic save/load of model directories, validated before anything is allocated.

Design choices
- Nothing is ever unpickled: safetensors weights and JSON configs.
- Every file is written (`minigpt.files`) to a temporary name, fsynced, then `os.replace`d. A model
  directory (`save_model`) is built beside its path and swapped in with two renames: a crash
  leaves it absent or complete, never half-written (leftovers are swept next time).
- Resumable training state (the journal in `meta.json`) is `minigpt.resume`'s.
- Tied weights are stored once and re-tied on load (`safetensors.torch.save_model`/`load_model`).
- Untrusted input: a model directory may come from someone else. `config.json` is validated
  field by field (type, range, upper bounds) and the weights' names, shapes and dtypes are read
  from the safetensors header (bounded) and compared with the config *before* the model is
  allocated, so a hostile config can neither exhaust memory nor fail deep inside torch.
- The weights remember what they were saved with: `model.safetensors`' metadata holds the
  architecture (every GPTConfig field but dropout) and the tokenizer's hash. block_size, qk_norm,
  rope_theta, norm_eps and logit_softcap own no weight, so an edited config.json would load
  silently and compute other logits: on load each recorded field must equal config.json's (an
  older directory has no record: only its shapes are checked). config.json must name its
  `tokenizer_hash`, else a foreign tokenizer.json of a fitting size would load.
- Files get the usual permissions (0666 minus the umask; safetensors alone makes them 0600).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from minigpt.files import atomic_directory, public

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# config.json bounds: generous for any model this code trains, small enough that nothing in
# the config alone can ask for more than a few GB before the weights are checked against it
CONFIG_BOUNDS = {"vocab_size": (1, 2**20), "n_layer": (1, 1024), "n_head": (1, 1024),
                 "n_embd": (2, 2**16), "block_size": (1, 2**20), "intermediate_size": (0, 2**18)}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}  # float weights this loader accepts
# model.safetensors metadata keys: the architecture and tokenizer the weights were saved with
CONFIG_KEY, TOKENIZER_KEY = "minigpt.config", "minigpt.tokenizer_hash"
UNRECORDED = ("dropout",)  # training-only: changes no output of a loaded model


class CheckpointError(RuntimeError):
    """A missing, torn or foreign checkpoint; the message is one line naming the path."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


# --- model directory --------------------------------------------------------------------------


def sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted. safetensors writes them from a
    Rust HashMap, whose order changes from one process to the next, so identical weights would give
    different bytes and DVC would see a new model directory (and re-run what depends on it)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # cannot happen: same keys and values, compact JSON
            raise CheckpointError(f"{path}: safetensors header grew when sorted")
        f.seek(8)
        f.write(text.ljust(size))


def save_model(model: torch.nn.Module, directory: str | Path, *, tokenizer_file: str | Path,
               meta: dict) -> None:
    """Write a self-contained model directory: model.safetensors, config.json, tokenizer.json.

    config.json = the architecture (`asdict(model.config)`) + `meta` (tokenizer_hash, stage,
    chat_template, training summary). Built in a temporary sibling, then swapped in."""
    from minigpt.tokenizer import tokenizer_hash

    model = unwrap(model)
    record = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in UNRECORDED}
    metadata = {"format": "pt", CONFIG_KEY: json.dumps(record, sort_keys=True),
                TOKENIZER_KEY: tokenizer_hash(tokenizer_file)}
    try:
        with atomic_directory(directory, durable=True) as tmp:
            st_save_model(model, str(tmp / MODEL_FILE), metadata=metadata)
            sort_metadata(tmp / MODEL_FILE)
            public(tmp / MODEL_FILE)
            config = {**dataclasses.asdict(model.config), **meta}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    except (OSError, SafetensorError) as e:  # a full disk: the old directory, if any, is untouched
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{directory}: model directory not written ({first})") from None


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


def check_gpt_config(config: dict, path: str | Path):
    """A GPTConfig from config.json's fields, each checked for type and range first.

    Bounds keep a hostile config from asking for absurd memory before its weights are checked:
    the weights' shapes then pin vocab_size, n_layer and n_embd to what the file holds, and
    block_size is bounded by what its RoPE tables and KV cache would cost."""
    from minigpt.model import GPTConfig

    def bad(field: str, why: str, value: Any) -> CheckpointError:
        return CheckpointError(f"{path}: not a GPT config ({field} {why}, got {value!r:.60})")

    floats = {"dropout": (0.0, 1.0), "rope_theta": (0.0, 1e12), "norm_eps": (0.0, 1.0),
              "logit_softcap": (0.0, 1e6)}
    choices = {"mlp": ("swiglu", "relu2"), "qk_norm": (False, True), "zero_init": (False, True)}
    kwargs = {}
    for f in dataclasses.fields(GPTConfig):
        if f.name not in config:
            if f.default is dataclasses.MISSING:
                raise CheckpointError(f"{path}: not a GPT config (missing field {f.name!r})")
            continue
        value = config[f.name]
        if f.name in CONFIG_BOUNDS:
            lo, hi = CONFIG_BOUNDS[f.name]
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(f.name, "must be an integer", value)
            if not lo <= value <= hi:
                raise bad(f.name, f"must be in [{lo}, {hi}]", value)
        elif f.name in floats:
            lo, hi = floats[f.name]
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not math.isfinite(value):
                raise bad(f.name, "must be a finite number", value)
            closed = f.name in ("dropout", "logit_softcap")  # 0 = off
            if not (lo <= value < hi if closed else lo < value < hi):
                raise bad(f.name, f"must be in {'[' if closed else '('}{lo}, {hi})", value)
        elif f.name in choices:
            if value not in choices[f.name] or type(value) is not type(choices[f.name][0]):
                raise bad(f.name, f"must be one of {', '.join(map(str, choices[f.name]))}", value)
        kwargs[f.name] = value
    n_embd, n_head = kwargs["n_embd"], kwargs["n_head"]
    if n_embd % n_head or (n_embd // n_head) % 2:
        raise bad("n_head", f"must split n_embd={n_embd} into even-sized heads", n_head)
    cache = 8 * kwargs["n_layer"] * kwargs["block_size"] * n_embd  # fp32 k+v of one sequence
    rope = 24 * kwargs["block_size"] * (n_embd // n_head)  # cos+sin tables, q|k|v slots, fp32
    if cache > 2**32 or rope > 2**30:
        raise bad("block_size", f"too large for n_layer={kwargs['n_layer']}, n_embd={n_embd} "
                  f"(a KV cache of {cache / 2**30:.1f} GiB, limit 4)", kwargs["block_size"])
    try:
        return GPTConfig(**kwargs)
    except ValueError as e:  # GPTConfig's own checks: still one line naming the file
        raise CheckpointError(f"{path}: not a GPT config ({e})") from None


def _raw_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header (bounded size) and the size of its data section."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: weights do not load (not safetensors: header length {n})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: weights do not load ({e.strerror})") from None
    except ValueError as e:  # UnicodeDecodeError included
        raise CheckpointError(f"{path}: weights do not load (bad safetensors header: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: weights do not load (header is not an object)")
    return header, size - 8 - n


def safetensors_header(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header, read and checked without
    loading any tensor (bounded header size; every tensor's byte range must fit the file)."""
    path = Path(path)
    header, data_size = _raw_header(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and isinstance(info.get("shape"), list) \
            and all(isinstance(d, int) and d >= 0 for d in info["shape"]) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(isinstance(o, int) for o in info["data_offsets"])
        if not ok:
            raise CheckpointError(f"{path}: weights do not load (tensor {name!r:.80}: malformed header entry)")
        dtype, shape, (begin, end) = info.get("dtype"), info["shape"], info["data_offsets"]
        if dtype not in ST_DTYPES:
            raise CheckpointError(f"{path}: weights do not load (tensor {name!r:.80} has dtype "
                                  f"{dtype!r:.20}, expected one of {', '.join(ST_DTYPES)})")
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * ST_DTYPES[dtype]:
            raise CheckpointError(f"{path}: weights do not load (tensor {name!r:.80} does not fit "
                                  f"the file: offsets {begin}..{end}, shape {shape})")
        out[name] = (dtype, shape)
    return out


def check_weights(path: str | Path, gpt_config) -> None:
    """The weights' names and shapes (from the header) must be exactly the ones gpt_config
    implies; the expected shapes come from a GPT built on the meta device (no memory)."""
    import torch

    from minigpt.model import GPT

    got = safetensors_header(path)
    with torch.device("meta"):  # one block, repeated: building 1000 blocks even on meta is slow
        one = GPT(dataclasses.replace(gpt_config, n_layer=1)).state_dict()
    expected = {}
    for k, v in one.items():
        for i in range(gpt_config.n_layer) if k.startswith("layers.0.") else [None]:
            expected[k if i is None else f"layers.{i}.{k[9:]}"] = list(v.shape)
    for name, shape in expected.items():
        if name not in got:
            raise CheckpointError(f"{path}: weights do not load (tensor {name!r} missing; "
                                  "config.json implies it)")
        if got[name][1] != shape:
            raise CheckpointError(f"{path}: weights do not load (tensor {name!r} has shape "
                                  f"{got[name][1]}, config.json implies {shape})")
    for name in got:
        if name not in expected:
            raise CheckpointError(f"{path}: weights do not load (unexpected tensor {name!r:.80})")


def check_saved_with(directory: Path, config: dict, gpt_config) -> None:
    """config.json must name a tokenizer hash and agree with what the weights were saved with
    (`save_model`'s metadata, when there is one): the fields no tensor shape pins."""
    path, weights = directory / CONFIG_FILE, directory / MODEL_FILE
    want = config.get("tokenizer_hash")
    if not isinstance(want, str) or not want:
        raise CheckpointError(f"{path}: no tokenizer_hash, so {TOKENIZER_FILE} cannot be checked "
                              "against the model (a model directory's config.json records it)")
    meta = _raw_header(weights)[0].get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    saved_hash = meta.get(TOKENIZER_KEY)
    if saved_hash is not None and saved_hash != want:
        raise CheckpointError(f"{path}: tokenizer_hash {want!r:.40} differs from the one the weights "
                              f"were saved with ({saved_hash!r:.40}, {MODEL_FILE} metadata)")
    if CONFIG_KEY not in meta:
        return  # saved before the record existed: the shapes are all that can be checked
    try:
        saved = json.loads(meta[CONFIG_KEY])
        assert isinstance(saved, dict)
    except (TypeError, ValueError, AssertionError):
        raise CheckpointError(f"{weights}: weights do not load (malformed {CONFIG_KEY} metadata)") from None
    ours = dataclasses.asdict(gpt_config)
    for name, value in saved.items():
        if name in ours and name not in UNRECORDED and ours[name] != value:
            raise CheckpointError(f"{path}: {name}={ours[name]!r:.40} does not match the weights, "
                                  f"saved with {name}={value!r:.40} ({MODEL_FILE} metadata); "
                                  "was config.json edited?")


def check_vocab(tok, config: dict, vocab_size: int, where: str | Path) -> None:
    """A tokenizer must fit the model: no more tokens than its embedding has rows, and exactly
    the recorded `tokenizer_vocab_size` when config.json has one."""
    n = tok.get_vocab_size()
    recorded = config.get("tokenizer_vocab_size")
    if n > vocab_size:
        raise CheckpointError(f"{where}: {n} tokens, more than the model's vocab_size {vocab_size}")
    if isinstance(recorded, int) and n != recorded:
        raise CheckpointError(f"{where}: {n} tokens, but the model was trained with a "
                              f"{recorded}-token tokenizer (config.json tokenizer_vocab_size)")


def load_model(directory: str | Path, device: str | torch.device = "cpu"):
    """Load a model directory -> (GPT, tokenizers.Tokenizer, config dict). Never unpickles.

    Raises CheckpointError (one line, naming the path) for a missing directory or file, a config
    that does not describe a GPT, weights that do not fit it, or a tokenizer whose hash differs
    from the one recorded in config.json. Everything is checked before the model is allocated."""
    from tokenizers import Tokenizer

    from minigpt.model import GPT
    from minigpt.tokenizer import same_tokenizer, tokenizer_hash

    directory = Path(directory)
    config = read_config(directory)
    gpt_config = check_gpt_config(config, directory / CONFIG_FILE)
    check_weights(directory / MODEL_FILE, gpt_config)
    check_saved_with(directory, config, gpt_config)
    tok_path = directory / TOKENIZER_FILE
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as e:  # tokenizers raises bare Exceptions
        raise CheckpointError(f"{tok_path}: not a valid tokenizer ({str(e).splitlines()[0]})") from None
    want = config.get("tokenizer_hash")
    got = tokenizer_hash(tok_path)
    same_tokenizer(got, want, f"{tok_path}: tokenizer hash {got} differs from config.json's {want}",
                   CheckpointError)
    check_vocab(tok, config, gpt_config.vocab_size, tok_path)
    model = GPT(gpt_config).to(device)  # plain init (cheap at these sizes): buffers stay right
    try:
        st_load_model(model, str(directory / MODEL_FILE), strict=True, device=str(device))
    except (SafetensorError, RuntimeError, OSError) as e:
        first = (str(e).splitlines() or ["unreadable"])[0]
        raise CheckpointError(f"{directory / MODEL_FILE}: weights do not load ({first})") from None
    model.eval()
    return model, tok, config
