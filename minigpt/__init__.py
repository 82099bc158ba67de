"""minigpt: a small instruction-following GPT built from raw text as a reproducible DVC pipeline."""

__version__ = "0.1.0"
