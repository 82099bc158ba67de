"""Lower-precision CPU decoding (minigpt.quant): the int8 and fp16 kernels against dequantized
reference matmuls, the int8 error bound, and int8 / fp16 greedy decoding against fp32 on a briefly
trained model."""

import pytest
import torch

from minigpt.model import GPT, GPTConfig
from minigpt.quant import REDUCE_RANGE, Fp16Linear, Int8Linear, available, check_dtype, quantize_int8
from minigpt.sample import generate, greedy_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

V, BLOCK = 64, 32
kernels = pytest.mark.skipif(available("int8") is not None, reason="no x86 quantized kernels (fbgemm)")


@kernels
@pytest.mark.parametrize("n_out, c_in", [(96, 64), (97, 32), (5, 160)])  # odd widths too
def test_int8_matmul_equals_the_dequantized_matmul_within_its_bound(n_out, c_in):
    torch.manual_seed(n_out)
    w = torch.randn(n_out, c_in) * torch.rand(n_out, 1)  # rows of different scales
    w[0] = 0.0  # an all-zero row quantizes to zeros, not NaN
    lin = Int8Linear(w)
    q, scales = lin.q, lin.scales
    assert q.dtype == torch.int8 and q.shape == (n_out, c_in) and scales.shape == (n_out,)
    assert int(q.abs().max()) == 127 and bool((q[0] == 0).all())
    assert bool((q[1:].abs().amax(1) == 127).all())  # each row's largest weight maps to +-127
    deq = lin.dequantized()
    assert bool(((deq - w).abs() <= scales[:, None] / 2 + 1e-7).all())  # round to nearest
    for shape in [(1, c_in), (3, c_in), (2, 5, c_in)]:  # a decode step, several rows, a prefill
        x = torch.randn(*shape) + 0.5
        y = lin(x)
        assert y.shape == (*shape[:-1], n_out) and y.dtype == torch.float32
        # the kernel is the matmul of the dequantized input and weights (exact int32 sums) ...
        xq = torch.quantize_per_tensor_dynamic(x, torch.quint8, REDUCE_RANGE)
        torch.testing.assert_close(y, xq.dequantize() @ deq.T, atol=1e-5, rtol=1e-5)
        # ... so its error against fp32 is bounded by both roundings: the weights' (half a scale
        # per row) and the input's (one input step at most, the zero point being rounded too)
        bound = x.abs() @ (scales / 2).expand(c_in, -1) + xq.q_scale() * deq.abs().sum(1)
        assert bool(((y - x @ w.T).abs() <= bound + 1e-4).all())
        assert float((y - x @ w.T).abs().max()) > 0  # it is not the fp32 matmul


@kernels
def test_fp16_linear_is_the_matmul_of_fp16_weights():
    torch.manual_seed(0)
    w, x = torch.randn(48, 32), torch.randn(2, 3, 32)
    y = Fp16Linear(w)(x)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 48)
    torch.testing.assert_close(y, x @ w.half().float().T, atol=1e-5, rtol=1e-5)
    assert not torch.equal(y, x @ w.T)


def test_quantize_int8_is_symmetric_per_row():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [-4.0, 4.0, 1.0]])
    q, s = quantize_int8(w)
    torch.testing.assert_close(s, torch.tensor([2 / 127, 1.0, 4 / 127]))
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [-127, 127, 32]]
    with pytest.raises(ValueError, match="int4"):
        check_dtype("int4")


def pattern(n: int, start: int) -> list[int]:
    """A deterministic sequence (each token fixes the next): something a tiny model learns fast."""
    out = [start]
    while len(out) < n:
        out.append((5 * out[-1] + 3) % V)
    return out


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=4, n_embd=64, block_size=BLOCK))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, V, (16,), generator=gen).tolist()
        batch = torch.tensor([pattern(BLOCK + 1, s) for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5  # it has learned the pattern: greedy continuations are meaningful
    return model.eval()


PROMPTS = [pattern(3, 7 * i % V) for i in range(8)]


@kernels
@pytest.mark.parametrize("dtype", ["int8", "fp16"])
@torch.inference_mode()
def test_low_precision_decoding_agrees_with_fp32(trained, dtype):
    want = [generate(trained, p, 20, temperature=0.0) for p in PROMPTS]
    fp32_logits, _ = trained(torch.tensor([PROMPTS[0]]), cache=trained.new_cache(1))
    trained.decode_dtype = dtype
    try:
        cache = trained.new_cache(1)
        kinds = {type(w) for w in cache.weight_slabs.values()}
        assert kinds == {Int8Linear if dtype == "int8" else Fp16Linear}  # every matmul, head included
        logits, _ = trained(torch.tensor([PROMPTS[0]]), cache=cache)
        assert not torch.equal(logits, fp32_logits)  # the lower-precision weights were used ...
        assert float((logits - fp32_logits).abs().max()) < 0.05 * float(fp32_logits.abs().max())  # ... close
        got = [generate(trained, p, 20, temperature=0.0) for p in PROMPTS]
        batched = greedy_batch(trained, PROMPTS, 20)  # ragged rows take the blocks' path
    finally:
        trained.decode_dtype = "fp32"
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    assert same >= 0.9 * sum(len(w) for w in want)
    assert sum(a == b for w, g in zip(want, batched) for a, b in zip(w, g)) >= 0.9 * same
    # back to fp32: the exact slabs again, greedy equal to the full forward as before
    assert all(isinstance(w, torch.Tensor) for w in trained.new_cache(1).weight_slabs.values())
    assert [generate(trained, p, 20, temperature=0.0) for p in PROMPTS] == want
