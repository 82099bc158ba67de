"""Byte-level BPE tokenizer: training, loading, hashing, and the special tokens.

Design choices
- Byte-level BPE (GPT-2 style) through Hugging Face `tokenizers`: every Unicode string round-trips
  exactly, there is no unknown token, and training is fast Rust code. The initial alphabet is all
  256 byte symbols, so even bytes absent from the training text (control characters, rare CJK
  bytes) have a token.
- No normalizer and `add_prefix_space=False`: the tokenizer never changes the text, so
  `decode(encode(x)) == x` for any string, leading spaces and `\\r\\n` included.
- Special tokens are fixed here, once, and get the first ids in a fixed order, so ids stay stable
  across vocabulary sizes.
- Text is encoded as *ordinary* text (`encode_text`): a literal "<|endoftext|>" inside a document
  or a user message becomes plain byte-level tokens, never the special id. Special ids are only
  ever inserted by code (encode appends EOT, `minigpt.template` places the role tokens). The
  `tokenizers` switch for this (`encode_special_tokens`) is not saved in tokenizer.json, so the
  saved file behaves like any Hugging Face tokenizer (it parses special tokens in a string).
- `decode` keeps special tokens: skipping them (the `tokenizers` default) would silently change
  text that the model generated.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minigpt.files import FormatError, atomic_write_bytes, read_objects, str_field

EOT = "<|endoftext|>"  # ends a document, and an assistant turn
PAD = "<|pad|>"  # batch padding; never a target
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = [EOT, PAD, SYSTEM, USER, ASSISTANT]


class TokenizerError(ValueError):
    """A missing or unusable tokenizer file; the message is one line naming the path."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts` (any iterable; it is streamed, not materialized).

    `vocab_size` counts the special tokens and the 256 byte symbols; a small corpus may end with
    fewer merges than asked for, so read the real size from `tok.get_vocab_size()`.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,  # listed first, so they take ids 0..4 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    check_special_tokens(tok)
    return tok


def check_special_tokens(tok: Tokenizer, where: str = "tokenizer") -> None:
    """Raise TokenizerError unless the special tokens hold ids 0..4 in SPECIAL_TOKENS order."""
    got = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != list(range(len(SPECIAL_TOKENS))):
        pairs = ", ".join(f"{t}={i}" for t, i in zip(SPECIAL_TOKENS, got))
        raise TokenizerError(f"{where}: special tokens must have ids 0..{len(got) - 1} ({pairs})")


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write tokenizer.json atomically (`minigpt.files.atomic_write_bytes`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, tok.to_str(pretty=True).encode("utf-8"))  # what `Tokenizer.save` writes


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json; a missing or invalid file raises TokenizerError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found (run `dvc repro tokenizer`)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception with a multi-line message
        first = (str(e).splitlines() or ["unreadable"])[0]
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({first})") from None
    check_special_tokens(tok, str(path))
    return tok


def tokenizer_hash(path: str | Path) -> str:
    """First 16 hex digits of the SHA-256 of the tokenizer.json bytes (the id used everywhere)."""
    path = Path(path)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({e.strerror})") from None


def same_tokenizer(got: str | None, want: str | None, mismatch: str,
                   error: type[Exception] = TokenizerError, optional: bool = False) -> None:
    """The one tokenizer-identity check: files made with two tokenizers agree only when their
    `tokenizer_hash`es are equal. Raises `error(mismatch)` otherwise; `optional`: a missing `want`
    (None: a model directory written without a hash) is accepted."""
    if optional and want is None:
        return
    if got != want:
        raise error(mismatch)


def special_id(tok: Tokenizer, token: str) -> int:
    """The id of a special token (one of SPECIAL_TOKENS)."""
    if token not in SPECIAL_TOKENS:
        raise KeyError(f"{token!r} is not a special token (known: {', '.join(SPECIAL_TOKENS)})")
    token_id = tok.token_to_id(token)
    if token_id is None:
        raise TokenizerError(f"tokenizer has no special token {token}")
    return token_id


@contextmanager
def ordinary_text(tok: Tokenizer) -> Iterator[Tokenizer]:
    """Within the block, `tok` encodes special-token strings as plain text.

    The flag lives on the (shared) tokenizer object, so it is restored on exit; no code here
    encodes from two threads with one tokenizer object.
    """
    before = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        yield tok
    finally:
        tok.encode_special_tokens = before


def encode_text(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` as ordinary text (a literal "<|endoftext|>" is not the special id)."""
    with ordinary_text(tok):
        return tok.encode(text, add_special_tokens=False).ids


def encode_texts(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """`encode_text` for many strings at once, on the Rust thread pool (no offsets computed)."""
    # encode_batch_fast (tokenizers >= 0.20) skips the offsets, which we never use
    batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    with ordinary_text(tok):
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
    """Text of `ids`, special tokens included (nothing skipped or cleaned up)."""
    return tok.decode(list(ids), skip_special_tokens=False)


def iter_texts(path: str | Path, key: str = "text") -> Iterator[str]:
    """The `key` field of every line of a JSONL file, streamed (training text for the tokenizer)."""
    try:
        for where, _, obj in read_objects(path):
            yield str_field(where, obj, key)
    except FormatError as e:  # this stage's documented wording for a broken line
        problem = "not valid JSON" if e.problem == "invalid JSON" else e.problem
        raise TokenizerError(f"{e.where}: {problem}" + (f" ({e.detail})" if e.detail else "")) from None
