"""`minigpt export --format gguf`: the file's metadata, and transformers' GGUF loader as the reference.

transformers de-quantizes a GGUF file and undoes llama.cpp's q/k permutation, so equal logits
there mean the weights, their layout, the tied embedding and the RoPE settings are what llama.cpp
reads. A slow test runs llama.cpp itself (llama-cpp-python) when it is installed.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")

from minigpt import cli  # noqa: E402
from minigpt.template import CHAT_TEMPLATE_JINJA, encode_prompt  # noqa: E402
from minigpt.checkpoint import load_model  # noqa: E402
from minigpt.sample import generate  # noqa: E402
from minigpt.tokenizer import EOT, PAD, save_tokenizer, train_tokenizer  # noqa: E402
from test_cli import CORPUS, _model_dir  # noqa: E402

# llama.cpp's regex for LLAMA_VOCAB_PRE_TYPE_GPT2 ("gpt-2"), from src/llama-vocab.cpp.
LLAMA_CPP_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
TOL = {"f32": 1e-4, "f16": 0.05, "q8_0": 0.5}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    tok = train_tokenizer(CORPUS, vocab_size=320)
    save_tokenizer(tok, root / "tokenizer.json")
    chat = _model_dir(root / "chat", root / "tokenizer.json", tok.get_vocab_size(), chat=True, seed=0)
    model, tok, _ = load_model(chat, "cpu")
    files = {}
    for dtype in TOL:
        assert cli.main(["export", str(root / "out"), "--format", "gguf", "--dtype", dtype,
                         "--checkpoint_path", str(chat)]) == 0
        files[dtype] = root / "out" / f"chat-{dtype}.gguf"
    return SimpleNamespace(root=root, model=model.eval(), tok=tok, files=files)


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def field(reader, key):
    f = reader.fields[key]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]


def test_metadata_tokenizer_and_tied_embedding(env):
    r = gguf.GGUFReader(env.files["f32"])
    assert field(r, "general.architecture") == "llama"
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert field(r, "tokenizer.chat_template") == CHAT_TEMPLATE_JINJA
    eot, pad = env.tok.token_to_id(EOT), env.tok.token_to_id(PAD)
    assert field(r, "tokenizer.ggml.eos_token_id") == eot
    assert field(r, "tokenizer.ggml.padding_token_id") == pad
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    c = env.model.config
    assert field(r, "llama.context_length") == c.block_size
    assert field(r, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert field(r, "llama.rope.dimension_count") == c.n_embd // c.n_head
    tokens = field(r, "tokenizer.ggml.tokens")
    assert tokens[:5] == ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
    assert tokens == [env.tok.id_to_token(i) for i in range(len(tokens))]
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied: llama.cpp reuses it
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(env.files["q8_0"]).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_llama_cpp_gpt2_regex_splits_like_our_pretokenizer(env):
    """`tokenizer.ggml.pre = "gpt-2"` is right only if llama.cpp's regex pre-splits text as our
    ByteLevel pre-tokenizer does (llama.cpp keeps unmatched gaps as their own pieces)."""
    import regex

    def llama_cpp_split(text: str) -> list[tuple[int, int]]:
        spans, pos = [], 0
        for m in regex.finditer(LLAMA_CPP_GPT2_REGEX, text):
            if m.start() > pos:
                spans.append((pos, m.start()))
            spans.append(m.span())
            pos = m.end()
        return spans + ([(pos, len(text))] if pos < len(text) else [])

    pre = env.tok.pre_tokenizer
    for text in ["Hello world, it's 2024!  Two  spaces\tand\ttabs\n\nnew  \n lines   ",
                 " leading space", "don't won't I'd we'll they've", "x1 22 333 ...!!  \r\n",
                 "Ünïcödé 中文字符 emoji 🙂🙂 mixed123abc", "a \tb  \t c\u00a0d"]:
        ours = [span for _, span in pre.pre_tokenize_str(text)]
        assert llama_cpp_split(text) == ours, text


def test_hf_gguf_tokenizer_equals_ours(env):
    from transformers import AutoTokenizer

    path = env.files["f32"]
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "The river runs through the old city!  Hello\n\n world 123"
    assert hf(text, add_special_tokens=False)["input_ids"] == env.tok.encode(text).ids
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        "<|user|>\nWhat is the capital of France?\n<|assistant|>\n"


@pytest.mark.parametrize("dtype", list(TOL))
def test_transformers_gguf_logits_and_greedy_tokens(env, dtype):
    prompt = encode_prompt(env.tok, "What is the capital of France?")
    ours = generate(env.model, prompt, 20, temperature=0.0)
    ids = torch.tensor([prompt + ours])
    with torch.no_grad():
        want = env.model(ids)[0][0]
        got = hf_model(env.files[dtype])(ids).logits[0]
    err = (got - want).abs().max().item()
    assert err < TOL[dtype], f"{dtype}: max |logit diff| {err}"
    # Greedy tokens, teacher-forced along our greedy path: where our top-2 margin is larger than
    # twice the error, the GGUF model must choose the same token (f32: everywhere).
    top2 = want.topk(2, dim=-1).values
    stable = (top2[:, 0] - top2[:, 1]) > 2 * err
    start = len(prompt) - 1
    picks = got.argmax(-1)[start:-1]
    assert stable[start:-1].sum() >= len(ours) // 4  # the check is not vacuous
    assert torch.equal(picks[stable[start:-1]], torch.tensor(ours)[stable[start:-1]])
    if dtype == "f32":  # and transformers' own greedy generate
        hf = hf_model(env.files[dtype])
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=1)
        assert out[0, len(prompt):].tolist() == ours


def test_bad_dtype_is_usage_error(env, capsys):
    code = cli.main(["export", str(env.root / "x"), "--format", "gguf", "--dtype", "q4",
                     "--checkpoint_path", str(env.root / "chat")])
    assert code == 2 and "--dtype" in capsys.readouterr().err


@pytest.mark.slow
def test_llama_cpp_generates_our_greedy_tokens(env):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    prompt = encode_prompt(env.tok, "What is the capital of France?")
    ours = generate(env.model, prompt, 20, temperature=0.0)
    llm = llama_cpp.Llama(model_path=str(env.files["f32"]), n_ctx=64, verbose=False, n_threads=1)
    text = env.tok.decode(prompt, skip_special_tokens=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
    got = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(token)
        if len(got) == len(ours):
            break
    assert got == ours


@pytest.mark.parametrize("knob,value", [("qk_norm", True), ("mlp", "relu2"), ("logit_softcap", 30.0)])
def test_non_llama_models_are_refused_before_writing(env, tmp_path, capsys, knob, value):
    """llama.cpp would read these as a plain Llama (other logits) or the export crashed (relu2)."""
    from minigpt.checkpoint import save_model
    from minigpt.model import GPT, GPTConfig
    from minigpt.tokenizer import tokenizer_hash

    tok_file = env.root / "tokenizer.json"
    model = GPT(GPTConfig(vocab_size=env.model.config.vocab_size, n_layer=1, n_head=2, n_embd=32,
                          block_size=32, **{knob: value}))
    save_model(model, tmp_path / "m", tokenizer_file=tok_file,
               meta={"tokenizer_hash": tokenizer_hash(tok_file), "stage": "pretrain",
                     "chat_template": None})
    out = tmp_path / "out"
    code = cli.main(["export", str(out), "--format", "gguf", "--checkpoint_path", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"model.{knob}=" in err and "llama" in err, err
    assert not out.exists() or not any(out.iterdir())  # neither a .gguf nor a .tmp


def test_gguf_chat_template_renders_exactly_our_prompt_ids(env):
    """What llama.cpp --jinja (or any Jinja engine) builds from the GGUF's template is our prompt,
    token for token, "\\n" tokens included (the built-in GLMEDGE guess dropped them)."""
    jinja2 = pytest.importorskip("jinja2")
    from transformers import AutoTokenizer

    from minigpt.template import encode_conversation

    def raise_exception(message):
        raise ValueError(message)

    stored = field(gguf.GGUFReader(env.files["f32"]), "tokenizer.chat_template")
    path = env.files["f32"]
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)  # the GGUF's own vocabulary
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n\nthere"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "A poem?"}],
    ]
    for messages in conversations:
        env_ = jinja2.Environment()
        env_.globals["raise_exception"] = raise_exception
        text = env_.from_string(stored).render(messages=messages, add_generation_prompt=True)
        want = encode_conversation(env.tok, messages, add_generation_prompt=True)
        assert hf(text, add_special_tokens=False)["input_ids"] == want
        assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    assert encode_prompt(env.tok, "What is the capital of France?") == \
        hf(hf.apply_chat_template(conversations[0], add_generation_prompt=True, tokenize=False),
           add_special_tokens=False)["input_ids"]
