"""The GPT (minigpt.model), its chunked loss (minigpt.loss) and KV-cache decoding (minigpt.decode):
loss, gradients, KV cache, RoPE convention, parameter accounting, optimizer groups."""

import math

import pytest
import torch
import torch.nn.functional as F

from minigpt import decode
from minigpt import model as model_mod
from minigpt.loss import _LinearCrossEntropy, linear_cross_entropy
from minigpt.model import GPT, GPTConfig, IGNORE
from minigpt.optim import adamw

V, T = 97, 16


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, n_layer=2, n_head=4, n_embd=32, block_size=T)
    return GPT(GPTConfig(**{**cfg, **kw}))


def batch(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def reference_loss(model, x, y):
    logits, _ = model(x)
    return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=-100)


def test_config_derives_swiglu_width_and_checks_heads():
    assert GPTConfig(vocab_size=10, n_layer=1, n_head=6, n_embd=384, block_size=8).intermediate_size == 1024
    assert GPTConfig(vocab_size=10, n_layer=1, n_head=4, n_embd=256, block_size=8).intermediate_size == 704
    assert GPTConfig(vocab_size=10, n_layer=1, n_head=4, n_embd=256, block_size=8,
                     intermediate_size=100).intermediate_size == 100
    with pytest.raises(ValueError):
        GPTConfig(vocab_size=10, n_layer=1, n_head=5, n_embd=64, block_size=8)
    with pytest.raises(ValueError):  # odd head_dim: RoPE rotates pairs
        GPTConfig(vocab_size=10, n_layer=1, n_head=4, n_embd=12, block_size=8)


def test_loss_and_grads_match_plain_cross_entropy():
    model = tiny()
    x, y = batch()
    y[0, :5] = -100  # ignored positions (SFT prompt, padding)
    ref = reference_loss(model, x, y)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, loss = model(x, y)
    assert logits is None  # the loss path never builds the full logits
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():  # the no-grad (eval) path gives the same number
        torch.testing.assert_close(model(x, y)[1], ref.detach(), atol=1e-6, rtol=1e-6)


def test_linear_cross_entropy_chunking_and_grad_scaling():
    torch.manual_seed(0)
    h = torch.randn(37, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.randint(0, 11, (37,))
    ref = F.cross_entropy(h @ w.t(), t) * 0.25  # a scaled loss (gradient accumulation)
    gh, gw = torch.autograd.grad(ref, (h, w))
    loss = linear_cross_entropy(h, w, t, chunk=5) * 0.25
    h2, w2 = torch.autograd.grad(loss, (h, w))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h2, gh)
    torch.testing.assert_close(w2, gw)
    assert torch.isnan(linear_cross_entropy(h, w, torch.full((37,), -100)))  # like F.cross_entropy
    # ignored rows: masking inside the chunks (the torch.compile path) == dropping them first (eager)
    t[::3] = IGNORE

    ref = F.cross_entropy(h @ w.t(), t)
    masked = _LinearCrossEntropy.apply(h, w, t, torch.float32, 4, 3)
    torch.testing.assert_close(masked, ref)
    torch.testing.assert_close(torch.autograd.grad(masked, h)[0], torch.autograd.grad(ref, h)[0])
    torch.testing.assert_close(linear_cross_entropy(h, w, t), ref)


