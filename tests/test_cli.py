"""The `minigpt` command line: generate, chat, export, and their one-line usage errors.

A tiny random GPT and a tiny byte-level BPE are built once per module in a temporary directory
(one instruction-tuned model directory, one base model directory). Most tests call `cli.main(argv)`
in-process (fast); a few run the real entry points (`python -m minigpt.generate`,
`python -m minigpt.cli chat`) as subprocesses to check exit codes and piped stdin end to end.
Expected outputs are computed with `minigpt.sample.generate` on the same ids, so the tests pin the
CLI's wiring (template, stop token, decoding), not the sampler's internals.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minigpt import cli, engine
from minigpt.template import TEMPLATE_NAME, encode_conversation, encode_prompt, user_content
from minigpt.checkpoint import load_model, save_model
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import (EOT, PAD, SPECIAL_TOKENS, decode, encode_text, save_tokenizer,
                               tokenizer_hash, train_tokenizer)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [
    "The river runs through the old city and the band plays on the bridge.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea. The sea is wide and the waves are blue.",
    "A king of the north built a great church near the forest road.",
] * 20
BLOCK_SIZE = 64


def _model_dir(path: Path, tok_file: Path, vocab_size: int, chat: bool, seed: int) -> Path:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=BLOCK_SIZE))
    with torch.no_grad():  # at the usual std 0.02 a random tied model just repeats its last token;
        for p in model.parameters():  # larger weights give varied text (partial UTF-8, specials too)
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    meta = {"tokenizer_hash": tokenizer_hash(tok_file), "stage": "finetune" if chat else "pretrain",
            "chat_template": TEMPLATE_NAME if chat else None}
    save_model(model, path, tokenizer_file=tok_file, meta=meta)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("cli")
    tok = train_tokenizer(CORPUS, vocab_size=320)
    assert tok.get_vocab_size() > len(SPECIAL_TOKENS) + 256
    tok_file = root / "tokenizer.json"
    save_tokenizer(tok, tok_file)
    other = root / "other_tokenizer.json"  # a different tokenizer (other merges): another hash
    save_tokenizer(train_tokenizer(CORPUS[:2] * 5, vocab_size=300), other)
    vocab = tok.get_vocab_size()
    return SimpleNamespace(
        root=root, tok=tok, other_tokenizer=other,
        chat=_model_dir(root / "chat", tok_file, vocab, chat=True, seed=0),
        base=_model_dir(root / "base", tok_file, vocab, chat=False, seed=1),
    )


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_module(module: str, *argv: str, stdin: str = "") -> SimpleNamespace:
    """Run `python -m module argv`; stdout/stderr decoded as UTF-8 with no newline translation
    (model text may hold a lone "\r")."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", module, *map(str, argv)], input=stdin.encode(),
                            env=env, capture_output=True, timeout=120, cwd=ROOT)
    return SimpleNamespace(returncode=result.returncode, stdout=result.stdout.decode(),
                           stderr=result.stderr.decode())


def greedy_text(model_dir: Path, ids: list[int], max_new_tokens: int) -> str:
    """What the CLI must print for `ids`: sample.generate, greedy, stopped at <|endoftext|>."""
    from minigpt.sample import generate

    model, tok, _ = load_model(model_dir, "cpu")
    eot = tok.token_to_id(EOT)
    new = generate(model, list(ids), max_new_tokens, temperature=0.0, stop_ids=[eot])
    if new and new[-1] == eot:
        new = new[:-1]
    assert eot not in new
    return decode(tok, new)


GREEDY = ["--temperature", "0", "--device", "cpu"]
SAMPLED = ["--temperature", "1.0", "--top_k", "0", "--top_p", "1.0", "--device", "cpu"]


