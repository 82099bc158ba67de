"""Export a GPT to one GGUF file (llama.cpp, Ollama, LM Studio), written with ggml's `gguf` package.

Design choices
- Architecture `llama`: the Hugging Face export's renaming with llama.cpp's tensor names, as its
  `convert_hf_to_gguf.py` does for a `LlamaForCausalLM`: q and k rows are permuted from HF's
  rotate_half RoPE layout to llama.cpp's interleaved pairs (`_permute`, its `LlamaModel.permute`).
- Tied embeddings: no `output.weight` is written; llama.cpp's llama loader then uses `token_embd`
  for the output (and transformers' GGUF loader sets tie_word_embeddings when it is absent).
- Tokenizer: `tokenizer.ggml.model = "gpt2"` (byte-level BPE: tokenizer.json's byte-level strings
  and merges) with `tokenizer.ggml.pre = "gpt-2"`, whose regex is the one `tokenizers`'
  ByteLevel(use_regex=True) applies (ours: no prefix space, no normalizer). Special tokens are
  CONTROL; eos = bos = <|endoftext|> (bos never added, like the HF export, but set so that
  llama.cpp does not fall back to GPT-2's id 11). The chat template is the same Jinja string.
- Only Llama-shaped models: a qk_norm, logit_softcap or relu2 model is refused before anything
  is written (`minigpt.export.check_exportable`, the Hugging Face export's check): llama.cpp
  would read such a file as a plain Llama and compute other logits.
- Written to `NAME.tmp` beside the target and renamed into place when complete; a failed write
  (a full disk) removes the `.tmp`, so a file with the final name is always whole.
- Types: f32, f16, or q8_0 for the 2-D weights; norms stay f32 (as llama.cpp's converter does).
  q8_0 needs rows that are a multiple of 32; a tensor whose rows are not falls back to f16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from minigpt.export import check_exportable, hf_state_dict

TYPES = ("f32", "f16", "q8_0")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF q/k rows (rotate_half halves per head) -> llama.cpp's interleaved pairs."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's llama tensor names (fp32)."""
    c = model.config
    hf = hf_state_dict(model)
    out = {"token_embd.weight": hf["model.embed_tokens.weight"],
           "output_norm.weight": hf["model.norm.weight"]}
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.n_layer):
        for hf_name, name in names.items():
            w = hf[f"model.layers.{i}.{hf_name}.weight"]
            if name in ("attn_q", "attn_k"):
                w = _permute(w, c.n_head)
            out[f"blk.{i}.{name}.weight"] = w
    return out


def _merges(tokenizer_json: dict) -> list[str]:
    """BPE merges as "a b" strings (tokenizer.json holds either strings or [a, b] pairs)."""
    merges = tokenizer_json["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def export_gguf(model, tokenizer_file: str | os.PathLike, out_file: str | os.PathLike, *,
                dtype: str, name: str, chat_template: str | None, eos_id: int,
                pad_id: int | None, bos_id: int | None) -> Path:
    """Write `model` (a minigpt GPT) with its tokenizer as one GGUF file; returns its path."""
    import gguf

    if dtype not in TYPES:
        raise ValueError(f"dtype must be one of {', '.join(TYPES)} (got {dtype!r})")
    check_exportable(model, "llama.cpp `llama`")  # before anything is written
    tokens, types, merges = _vocabulary(tokenizer_file, model.config.vocab_size)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # renamed into place when complete
    w = gguf.GGUFWriter(str(tmp), "llama")
    _add_model_keys(w, model.config, name, dtype)
    _add_tokenizer_keys(w, tokens, types, merges, eos_id=eos_id, pad_id=pad_id, bos_id=bos_id,
                        chat_template=chat_template)
    _add_tensors(w, model, dtype)
    _write(w, tmp, out)
    return out


def _vocabulary(tokenizer_file: str | os.PathLike, vocab_size: int) -> tuple[list, list, list]:
    """The token strings, their GGUF token types and the BPE merges, one row per embedding row."""
    import gguf
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    raw = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
    if raw.get("model", {}).get("type") != "BPE":
        raise ValueError(f"{tokenizer_file}: not a BPE tokenizer")
    n = tok.get_vocab_size()
    if n > vocab_size:
        raise ValueError(f"tokenizer has {n} tokens, model only {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # the embedding's unused rows, if any
    types = [gguf.TokenType.UNUSED] * vocab_size
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for text, i in tok.get_vocab().items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL
    return tokens, types, _merges(raw)


def _add_model_keys(w, c, name: str, dtype: str) -> None:
    """The `llama` architecture's shape keys and the file type."""
    import gguf

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w.add_name(name)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head)
    w.add_rope_dimension_count(c.n_embd // c.n_head)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(file_type)


def _add_tokenizer_keys(w, tokens: list, types: list, merges: list[str], *, eos_id: int,
                        pad_id: int | None, bos_id: int | None, chat_template: str | None) -> None:
    """GPT-2 byte-level BPE, its special ids (bos never added) and the chat template."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(eos_id)
    w.add_bos_token_id(eos_id if bos_id is None else bos_id)
    if pad_id is not None:
        w.add_pad_token_id(pad_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)


def _add_tensors(w, model, dtype: str) -> None:
    """The weights: norms f32; 2-D weights as `dtype` (q8_0 rows not a multiple of 32: f16)."""
    import gguf

    for tname, t in gguf_tensors(model).items():
        data = t.numpy()
        if data.ndim == 1 or dtype == "f32":
            w.add_tensor(tname, data.astype(np.float32))
        elif dtype == "q8_0" and data.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(tname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(tname, data.astype(np.float16))


def _write(w, tmp: Path, out: Path) -> None:
    """Write the file to `tmp`, then rename it to `out`; a failure leaves neither half written."""
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    except BaseException as e:  # a full disk, Ctrl-C: no half-written .tmp stays behind
        try:
            w.close()
        except OSError:
            pass  # flushing the rest into a full disk fails again
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            why = e.strerror or f"short write, {e}: is the disk full?"  # numpy's tofile says only that
            raise OSError(f"{out}: cannot write ({why})") from None
        raise
    os.replace(tmp, out)
