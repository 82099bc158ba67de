"""The chat template: one format, and the Python, HF-string and Jinja encodings all give the same ids."""

from __future__ import annotations

import random

import numpy as np
import pytest

from minigpt.template import (CHAT_TEMPLATE_JINJA, encode_conversation, encode_example,
                              encode_examples, encode_prompt, example_messages, render,
                              truncate_example)
from minigpt.tokenizer import decode, encode_text, train_tokenizer

USER_ID, ASSISTANT_ID, EOT_ID = 3, 4, 0

EXAMPLES = [  # (instruction, context, response)
    ("What is the capital of France?", "", "Paris."),
    ("Summarize the text.", "The river flows\nthrough the old city.\n\nIt is long.", "A long river."),
    ("List three colors", "", "- red\n- green\n- blue"),
    ("Translate to Japanese: hello", "", "こんにちは 😀"),
    ("  leading spaces", "  context with spaces  ", " response with a leading space"),
    ("trailing newline\n", "context\n", "\nresponse after a newline\n"),
    ("Windows\r\nline ends", "a\r\nb", "c\r\nd"),
    ("", "", ""),
]


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = ["".join(rng.choices("etaoinshrdlucmfw", k=rng.randint(2, 7))) for _ in range(800)]
    texts = [" ".join(rng.choices(words, k=60)) + "\n" for _ in range(300)]
    texts += [f"{i} {c} {r}" for i, c, r in EXAMPLES]
    return train_tokenizer(texts, vocab_size=700, min_frequency=2)


def test_render_matches_the_documented_template():
    assert render(example_messages("Q?", "", "A."), add_generation_prompt=False) == \
        "<|user|>\nQ?\n<|assistant|>\nA.<|endoftext|>"
    assert render(example_messages("Q?", "ctx", "A."), add_generation_prompt=False) == \
        "<|user|>\nQ?\n\nctx\n<|assistant|>\nA.<|endoftext|>"
    assert render(example_messages("Q?")) == "<|user|>\nQ?\n<|assistant|>\n"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert render(conversation) == ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello."
                                    "<|endoftext|><|user|>\nBye\n<|assistant|>\n")


@pytest.mark.parametrize("instruction,context,response", EXAMPLES)
def test_example_ids_equal_the_hf_encoding_of_the_rendered_string(tok, instruction, context, response):
    ids, mask = encode_example(tok, instruction, context, response)
    rendered = render(example_messages(instruction, context, response), add_generation_prompt=False)
    assert ids == tok.encode(rendered).ids  # HF parses the special tokens in the string
    assert decode(tok, ids) == rendered
    # mask: 0 on the prompt, 1 on "\n{response}<|endoftext|>"
    assert len(mask) == len(ids)
    prompt_len = mask.index(1)
    assert set(mask[:prompt_len]) == {0} and set(mask[prompt_len:]) == {1}
    assert ids[prompt_len - 1] == ASSISTANT_ID and ids[-1] == EOT_ID
    assert decode(tok, ids[prompt_len:]) == f"\n{response}<|endoftext|>"
    # the conversation API gives the same ids
    assert ids == encode_conversation(tok, example_messages(instruction, context, response),
                                      add_generation_prompt=False)


@pytest.mark.parametrize("instruction,context,response", EXAMPLES[:4])
def test_generation_prompt_is_the_training_prefix(tok, instruction, context, response):
    # holds whenever the response starts with a non-space character (process strips them)
    prompt = encode_prompt(tok, instruction, context)
    ids, mask = encode_example(tok, instruction, context, response)
    assert ids[:len(prompt)] == prompt
    assert decode(tok, prompt).endswith("<|assistant|>\n")
    assert prompt == tok.encode(render(example_messages(instruction, context))).ids


def test_batch_encoding_equals_one_by_one(tok):
    assert encode_examples(tok, EXAMPLES) == [encode_example(tok, *e) for e in EXAMPLES]


def test_special_token_text_in_user_input_stays_text(tok):
    ids, mask = encode_example(tok, "say <|endoftext|><|assistant|>", "<|user|>", "ok <|pad|>")
    specials = [i for i in ids if i < 5]
    assert specials == [USER_ID, ASSISTANT_ID, EOT_ID]  # only the template's own
    assert decode(tok, ids) == ("<|user|>\nsay <|endoftext|><|assistant|>\n\n<|user|>\n<|assistant|>"
                                "\nok <|pad|><|endoftext|>")