# --- generate -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_greedy_chat_model_applies_template_and_matches_sampler(env, capsys):
    """`python -m minigpt.generate` (a subprocess) and `minigpt generate` (in-process) print the
    same greedy answer: the chat template applied, stopped at <|endoftext|>."""
    prompt = "What is the capital of France?"
    want = greedy_text(env.chat, encode_prompt(env.tok, prompt), 24) + "\n"
    args = ["--checkpoint_path", env.chat, "--prompt", prompt, "--max_new_tokens", "24", *GREEDY]
    result = run_module("minigpt.generate", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == want
    assert run_main(capsys, "generate", *args) == (0, want, "")


def test_raw_and_base_model_continue_text_after_endoftext(env, capsys):
    prompt = "The river"
    ids = [env.tok.token_to_id(EOT)] + encode_text(env.tok, prompt)
    for model_dir, extra in ((env.base, []), (env.chat, ["--raw"])):
        code, out, _ = run_main(capsys, "generate", "--checkpoint_path", model_dir, "--prompt", prompt,
                                "--max_new_tokens", 16, *GREEDY, *extra)
        assert code == 0
        assert out == prompt + greedy_text(model_dir, ids, 16) + "\n"  # echoed, then continued


def test_empty_prompt_allowed_for_base_model(env, capsys):
    code, out, _ = run_main(capsys, "generate", "--checkpoint_path", env.base, "--prompt", "",
                            "--max_new_tokens", 8, *GREEDY)
    assert code == 0
    assert out == greedy_text(env.base, [env.tok.token_to_id(EOT)], 8) + "\n"


def test_seed_reproducible(env, capsys):
    def sample(seed: int) -> str:
        code, out, _ = run_main(capsys, "generate", "--checkpoint_path", env.chat, "--prompt", "Hi",
                                "--max_new_tokens", 24, "--seed", seed, *SAMPLED)
        assert code == 0
        return out

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)  # 24 tokens from a near-uniform model: collisions are hopeless


def test_num_samples(env, capsys):
    args = ["generate", "--checkpoint_path", env.chat, "--prompt", "Hi", "--max_new_tokens", 12, *SAMPLED]
    code, out, _ = run_main(capsys, *args, "--seed", 3, "--num_samples", 3)
    assert code == 0
    samples = out.split("\n---\n")
    assert len(samples) == 3
    assert len(set(samples)) == 3  # one generator for the run: samples differ
    _, again, _ = run_main(capsys, *args, "--seed", 3, "--num_samples", 3)
    assert again == out
    _, streamed, _ = run_main(capsys, *args, "--seed", 3, "--num_samples", 3, "--stream")
    assert len(set(streamed.split("\n---\n"))) == 3  # one sample at a time: also independent


@pytest.mark.parametrize("flags", [[*GREEDY, "--num_samples", "2"], [*SAMPLED, "--seed", "7"]],
                         ids=["greedy", "sampled"])
def test_stream_equals_non_stream(env, capsys, flags):
    """Streaming prints what a plain run prints. (Several sampled samples are one batched decode
    without --stream, which draws its random numbers in another order than one sample at a time.)"""
    args = ["generate", "--checkpoint_path", env.chat, "--prompt", "Write a poem", "--max_new_tokens", 32,
            *flags]
    code, plain, _ = run_main(capsys, *args)
    assert code == 0
    code, streamed, _ = run_main(capsys, *args, "--stream")
    assert code == 0
    assert streamed == plain


def test_context_overflow_warns_once_on_one_line(env, capsys):
    prompt = " ".join(CORPUS[:3])
    assert len(encode_text(env.tok, prompt)) > BLOCK_SIZE
    code, out, err = run_main(capsys, "generate", "--checkpoint_path", env.base, "--prompt", prompt,
                              "--max_new_tokens", 40, "--num_samples", 2, *GREEDY)
    assert code == 0 and out.startswith(prompt)  # the notice goes to stderr, once per run
    assert len(err.splitlines()) == 1 and err.startswith("warning: ") and "block_size" in err


def test_text_stream_holds_back_partial_characters(env):
    """Multi-byte characters split over byte-level tokens print whole, never as U+FFFD."""
    text = "naïve 日本語 🙂 ok"
    ids = encode_text(env.tok, text)
    assert len(ids) > len(text.encode()) // 2  # the corpus has none of these: mostly byte tokens
    stream = engine.TextStream(env.tok)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_generate_shim_is_cli_generate():
    from minigpt import generate

    assert generate.main(["--temperature", "-1"]) == cli.main(["generate", "--temperature", "-1"]) == 2


