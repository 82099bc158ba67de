"""Export a GPT to a Hugging Face `LlamaForCausalLM` directory.

Design choices
- The model is Llama-shaped by construction (`minigpt.model`), so export is a pure renaming:
  fused q|k|v and gate|up weights are split, nothing is permuted (RoPE already uses HF's
  rotate_half layout), and the tied embedding is stored once (`tie_word_embeddings: true`).
- Only the standard files are written (config.json, model.safetensors, tokenizer.json,
  tokenizer_config.json, generation_config.json), by hand, so export needs neither transformers
  nor network access; `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(dir)` load it.
- config.json carries both `rope_theta` (transformers 4.x) and `rope_parameters` (5.x).
- Atomic (`minigpt.files.atomic_directory`): the directory, model card included, is built
  complete in a hidden sibling, then swapped in (the old one is renamed aside and deleted), so a failed export leaves the previous one intact and a new one
  never has stale files from an earlier export beside it. An existing OUT_DIR is replaced only
  when it holds nothing but export files (never a directory the user keeps other things in).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from minigpt.files import atomic_directory, public, write_json


# Architecture knobs (GPTConfig field: Llama's value) that LlamaForCausalLM, and llama.cpp's
# `llama` architecture (`minigpt.export_gguf`), cannot express. zero_init only changes the
# starting weights, so it exports.
NOT_LLAMA = {"mlp": "swiglu", "qk_norm": False, "logit_softcap": 0.0}


class ExportError(ValueError):
    """The model cannot be written as a LlamaForCausalLM; the message is one line."""


def check_exportable(model, target: str = "LlamaForCausalLM") -> None:
    """Raise ExportError naming the first knob that makes `model` differ from Llama (both
    exports call it before writing anything; `target` names the format in the message)."""
    for knob, llama in NOT_LLAMA.items():
        value = getattr(model.config, knob, llama)
        if value != llama:
            raise ExportError(f"model.{knob}={value!r} has no {target} equivalent "
                              f"(export needs {knob}={llama!r})")


EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json", "README.md")  # README.md: the model card


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under LlamaForCausalLM's names (fp32, CPU, contiguous; lm_head tied, not stored)."""
    c = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(c.n_layer):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[p + "attn.qkv.weight"].split(c.n_embd, dim=0)
        gate, up = sd[p + "mlp.gate_up.weight"].split(c.intermediate_size, dim=0)
        out.update({
            q + "input_layernorm.weight": sd[p + "attn_norm.weight"],
            q + "self_attn.q_proj.weight": wq,
            q + "self_attn.k_proj.weight": wk,
            q + "self_attn.v_proj.weight": wv,
            q + "self_attn.o_proj.weight": sd[p + "attn.proj.weight"],
            q + "post_attention_layernorm.weight": sd[p + "mlp_norm.weight"],
            q + "mlp.gate_proj.weight": gate,
            q + "mlp.up_proj.weight": up,
            q + "mlp.down_proj.weight": sd[p + "mlp.down.weight"],
        })
    return {k: v.contiguous().clone() for k, v in out.items()}


def llama_config(model, eos_id: int, pad_id: int | None, bos_id: int | None) -> dict:
    """config.json for LlamaForCausalLM with our architecture."""
    c = model.config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_head,
        "head_dim": c.n_embd // c.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def export_hf(model, tokenizer_file: str | os.PathLike, out_dir: str | os.PathLike, *,
              chat_template: str | None, eos_id: int, pad_id: int | None,
              bos_id: int | None = None, extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write a Hugging Face model directory for `model` (a minigpt GPT) to out_dir; returns it.

    tokenizer_file is the model's tokenizer.json (copied); chat_template a Jinja string (or None)
    for tokenizer_config.json; eos/pad/bos ids name the special tokens; `extra_files` maps names
    (one of EXPORT_FILES, e.g. README.md: the model card) to text written inside the same export.
    """
    from tokenizers import Tokenizer

    check_exportable(model)  # before anything is written
    out = Path(out_dir)
    tok = Tokenizer.from_file(str(tokenizer_file))
    if tok.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, model only {model.config.vocab_size}")

    def name(i: int | None) -> str | None:
        if i is None:
            return None
        token = tok.id_to_token(int(i))
        if token is None:
            raise ValueError(f"token id {i} is not in {tokenizer_file}")
        return token

    tok_cfg = {  # names first: a bad id fails before anything is written
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model.config.block_size,
        "bos_token": name(bos_id),
        "eos_token": name(eos_id),
        "pad_token": name(pad_id),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if out.exists():
        others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES) \
            if out.is_dir() else [out.name]
        if others:
            raise ValueError(f"{out} exists and holds other files ({', '.join(others[:3])}); "
                             "choose a new or empty directory")
    with atomic_directory(out, durable=True) as tmp:  # all or nothing, the card included
        try:
            save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        except SafetensorError as e:  # a full disk: an I/O error, not a traceback
            raise OSError(f"{out / 'model.safetensors'}: cannot write ({e})") from None
        public(tmp / "model.safetensors")
        write_json(tmp / "config.json", llama_config(model, eos_id, pad_id, bos_id))
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        if chat_template is not None:
            tok_cfg["chat_template"] = chat_template
        write_json(tmp / "tokenizer_config.json", tok_cfg)
        gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
        write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
        for name, text in (extra_files or {}).items():
            if isinstance(text, bytes):  # e.g. a user's own README.md, kept byte for byte
                (tmp / name).write_bytes(text)
            else:
                (tmp / name).write_text(text, encoding="utf-8")
    return out
