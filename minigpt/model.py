"""The GPT: a small Llama-style decoder-only transformer, its training and full forward.

Design choices (the measurements behind them: docs/EXPERIMENTS.md and the bench/ scripts)
- Llama recipe (RoPE in HF's `rotate_half` convention, RMSNorm, SwiGLU, no biases): better loss per
  FLOP than GPT-2's at this size, same cost per token, and one-to-one with
  `transformers.LlamaForCausalLM` (`minigpt.export`), q/k weights needing no permutation.
- Tied input/output embeddings: at vocab 30k the embedding is ~half the parameters. Fused q|k|v and
  gate|up projections: fewer, larger matmuls; export splits them back.
- Attention is `F.scaled_dot_product_attention`, except CPU bf16 attention up to CAUSAL_SCORES
  (`causal_attention`: two matmuls around a softmax beat the flash kernel there).
- The CPU training loss is `minigpt.loss.linear_cross_entropy` (no (B, T, vocab) logits); GPUs
  and a logit softcap take plain cross-entropy over full logits.
- Decoding with a KV cache (`GPT.forward(cache=...)`) lives in `minigpt.decode`.
- Dropout drops attention and MLP outputs, not attention probabilities (as Llama): on CPU the latter
  forces SDPA off its flash kernel and draws a mask over all (B, H, T, T) scores.
- Init as GPT-2/nanoGPT: normal(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layer).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minigpt.config import head_size_problem
from minigpt.loss import IGNORE, linear_cross_entropy

if TYPE_CHECKING:
    from minigpt.config import ModelConfig
    from minigpt.decode import KVCache


@dataclass
class GPTConfig:
    """The architecture; saved to config.json and enough to rebuild the model."""

    vocab_size: int
    """Tokens in the vocabulary (from the trained tokenizer)."""
    n_layer: int
    """Transformer blocks."""
    n_head: int
    """Attention heads; n_embd / n_head must be even (RoPE rotates pairs)."""
    n_embd: int
    """Residual stream width."""
    block_size: int
    """Maximum context length (RoPE tables are precomputed for it)."""
    dropout: float = 0.0
    """Dropout on each attention and MLP output (training only), not on attention probabilities."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    intermediate_size: int = 0
    """MLP hidden width; 0 derives ~8/3 * n_embd (swiglu) or 4 * n_embd (relu2), rounded up to a
    multiple of 64: both give ~8 n_embd^2 MLP weights."""
    mlp: str = "swiglu"
    """MLP activation: swiglu (Llama: silu(gate) * up) or relu2 (relu(up)^2, modded-nanogpt)."""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head (no gain) before attention."""
    zero_init: bool = False
    """Initialise the residual output projections (attn.proj, mlp.down) to zero."""
    logit_softcap: float = 0.0
    """Logits = cap * tanh(logits / cap) when > 0 (Gemma 2 / modded-nanogpt); 0 = off."""

    def __post_init__(self) -> None:
        heads = head_size_problem(self.n_embd, self.n_head)
        if heads:
            raise ValueError(f"n_embd={self.n_embd} {heads}")
        if self.mlp not in ("swiglu", "relu2"):
            raise ValueError(f"mlp={self.mlp!r} must be swiglu or relu2")
        if not self.logit_softcap >= 0:
            raise ValueError(f"logit_softcap={self.logit_softcap} must be >= 0")
        if self.intermediate_size <= 0:
            wide = 8 / 3 if self.mlp == "swiglu" else 4
            self.intermediate_size = 64 * math.ceil(wide * self.n_embd / 64)

    @classmethod
    def from_params(cls, shape: ModelConfig, vocab_size: int) -> GPTConfig:
        """The architecture params.yaml's `model` section describes, for a `vocab_size` tokenizer."""
        return cls(vocab_size=vocab_size, **dataclasses.asdict(shape))


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and signed sin, (length, 3, 1, head_dim), for the q | k | v slots of the fused projection.

    HF Llama layout: frequencies repeated for both halves of a head. The sin table holds
    (-sin, +sin) so that rotate_half(x) * sin == flip_halves(x) * signed_sin. The v slot is the
    identity (cos 1, sin 0): rotating all three slots at once is fewer ops than slicing q|k out."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
    cos = torch.stack((cos, cos, torch.ones_like(cos)), dim=1)[:, :, None]
    sin = torch.stack((sin, sin, torch.zeros_like(sin)), dim=1)[:, :, None]
    return cos, sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1) done as a flip of the halves
    (the sign lives in `sin`). x: (..., head_dim), cos/sin broadcastable to it."""
    flipped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, flipped, sin)


CAUSAL_SCORES = 2**24  # B * H * T * T scores up to which CPU bf16 attention is plain matmuls (32 MB)


def _plain_causal(q: Tensor) -> bool:
    """CPU bf16 attention of a modest size: two matmuls and a softmax beat the flash kernel there
    (module docstring); the (B, H, T, T) scores they keep for backward cap the size."""
    B, H, T, _ = q.shape
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and B * H * T * T <= CAUSAL_SCORES


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d) + causal -inf mask) v for (B, H, T, d) inputs, as plain ops."""
    T = q.shape[-2]
    mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    return ((q * q.shape[-1] ** -0.5) @ k.mT + mask).softmax(-1) @ v


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of (B, H, T, hd) queries over as many keys (T = 1: the query sees all
    the keys given); plain ops for small CPU bf16 (`_plain_causal`), else SDPA."""
    T = q.shape[-2]
    if T > 1 and _plain_causal(q):
        return causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # rows: q | k | v
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm

    def heads(self, qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The q | k | v projection (B, T, 3C), rotated (and normed), as (B, 3H, T, hd) heads."""
        B, T, _ = qkv.shape
        qkv = apply_rope(qkv.view(B, T, 3, self.n_head, self.head_dim), cos, sin)
        if self.qk_norm:  # RoPE is a rotation, so norming after it equals norming before
            qkv = torch.cat((F.rms_norm(qkv[:, :, :2], (self.head_dim,)), qkv[:, :, 2:]), dim=2)
        return qkv.view(B, T, 3 * self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.heads(self.qkv(x), cos, sin).split(self.n_head, dim=1)
        y = self.proj(attend(q, k, v).transpose(1, 2).reshape(B, T, C))
        return F.dropout(y, self.dropout, True) if self.training and self.dropout > 0 else y


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.relu2 = config.mlp == "relu2"
        if self.relu2:
            self.up = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        else:
            self.gate_up = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)  # gate | up
        self.down = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.dropout = config.dropout

    @property
    def inner(self) -> nn.Linear:
        """The projection into the hidden width: up (relu2) or gate | up (swiglu)."""
        return self.up if self.relu2 else self.gate_up

    def activate(self, h: Tensor) -> Tensor:
        """relu(up)^2, or silu(gate) * up, of the inner projection's output."""
        if self.relu2:
            return F.relu(h).square()
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward(self, x: Tensor) -> Tensor:
        y = self.down(self.activate(self.inner(x)))
        return F.dropout(y, self.dropout, True) if self.training and self.dropout > 0 else y


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self._decode_slabs: tuple[list, list, dict] | None = None  # minigpt.decode.decode_weights
        self.decode_dtype = "fp32"  # weights of CPU decoding: fp32 (exact), fp16 or int8 (minigpt.quant)
        # On the meta device (checkpoint.check_weights: shapes only) only the parameters are
        # made, uninitialised: normal_ or RoPE's math on meta is slow once per process (it
        # imports torch._dynamo). Elsewhere init is unchanged, so seeds give the same weights.
        shapes_only = torch.get_default_device().type == "meta"
        empty = torch.empty(config.vocab_size, config.n_embd) if shapes_only else None
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd, _weight=empty)  # also the head
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        if shapes_only:  # the parameters are all there is to see
            return
        cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # derived from config: not saved
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                if config.zero_init:  # each block starts as the identity (modded-nanogpt)
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None):
        """Returns (logits, loss).

        - targets given (int64 (B, T), -100 = ignored): loss = mean CE over the other positions;
          logits is None. On CPU without a logit softcap the loss is chunked
          (`linear_cross_entropy`: no full logits); on other devices, or with `logit_softcap` > 0
          (the chunked loss has no tanh), it is plain cross-entropy over full fp32 logits.
        - no targets, no cache: logits (B, T, vocab) for every position; loss None.
        - cache: idx are the new tokens at positions cache.pos.. (prefill T > 1 or decode T = 1);
          the cache is updated in place and logits are for the LAST position only: (B, 1, vocab).
        """
        B, T = idx.shape
        pos, limit = (cache.pos, cache.max_len) if cache is not None else (0, self.config.block_size)
        if pos + T > limit:
            raise ValueError(f"positions {pos}..{pos + T - 1} exceed the context of {limit} "
                             f"(block_size={self.config.block_size})")
        if cache is not None:
            from minigpt.decode import forward

            return forward(self, idx, cache), None
        x = self.tok_emb(idx)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # shared by all layers
        if cos.dtype != dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        for block in self.layers:
            x = block(x, cos, sin)
        x = self.norm(x)
        if targets is None:
            return self._cap(F.linear(x, self.tok_emb.weight)), None
        if x.device.type == "cpu" and self.config.logit_softcap == 0:
            return None, linear_cross_entropy(x.view(B * T, -1), self.tok_emb.weight, targets.reshape(-1))
        # the chunked loss has no tanh; on a GPU the step is launch-bound, and the chunked loop's
        # many small kernels (and its graph breaks under torch.compile) cost more than the
        # logits' memory (bench/train_throughput.py; figures in docs/EXPERIMENTS.md)
        logits = self._cap(F.linear(x, self.tok_emb.weight).float())
        return None, F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1), ignore_index=IGNORE)

    def _cap(self, logits: Tensor) -> Tensor:
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; non_embedding drops the (tied) token embedding / LM head matrix."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token, nanoGPT/PaLM convention: 6 N + 12 L C T.

        N = non-embedding parameters + the LM head matrix (tied to the embedding: the lookup is
        free, but the same matrix is a full matmul as the head), i.e. num_params() here;
        12 L C T is attention's QK^T and AV at full context T = block_size (fwd + bwd)."""
        c = self.config
        n = self.num_params(non_embedding=True) + c.vocab_size * c.n_embd
        return 6.0 * n + 12.0 * c.n_layer * c.n_embd * c.block_size

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """An empty KV cache for the cached forward (`minigpt.decode.new_cache`)."""
        from minigpt.decode import new_cache

        return new_cache(self, batch_size, max_len, device, dtype)
