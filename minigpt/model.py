"""The GPT: a small Llama-style decoder-only transformer.

Design choices (the measurements behind them: docs/EXPERIMENTS.md and the bench/ scripts)
- Llama recipe (RoPE in HF's `rotate_half` convention, RMSNorm, SwiGLU, no biases): better loss per
  FLOP than GPT-2's at this size, same cost per token, and one-to-one with
  `transformers.LlamaForCausalLM` (`minigpt.export`), q/k weights needing no permutation.
- Tied input/output embeddings: at vocab 30k the embedding is ~half the parameters. Fused q|k|v and
  gate|up projections: fewer, larger matmuls; export splits them back.
- Attention is `F.scaled_dot_product_attention`, except CPU bf16 attention up to CAUSAL_SCORES
  (`causal_attention`: two matmuls around a softmax beat the flash kernel there).
- The CPU training loss never materialises (B, T, vocab) logits: `_LinearCrossEntropy` walks rows in
  chunks, logits, loss and both gradients while a chunk is in cache, softmax in fp32 blocks of
  SOFTMAX_LOGITS written back over the chunk's logits; rows with target -100 are skipped before the
  head. The LM head is half the FLOPs and its logits the largest activation. On GPUs (launch-bound)
  and with a logit softcap the plain cross-entropy over full logits is used (`GPT.forward`).
- `KVCache`: one preallocated (layer, k|v, batch, head, position, head_dim) tensor written in place;
  a decode step is a few hundred small ops around GEMVs, so it is written for few ops. On CPU in fp32
  the cache holds the weights as one (in, out/P) slab per thread (`decode_weights`): MKL's GEMV
  streams (in, out) faster than nn.Linear's rows but on one thread, a bmm over P slabs on all P;
  `_decode_step` runs such a step as plain ops, bitwise equal to the blocks' T = 1 path. With
  `GPT.decode_dtype` fp16 or int8 the cache holds `minigpt.quant`'s matmuls in the slabs' place. Ragged
  rows (`KVCache.lengths`) decode different prompts together behind a mask. Positions stop at
  block_size.
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

if TYPE_CHECKING:
    from minigpt.config import ModelConfig

SOFTMAX_LOGITS = 2**21  # fp32 logits per softmax block of the chunked loss (8 MB: in cache)
TINY_PROB = 1e-30  # target probabilities below this (fp32 underflows ~1e-38) take log_softmax's log
IGNORE = -100  # the targets' "not a target" id (cross-entropy ignore_index): SFT prompts, padding


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


class KVCache:
    """Preallocated keys and values of every layer: kv is (n_layer, 2, B, n_head, max_len, head_dim),
    keys at [:, 0], values at [:, 1], so one copy writes both. The batch and head dims are
    adjacent, so a (B, n_head, seen, head_dim) slice is one strided batch that attention's
    matmuls read in place (with k|v as 2 * n_head heads of one row, every step copied the keys
    and values first; docs/EXPERIMENTS.md).

    `pos` is the number of positions already written; GPT.forward advances it. `lengths`, when
    set (int64 (B,)), gives each row its own length instead: a decode step (T = 1) writes row b's
    token at position lengths[b] and attends to its positions 0..lengths[b]; `pos` is then the
    longest row's length."""

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device=None, dtype=None):
        self.kv = torch.zeros(n_layer, 2, batch_size, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.lengths: Tensor | None = None
        self.weight_slabs: dict = {}  # module -> (P, in, out/P) weight slabs or a quant matmul, CPU decoding

    def reset(self) -> None:
        self.pos = 0  # stale entries beyond pos are never read

    def copy_prefix(self, one: KVCache, rows: slice = slice(None)) -> None:
        """Positions 0..one.pos-1 of the one-row cache `one` into `rows` of this one (each row
        the same prefix): a prompt prefilled once, for several rows."""
        self.kv[:, :, rows, :, : one.pos] = one.kv[:, :, :1, :, : one.pos]

    def keep_rows(self, index: Tensor) -> None:
        """Only the rows `index` (int64), in that order: finished rows leave a batch."""
        self.kv = self.kv.index_select(2, index)
        if self.lengths is not None:
            self.lengths = self.lengths[index]


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


def _linear(x: Tensor, lin: nn.Module, cache: KVCache | None) -> Tensor:
    """lin(x) (a bias-free Linear, or the tied head's Embedding), through the cache's (P, in,
    out/P) slabs of the weight when it holds them: one batched matmul, a slab per thread."""
    slabs = cache.weight_slabs.get(lin) if cache is not None else None
    if slabs is None:
        return F.linear(x, lin.weight)
    if not isinstance(slabs, Tensor):  # fp16 / int8 decoding weights (minigpt.quant)
        return slabs(x)
    n_slabs, c_in, width = slabs.shape
    rows = x if x.dim() == 2 else x.reshape(-1, c_in)  # a decode step's (B, C): no reshape op
    y = torch.bmm(rows.expand(n_slabs, -1, -1), slabs)  # (P, rows, out/P)
    if x.numel() != c_in:  # rows > 1: row-major again; one row is already in order (no ops)
        y = y.transpose(0, 1)
    y = y.reshape(*x.shape[:-1], n_slabs * width)
    n_out = lin.weight.shape[0]
    return y if y.shape[-1] == n_out else y[..., :n_out]  # the last slab's zero padding


def _slabs(w: Tensor, n: int) -> Tensor:
    """w (out, in) as n contiguous (in, ceil(out/n)) slabs, (n, in, ceil(out/n)), zero-padded."""
    width = -(-w.shape[0] // n)
    padded = F.pad(w, (0, 0, 0, n * width - w.shape[0]))  # zero rows at the end
    return padded.view(n, width, w.shape[1]).transpose(1, 2).contiguous()


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


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # rows: q | k | v
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        H = self.n_head
        qkv = apply_rope(_linear(x, self.qkv, cache).view(B, T, 3, H, self.head_dim), cos, sin)
        if self.qk_norm:  # RoPE is a rotation, so norming after it equals norming before
            qkv = torch.cat((F.rms_norm(qkv[:, :, :2], (self.head_dim,)), qkv[:, :, 2:]), dim=2)
        qkv = qkv.view(B, T, 3 * H, self.head_dim).transpose(1, 2)  # (B, 3H, T, hd)
        q, kv = qkv[:, :H], qkv[:, H:].unflatten(1, (2, H)).transpose(0, 1)  # kv: (2, B, H, T, hd)
        mask, causal, dtype = None, T > 1, q.dtype
        if cache is not None and cache.lengths is not None:  # ragged rows, one new token each
            lengths, seen, past = cache.lengths, cache.pos + 1, cache.kv[layer]
            past[:, torch.arange(B, device=x.device), :, lengths] = kv[:, :, :, 0].transpose(0, 1)
            kv = past[:, :, :, :seen]
            mask = (torch.arange(seen, device=x.device) <= lengths[:, None])[:, None, None]
            causal = False
        elif cache is not None:  # write the new keys/values, attend over everything so far
            pos = cache.pos
            cache.kv[layer, :, :, :, pos : pos + T] = kv
            kv = cache.kv[layer, :, :, :, : pos + T]
            if pos > 0 and T > 1:  # chunked prefill: new queries see the past and a causal block
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
                causal = False
        if cache is not None and q.dtype != kv.dtype:  # cache kept in another dtype than the compute
            q = q.to(kv.dtype)
        if cache is not None and T == 1 and not q.is_cuda:
            # a CPU decode step: plain matmuls and softmax, whose results do not depend on the
            # thread count (the flash kernel splits its work by it), so a step gives the same
            # numbers whichever count `sample.StepThreads` picks (+~20 us per layer)
            att = (q @ kv[0].transpose(-1, -2)) * self.head_dim**-0.5
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            y = att.softmax(-1) @ kv[1]
        elif causal and mask is None and _plain_causal(q):
            y = causal_attention(q, kv[0], kv[1])
        else:
            y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, C)
        if y.dtype != dtype:
            y = y.to(dtype)
        y = _linear(y, self.proj, cache)
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

    def forward(self, x, cache: KVCache | None = None):
        if self.relu2:
            y = _linear(F.relu(_linear(x, self.up, cache)).square(), self.down, cache)
        else:
            gate, up = _linear(x, self.gate_up, cache).chunk(2, dim=-1)
            y = _linear(F.silu(gate) * up, self.down, cache)
        return F.dropout(y, self.dropout, True) if self.training and self.dropout > 0 else y


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x), cache)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean CE of (h @ w.T) against targets (-100 = ignored), chunked over rows; the gradients are
    computed in forward while each chunk's logits are hot, so backward only scales them.

    Never holds more than `chunk` rows of logits, in `dtype` (bf16 under autocast): the matmuls
    run in it, the softmax walks the chunk `rows` at a time in fp32 (cache-sized) and writes the
    gradient (softmax - onehot) back over the logits, so no full-size fp32 copy or temporary is
    ever made."""

    @staticmethod
    def forward(ctx, h, w, targets, dtype, chunk, rows):
        hc, wc = h.to(dtype), w.to(dtype)  # cast the (vocab, C) matrix once, not per chunk
        valid = targets != IGNORE
        n = valid.sum()
        scale = (valid / n.clamp(min=1))[:, None]  # fp32: applied to the small (rows, C) side
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = None  # fp32 accumulator, created by the first chunk's product
        logits = torch.empty(min(chunk, targets.numel()), w.shape[0], dtype=dtype, device=h.device)
        for i in range(0, targets.numel(), chunk):
            hi, ti = hc[i : i + chunk], targets[i : i + chunk, None].clamp(min=0)
            vi = valid[i : i + chunk, None]
            g = torch.mm(hi, wc.t(), out=logits[: hi.shape[0]])
            for j in range(0, g.shape[0], rows):  # softmax - onehot, in place over the logits
                gj, tj = g[j : j + rows], ti[j : j + rows]
                p = torch.softmax(gj, dim=-1, dtype=torch.float32)
                target = p.gather(1, tj)
                logp = target.log()
                tiny = target < TINY_PROB  # fp32 underflow is near: those log-probabilities exactly
                if torch.compiler.is_compiling() or bool(tiny.any()):  # no data-dependent graph break
                    exact = torch.log_softmax(gj, dim=-1, dtype=torch.float32).gather(1, tj)
                    logp = torch.where(tiny, exact, logp)
                loss -= (logp * vi[j : j + rows]).sum()
                gj.copy_(p)
                gj.scatter_(1, tj, (target - 1).to(dtype))  # p - 1 in fp32, not in bf16
            grad_h[i : i + chunk] = (g @ wc).to(h.dtype) * scale[i : i + chunk]
            hi = hi * vi  # ignored rows (left in only under compile) give no gradient
            if grad_w is None:
                grad_w = (g.t() @ hi).float()
            elif dtype == torch.float32:
                grad_w.addmm_(g.t(), hi)
            else:  # bf16 product, fp32 accumulation across chunks
                grad_w += g.t() @ hi
        ctx.save_for_backward(grad_h, grad_w.mul_(1 / n.clamp(min=1)))
        ctx.w_dtype = w.dtype
        return loss / n  # nan when every target is ignored, like F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # in place: the saved gradients are ours and used once (a second backward is an error anyway)
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out).to(ctx.w_dtype), None, None, None, None


def linear_cross_entropy(h: Tensor, w: Tensor, targets: Tensor, chunk: int | None = None) -> Tensor:
    """Mean cross-entropy of logits h @ w.T over targets != IGNORE, without materialising all logits.

    h: (N, C), w: (V, C), targets: (N,) int64. Returns nan when every target is ignored.
    chunk: rows per chunk; default 64M logits on CPU (the seed config's whole batch of 8 x 256:
    fewer, larger matmuls and one fp32 grad_w accumulation beat smaller chunks), 128M on GPUs."""
    if chunk is None:
        chunk = max(256, (2**27 if h.is_cuda else 2**26) // w.shape[0])
    rows = max(1, SOFTMAX_LOGITS // w.shape[0])
    if not torch.compiler.is_compiling():  # eager: drop ignored rows before the head (SFT prompts)
        keep = targets != IGNORE
        if not bool(keep.all()) and bool(keep.any()):
            h, targets = h[keep], targets[keep]
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        with torch.autocast(h.device.type, enabled=False):
            return _LinearCrossEntropy.apply(h, w, targets, dtype, chunk, rows)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    wc = w.to(dtype)
    if not h.is_cuda:  # no gradients to keep: chunks small enough to keep the logits in cache, but
        # not narrower than the matmul is wide (timings: docs/EXPERIMENTS.md, bench/eval_throughput.py)
        chunk = min(chunk, 256, max(64, h.shape[1]))
    n = (targets != IGNORE).sum()
    if h.is_cuda or dtype != torch.float32 or torch.compiler.is_compiling() or not bool(n):
        for i in range(0, targets.numel(), chunk):
            logits = (h[i : i + chunk].to(dtype) @ wc.t()).float()
            total += F.cross_entropy(logits, targets[i : i + chunk], reduction="sum")
        return total / n
    # CPU fp32 (evaluation), every target valid: the logits and log-probabilities of each chunk
    # go to two buffers made once (their pages stay mapped and in cache), not to fresh tensors.
    # log_softmax's own vectorised exp beats a hand-written max/sub/exp_/sum/log chain over the
    # same buffer (see bench/eval_throughput.py; figures in docs/EXPERIMENTS.md).
    buf = torch.empty(min(chunk, targets.numel()), w.shape[0])
    logp = torch.empty_like(buf)
    for i in range(0, targets.numel(), chunk):
        t = targets[i : i + chunk]
        logits = torch.mm(h[i : i + chunk], wc.t(), out=buf[: t.numel()])
        torch.ops.aten._log_softmax.out(logits, 1, False, out=logp[: t.numel()])
        total -= logp[: t.numel()].gather(1, t[:, None]).sum()
    return total / n


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self._decode_slabs: tuple[list, list, dict] | None = None  # see decode_weights()
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
        if (T == 1 and cache.weight_slabs and cache.lengths is None and not self.training
                and cache.kv.dtype == self.tok_emb.weight.dtype):
            return self._decode_step(idx, cache), None
        x = self.tok_emb(idx)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]  # shared by all layers
        ragged = cache is not None and cache.lengths is not None
        if ragged:  # each row at its own position: (B, 1, 3, 1, head_dim) tables
            if T != 1:
                raise ValueError(f"ragged rows decode one token at a time (got {T})")
            cos, sin = self.rope_cos[cache.lengths][:, None], self.rope_sin[cache.lengths][:, None]
        if cos.dtype != dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i)
        x = self.norm(x)
        cap = self.config.logit_softcap
        if cache is not None:
            cache.pos += T
            if ragged:
                cache.lengths += 1
            return self._cap(_linear(x[:, -1:], self.tok_emb, cache)), None
        if targets is not None and cap > 0:  # the chunked loss has no tanh: plain logits
            logits = self._cap(F.linear(x, self.tok_emb.weight).float())
            return None, F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1), ignore_index=IGNORE)
        if targets is not None:
            if x.device.type != "cpu":
                # On a GPU the step is launch-bound, and the chunked loop's many small kernels (and
                # its graph breaks under torch.compile) cost more than the logits' memory
                # (bench/train_throughput.py; figures in docs/EXPERIMENTS.md).
                logits = F.linear(x, self.tok_emb.weight).float()
                return None, F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1), ignore_index=IGNORE)
            return None, linear_cross_entropy(x.view(B * T, -1), self.tok_emb.weight, targets.reshape(-1))
        return self._cap(F.linear(x, self.tok_emb.weight)), None

    def _decode_step(self, idx: Tensor, cache: KVCache) -> Tensor:
        """One token per row through the cache's weight slabs (CPU fp32 decoding): the blocks'
        math as plain ops on (B, ...) tensors, without the modules' calls and the 5-D views they
        share with training. The same numbers as the blocks' own T = 1 path (tested bitwise) in
        less time per token (bench/generate_throughput.py)."""
        c, B, pos = self.config, idx.shape[0], cache.pos
        H, hd, C = c.n_head, c.n_embd // c.n_head, c.n_embd
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (3, 1, hd): q | k | v slots
        x = self.tok_emb(idx).view(B, C)
        for i, block in enumerate(self.layers):
            attn, mlp, n1, n2 = block.attn, block.mlp, block.attn_norm, block.mlp_norm
            qkv = _linear(F.rms_norm(x, (C,), n1.weight, n1.eps), attn.qkv, cache).view(B, 3, H, hd)
            qkv = torch.addcmul(qkv * cos, qkv.view(B, 3, H, 2, hd // 2).flip(-2).view(B, 3, H, hd), sin)
            if attn.qk_norm:
                qkv = torch.cat((F.rms_norm(qkv[:, :2], (hd,)), qkv[:, 2:]), dim=1)
            kv = cache.kv[i]  # (k|v, B, H, max_len, hd)
            kv[:, :, :, pos] = qkv[:, 1:].transpose(0, 1)
            k, v = kv[:, :, :, : pos + 1].flatten(1, 2).unbind(0)  # (B * H, pos + 1, hd) each
            att = torch.bmm(qkv[:, 0].reshape(B * H, 1, hd), k.mT).mul_(hd**-0.5).softmax(-1)
            x = x + _linear(torch.bmm(att, v).view(B, C), attn.proj, cache)
            h = F.rms_norm(x, (C,), n2.weight, n2.eps)
            if mlp.relu2:
                h = F.relu(_linear(h, mlp.up, cache)).square()
            else:
                gate, up = _linear(h, mlp.gate_up, cache).chunk(2, dim=-1)
                h = F.silu(gate) * up
            x = x + _linear(h, mlp.down, cache)
        cache.pos += 1
        return self._cap(_linear(self.norm(x), self.tok_emb, cache)).view(B, 1, -1)

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

    def decode_weights(self) -> dict[nn.Module, Tensor]:
        """Every matmul weight (the tied head included) as P = torch.get_num_threads() contiguous
        (in, ceil(out/P)) slabs, (P, in, out/P), the last zero-padded; CPU decoding reads them
        instead of nn.Linear's (out, in) rows; with `decode_dtype` fp16 or int8, that dtype's
        matmuls (`minigpt.quant`) instead of the slabs. Made once (as long as ~10 decode steps) and
        remade only when the thread count (fp32) or decode_dtype changed or a weight has been
        moved, replaced or updated in place since (its storage or version counter changed)."""
        mods = [m for m in self.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
        n_slabs, dtype = torch.get_num_threads(), self.decode_dtype
        key = [n_slabs if dtype == "fp32" else 0, dtype] + [(m.weight.data_ptr(), m.weight._version) for m in mods]
        if self._decode_slabs is None or self._decode_slabs[0] != key:
            # the key's tensors stay referenced (detach shares storage and version counter), so
            # a replaced weight's address cannot be reused by a new one and read as unchanged
            pinned = [m.weight.detach() for m in mods]
            if dtype == "fp32":
                made = {m: _slabs(w, n_slabs) for m, w in zip(mods, pinned)}
            else:  # lower-precision weights instead of the slabs (minigpt.quant)
                from minigpt.quant import LINEARS, check_dtype

                made = {m: LINEARS[check_dtype(dtype)](w) for m, w in zip(mods, pinned)}
            self._decode_slabs = (key, pinned, made)
        return self._decode_slabs[2]

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None
                  ) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to max_len (default block_size) tokens.

        dtype defaults to the autocast dtype when autocast is on, else the weights' dtype. On CPU
        in fp32 without autocast the cache also points at `decode_weights()`, which the cached
        forward reads instead of the weights."""
        c, w = self.config, self.tok_emb.weight
        device = torch.device(device if device is not None else w.device)
        autocast = torch.is_autocast_enabled(device.type)
        if dtype is None:
            dtype = torch.get_autocast_dtype(device.type) if autocast else w.dtype
        max_len = min(max_len or c.block_size, c.block_size)
        cache = KVCache(c.n_layer, batch_size, c.n_head, max_len, c.n_embd // c.n_head, device, dtype)
        if device.type == "cpu" and w.dtype == torch.float32 and not autocast:
            cache.weight_slabs = self.decode_weights()
        return cache
