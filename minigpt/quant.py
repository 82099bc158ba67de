"""Lower-precision weights for CPU decoding: int8 and fp16, chosen with `--dtype`.

- Decoding one token reads every weight once and does little else with it, so fewer bytes per
  weight is the lever (int8: a quarter of fp32's, fp16: half). Only the matmuls of the cached
  forward (prefill and decode steps, the tied LM head included) change; the embedding lookup,
  norms, attention and the KV cache stay fp32, and so do training and the eval stage. fp32 stays
  the default and exact.
- int8: weights symmetric per output row (round to nearest, -127..127); each matmul quantizes its
  input on the fly (7-bit range, as torch's dynamic quantization does) and runs torch's x86
  quantized linear (fbgemm: int8 dot products, int32 sums, prepacked weights), much as llama.cpp's
  q8_0 quantizes activations. torch's weight-only `aten._weight_int8pack_mm` gives the same
  weights but is slower at one row on AVX2 than the fp32 weights it replaces (docs/EXPERIMENTS.md).
- fp16: fbgemm's fp16-weight linear (fp32 inputs and sums, weights widened in registers, fast with
  F16C); fp16 keeps 3 more mantissa bits than bf16, which decoded no faster than fp32 here.
- These kernels take torch's deprecated quantized tensor API (torchao's CPU int8 paths are the
  slower kernels above): its warning is silenced where the weights are packed, and `available()`
  says when a torch build lacks the kernels. `minigpt.decode.decode_weights` makes the weights
  once per model and dtype and the cache reads them in place of the fp32 slabs.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

DTYPES = ("fp32", "fp16", "int8")  # --dtype choices; fp32 = the exact default
INT8_MAX = 127  # symmetric: -127..127, so the scale maps amax to 127 and -amax to -127
REDUCE_RANGE = True  # 7-bit inputs: fbgemm's int16 pair sums (u8 * s8 + u8 * s8) cannot saturate


def available(dtype: str) -> str | None:
    """None when this torch build can decode in `dtype`, else why not (one line)."""
    if dtype not in DTYPES:
        return f"decode dtype must be one of {', '.join(DTYPES)} (got {dtype!r})"
    if dtype != "fp32" and "fbgemm" not in torch.backends.quantized.supported_engines:
        return f"decoding in {dtype} needs torch's x86 quantized kernels (fbgemm), not in this build"
    return None


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (out, in) float -> (int8 (out, in), fp32 scales (out,)) with w ~= q * scales[:, None]."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))  # an all-zero row: q = 0
    q = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scales.contiguous()


class Int8Linear:
    """x @ w.T with w as int8 rows and per-row scales (`quantize_int8`), x quantized per call."""

    def __init__(self, w: Tensor):
        self.q, self.scales = quantize_int8(w)
        zeros = torch.zeros(len(self.scales), dtype=torch.long)
        with warnings.catch_warnings():  # the deprecated quantized tensor API (module docstring)
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(self.q, self.scales.double(), zeros, 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, None)

    def dequantized(self) -> Tensor:
        """The fp32 matrix this one multiplies by."""
        return self.q.float() * self.scales[:, None]

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, REDUCE_RANGE)


class Fp16Linear:
    """x @ w.T with w stored in fp16; x and the sums stay fp32."""

    def __init__(self, w: Tensor):
        self.packed = torch.ops.quantized.linear_prepack_fp16(w.detach().float(), None)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


LINEARS = {"int8": Int8Linear, "fp16": Fp16Linear}


def check_dtype(dtype: str) -> str:
    problem = available(dtype)
    if problem:
        raise ValueError(problem)
    return dtype
