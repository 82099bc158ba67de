"""`minigpt export`: a model directory to OUT_DIR, as a Hugging Face directory with its model card
(optionally pushed to the Hub) or as one GGUF file.

Design choices
- OUT_DIR may not be, be inside, or contain the model directory; both writers are atomic
  (`minigpt.export`, `minigpt.export_gguf`), so a failed export leaves nothing half written.
- A README.md edited since the last export is kept, with a warning, instead of being replaced by
  a new card (`minigpt.card.card_edited`).
- Every failure the user can fix (an unwritable OUT_DIR, a missing optional package, a failed
  upload) is one `UsageError` line; an upload that fails leaves the export on disk.
"""

from __future__ import annotations

import sys
from pathlib import Path

from minigpt.engine import Loaded, UsageError, load


def export(checkpoint_path: str, out_dir: str, fmt: str, dtype: str, project_dir: str,
           push_to_hub: str | None, private: bool) -> None:
    """`minigpt export`: write `checkpoint_path` to `out_dir` as `fmt` ("hf" or "gguf")."""
    src, dst = Path(checkpoint_path).resolve(), Path(out_dir).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise UsageError(f"export to {out_dir}: OUT_DIR must be outside the model directory "
                         f"{checkpoint_path} (and not contain it)")
    m = load(checkpoint_path, "cpu")
    if fmt == "gguf":
        _gguf(m, checkpoint_path, out_dir, dtype)
        return
    out = _hf(m, checkpoint_path, out_dir, project_dir)
    if push_to_hub:
        _push(out, push_to_hub, private)


def _gguf(m: Loaded, checkpoint_path: str, out_dir: str, dtype: str) -> None:
    from minigpt.template import CHAT_TEMPLATE_JINJA
    from minigpt.tokenizer import PAD, special_id

    try:
        from minigpt.export_gguf import export_gguf
    except ImportError as e:
        raise UsageError(f"--format gguf needs the gguf package: pip install gguf ({e})") from None
    name = Path(checkpoint_path).resolve().name
    tokenizer_file = Path(checkpoint_path) / "tokenizer.json"  # the directory is self-contained
    try:
        out = export_gguf(m.model, tokenizer_file, Path(out_dir) / f"{name}-{dtype}.gguf",
                          dtype=dtype, name=name, chat_template=CHAT_TEMPLATE_JINJA,
                          eos_id=m.eot, pad_id=special_id(m.tok, PAD), bos_id=None)
    except (OSError, ValueError) as e:
        raise UsageError(f"export to {out_dir}: {e}") from None
    print(f"exported {checkpoint_path} to {out} (GGUF, llama, {dtype})", file=sys.stderr)


def _edited_card(out_dir: str) -> bytes | None:
    """OUT_DIR/README.md if the user edited it since it was exported (it is theirs), else None."""
    from minigpt.card import card_edited

    readme = Path(out_dir) / "README.md"
    try:
        kept = readme.read_bytes() if readme.is_file() and not readme.is_symlink() else None
    except OSError as e:
        raise UsageError(f"export to {out_dir}: {readme}: {e.strerror}") from None
    return kept if kept is not None and card_edited(kept) else None


def _hf(m: Loaded, checkpoint_path: str, out_dir: str, project_dir: str) -> Path:
    from minigpt.card import model_card
    from minigpt.export import export_hf
    from minigpt.template import CHAT_TEMPLATE_JINJA
    from minigpt.tokenizer import PAD, special_id

    kept = _edited_card(out_dir)
    try:
        name = Path(checkpoint_path).resolve().name
        card = kept or model_card(m.config, m.model.num_params(), name, project_dir)
        # The template goes into base models' exports too: harmless, and every export has the
        # same tokenizer_config.
        out = export_hf(m.model, Path(checkpoint_path) / "tokenizer.json", out_dir,
                        chat_template=CHAT_TEMPLATE_JINJA,
                        eos_id=m.eot,  # <|endoftext|> ends every answer and document
                        pad_id=special_id(m.tok, PAD), bos_id=None,
                        extra_files={"README.md": card})  # inside the export: all or nothing
    except (OSError, ValueError) as e:  # an unwritable OUT_DIR, a tokenizer that does not fit
        raise UsageError(f"export to {out_dir}: {e}") from None
    print(f"exported {checkpoint_path} to {out} (Hugging Face LlamaForCausalLM, "
          "README.md model card)", file=sys.stderr)
    if kept is not None:
        print(f"warning: {Path(out_dir) / 'README.md'} was edited after it was exported: kept as "
              "it is, not regenerated (delete it to get a new model card)", file=sys.stderr)
    return out


def _push(out: Path, repo_id: str, private: bool) -> None:
    from minigpt.card import push_to_hub

    try:
        url = push_to_hub(out, repo_id, private=private)
    except ImportError as e:
        raise UsageError(f"--push-to-hub needs huggingface_hub: pip install huggingface_hub ({e})") from None
    except Exception as e:  # network, auth, a bad repo id: one line, the export stays on disk
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"--push-to-hub {repo_id}: {first}") from None
    print(f"uploaded {out} to {url}", file=sys.stderr)
