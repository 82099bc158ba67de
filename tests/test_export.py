"""Export to a Hugging Face LlamaForCausalLM directory: files, weights, and equivalence in transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from minigpt.export import export_hf, hf_state_dict
from minigpt.model import GPT, GPTConfig
from minigpt.sample import generate
from minigpt.tokenizer import EOT, PAD, SPECIAL_TOKENS

V = 320
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tmp = tmp_path_factory.mktemp("export")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp / "tokenizer.json"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=4, n_embd=32, block_size=32,
                          rope_theta=500.0, norm_eps=1e-6)).eval()
    with torch.no_grad():  # non-trivial norms and sharper logits, so a wrong mapping shows
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    out = export_hf(model, tmp / "tokenizer.json", tmp / "hf", chat_template=TEMPLATE, eos_id=0, pad_id=1)
    return model, out


def test_files_config_and_weight_names(exported):
    model, out = exported
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                             "tokenizer_config.json", "generation_config.json"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (32, 2, 4)
    assert cfg["intermediate_size"] == model.config.intermediate_size and cfg["torch_dtype"] == "float32"
    assert cfg["eos_token_id"] == 0 and cfg["pad_token_id"] == 1 and cfg["bos_token_id"] is None
    weights = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in weights and len(weights) == 2 + 9 * 2
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (32, 32)
    assert weights["model.layers.0.mlp.up_proj.weight"].shape == (model.config.intermediate_size, 32)
    q, k, v = (weights[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    torch.testing.assert_close(torch.cat([q, k, v]), model.layers[0].attn.qkv.weight, rtol=0, atol=0)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == EOT and tok_cfg["pad_token"] == PAD and tok_cfg["chat_template"] == TEMPLATE
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 0, "pad_token_id": 1}
    assert set(hf_state_dict(model)) == set(weights)


def test_transformers_logits_and_greedy_match(exported):
    transformers = pytest.importorskip("transformers")
    model, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    x = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf(x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    prompt = [5, 17, 42, 99]
    for penalty in (1.0, 1.3):
        want = generate(model, prompt, 20, temperature=0, repetition_penalty=penalty)
        with torch.no_grad():
            got = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              repetition_penalty=penalty, eos_token_id=None, pad_token_id=1)
        assert got[0, len(prompt):].tolist() == want


def test_transformers_tokenizer_loads(exported):
    transformers = pytest.importorskip("transformers")
    _, out = exported
    from tokenizers import Tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == EOT and tok.pad_token == PAD and tok.eos_token_id == 0
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "hello world<|endoftext|>"
    assert tok(text)["input_ids"] == ours.encode(text).ids
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert ids == ours.encode("<|user|>\nhello\n").ids


def test_export_rejects_unknown_special_id(exported, tmp_path):
    model, out = exported
    with pytest.raises(ValueError, match="not in"):
        export_hf(model, out / "tokenizer.json", tmp_path / "x", chat_template=None, eos_id=310, pad_id=1)
    assert not (tmp_path / "x").exists()  # nothing written


@pytest.mark.parametrize("knob,value", [("qk_norm", True), ("mlp", "relu2"), ("logit_softcap", 30.0)])
def test_export_refuses_non_llama_knobs(exported, tmp_path, knob, value):
    from minigpt.export import ExportError

    _, out = exported
    model = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=16, **{knob: value}))
    with pytest.raises(ExportError, match=rf"^model\.{knob}=.*no LlamaForCausalLM equivalent") as e:
        export_hf(model, out / "tokenizer.json", tmp_path / "hf", chat_template=None, eos_id=0, pad_id=1)
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()


def test_export_zero_init_model_still_matches_llama(exported, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, out = exported
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=4, n_embd=32, block_size=32, zero_init=True)).eval()
    assert torch.all(model.layers[0].mlp.down.weight == 0)
    with torch.no_grad():  # trained-looking weights, so the blocks matter
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf_dir = export_hf(model, out / "tokenizer.json", tmp_path / "hf", chat_template=None, eos_id=0, pad_id=1)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], rtol=1e-4, atol=1e-4)
