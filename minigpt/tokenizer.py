"""Byte-level BPE tokenizer: training, loading, hashing, and the special tokens.

Design choices
- Byte-level BPE (GPT-2 style) through Hugging Face `tokenizers`: every Unicode string round-trips
  exactly, there is no unknown token, and training is fast Rust code.
- Special tokens are fixed here, once, and get the first ids in a fixed order, so ids stay stable
  across vocabulary sizes.
"""

EOT = "<|endoftext|>"  # ends a document, and an assistant turn
PAD = "<|pad|>"  # batch padding; never a target
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = [EOT, PAD, SYSTEM, USER, ASSISTANT]