# --- usage errors: one line on stderr naming the flag, exit code 2 ------------------------------

BAD_FLAGS = {
    "temperature": (["--temperature", "-0.5"], "--temperature"),
    "top_p_zero": (["--top_p", "0"], "--top_p"),
    "top_p_above_one": (["--top_p", "1.5"], "--top_p"),
    "repetition_penalty": (["--repetition_penalty", "0"], "--repetition_penalty"),
    "max_new_tokens": (["--max_new_tokens", "0"], "--max_new_tokens"),
    "empty_prompt": (["--prompt", "  "], "--prompt"),
    "missing_checkpoint": (["--checkpoint_path", "{root}/nowhere"], "--checkpoint_path"),
    "wrong_format_checkpoint": (["--checkpoint_path", "{root}/junk"], "--checkpoint_path"),
    "tokenizer_mismatch": (["--tokenizer_path", "{other}"], "--tokenizer_path"),
    "missing_tokenizer": (["--tokenizer_path", "{root}/none.json"], "--tokenizer_path"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_input_one_line_exit_2(env, capsys, case):
    junk = env.root / "junk"
    junk.mkdir(exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json"):
        (junk / name).write_text("not this format")
    (junk / "config.json").write_text(json.dumps({"hello": "world"}))
    flags, flag = BAD_FLAGS[case]
    flags = [f.format(root=env.root, other=env.other_tokenizer) for f in flags]
    code, out, err = run_main(capsys, "generate", "--checkpoint_path", env.chat, "--prompt", "Hi",
                              "--device", "cpu", *flags)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], err


def test_matching_tokenizer_path_is_accepted(env, capsys):
    args = ["generate", "--checkpoint_path", env.chat, "--prompt", "Hi", "--max_new_tokens", 8, *GREEDY]
    code, out, _ = run_main(capsys, *args, "--tokenizer_path", env.root / "tokenizer.json")
    assert code == 0
    assert run_main(capsys, *args)[1] == out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is absent")
def test_unavailable_device_is_usage_error(env, capsys):
    code, _, err = run_main(capsys, "generate", "--checkpoint_path", env.chat, "--prompt", "Hi",
                            "--device", "cuda")
    assert code == 2 and err.startswith("error: --device cuda") and err.count("\n") == 1


@pytest.mark.parametrize("device", ["cuda:", "cuda:x", "gpu", "cpu:0"])
def test_bad_device_name_is_refused_like_the_params_key(env, capsys, device):
    """One rule for `--device` and params' `*.device` (config.device_problem): `cuda:` with no
    index was accepted by the CLI alone. Same words after the flag or key."""
    from minigpt.config import ConfigError, parse_params

    with pytest.raises(ConfigError) as e:
        parse_params({"eval": {"device": device}})
    assert str(e.value).startswith("eval.device: ")
    why = str(e.value).removeprefix("eval.device: ")
    for command in ("generate", "chat", "serve"):
        code, out, err = run_main(capsys, command, "--checkpoint_path", env.chat, "--device", device)
        assert (code, out, err) == (2, "", f"error: argument --device: {why}\n")


def test_bad_input_exit_code_from_entry_point(env):
    result = run_module("minigpt.generate", "--checkpoint_path", env.chat, "--top_p", "2")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: argument --top_p: must be in (0, 1], got 2"]


# --- chat ---------------------------------------------------------------------------------------

def chat_reply(env, messages: list[dict], max_new_tokens: int) -> str:
    return greedy_text(env.chat, encode_conversation(env.tok, messages), max_new_tokens)


@pytest.mark.slow
def test_chat_piped_reset_and_quit(env):
    """Subprocess with piped stdin: /reset forgets the history, /quit stops reading."""
    stdin = "Hello there\n/reset\nHello there\n/quit\nnever answered\n"
    result = run_module("minigpt.cli", "chat", "--checkpoint_path", env.chat, "--max_new_tokens", 10,
                        *GREEDY, stdin=stdin)
    assert result.returncode == 0, result.stderr
    first = chat_reply(env, [{"role": "user", "content": "Hello there"}], 10)
    assert result.stdout == f"{first}\n{first}\n"  # same answer: the second turn starts fresh
    assert "[conversation cleared]" in result.stderr


def test_chat_keeps_history_and_ends_at_eof(env, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nWhat is the sea?\n"))  # EOF = Ctrl-D
    code, out, err = run_main(capsys, "chat", "--checkpoint_path", env.chat, "--max_new_tokens", 8,
                              *GREEDY)
    assert code == 0
    messages = [{"role": "user", "content": "Hello"}]
    first = chat_reply(env, messages, 8)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is the sea?"}]
    assert out == f"{first}\n{chat_reply(env, messages, 8)}\n"  # the blank line is ignored
    assert "dropped" not in err


def test_chat_drops_oldest_turns_to_fit_context(env, capsys, monkeypatch):
    long_line = "The river runs through the old city and the band plays on the bridge."
    assert len(encode_prompt(env.tok, long_line)) < BLOCK_SIZE - 16
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long_line}\n{long_line}\n{long_line}\n"))
    code, out, err = run_main(capsys, "chat", "--checkpoint_path", env.chat, "--max_new_tokens", 16,
                              *GREEDY)
    assert code == 0
    assert "[dropped the oldest" in err
    assert out.count("\n") >= 3


def test_fit_conversation_keeps_system_and_last_user(env):
    turns = [{"role": "system", "content": "Be brief."}]
    for i in range(4):
        turns += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    turns.append({"role": "user", "content": "last question"})
    messages = list(turns)
    ids, dropped = engine.fit_conversation(env.tok, messages, limit=1)  # nothing fits: drop all it may
    assert dropped == 4
    assert messages == [turns[0], turns[-1]]
    assert ids == encode_conversation(env.tok, messages)
    messages = list(turns)
    _, dropped = engine.fit_conversation(env.tok, messages, limit=10_000)
    assert dropped == 0 and messages == turns


@pytest.mark.slow
def test_chat_overflow_warning_is_its_own_line_on_a_shared_screen(env):
    """stdout and stderr into one pipe (a terminal shows both): the context-overflow notice comes
    after the streamed answer's line, never inside it."""
    question = " ".join(CORPUS[:2])[:150]
    env_vars = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "minigpt.cli", "chat", "--checkpoint_path",
                             str(env.chat), "--max_new_tokens", "60", *GREEDY],
                            input=(question + "\n").encode(), env=env_vars, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=120, cwd=ROOT)
    assert result.returncode == 0
    merged = result.stdout.decode()
    answer = chat_reply(env, [{"role": "user", "content": question}], 60)
    assert len(encode_conversation(env.tok, [{"role": "user", "content": question}])) + \
        len(encode_text(env.tok, answer)) > BLOCK_SIZE  # the window did slide mid-answer
    warning = next(line for line in merged.split("\n") if "block_size" in line)
    assert warning.startswith("warning: context of ")
    assert merged == f"{answer}\n{warning}\n"


