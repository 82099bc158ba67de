"""Lower-precision weights for CPU decoding: int8 weight-only and bf16, chosen with `--dtype`.

Design choices
- Decoding one token reads every weight once and does little else with it, so fewer bytes per
  weight is the lever (int8: a quarter of fp32's). Only the matmuls of the cached forward (prefill
  and decode steps, the tied LM head included) change; the embedding lookup, norms, attention and
  the KV cache stay fp32, and so do training and the eval stage. fp32 stays the default and exact.
- int8: symmetric, one fp32 scale per output row (per-channel, round to nearest, -127..127), run by
  torch's CPU weight-only kernel `aten._weight_int8pack_mm` (x fp32 (M, K), w int8 (N, K),
  scales fp32 (N,): x @ (w * scales).T), which dequantizes in registers and streams the int8
  rows on all threads. The error per output is at most sum_k |x_k| * scale_n / 2.
- bf16: the weights rounded to bf16, activations cast to bf16 for each matmul and back. It halves
  the bytes, but only CPUs with native bf16 dot products (AVX512-BF16, AMX) run it fast.
- The weights are made once per model and dtype by `GPT.decode_weights` (which caches them like
  the fp32 slabs) and read through `KVCache.weight_slabs`; a value there that is not a tensor is
  one of these callables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DTYPES = ("fp32", "int8", "bf16")  # --dtype choices; fp32 = the exact default
INT8_MAX = 127  # symmetric: -127..127, so the scale maps amax to 127 and -amax to -127


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (out, in) float -> (int8 (out, in), fp32 scales (out,)) with w ~= q * scales[:, None]."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))  # an all-zero row: q = 0
    q = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scales.contiguous()


class Int8Linear:
    """x @ w.T with w stored as int8 rows and per-row scales (`quantize_int8`)."""

    def __init__(self, w: Tensor):
        self.q, self.scales = quantize_int8(w)

    def dequantized(self) -> Tensor:
        """The fp32 matrix this one multiplies by (the reference the kernel is tested against)."""
        return self.q.float() * self.scales[:, None]

    def __call__(self, x: Tensor) -> Tensor:
        n_out, c_in = self.q.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, c_in).contiguous(), self.q, self.scales)
        return y.view(*x.shape[:-1], n_out)


class Bf16Linear:
    """x @ w.T with w stored in bf16; x is cast to bf16 for the matmul, the result back to x's dtype."""

    def __init__(self, w: Tensor):
        self.w = w.detach().to(torch.bfloat16).contiguous()

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x.to(torch.bfloat16), self.w).to(x.dtype)


LINEARS = {"int8": Int8Linear, "bf16": Bf16Linear}


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"decode dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    return dtype
