"""A loaded model directory and how to sample text from it: what `generate`, `chat` and `serve` share.

Design choices
- `load` opens a model directory once (weights, tokenizer, config) and answers the questions every
  front end asks: is it a chat model (config.json names the chat template), which id ends a turn.
  Problems with the directory or a separate `--tokenizer_path` become one-line `UsageError`s.
- Sampling settings travel as one typed `Sampling` value (built from the CLI flags or from an
  API request), never as an argparse namespace.
- Prompts: a chat model's prompt is wrapped in the chat template (`minigpt.template`); raw text
  starts after `<|endoftext|>`, the document separator the model saw in pretraining. Generation
  stops at `<|endoftext|>`, which is never part of the returned ids.
- `TextStream` decodes the whole generated id list at every token and hands out the new suffix,
  holding back while the text ends in U+FFFD (a byte-level token can end inside a multi-byte
  character): streamed text is byte-for-byte the non-streamed text. Replies are at most a few
  hundred tokens, so re-decoding costs nothing noticeable.
- One seeded generator per run (`make_generator`): samples differ from each other and the whole
  run is reproducible; the server makes one per request.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # imported for real inside the functions: `minigpt --help` stays instant
    import torch
    from tokenizers import Tokenizer

    from minigpt.model import GPT


class UsageError(Exception):
    """A user's mistake (a flag, a file, a prompt); the message is one line, shown as `error: ...`."""


def utf8_text(text: str, where: str) -> str:
    """`text` (argv or a stdin line), refused with one line if it held bytes that are not UTF-8
    (Python keeps them as lone surrogates)."""
    from minigpt.files import lone_surrogate

    if (at := lone_surrogate(text)) is not None:
        char = ord(text[at])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise UsageError(f"{where} is not valid UTF-8 ({what} at character {at + 1})")
    return text


@dataclass(frozen=True)
class Sampling:
    """How to sample: the `generate`/`chat` flags, or an API request's fields."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 50  # 0 = off
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = None
    num_samples: int = 1

    @classmethod
    def from_args(cls, args: Any) -> "Sampling":
        """The settings among `args`' attributes (an argparse namespace); the rest default."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


@dataclass
class Loaded:
    """A model ready to generate with, and how to talk to it."""

    model: GPT
    tok: Tokenizer
    config: dict
    device: torch.device
    is_chat: bool
    """config.json names a chat template: prompts are wrapped in it."""
    eot: int
    """<|endoftext|>: starts raw prompts, ends every generation."""
    slid: bool = False
    """The sampler's window has slid once already this run (the notice is shown once)."""
    pending: list = field(default_factory=list)
    """Notices raised while an answer is being printed, shown after it (`flush_notices`)."""

    def warn_slide(self, message: str) -> None:
        """The sampler's context-overflow notice: one `warning:` line on stderr, once per run
        (the sampler says it once per call; --num_samples and chat turns make many calls).
        It arrives mid-answer, so it waits for the answer's end: on a terminal, where stdout and
        stderr share the screen, it must not land inside the answer's line."""
        if not self.slid:
            self.pending.append(f"warning: {message}")
            self.slid = True

    def flush_notices(self) -> None:
        """Print the notices held back during an answer, each on its own stderr line."""
        for line in self.pending:
            print(line, file=sys.stderr, flush=True)
        self.pending.clear()


def _check_tokenizer(path: str, config: dict) -> Tokenizer:
    """Load --tokenizer_path and check it is the tokenizer the model was trained with."""
    from minigpt.tokenizer import TokenizerError, load_tokenizer, same_tokenizer, tokenizer_hash

    try:
        tok = load_tokenizer(path)
        got = tokenizer_hash(path)
    except TokenizerError as e:
        raise UsageError(f"--tokenizer_path: {e}") from None
    want = config.get("tokenizer_hash")  # load_model has checked it against the model's own file
    same_tokenizer(got, want, f"--tokenizer_path {path}: tokenizer hash {got} does not match the "
                   f"model's ({want} in config.json)", UsageError, optional=True)
    return tok


