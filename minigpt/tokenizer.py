"""Byte-level BPE tokenizer: training, loading, hashing, and the special tokens.

Design choices
- Byte-level BPE (GPT-2 style) through Hugging Face `tokenizers`, all 256 bytes in the initial
  alphabet, no normalizer, `add_prefix_space=False`: every string round-trips exactly
  (`decode(encode(x)) == x`), with no unknown token.
- Special tokens are fixed here and get the first ids in a fixed order (stable across vocabulary
  sizes). Text is encoded as *ordinary* text (`encode_text`): a literal "<|endoftext|>" in a
  document or message is plain bytes; special ids are only inserted by code. `decode` keeps them.
- Long documents reach `tokenizers` in pieces of at most PIECE_CHARS (`split_text`), cut at
  whitespace where the pre-tokenizer splits anyway: encoding gives exactly the whole text's ids
  and training the same pre-token counts, while no one string outgrows a piece (one huge line
  would otherwise exhaust the trainer's memory).
- Training on a budget (`TrainingSample`): the first `max_chars` characters in stable-hash order
  (a salted SHA-256 per document), each document first cut to `max_doc_chars`. A counting pass
  over 1/65536ths of hash space fixes the threshold; training then streams the documents below it
  in file order: a sample spread over the whole corpus, independent of order and shard layout, in
  constant memory. A corpus within the budget is used whole: exactly the unbudgeted result.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minigpt.files import FormatError, atomic_write_bytes, read_objects, str_field

EOT = "<|endoftext|>"  # ends a document, and an assistant turn
PAD = "<|pad|>"  # batch padding; never a target
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = [EOT, PAD, SYSTEM, USER, ASSISTANT]
# Documents longer than this (characters) are trained on and encoded in pieces (`split_text`).
PIECE_CHARS = 2**20


class TokenizerError(ValueError):
    """A missing or unusable tokenizer file; the message is one line naming the path."""


def split_text(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of about `max_chars` characters at boundaries where byte-level
    pre-tokenization already splits, so encoding the pieces gives the whole text's ids.

    A cut goes right before a space or newline c with a non-space before it and a non-space
    after it: GPT-2's pre-tokenizer pattern never lets a pre-token run from a non-space into
    whitespace, and `c` + the next character start a pre-token whatever precedes them."""
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = _last_boundary(text, start + max_chars // 2, start + max_chars)
        if cut is None:  # no safe boundary in range: take the next one (a huge word stays whole)
            m = _BOUNDARY.search(text, start + max_chars)
            if m is None:
                break
            cut = m.start()
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


_BOUNDARY = re.compile(r"(?<=\S)[ \n](?=\S)")


def _last_boundary(text: str, lo: int, hi: int) -> int | None:
    """The last index i in (lo, hi) with text[i] in " \n" between two non-space characters."""
    for sep in ("\n", " "):
        i = text.rfind(sep, lo, hi)
        while i > lo:
            if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
                return i
            i = text.rfind(sep, lo, i)
    return None


def training_pieces(texts: Iterable[str], max_chars: int = PIECE_CHARS) -> Iterator[str]:
    """Each text as pieces of at most `max_chars` for the trainer: `split_text`, then a hard cut
    of any stretch it had to leave longer (no whitespace boundary in it)."""
    for text in texts:
        for piece in split_text(text, max_chars):
            if len(piece) <= max_chars:
                yield piece
            else:
                yield from (piece[i:i + max_chars] for i in range(0, len(piece), max_chars))


def _sample_fraction(text: str) -> float:
    """A document's place in [0, 1) for the training sample: SHA-256 with its own salt, so it is
    uncorrelated with the split hash (`minigpt.splits.stable_fraction`), which already decided
    that every train document lies outside the validation/test bands."""
    digest = hashlib.sha256(b"tokenizer-sample\0" + text.encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53


class TrainingSample:
    """The texts the tokenizer trains on, within a budget (see the module docstring).

    `texts()` returns a fresh iterator over the documents: it is called twice when the corpus
    may exceed `max_chars` (a counting pass, then training), once when `fits` says it cannot.
    Iterate once; `documents` and `characters` then say what was used, `total` (None without a
    counting pass) what there was."""

    BINS = 2**16

    def __init__(self, texts: Callable[[], Iterable[str]], max_chars: int = 0,
                 max_doc_chars: int = 0, fits: bool = False):
        self.texts, self.max_chars, self.max_doc_chars = texts, max_chars, max_doc_chars
        self.edge = self.BINS  # bin of places taken in part; all below it are taken whole
        self.room = 0  # characters left for the documents of the edge bin
        self.total: Optional[int] = None
        self.documents = self.characters = 0
        if max_chars and not fits:
            chars = [0] * self.BINS
            for text in map(self._cap, texts()):
                chars[self._bin(text)] += len(text)
            self.total = sum(chars)
            if self.total > max_chars:
                below = 0
                for i, n in enumerate(chars):
                    if below + n >= max_chars:
                        self.edge, self.room = i, max_chars - below
                        break
                    below += n

    @property
    def sampled(self) -> bool:
        return self.edge < self.BINS

    @property
    def threshold(self) -> float:
        """Places below this are in the sample (those in the last 1/BINS of it, in part)."""
        return min(1.0, (self.edge + 1) / self.BINS)

    def _bin(self, text: str) -> int:
        return int(_sample_fraction(text) * self.BINS)

    def _cap(self, text: str) -> str:
        return text[:self.max_doc_chars] if self.max_doc_chars else text

    def __iter__(self) -> Iterator[str]:
        for text in map(self._cap, self.texts()):
            if self.sampled:
                b = self._bin(text)
                if b > self.edge or (b == self.edge and not self.room):
                    continue
                if b == self.edge:  # the edge bin fills what the bins below leave, in file order
                    text = text[:self.room]
                    self.room -= len(text)
            if self.max_chars:
                text = text[:self.max_chars - self.characters]
            self.documents += 1
            self.characters += len(text)
            yield text
            if self.max_chars and self.characters >= self.max_chars:
                return


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts` (any iterable; it is streamed, not materialized, and
    long texts are handed to the trainer in pieces: `training_pieces`).

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
    tok.train_from_iterator(training_pieces(texts), trainer=trainer)
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
