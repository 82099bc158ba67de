"""The chunked cross-entropy of the CPU training loss: logits never materialised.

`_LinearCrossEntropy` walks the rows in chunks and computes each chunk's logits, loss and both
gradients while the chunk is in cache; the softmax runs in fp32 blocks of SOFTMAX_LOGITS written
back over the chunk's logits, and rows with target IGNORE are dropped before the head. At a 30k
vocabulary the LM head is about half the FLOPs and its (B, T, vocab) logits the largest activation,
so this is the CPU path of `GPT.forward`'s loss; GPUs (launch-bound) and a logit softcap (no tanh
here) use plain cross-entropy over full logits. Timings: docs/EXPERIMENTS.md, bench/train_throughput.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SOFTMAX_LOGITS = 2**21  # fp32 logits per softmax block of the chunked loss (8 MB: in cache)
TINY_PROB = 1e-30  # target probabilities below this (fp32 underflows ~1e-38) take log_softmax's log
IGNORE = -100  # the targets' "not a target" id (cross-entropy ignore_index): SFT prompts, padding


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
