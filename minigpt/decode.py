"""Decoding with a KV cache: the cached forward (prefill and one-token steps) and its CPU engine.

- `KVCache`: one preallocated (layer, k|v, batch, head, position, head_dim) tensor written in
  place. Ragged rows (`KVCache.lengths`) decode different prompts together behind a mask.
  Positions stop at the cache's max_len (at most block_size: RoPE's tables stop there).
- A decode step reads every weight once and does a few hundred small ops around the GEMVs, so it
  is written for few ops. On CPU in fp32 the cache reads each weight as one slab per thread
  (`decode_weights`): a bmm over P slabs runs on all P threads, and each slab keeps the longer
  side of its matrix along memory, which MKL's one-row matmul streams faster; the copies cost the
  weights' memory once more. `_step` runs a step as plain ops into buffers made once per cache
  (`_Plan`), bitwise equal to the general cached path (`_attention`, `_mlp`).
- With `GPT.decode_dtype` fp16 or int8 the cache holds `minigpt.quant`'s matmuls in the slabs' place.
- CPU decode attention is plain matmuls and a softmax, whose results do not depend on the thread
  count (the flash kernel splits its work by it), so `sample.StepThreads` may switch counts freely.
- Timings behind these choices: docs/EXPERIMENTS.md, bench/decode_step.py (where a step's time
  goes) and bench/generate_throughput.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minigpt.model import attend

if TYPE_CHECKING:
    from minigpt.model import GPT, MLP, Attention


class KVCache:
    """Preallocated keys and values of every layer: kv is (n_layer, 2, B, n_head, max_len, head_dim),
    keys at [:, 0], values at [:, 1], so one copy writes both. The batch and head dims are
    adjacent, so a (B, n_head, seen, head_dim) slice is one strided batch that attention's
    matmuls read in place (with k|v as 2 * n_head heads of one row, every step copied the keys
    and values first; docs/EXPERIMENTS.md).

    `pos` is the number of positions already written; the cached forward advances it. `lengths`,
    when set (int64 (B,)), gives each row its own length instead: a decode step (T = 1) writes row
    b's token at position lengths[b] and attends to its positions 0..lengths[b]; `pos` is then the
    longest row's length."""

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device=None, dtype=None):
        self.kv = torch.zeros(n_layer, 2, batch_size, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.lengths: Tensor | None = None
        self.weight_slabs: dict = {}  # module -> (P, in, out/P) weight slabs or a quant matmul, CPU decoding
        self.plan: _Plan | None = None  # the lean decode step's buffers (`_step`)

    def reset(self) -> None:
        self.pos = 0  # stale entries beyond pos are never read

    def copy_prefix(self, one: KVCache, rows: slice = slice(None)) -> None:
        """Positions 0..one.pos-1 of the one-row cache `one` into `rows` of this one (each row
        the same prefix): a prompt prefilled once, for several rows."""
        self.kv[:, :, rows, :, : one.pos] = one.kv[:, :, :1, :, : one.pos]

    def keep_rows(self, index: Tensor) -> None:
        """Only the rows `index` (int64), in that order: finished rows leave a batch."""
        self.kv = self.kv.index_select(2, index)
        self.plan = None
        if self.lengths is not None:
            self.lengths = self.lengths[index]


def new_cache(model: GPT, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
    """An empty KV cache for `batch_size` sequences of up to max_len (default block_size) tokens.

    dtype defaults to the autocast dtype when autocast is on, else the weights' dtype. On CPU
    in fp32 without autocast the cache also points at `decode_weights(model)`, which the cached
    forward reads instead of the weights."""
    c, w = model.config, model.tok_emb.weight
    device = torch.device(device if device is not None else w.device)
    autocast = torch.is_autocast_enabled(device.type)
    if dtype is None:
        dtype = torch.get_autocast_dtype(device.type) if autocast else w.dtype
    max_len = min(max_len or c.block_size, c.block_size)
    cache = KVCache(c.n_layer, batch_size, c.n_head, max_len, c.n_embd // c.n_head, device, dtype)
    if device.type == "cpu" and w.dtype == torch.float32 and not autocast:
        cache.weight_slabs = decode_weights(model)
    return cache


def decode_weights(model: GPT) -> dict[nn.Module, Tensor]:
    """Every matmul weight (the tied head included) as P = torch.get_num_threads() contiguous
    (in, ceil(out/P)) slabs, (P, in, out/P), the last zero-padded; CPU decoding reads them
    instead of nn.Linear's (out, in) rows; with `model.decode_dtype` fp16 or int8, that dtype's
    matmuls (`minigpt.quant`) instead of the slabs. Made once (as long as ~10 decode steps) and
    remade only when the thread count (fp32) or decode_dtype changed or a weight has been
    moved, replaced or updated in place since (its storage or version counter changed)."""
    mods = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    n_slabs, dtype = torch.get_num_threads(), model.decode_dtype
    key = [n_slabs if dtype == "fp32" else 0, dtype] + [(m.weight.data_ptr(), m.weight._version) for m in mods]
    if model._decode_slabs is None or model._decode_slabs[0] != key:
        # the key's tensors stay referenced (detach shares storage and version counter), so
        # a replaced weight's address cannot be reused by a new one and read as unchanged
        pinned = [m.weight.detach() for m in mods]
        if dtype == "fp32":
            made = {m: _slabs(w, n_slabs) for m, w in zip(mods, pinned)}
        else:  # lower-precision weights instead of the slabs (minigpt.quant)
            from minigpt.quant import LINEARS, check_dtype

            made = {m: LINEARS[check_dtype(dtype)](w) for m, w in zip(mods, pinned)}
        model._decode_slabs = (key, pinned, made)
    return model._decode_slabs[2]


def _slabs(w: Tensor, n: int) -> Tensor:
    """w (out, in) as n (in, ceil(out/n)) slabs, (n, in, ceil(out/n)), zero-padded, each slab's
    memory one block: (in, out/n) row-major for a matrix at least as wide as it is deep, else
    (out/n, in) (a transposed view): MKL's one-row matmul streams the longer side faster
    (bench/generate_throughput.py --matmuls)."""
    width = -(-w.shape[0] // n)
    padded = F.pad(w, (0, 0, 0, n * width - w.shape[0]))  # zero rows at the end
    slabs = padded.view(n, width, w.shape[1])
    return slabs.clone().mT if w.shape[1] > w.shape[0] else slabs.transpose(1, 2).contiguous()


def linear(x: Tensor, lin: nn.Module, cache: KVCache) -> Tensor:
    """lin(x) (a bias-free Linear, or the tied head's Embedding), through the cache's (P, in,
    out/P) slabs of the weight when it holds them: one batched matmul, a slab per thread."""
    slabs = cache.weight_slabs.get(lin)
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


def forward(model: GPT, idx: Tensor, cache: KVCache) -> Tensor:
    """Logits (B, 1, vocab) after the new tokens `idx` (B, T) at positions cache.pos.. (a prefill,
    T > 1, or a decode step, T = 1); the cache is updated in place. The caller (`GPT.forward`)
    has checked that the positions fit."""
    if (idx.shape[1] == 1 and cache.weight_slabs and not model.training
            and cache.kv.dtype == model.tok_emb.weight.dtype):
        return _step(model, idx, cache)
    T, pos = idx.shape[1], cache.pos
    x = model.tok_emb(idx)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    cos, sin = model.rope_cos[pos : pos + T], model.rope_sin[pos : pos + T]  # shared by all layers
    ragged = cache.lengths is not None
    if ragged:  # each row at its own position: (B, 1, 3, 1, head_dim) tables
        if T != 1:
            raise ValueError(f"ragged rows decode one token at a time (got {T})")
        cos, sin = model.rope_cos[cache.lengths][:, None], model.rope_sin[cache.lengths][:, None]
    if cos.dtype != dtype:
        cos, sin = cos.to(dtype), sin.to(dtype)
    for i, block in enumerate(model.layers):
        x = x + _attention(block.attn, block.attn_norm(x), cos, sin, cache, i)
        x = x + _mlp(block.mlp, block.mlp_norm(x), cache)
    x = model.norm(x)
    cache.pos += T
    if ragged:
        cache.lengths += 1
    return model._cap(linear(x[:, -1:], model.tok_emb, cache))


def _attention(attn: Attention, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer: int) -> Tensor:
    """`Attention.forward` over the cache: writes the new keys/values, attends over all so far."""
    B, T, C = x.shape
    H = attn.n_head
    qkv = attn.heads(linear(x, attn.qkv, cache), cos, sin)  # (B, 3H, T, hd)
    q, kv = qkv[:, :H], qkv[:, H:].unflatten(1, (2, H)).transpose(0, 1)  # kv: (2, B, H, T, hd)
    mask, dtype = None, q.dtype
    if cache.lengths is not None:  # ragged rows, one new token each
        lengths, seen, past = cache.lengths, cache.pos + 1, cache.kv[layer]
        past[:, torch.arange(B, device=x.device), :, lengths] = kv[:, :, :, 0].transpose(0, 1)
        kv = past[:, :, :, :seen]
        mask = (torch.arange(seen, device=x.device) <= lengths[:, None])[:, None, None]
    else:  # write the new keys/values, attend over everything so far
        pos = cache.pos
        cache.kv[layer, :, :, :, pos : pos + T] = kv
        kv = cache.kv[layer, :, :, :, : pos + T]
        if pos > 0 and T > 1:  # chunked prefill: new queries see the past and a causal block
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
    if q.dtype != kv.dtype:  # cache kept in another dtype than the compute
        q = q.to(kv.dtype)
    if T == 1 and not q.is_cuda:  # thread-count invariant plain ops (module docstring)
        att = (q @ kv[0].transpose(-1, -2)) * attn.head_dim**-0.5
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        y = att.softmax(-1) @ kv[1]
    elif mask is None:  # a prefill from position 0, or a GPU step: as the full forward
        y = attend(q, kv[0], kv[1])
    else:
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
    y = y.transpose(1, 2).reshape(B, T, C)
    if y.dtype != dtype:
        y = y.to(dtype)
    return _dropout(linear(y, attn.proj, cache), attn)


def _mlp(mlp: MLP, x: Tensor, cache: KVCache) -> Tensor:
    return _dropout(linear(mlp.activate(linear(x, mlp.inner, cache)), mlp.down, cache), mlp)


def _dropout(y: Tensor, module: Attention | MLP) -> Tensor:
    """The module's output dropout, as its own forward applies it (training mode only)."""
    return F.dropout(y, module.dropout, True) if module.training and module.dropout > 0 else y


def _matmul(w, x: Tensor, n_out: int, then=None, fresh: bool = False) -> Callable:
    """x @ weight.T as a call without arguments, x a buffer (B, in) that `_Plan` refills: one bmm
    over the (P, in, out/P) slabs, into a buffer made here (or a new tensor when `fresh`), read
    row-major; or the quant matmul `w` (`minigpt.quant`). `then` (views only) reshapes the
    (B, out) result: once, on a buffer that stays, else per call."""
    then = then or (lambda y: y)
    if not isinstance(w, Tensor):
        return lambda: then(w(x))
    (P, _, width), B = w.shape, x.shape[0]
    xs, out = x.expand(P, B, x.shape[1]), torch.empty(P, B, width)
    if B > 1:  # rows > 1: row-major again (a copy), as `linear` does
        return lambda: then(torch.bmm(xs, w).transpose(0, 1).reshape(B, P * width)[:, :n_out])
    if fresh:  # one row is in order already: a view
        return lambda: then(torch.bmm(xs, w).view(1, P * width)[:, :n_out])
    view = then(out.view(1, P * width)[:, :n_out])

    def run():
        torch.bmm(xs, w, out=out)
        return view
    return run


class _Plan:
    """What `_step` reuses at every step of one cache: buffers for the residual stream, the norms
    and the rotated q|k|v, and each layer's matmuls reading them, made once (not per step)."""

    def __init__(self, model: GPT, cache: KVCache):
        c, B, w = model.config, cache.kv.shape[2], cache.weight_slabs
        H, hd, C = c.n_head, c.n_embd // c.n_head, c.n_embd
        self.weights, self.rows = w, B
        self.x, self.h, self.sq, self.r = torch.empty(B, C), torch.empty(B, C), torch.empty(B, C), torch.empty(B, 1)
        # the norms' and attention's constants as 0-d tensors: a Python number costs each op
        # a wrapped scalar (docs/EXPERIMENTS.md), for the same numbers
        self.width = torch.tensor(float(C))
        self.eps = {m: torch.tensor(m.eps) for m in model.modules() if isinstance(m, nn.RMSNorm)}
        self.scale = torch.tensor(hd**-0.5)
        self.rot = torch.empty(3, B, H, hd)  # rotated q | k | v: q and k|v each contiguous
        self.q, self.kv_new = self.rot[0].view(B * H, 1, hd), self.rot[1:]
        self.rot_rows = self.rot.transpose(0, 1)  # (B, 3, H, hd)
        self.rot_halves = self.rot_rows.view(B, 3, H, 2, hd // 2)  # RoPE's halves
        self.o = torch.empty(B * H, 1, hd)  # attention's output, (B, C) for the projection
        self.inner = torch.empty(B, c.intermediate_size)  # the MLP's activation
        halves = (lambda y: y.view(B, 3, H, 2, hd // 2))  # q | k | v, each head's two halves
        gate_up = None if c.mlp == "relu2" else (lambda y: y.chunk(2, dim=-1))
        self.layers = []
        for block in model.layers:
            attn, mlp = block.attn, block.mlp
            self.layers.append((block.attn_norm, _matmul(w[attn.qkv], self.h, 3 * C, halves),
                                _matmul(w[attn.proj], self.o.view(B, C), C), block.mlp_norm,
                                _matmul(w[mlp.inner], self.h, mlp.inner.weight.shape[0], gate_up),
                                _matmul(w[mlp.down], self.inner, C)))
        self.head = _matmul(w[model.tok_emb], self.h, c.vocab_size, fresh=True)

    def norm(self, norm: nn.RMSNorm) -> None:
        """self.h = F.rms_norm(self.x) with norm's weight, in the same ops (the same numbers:
        mean is sum then a division, and pow 2 is x * x, in torch's CPU kernels)."""
        torch.sum(torch.mul(self.x, self.x, out=self.sq), -1, keepdim=True, out=self.r)
        self.r.div_(self.width).add_(self.eps[norm]).rsqrt_()
        torch.mul(self.x, self.r, out=self.h).mul_(norm.weight)


def _step(model: GPT, idx: Tensor, cache: KVCache) -> Tensor:
    """One token per row through the cache's weights (CPU decoding): the blocks' math as plain
    ops on (B, ...) tensors into buffers made once per cache (`_Plan`), without the modules'
    calls and the 5-D views of the general path. The same numbers as `_attention`/`_mlp` at
    T = 1 (tested bitwise) in fewer ops; ragged rows (`KVCache.lengths`) too, each at its own
    position, behind the general path's mask."""
    plan, B, pos, lengths = cache.plan, idx.shape[0], cache.pos, cache.lengths
    if plan is None or plan.weights is not cache.weight_slabs or plan.rows != B:
        plan = cache.plan = _Plan(model, cache)
    c = model.config
    H, hd = c.n_head, c.n_embd // c.n_head
    at = pos if lengths is None else lengths  # q | k | v slots, each head's halves (per row if ragged)
    cos = model.rope_cos[at].view(-1, 3, 1, 2, hd // 2)
    sin = model.rope_sin[at].view(-1, 3, 1, 2, hd // 2)
    seen = cache.kv[:, :, :, :, : pos + 1].flatten(2, 3)  # (layer, k|v, B * H, pos + 1, hd)
    keys, values = seen[:, 0].mT.unbind(0), seen[:, 1].unbind(0)
    if lengths is None:
        new, hidden = cache.kv[:, :, :, :, pos].unbind(0), None
    else:  # row b writes at lengths[b] and sees positions 0..lengths[b]
        rows = torch.arange(B, device=idx.device)
        hidden = (torch.arange(pos + 1, device=idx.device) > lengths[:, None]).view(B, 1, 1, pos + 1)
    torch.index_select(model.tok_emb.weight, 0, idx.view(B), out=plan.x)
    for i, (norm1, qkv, proj, norm2, inner, down) in enumerate(plan.layers):
        plan.norm(norm1)
        y = qkv()  # (B, 3, H, 2, hd / 2)
        torch.mul(y, cos, out=plan.rot_halves).addcmul_(y.flip(-2), sin)
        if c.qk_norm:
            plan.rot_rows[:, :2] = F.rms_norm(plan.rot_rows[:, :2], (hd,))
        if hidden is None:
            new[i].copy_(plan.kv_new)
        else:
            cache.kv[i][:, rows, :, lengths] = plan.kv_new.transpose(0, 1)
        att = torch.bmm(plan.q, keys[i]).mul_(plan.scale)
        if hidden is not None:
            att.view(B, H, 1, pos + 1).masked_fill_(hidden, float("-inf"))
        torch.bmm(att.softmax(-1), values[i], out=plan.o)
        plan.x.add_(proj())
        plan.norm(norm2)
        if c.mlp == "relu2":
            torch.square(F.relu(inner()), out=plan.inner)
        else:
            gate, up = inner()
            torch.mul(F.silu(gate, inplace=True), up, out=plan.inner)
        plan.x.add_(down())
    cache.pos += 1
    if lengths is not None:
        lengths += 1
    plan.norm(model.norm)
    return model._cap(plan.head()).view(B, 1, -1)
