"""The chat template (`minigpt-v1`): the one place that turns instructions and conversations into ids.

    <|user|>\\n{instruction}\\n\\n{context}\\n<|assistant|>\\n{response}<|endoftext|>

(`\\n\\n{context}` only when there is a context.) A conversation repeats user/assistant turns; an
optional `<|system|>\\n{text}\\n` turn comes first. Encode, finetune, eval, generate, chat and
export all call this module, so training and inference can never disagree on the format.

Design choices
- One description, `_segments` (pieces marked target or not), feeds Python encoding, `render`, the
  loss mask and `CHAT_TEMPLATE_JINJA` (Hugging Face's `apply_chat_template`); tests check they agree.
- Special-token ids are appended directly and text between them is encoded as ordinary text, so a
  typed "<|endoftext|>" is never a turn boundary; otherwise the ids equal a Hugging Face tokenizer's
  on the rendered string, so an exported model gets the same ids.
- The loss mask is 1 on `\\n{response}` and the closing `<|endoftext|>`; the generation prompt
  (`encode_prompt`) ends with `<|assistant|>\\n`, a prefix of the training ids.
- `encode_examples` encodes many examples in one `encode_batch` call (the Rust thread pool).
- `truncate_example` (and `truncate_prompt`, for a generation prompt) works on ids: it drops the
  tail of the user text (context first), keeps the template tokens and the whole response, so
  the model never learns from a cut-off answer.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer

from minigpt.tokenizer import ASSISTANT, EOT, SPECIAL_TOKENS, SYSTEM, USER, encode_texts

TEMPLATE_NAME = "minigpt-v1"  # recorded as `chat_template` in a fine-tuned model's config.json

# The same template for Hugging Face (`tokenizer_config.json` "chat_template") and llama.cpp (the
# GGUF's `tokenizer.chat_template`). Every tag trims the whitespace around it (`{%-`, `-%}`), so the
# layout here never leaks into the output, whatever the environment's trim_blocks/lstrip_blocks.
# Jinja string literals decode `\n` to a newline. The role tags are built as '<|' + role + '|>'
# on purpose: without --jinja, llama.cpp does not run the template but guesses a built-in format
# from substrings of it (`llm_chat_detect_template`), and the literals '<|user|>' and
# '<|assistant|>' read as GLMEDGE, which drops our "\n" tokens. With no known substring it
# refuses ("this custom template is not supported, try using --jinja") instead of guessing.
CHAT_TEMPLATE_JINJA = (
    r"{%- for message in messages -%}"
    r"{%- if message['role'] == 'user' or (message['role'] == 'system' and loop.first) -%}"
    r"{{- '<|' + message['role'] + '|>\n' + message['content'] + '\n' -}}"
    r"{%- elif message['role'] == 'assistant' -%}"
    r"{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|endoftext|>' -}}"
    r"{%- else -%}"
    r"{{- raise_exception('minigpt-v1: roles are system (first only), user, assistant') -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|' + 'assistant' + '|>\n' -}}{%- endif -%}"
)

# A piece of a rendered conversation: (text, is_special_token, is_target).
Piece = tuple[str, bool, bool]
Message = Mapping[str, str]

_ASSISTANT_ID = SPECIAL_TOKENS.index(ASSISTANT)  # ids are fixed by FORMATS.md (0..4)
_TEMPLATE_HEAD = 1  # <|user|> (or <|system|>) that opens the prompt
_TEMPLATE_TAIL = 2  # the "\n" before <|assistant|>, and <|assistant|>


def user_content(instruction: str, context: str = "") -> str:
    """The user turn's text for an instruction and an optional context."""
    return f"{instruction}\n\n{context}" if context else instruction


