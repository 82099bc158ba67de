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


# ---------------------------------------------------------------------------- llama.cpp without --jinja

# llama.cpp's built-in template names and `llm_chat_detect_template`, transcribed in order from
# src/llama-chat.cpp (github.com/ggml-org/llama.cpp, commit 0192c1297ddde77b0d9688179779e4218cf04db4).
# Without --jinja llama.cpp formats a chat with the first built-in format this guesses from the
# GGUF's tokenizer.chat_template; UNKNOWN makes it refuse ("this custom template is not supported,
# try using --jinja", common/chat.cpp), which is the only safe outcome for our format.
LLAMA_CPP_TEMPLATE_NAMES = (
    "chatml llama2 llama2-sys llama2-sys-bos llama2-sys-strip mistral-v1 mistral-v3 "
    "mistral-v3-tekken mistral-v7 mistral-v7-tekken phi3 phi4 falcon3 zephyr monarch gemma orion "
    "openchat vicuna vicuna-orca deepseek deepseek2 deepseek3 command-r llama3 chatglm3 chatglm4 "
    "glmedge minicpm exaone3 exaone4 rwkv-world granite gigachat megrez yandex bailing llama4 "
    "smolvlm hunyuan-moe hunyuan-dense kimi-k2").split()


def llama_cpp_detect(t: str) -> str:
    """The built-in format llama.cpp would guess for template `t` (a test oracle, not a port:
    the variant picked inside a family is simplified, the family and its order are not)."""
    has = t.__contains__
    if t in LLAMA_CPP_TEMPLATE_NAMES:
        return t
    rules = [
        ("chatml/phi4/smolvlm", has("<|im_start|>")),
        ("mistral/llama2", t.startswith("mistral") or has("[INST]")),
        ("phi3", has("<|assistant|>") and has("<|end|>")),
        ("chatglm4", has("[gMASK]<sop>")),
        ("falcon3" if has("</s>") else "glmedge", has("<|assistant|>") and has("<|user|>")),
        ("glmedge", has("<|{{ item['role'] }}|>") and has("<|begin_of_image|>")),
        ("zephyr", has("<|user|>") and has("<|endoftext|>")),
        ("monarch", has("bos_token + message['role']")),
        ("gemma", has("<start_of_turn>")),
        ("orion", has("'\\n\\nAssistant: ' + eos_token")),
        ("openchat", has("GPT4 Correct ")),
        ("vicuna", has("USER: ") and has("ASSISTANT: ")),
        ("deepseek", has("### Instruction:") and has("<|EOT|>")),
        ("command-r", has("<|START_OF_TURN_TOKEN|>") and has("<|USER_TOKEN|>")),
        ("llama3", has("<|start_header_id|>") and has("<|end_header_id|>")),
        ("chatglm3", has("[gMASK]sop")),
        ("minicpm", has("<用户>")),
        ("deepseek2", has("'Assistant: ' + message['content'] + eos_token")),
        ("deepseek3", has("<｜Assistant｜>") and has("<｜User｜>") and has("<｜end▁of▁sentence｜>")),
        ("exaone", has("[|system|]") and has("[|assistant|]") and has("[|endofturn|]")),
        ("rwkv-world", has("rwkv-world") or has("{{- 'User: ' + message['content']|trim + '\\n\\n' -}}")),
        ("granite", has("<|start_of_role|>")),
        ("gigachat", has("message['role'] + additional_special_tokens[0] + message['content'] + "
                         "additional_special_tokens[1]")),
        ("megrez", has("<|role_start|>")),
        ("yandex", has(" Ассистент:")),
        ("bailing", has("<role>ASSISTANT</role>") and has("'HUMAN'")),
        ("llama4", has("<|header_start|>") and has("<|header_end|>")),
        ("dots1", has("<|endofuserprompt|>")),
        ("hunyuan-moe", has("<|startoftext|>") and has("<|extra_4|>")),
        ("hunyuan-dense", has("<｜hy_place▁holder▁no▁2｜>") and has("<｜hy_place▁holder▁no▁3｜>")),
        ("kimi-k2", has("<|im_assistant|>assistant<|im_middle|>")),
    ]
    return next((name for name, hit in rules if hit), "UNKNOWN")


def test_llama_cpp_oracle_reproduces_the_reported_misdetection():
    """The template exported before issue 25 (literal role tags) was guessed as GLMEDGE, whose
    format drops our "\\n" after each role tag: 17 prompt tokens instead of 19 in real llama.cpp."""
    old = ("{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
           "{{- '<|user|>\\n' + message['content'] + '\\n' -}}{%- endif -%}{%- endfor -%}"
           "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}")
    assert llama_cpp_detect(old) == "glmedge"
    assert llama_cpp_detect("{{ '<|im_start|>' + message['role'] }}") == "chatml/phi4/smolvlm"
    assert llama_cpp_detect("gemma") == "gemma"


def test_our_template_triggers_no_llama_cpp_builtin_format():
    import re

    assert llama_cpp_detect(CHAT_TEMPLATE_JINJA) == "UNKNOWN"
    # and no literal special token but the end of a turn: a future heuristic keyed on a role tag
    # (the way llama.cpp's are) cannot match either
    assert re.findall(r"<\|\w+\|>", CHAT_TEMPLATE_JINJA) == ["<|endoftext|>"]