def test_chat_ctrl_c_stops_the_answer_not_the_chat(env, capsys, monkeypatch):
    import minigpt.sample

    calls = []

    def fake_generate(model, ids, max_new_tokens, *, on_token=None, **kwargs):
        calls.append(list(ids))
        word = encode_text(env.tok, " partial")
        for t in word:
            on_token(t)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the first answer
        return word

    monkeypatch.setattr(minigpt.sample, "generate", fake_generate)
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n"))
    code, out, err = run_main(capsys, "chat", "--checkpoint_path", env.chat, *GREEDY)
    assert code == 0
    assert "[stopped]" in err
    assert out == " partial" + " partial\n"
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": " partial"},
               {"role": "user", "content": "two"}]
    assert calls[1] == encode_conversation(env.tok, history)  # the partial answer stays in context


# --- export -------------------------------------------------------------------------------------

def test_export_hf_loads_in_transformers_with_same_chat_ids(env, capsys, tmp_path):
    out_dir = tmp_path / "hf"
    code, _, err = run_main(capsys, "export", "--format", "hf", out_dir, "--checkpoint_path", env.chat)
    assert code == 0, err
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    assert tok.eos_token == EOT and tok.pad_token == PAD
    for instruction, context in (("What is the capital of France?", ""),
                                 ("Summarize this.", "The sea is wide.\nThe waves are blue.")):
        messages = [{"role": "user", "content": user_content(instruction, context)}]
        got = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(got, list):  # transformers 5 returns a BatchEncoding by default
            got = got["input_ids"]
        assert got == encode_prompt(env.tok, instruction, context)
    ours, _, _ = load_model(env.chat, "cpu")
    ids = torch.tensor([encode_prompt(env.tok, "Hi")])
    with torch.no_grad():
        want, _ = ours(ids)
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_export_missing_checkpoint_is_usage_error(capsys, tmp_path):
    code, _, err = run_main(capsys, "export", tmp_path / "hf", "--checkpoint_path", tmp_path / "none")
    assert code == 2
    assert err.startswith("error: --checkpoint_path") and err.count("\n") == 1