def load(checkpoint_path: str, device_name: str = "cpu", tokenizer_path: str | None = None,
         dtype: str = "fp32") -> Loaded:
    """The model directory (and optional separate tokenizer), with usage errors as UsageError.
    dtype: the weights CPU decoding reads (`minigpt.quant`): fp32 (exact), fp16 or int8."""
    from minigpt.checkpoint import CheckpointError, check_vocab, load_model
    from minigpt.runtime import DeviceError, resolve_device
    from minigpt.template import TEMPLATE_NAME
    from minigpt.tokenizer import EOT, TokenizerError, check_special_tokens, special_id

    try:
        device = resolve_device(device_name, where="--device")
    except DeviceError as e:
        raise UsageError(str(e)) from None
    if dtype != "fp32" and device.type != "cpu":  # before the (slow) model load
        raise UsageError(f"--dtype {dtype} is for CPU decoding; use it with --device cpu "
                         f"(got {device.type})")
    if dtype != "fp32":
        from minigpt.quant import available

        if available(dtype):
            raise UsageError(f"--dtype {dtype}: {available(dtype)}")
    try:
        model, tok, config = load_model(checkpoint_path, device)
        check_special_tokens(tok, f"{checkpoint_path}/tokenizer.json")  # ids 0..4 per FORMATS.md
    except (CheckpointError, TokenizerError) as e:
        raise UsageError(f"--checkpoint_path: {e}") from None  # e names the path
    if tokenizer_path is not None:
        tok = _check_tokenizer(tokenizer_path, config)
        try:  # ids past the embedding would crash
            check_vocab(tok, config, model.config.vocab_size, tokenizer_path)
        except CheckpointError as e:
            raise UsageError(f"--tokenizer_path {e}") from None
    template = config.get("chat_template")
    if template not in (None, TEMPLATE_NAME):
        raise UsageError(f"--checkpoint_path {checkpoint_path}: unknown chat_template {template!r} "
                       f"(this version knows {TEMPLATE_NAME})")
    model.eval()
    model.decode_dtype = dtype
    return Loaded(model, tok, config, device, template == TEMPLATE_NAME, special_id(tok, EOT))


# --- generation ---------------------------------------------------------------------------------

class TextStream:
    """Incremental detokenizer: push ids, get back the text that is now safe to print.

    Decodes all ids so far and returns what was not yet returned, except while the text ends in
    U+FFFD (an incomplete UTF-8 sequence that the next token may complete). `finish` returns the
    rest, so the pieces always add up to `decode(ids)`."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.sent = 0

    def text(self) -> str:
        from minigpt.tokenizer import decode

        return decode(self.tok, self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.text()
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def finish(self) -> str:
        return self._take(self.text())

    def _take(self, text: str) -> str:
        new, self.sent = text[self.sent:], len(text)
        return new


def write_out(text: str, out=None) -> None:
    out = out or sys.stdout
    if text:
        out.write(text)
        out.flush()


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A seeded generator on the model's device (where sampling happens), or None for OS entropy."""
    import torch

    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def sample_ids(m: Loaded, ids: list[int], s: Sampling, generator,
               on_token: Callable[[int], None] | None = None) -> list[int]:
    """New token ids for the prompt `ids`, without the closing <|endoftext|>."""
    from minigpt.sample import generate

    try:
        new = generate(m.model, ids, s.max_new_tokens, temperature=s.temperature,
                       top_k=s.top_k or None, top_p=s.top_p,
                       repetition_penalty=s.repetition_penalty, stop_ids=[m.eot],
                       generator=generator, on_token=on_token, on_window=m.warn_slide)
    except ValueError as e:  # the sampler's own argument checks; ours should have caught them
        raise UsageError(str(e)) from None
    return new[:-1] if new and new[-1] == m.eot else list(new)


def batch_ids(m: Loaded, ids: list[int], s: Sampling, generator) -> list[list[int]]:
    """s.num_samples continuations of `ids` from one batched decode, each without its closing
    <|endoftext|>."""
    from minigpt.sample import generate_batch

    try:
        rows = generate_batch(m.model, ids, s.max_new_tokens, s.num_samples,
                              temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p,
                              repetition_penalty=s.repetition_penalty, stop_ids=[m.eot],
                              generator=generator, on_window=m.warn_slide)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return [r[:-1] if r and r[-1] == m.eot else list(r) for r in rows]


def stream_ids(m: Loaded, ids: list[int], s: Sampling, generator,
               stream: TextStream) -> list[int]:
    """sample_ids, printing text through `stream` as it comes. On Ctrl-C the decoded text is
    printed and the interrupt propagates; `stream.ids` holds what was generated until then."""

    def on_token(token_id) -> None:
        if int(token_id) != m.eot:
            write_out(stream.push(token_id))

    try:
        return sample_ids(m, ids, s, generator, on_token)
    finally:
        write_out(stream.finish())


def prompt_ids(m: Loaded, prompt: str, raw: bool) -> list[int]:
    """The ids a prompt becomes: the chat template for a chat model, else <|endoftext|> + text."""
    from minigpt.template import encode_prompt
    from minigpt.tokenizer import encode_text

    if m.is_chat and not raw:
        if not prompt.strip():
            raise UsageError("--prompt is empty; an instruction-tuned model needs an instruction "
                           "(or pass --raw to start from <|endoftext|>)")
        return encode_prompt(m.tok, prompt)
    return [m.eot] + encode_text(m.tok, prompt)


def fit_conversation(tok: Tokenizer, messages: list[dict], limit: int) -> tuple[list[int], int]:
    """Encode `messages`, first dropping the oldest user/assistant turns (in place) while the ids
    are longer than `limit`. Keeps a leading system message and the last user message, so the
    result may still be too long: then the sampler slides its window. Returns (ids, turns dropped)."""
    from minigpt.template import encode_conversation

    first = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    ids = encode_conversation(tok, messages, add_generation_prompt=True)
    while len(ids) > limit and len(messages) - first > 1:
        del messages[first:first + 2]  # one user message and the assistant reply to it
        dropped += 1
        ids = encode_conversation(tok, messages, add_generation_prompt=True)
    return ids, dropped