def test_linear_cross_entropy_without_grad_matches_cross_entropy():
    # the no-grad CPU fp32 path (logits and log-probabilities in reused buffers): chunk remainders,
    # ignored rows, logits large enough that a plain exp would overflow, all rows ignored
    torch.manual_seed(0)
    h, w = torch.randn(37, 8) * 30, torch.randn(11, 8)
    t = torch.randint(0, 11, (37,))
    t[::4] = IGNORE
    ref = F.cross_entropy(h @ w.t(), t)
    with torch.no_grad():
        for chunk in (5, 37, 256):
            torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk=chunk), ref)
        assert torch.isnan(linear_cross_entropy(h, w, torch.full((37,), IGNORE)))
        assert not torch.isfinite((h @ w.t()).exp()).all()  # the case the max subtraction is for
        long_h, long_t = torch.randn(150, 8) * 30, torch.randint(0, 11, (150,))  # default chunks: 64
        torch.testing.assert_close(linear_cross_entropy(long_h, w, long_t),
                                   F.cross_entropy(long_h @ w.t(), long_t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_training_path_keeps_underflowing_targets_exact(dtype):
    # the training path takes log p(target) from the softmax; a block where a target's probability
    # underflows fp32 (logits ~30x apart here) takes exact log-probabilities from log_softmax

    torch.manual_seed(0)
    h, w = (torch.randn(37, 8) * 30).requires_grad_(), torch.randn(11, 8).requires_grad_()
    t = torch.randint(0, 11, (37,))
    logits = (h.to(dtype) @ w.to(dtype).t()).float()  # rounded to dtype, as the path computes them
    assert (logits.softmax(-1).gather(1, t[:, None]) == 0).sum() >= 3  # underflowed: the case under test
    ref = F.cross_entropy(logits.double(), t)
    gh, gw = torch.autograd.grad(ref, (h, w))
    loss = _LinearCrossEntropy.apply(h, w, t, dtype, 16, 5)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    h2, w2 = torch.autograd.grad(loss, (h, w))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(h2.double(), gh.double(), **tol)
    torch.testing.assert_close(w2.double(), gw.double(), **tol)


def test_linear_cross_entropy_bf16_matches_autocast_cross_entropy():
    # the bf16 path (matmuls in bf16, softmax in fp32 blocks written back over bf16 logits) against
    # autograd through F.cross_entropy of the same bf16 logits
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = (torch.randn(300, 32) * 0.3).requires_grad_()
    t = torch.randint(0, 300, (64,))
    t[5] = IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ w.t()).float(), t)
    gh, gw = torch.autograd.grad(ref, (h, w))

    for chunk, rows in ((64, 64), (24, 7)):
        loss = _LinearCrossEntropy.apply(h, w, t, torch.bfloat16, chunk, rows)
        h2, w2 = torch.autograd.grad(loss, (h, w))
        assert loss.dtype == torch.float32 and h2.dtype == w2.dtype == torch.float32
        torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(h2, gh, atol=2e-4, rtol=2e-2)
        torch.testing.assert_close(w2, gw, atol=2e-4, rtol=2e-2)


def test_bf16_autocast_loss_close_to_fp32():
    model = tiny()
    x, y = batch()
    ref = reference_loss(model, x, y).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref) < 2e-2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.tok_emb.weight.grad.dtype == torch.float32


def test_plain_causal_attention_matches_sdpa_and_takes_only_small_cpu_bf16():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    go = torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = model_mod.causal_attention(q, k, v)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)  # the same math
    grads = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), go), grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out = model_mod.causal_attention(qb, kb, vb)  # in bf16: within bf16 rounding of the exact result
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=3e-2)
    for a, b in zip(torch.autograd.grad(out, (qb, kb, vb), go.bfloat16()), grads):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=6e-2)
    assert model_mod._plain_causal(qb) and not model_mod._plain_causal(q.float())
    big = torch.empty(1, 1, 2**12 + 1, 8, dtype=torch.bfloat16)  # > CAUSAL_SCORES: flash, no T^2 scores
    assert not model_mod._plain_causal(big)


def test_bf16_training_uses_plain_attention_with_the_same_gradients(monkeypatch):
    model = tiny()
    x, y = batch()
    grads, calls = {}, []
    plain_attention = model_mod.causal_attention
    monkeypatch.setattr(model_mod, "causal_attention", lambda *a: calls.append(1) or plain_attention(*a))
    for plain in (True, False):
        if not plain:
            monkeypatch.setattr(model_mod, "_plain_causal", lambda q: False)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        grads[plain] = (loss.item(), [p.grad.clone() for p in model.parameters()])
        assert len(calls) == model.config.n_layer  # once per layer in the plain run, no more after
    assert abs(grads[True][0] - grads[False][0]) < 1e-2
    for a, b in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(a, b, rtol=0.1, atol=2e-3)