def example_messages(instruction: str, context: str = "", response: str | None = None) -> list[dict]:
    """An instruction example as a conversation (no assistant turn when `response` is None)."""
    messages = [{"role": "user", "content": user_content(instruction, context)}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _segments(messages: Sequence[Message], add_generation_prompt: bool) -> list[Piece]:
    """The template: a conversation as special tokens and text runs, each marked target or not."""
    pieces: list[Piece] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string (got {type(content).__name__})")
        if role == "system" and i == 0:
            pieces += [(SYSTEM, True, False), (f"\n{content}\n", False, False)]
        elif role == "user":
            pieces += [(USER, True, False), (f"\n{content}\n", False, False)]
        elif role == "assistant":
            pieces += [(ASSISTANT, True, False), (f"\n{content}", False, True), (EOT, True, True)]
        else:
            raise ValueError(f"message {i}: role {role!r} is not one of system (first only), "
                             "user, assistant")
    if add_generation_prompt:
        pieces += [(ASSISTANT, True, False), ("\n", False, False)]
    return pieces


def render(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The conversation as one string, special tokens inline (what CHAT_TEMPLATE_JINJA renders)."""
    return "".join(text for text, _, _ in _segments(messages, add_generation_prompt))


def _encode_pieces(tok: Tokenizer, conversations: list[list[Piece]]) -> list[tuple[list[int], list[int]]]:
    """Ids and loss masks of many piece lists, encoding all their text in one batch call."""
    specials = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    texts = [text for pieces in conversations for text, special, _ in pieces if not special]
    encoded = iter(encode_texts(tok, texts))
    out = []
    for pieces in conversations:
        ids: list[int] = []
        mask: list[int] = []
        for text, special, target in pieces:
            piece_ids = [specials[text]] if special else next(encoded)
            ids += piece_ids
            mask += [int(target)] * len(piece_ids)
        out.append((ids, mask))
    return out


def encode_conversation(tok: Tokenizer, messages: Sequence[Message],
                        add_generation_prompt: bool = True) -> list[int]:
    """Ids of a multi-turn conversation (system/user/assistant messages with role and content)."""
    return _encode_pieces(tok, [_segments(messages, add_generation_prompt)])[0][0]


def encode_prompt(tok: Tokenizer, instruction: str, context: str = "") -> list[int]:
    """Ids of an instruction prompt, up to and including `<|assistant|>\\n`: input to generation."""
    return encode_conversation(tok, example_messages(instruction, context), add_generation_prompt=True)


def encode_examples(tok: Tokenizer, rows: Iterable[tuple[str, str, str]]
                    ) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) for many (instruction, context, response) rows, in one batched encode."""
    conversations = [_segments(example_messages(i, c, r), add_generation_prompt=False)
                     for i, c, r in rows]
    return _encode_pieces(tok, conversations)


def encode_example(tok: Tokenizer, instruction: str, context: str,
                   response: str) -> tuple[list[int], list[int]]:
    """Ids of a training example and its loss mask (1 on `\\n{response}<|endoftext|>`, else 0)."""
    return encode_examples(tok, [(instruction, context, response)])[0]


def truncate_example(ids: Sequence[int], mask: Sequence[int], max_len: int
                     ) -> tuple[Sequence[int], Sequence[int]] | None:
    """Fit an encoded example into `max_len` tokens, or None when even its response cannot fit.

    Drops tokens from the end of the user text (the context's tail first, then the instruction's)
    and keeps the opening role token, the "\\n" before `<|assistant|>`, `<|assistant|>` and the
    whole response. Works on lists and numpy arrays and returns the same kind.
    """
    m = np.asarray(mask)
    n = len(m)
    if len(ids) != n:
        raise ValueError(f"ids and mask differ in length ({len(ids)} != {n})")
    prompt = int(np.argmax(m)) if m.any() else n  # the mask is 0 on the prompt, then 1 to the end
    if not m[prompt:].all() or prompt < _TEMPLATE_HEAD + _TEMPLATE_TAIL \
            or int(ids[prompt - 1]) != _ASSISTANT_ID:
        raise ValueError("not a single-turn chat example (prompt ending in <|assistant|>, then "
                         "a response masked 1 to the end)")
    if n <= max_len:
        return ids, mask
    keep = _kept(n, prompt, max_len)
    if keep is None:
        return None
    if isinstance(ids, np.ndarray):
        return ids[keep], np.asarray(mask)[keep]
    return [ids[k] for k in keep], [mask[k] for k in keep]


def truncate_prompt(ids: Sequence[int], max_len: int) -> list[int] | None:
    """A generation prompt (`encode_prompt`) cut to `max_len` tokens the way `truncate_example`
    cuts an example, the "\\n" after `<|assistant|>` kept like a response: the user text's tail
    goes first. None when the template tokens alone do not fit."""
    n = len(ids)
    if n < _TEMPLATE_HEAD + _TEMPLATE_TAIL + 1 or int(ids[n - 2]) != _ASSISTANT_ID:
        raise ValueError("not a generation prompt (ending in <|assistant|>, then one token)")
    if n <= max_len:
        return list(ids)
    keep = _kept(n, n - 1, max_len)
    return None if keep is None else [ids[k] for k in keep]


def _kept(n: int, prompt: int, max_len: int) -> np.ndarray | None:
    """Which of n tokens stay when the response starts at `prompt` and max_len < n: the role token,
    as much user text as fits, "\\n<|assistant|>" and the whole response (None: it cannot fit)."""
    response = n - prompt
    if _TEMPLATE_HEAD + _TEMPLATE_TAIL + response > max_len:
        return None
    head = max_len - response - _TEMPLATE_TAIL  # role token + as much user text as fits
    return np.r_[0:head, prompt - _TEMPLATE_TAIL:n]