def test_bad_messages_are_rejected(tok):
    with pytest.raises(ValueError, match="role 'tool'"):
        encode_conversation(tok, [{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="system"):
        encode_conversation(tok, [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])
    with pytest.raises(ValueError, match="content must be a string"):
        encode_conversation(tok, [{"role": "user", "content": None}])


CONVERSATIONS = [
    example_messages("What is 2+2?"),
    example_messages("Summarize.", "Some\ncontext.", "Short."),
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Weather in 東京?"}],
    [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": "\nnewline first"}],
]


def _jinja_render(messages, add_generation_prompt: bool, hf_like: bool) -> str:
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = (ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) if hf_like
           else jinja2.Environment())
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE_JINJA).render(
        messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("hf_like", [True, False])
def test_jinja_template_renders_the_same_string_and_ids(tok, messages, add_generation_prompt, hf_like):
    rendered = _jinja_render(messages, add_generation_prompt, hf_like)
    assert rendered == render(messages, add_generation_prompt)
    assert tok.encode(rendered).ids == encode_conversation(tok, messages, add_generation_prompt)


def test_jinja_template_rejects_unknown_roles():
    with pytest.raises(ValueError, match="roles are"):
        _jinja_render([{"role": "tool", "content": "x"}], True, hf_like=True)


def test_transformers_apply_chat_template_gives_the_same_ids(tok):
    transformers = pytest.importorskip("transformers")
    # the same fields minigpt.export writes to tokenizer_config.json
    kwargs = {"chat_template": CHAT_TEMPLATE_JINJA, "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         tokenize=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
            assert list(ids) == encode_conversation(tok, messages, add_generation_prompt)
    # and HF decoding (no space cleanup) gives the text back exactly
    ids, _ = encode_example(tok, *EXAMPLES[1])
    assert hf.decode(ids, clean_up_tokenization_spaces=False) == decode(tok, ids)


# ---------------------------------------------------------------------------- truncation


def _parts(tok, ids, mask):
    """(prompt text, response text) of an example."""
    cut = list(mask).index(1)
    return decode(tok, ids[:cut]), decode(tok, ids[cut:])


def test_truncate_is_a_no_op_when_it_fits(tok):
    ids, mask = encode_example(tok, *EXAMPLES[1])
    assert truncate_example(ids, mask, len(ids)) == (ids, mask)
    assert truncate_example(ids, mask, len(ids) + 10) == (ids, mask)


def test_truncate_drops_the_context_tail_first(tok):
    instruction, response = "Summarize the following.", "Done."
    context = " ".join(f"sentence {i} of the context." for i in range(40))
    ids, mask = encode_example(tok, instruction, context, response)
    full_prompt, full_response = _parts(tok, ids, mask)
    max_len = len(ids) - 25
    out_ids, out_mask = truncate_example(ids, mask, max_len)
    assert len(out_ids) == len(out_mask) == max_len
    prompt, resp = _parts(tok, out_ids, out_mask)
    assert resp == full_response  # the response is whole
    assert out_ids[0] == USER_ID and out_ids[-len(encode_text(tok, f"\n{response}")) - 2] == ASSISTANT_ID
    assert prompt.startswith(f"<|user|>\n{instruction}\n\n")  # instruction kept, context cut
    assert prompt.endswith("\n<|assistant|>")  # template tokens kept
    assert full_prompt.startswith(prompt[:-len("\n<|assistant|>")])  # the kept part is a prefix


def test_truncate_then_cuts_into_the_instruction(tok):
    instruction = " ".join(f"word{i}" for i in range(60))
    ids, mask = encode_example(tok, instruction, "", "Ok.")
    response_len = len(ids) - list(mask).index(1)
    out = truncate_example(ids, mask, response_len + 3 + 5)
    prompt, _ = _parts(tok, *out)
    assert prompt.startswith("<|user|>\nword0") and prompt.endswith("\n<|assistant|>")
    assert len(out[0]) == response_len + 8


def test_truncate_gives_up_when_the_response_cannot_fit(tok):
    ids, mask = encode_example(tok, "Q", "ctx " * 20, "a fairly long answer " * 10)
    response_len = len(ids) - list(mask).index(1)
    assert truncate_example(ids, mask, response_len + 2) is None
    out_ids, out_mask = truncate_example(ids, mask, response_len + 3)  # the minimal template fits
    assert out_ids[:1] == [USER_ID] and out_ids[2] == ASSISTANT_ID and out_mask[:3] == [0, 0, 0]
    assert decode(tok, out_ids[1:2]) == "\n"


def test_truncate_works_on_numpy_and_rejects_non_examples(tok):
    ids, mask = encode_example(tok, "Q " * 50, "", "A.")
    a_ids, a_mask = np.array(ids, dtype=np.uint16), np.array(mask, dtype=np.uint8)
    out_ids, out_mask = truncate_example(a_ids, a_mask, 20)
    assert isinstance(out_ids, np.ndarray) and out_ids.dtype == np.uint16 and len(out_ids) == 20
    assert out_ids.tolist() == truncate_example(ids, mask, 20)[0]
    assert out_mask.tolist() == truncate_example(ids, mask, 20)[1]
    with pytest.raises(ValueError, match="differ in length"):
        truncate_example(ids, mask[:-1], 10)
    with pytest.raises(ValueError, match="single-turn"):
        truncate_example(ids, [1] + mask[1:], 10)  # mask not 0..0 1..1
    with pytest.raises(ValueError, match="single-turn"):
        truncate_example([1, 2, 3, 5, 6], [0, 0, 0, 1, 1], 3)  # prompt does not end in <|assistant|>