def test_causal():
    model = tiny().eval()
    x, _ = batch(1)
    x2 = x.clone()
    x2[0, 10:] = (x2[0, 10:] + 1) % V
    with torch.no_grad():
        a, b = model(x)[0], model(x2)[0]
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("threads", [1, 2, 5])  # 5 divides none of the widths: padded slabs
def test_cpu_decode_reads_weight_slabs_one_per_thread(threads):
    model = tiny().eval()
    x, _ = batch(2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            cache = model.new_cache(2)
            linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
            assert set(cache.weight_slabs) == set(linears)  # every matmul weight, the tied head included
            for m, slabs in cache.weight_slabs.items():
                out, c_in = m.weight.shape
                assert slabs.shape == (threads, c_in, -(-out // threads))
                # each slab one block of memory, the longer side along it (decode._slabs)
                assert (slabs.mT if c_in > out else slabs).is_contiguous()
                joined = slabs.transpose(0, 1).reshape(c_in, -1)
                assert torch.equal(joined[:, :out], m.weight.t()) and not joined[:, out:].any()
            assert model.new_cache(1).weight_slabs is cache.weight_slabs  # made once, not per cache
            with torch.autocast("cpu", dtype=torch.bfloat16):  # the copies would be cast every step
                assert model.new_cache(1).weight_slabs == {}
            plain = model.new_cache(2)
            plain.weight_slabs = {}
            a = [model(x[:, :8], cache=cache)[0]] + [model(x[:, i : i + 1], cache=cache)[0] for i in range(8, 12)]
            b = [model(x[:, :8], cache=plain)[0]] + [model(x[:, i : i + 1], cache=plain)[0] for i in range(8, 12)]
            torch.set_num_threads(threads + 1)  # another thread count: new slabs
            assert model.new_cache(1).weight_slabs is not cache.weight_slabs
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(torch.cat(a), torch.cat(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 3])  # 3: padded slabs
@pytest.mark.parametrize("knobs", [{}, {"qk_norm": True, "mlp": "relu2", "logit_softcap": 15.0}])
def test_lean_decode_step_equals_the_blocks_bitwise(threads, knobs, monkeypatch):
    # decode._step (CPU fp32 decoding through the slabs) against the general cached path at
    # T = 1, which train() mode selects (dropout 0: the same math): one row, several, and rows of
    # different lengths (KVCache.lengths, as greedy_batch and serve's batch decode them), each at
    # its own position behind a mask
    model = tiny(**knobs)
    x, _ = batch(3)
    calls = []
    lean = decode._step
    monkeypatch.setattr(decode, "_step", lambda *a: calls.append(1) or lean(*a))

    def decoded(rows: int, lengths: list[int] | None) -> torch.Tensor:
        cache = model.new_cache(rows)
        if lengths is None:
            logits = [model(x[:rows, :6], cache=cache)[0]]
        else:
            one, logits = model.new_cache(1), []
            for r, n in enumerate(lengths):  # each prompt prefilled alone, as greedy_batch does
                one.reset()
                model(x[r : r + 1, :n], cache=one)
                cache.copy_prefix(one, slice(r, r + 1))
            cache.lengths, cache.pos = torch.tensor(lengths), max(lengths)
        logits += [model(x[:rows, i : i + 1], cache=cache)[0] for i in range(6, 10)]
        if lengths is not None:
            assert cache.lengths.tolist() == [n + 4 for n in lengths] and cache.pos == max(lengths) + 4
        return torch.cat(logits, 1)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for rows, lengths in ((1, None), (3, None), (3, [5, 9, 2])):
                out = {}
                for mode in ("lean", "blocks"):
                    model.train(mode == "blocks")
                    out[mode] = decoded(rows, lengths)
                assert out["lean"].shape == (rows, 5 if lengths is None else 4, V)
                assert torch.equal(out["lean"], out["blocks"])
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 3 * 4  # every decode step of the eval-mode runs took the lean path


def test_decode_weights_follow_every_weight_change():
    # the copies live on the model across caches: a stale one would decode with old weights
    model = tiny().eval()
    x, _ = batch(1)

    def decoded():
        with torch.no_grad():
            return model(x[:, :6], cache=model.new_cache(1))[0]

    def full():
        with torch.no_grad():
            return model(x[:, :6])[0][:, -1:]

    first = decode.decode_weights(model)
    with torch.no_grad():
        model.layers[0].mlp.down.weight.mul_(3.0)  # in place, as an optimizer step
    assert decode.decode_weights(model) is not first
    torch.testing.assert_close(decoded(), full(), atol=1e-5, rtol=1e-5)
    model.load_state_dict({k: v * 0.5 for k, v in tiny().state_dict().items()})  # as a resume
    torch.testing.assert_close(decoded(), full(), atol=1e-5, rtol=1e-5)
    model.to(torch.bfloat16).float()  # replaced storage, possibly at a freed address
    torch.testing.assert_close(decoded(), full(), atol=1e-5, rtol=1e-5)
    kept = decode.decode_weights(model)
    assert decode.decode_weights(model) is kept  # unchanged weights: no new copies


def test_kv_cache_prefill_decode_and_chunked_prefill_match_full_forward():
    model = tiny().eval()
    x, _ = batch(2)
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_cache(2)
        got = [model(x[:, :6], cache=cache)[0][:, -1]]  # prefill
        want = [full[:, 5]]
        for t in range(6, 9):  # one-token decode
            got.append(model(x[:, t : t + 1], cache=cache)[0][:, -1])
            want.append(full[:, t])
        got.append(model(x[:, 9:T], cache=cache)[0][:, -1])  # chunked prefill at pos > 0
        want.append(full[:, T - 1])
    assert cache.pos == T
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        model(x[:, :1], cache=cache)


def test_ragged_cache_rows_decode_at_their_own_positions():
    """Rows of different lengths in one cache (KVCache.lengths): each step's logits equal a full
    forward over that row's own tokens, and a row never sees another row's longer tail."""
    model = tiny().eval()
    x, _ = batch(3)
    lens = [3, 9, 6]
    with torch.no_grad():
        cache, one = model.new_cache(3), model.new_cache(1)
        for r, n in enumerate(lens):  # prefill alone, then copy into the row
            one.reset()
            model(x[r : r + 1, :n], cache=one)
            cache.copy_prefix(one, slice(r, r + 1))
        cache.kv[:, :, 0, :, 3:] = 1e4  # garbage past row 0's length must stay masked
        for step in range(4):
            cache.lengths, cache.pos = torch.tensor([n + step for n in lens]), max(lens) + step
            new = torch.stack([x[r, n + step] for r, n in enumerate(lens)])[:, None]
            got = model(new, cache=cache)[0][:, -1]
            assert cache.lengths.tolist() == [n + step + 1 for n in lens]
            for r, n in enumerate(lens):
                want = model(x[r : r + 1, : n + step + 1])[0][0, -1]
                torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="one token at a time"):
            model(x[:, :2], cache=cache)


def test_cache_in_other_dtype_than_weights():
    model = tiny().eval()
    x, _ = batch(1)
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_cache(1, dtype=torch.bfloat16)
        logits, _ = model(x, cache=cache)
    assert cache.kv.dtype == torch.bfloat16 and logits.dtype == torch.float32
    torch.testing.assert_close(logits[:, -1], full[:, -1], atol=5e-2, rtol=5e-2)


def test_rope_is_hf_rotate_half():
    """Reference: HF Llama's apply_rotary_pos_emb (rotate_half) on q and k, identity on v."""
    model = tiny().eval()
    attn = model.layers[0].attn
    x = torch.randn(1, T, 32)
    hd = 8
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    emb = torch.cat([torch.outer(torch.arange(T).float(), inv)] * 2, -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]

    def rotate_half(t):
        return torch.cat((-t[..., hd // 2 :], t[..., : hd // 2]), dim=-1)

    q, k, v = attn.qkv(x).view(1, T, 3, 4, hd).unbind(2)
    want = torch.stack([q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v], 2)
    from minigpt.model import apply_rope

    got = apply_rope(attn.qkv(x).view(1, T, 3, 4, hd), model.rope_cos[:T], model.rope_sin[:T])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_param_accounting_tied_and_flops():
    model = tiny()
    c = model.config
    emb = V * 32
    per_layer = 32 * 3 * 32 + 32 * 32 + 3 * 32 * c.intermediate_size + 2 * 32
    assert model.num_params() == emb + 2 * per_layer + 32
    assert model.num_params(non_embedding=True) == 2 * per_layer + 32
    sd = model.state_dict()
    assert "tok_emb.weight" in sd and not any("lm_head" in k or "rope" in k for k in sd)
    n = model.num_params()  # non-embedding + the (tied) LM head matrix
    assert model.flops_per_token() == 6 * n + 12 * 2 * 32 * T


def test_init_scales_residual_projections():
    model = GPT(GPTConfig(vocab_size=512, n_layer=8, n_head=4, n_embd=128, block_size=8))
    std = 0.02 / math.sqrt(16)
    assert abs(model.layers[0].attn.proj.weight.std().item() - std) < 0.1 * std
    assert abs(model.layers[0].mlp.down.weight.std().item() - std) < 0.1 * std
    assert abs(model.layers[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert torch.all(model.norm.weight == 1)


def test_adamw_decays_matrices_only():
    model = tiny()
    opt = adamw(model.parameters(), 0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch()
    model(x, y)[1].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # every tensor moved


def test_dropout_only_in_training():
    model = tiny(dropout=0.5)
    x, _ = batch(1)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x)[0], model(x)[0])
        model.eval()
        torch.testing.assert_close(model(x)[0], model(x)[0])


def test_dropout_drops_block_outputs_not_attention_probabilities():
    """In training, every element of an attention (or MLP) output is 0 or its eval value / (1 - p):
    one mask on the output, none inside attention (which would also force SDPA's math path)."""
    model, p = tiny(dropout=0.5), 0.5
    block = model.layers[0]
    x = torch.randn(2, 16, block.attn.proj.weight.shape[0])
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    with torch.no_grad():
        for f in (lambda: block.attn(x, cos, sin), lambda: block.mlp(x)):
            model.eval()
            want = f()
            model.train()
            got = f()
            kept = got != 0
            assert 0.3 < kept.float().mean() < 0.7
            torch.testing.assert_close(got[kept], want[kept] / (1 - p))


KNOBS = [dict(qk_norm=True), dict(mlp="relu2"), dict(logit_softcap=5.0), dict(zero_init=True)]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "-".join(map(str, k.items())))
def test_recipe_knobs_loss_cache_and_gradients(knobs):
    model = tiny(**knobs)
    with torch.no_grad():  # zero-init blocks would hide a broken path; soft-capping needs big logits
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    x, y = batch()
    _, loss = model(x, y)
    torch.testing.assert_close(loss, reference_loss(model, x, y), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    full, _ = model(x)
    if knobs.get("logit_softcap"):
        assert full.abs().max() <= 5.0
    cache = model.new_cache(3)
    with torch.no_grad():
        model(x[:, :10], cache=cache)
        step, _ = model(x[:, 10:11], cache=cache)
    torch.testing.assert_close(step[:, 0], full[:, 10].detach(), rtol=1e-4, atol=1e-4)


def test_knob_shapes_and_init():
    assert GPTConfig(vocab_size=10, n_layer=1, n_head=4, n_embd=128, block_size=8, mlp="relu2").intermediate_size == 512
    model = tiny(zero_init=True)
    assert torch.all(model.layers[1].attn.proj.weight == 0) and torch.all(model.layers[0].mlp.down.weight == 0)
    assert model.layers[0].attn.qkv.weight.std() > 0.01
    assert not hasattr(tiny(mlp="relu2").layers[0].mlp, "gate_up")
    with pytest.raises(ValueError, match="mlp"):
        GPTConfig(vocab_size=10, n_layer=1, n_head=4, n_embd=32, block_size=8, mlp="gelu")


@pytest.mark.slow
def test_compiled_training_loss_has_no_graph_break():
    # torch.compile on CPU traces the chunked loss whole (~12 s to compile; a break doubled that)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny()
    x, y = batch()
    y[0, :5] = IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = torch.compile(model)(x, y)
        _, ref = model(x, y)
    loss.backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