# --- --dtype (lower-precision CPU decoding, minigpt.quant) ---------------------------------------

@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="x86 kernels")
def test_dtype_reaches_the_decoder_of_generate_chat_and_serve(env, capsys, monkeypatch):
    from minigpt.sample import generate

    seen = []
    real_load = cli.load

    def spy(*args, **kwargs):
        m = real_load(*args, **kwargs)
        seen.append(m.model.decode_dtype)
        return m

    monkeypatch.setattr(cli, "load", spy)
    prompt = "What is the capital of France?"
    model, tok, _ = load_model(env.chat, "cpu")
    model.decode_dtype = "int8"
    new = generate(model, encode_prompt(env.tok, prompt), 24, temperature=0.0, stop_ids=[tok.token_to_id(EOT)])
    want = decode(tok, [t for t in new if t != tok.token_to_id(EOT)]) + "\n"
    args = ["--checkpoint_path", env.chat, "--prompt", prompt, "--max_new_tokens", "24", *GREEDY]
    assert run_main(capsys, "generate", *args, "--dtype", "int8") == (0, want, "")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert run_main(capsys, "chat", "--checkpoint_path", env.chat, *GREEDY, "--dtype", "fp16")[0] == 0
    import minigpt.serve

    monkeypatch.setattr(minigpt.serve, "serve", lambda m, *a: seen.append(m.model.decode_dtype))
    assert run_main(capsys, "serve", "--checkpoint_path", env.chat, "--device", "cpu", "--dtype", "int8")[0] == 0
    assert run_main(capsys, "generate", *args)[0] == 0  # default: fp32, the exact path
    assert seen == ["int8", "fp16", "int8", "int8", "fp32"]


def test_dtype_off_cpu_or_unknown_is_usage_error(env, capsys, monkeypatch):
    import minigpt.runtime

    code, _, err = run_main(capsys, "generate", "--checkpoint_path", env.chat, "--dtype", "int4")
    assert code == 2 and err.startswith("error: argument --dtype") and err.count("\n") == 1
    monkeypatch.setattr(minigpt.runtime, "resolve_device", lambda *a, **k: torch.device("cuda"))
    code, _, err = run_main(capsys, "generate", "--checkpoint_path", env.chat, "--dtype", "int8")
    assert code == 2 and err == "error: --dtype int8 is for CPU decoding; use it with --device cpu (got cuda)\n"
    import minigpt.quant

    monkeypatch.undo()
    monkeypatch.setattr(minigpt.quant, "available", lambda dtype: "no kernels in this build")
    code, _, err = run_main(capsys, "generate", "--checkpoint_path", env.chat, "--device", "cpu", "--dtype", "fp16")
    assert code == 2 and err == "error: --dtype fp16: no kernels in this build\n"
