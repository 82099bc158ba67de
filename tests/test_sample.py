"""KV-cache decoding and sampling filters, checked against a plain full-forward reference."""

import time
import warnings

import pytest
import torch

from minigpt.model import GPT, GPTConfig
from minigpt.sample import (KEEP_FRACTION, NUCLEUS_CANDIDATES, apply_repetition_penalty, candidates,
                            filter_top_k, filter_top_p, generate, generate_batch, greedy_batch, sample_next)

V, BLOCK = 97, 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=4, n_embd=32, block_size=BLOCK)).eval()
    with torch.no_grad():  # larger weights: sharper, more varied greedy continuations
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return m


def reference_greedy(model, ids, n, penalty=1.0):
    """Full forward over the current window every step; same window policy as the sampler."""
    keep = int(BLOCK * KEEP_FRACTION)
    hist = list(ids)
    win = hist[-keep:] if len(hist) > BLOCK else list(hist)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([win]))[0][0, -1]
            if penalty != 1.0:
                seen = torch.zeros(V, dtype=torch.bool)
                seen[hist] = True
                logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
            tok = int(logits.argmax())
            out.append(tok)
            hist.append(tok)
            win = win + [tok] if len(win) < BLOCK else hist[-keep:]
    return out


PROMPT = [3, 14, 15, 92, 65]


def test_cached_greedy_equals_full_recompute(model):
    assert generate(model, PROMPT, 10, temperature=0) == reference_greedy(model, PROMPT, 10)


def test_sliding_window_beyond_block_size(model):
    n = 2 * BLOCK  # slides several times (every BLOCK / 4 tokens once full)
    with pytest.warns(UserWarning, match="block_size") as record:
        got = generate(model, PROMPT, n, temperature=0)
    assert len([w for w in record if "block_size" in str(w.message)]) == 1  # warned once
    assert got == reference_greedy(model, PROMPT, n)
    long_prompt = list(range(5, 5 + BLOCK + 4))  # a prompt longer than the window
    messages = []
    got = generate(model, long_prompt, 20, temperature=0, on_window=messages.append)
    assert got == reference_greedy(model, long_prompt, 20) and len(messages) == 1


def test_greedy_equivalents(model):
    greedy = generate(model, PROMPT, 8, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert generate(model, PROMPT, 8, temperature=1.0, top_k=1, generator=g) == greedy
    assert generate(model, PROMPT, 8, temperature=0.7, top_p=1e-6, generator=g) == greedy


def test_sampling_is_seeded_and_varies(model):
    def run(seed):
        return generate(model, PROMPT, 12, temperature=1.0, top_k=50, top_p=0.95,
                        generator=torch.Generator().manual_seed(seed))

    assert run(1) == run(1)
    assert len({tuple(run(s)) for s in range(4)}) > 1
    assert all(0 <= t < V for t in run(2))


def test_repetition_penalty_matches_reference(model):
    got = generate(model, PROMPT, 10, temperature=0, repetition_penalty=1.5)
    assert got == reference_greedy(model, PROMPT, 10, penalty=1.5)
    assert got != generate(model, PROMPT, 10, temperature=0)


def test_stop_ids_and_streaming(model):
    greedy = generate(model, PROMPT, 10, temperature=0)
    stop = greedy[4]
    streamed = []
    got = generate(model, PROMPT, 10, temperature=0, stop_ids=[stop], on_token=streamed.append)
    assert got == greedy[: greedy.index(stop) + 1] and got[-1] == stop
    assert streamed == got
    assert generate(model, PROMPT, 0) == []


def test_filters():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [False, False, True, True]
    probs = torch.tensor([0.5, 0.3, 0.2]).log()
    assert torch.isinf(filter_top_p(probs, 0.6)).tolist() == [False, False, True]
    assert torch.isinf(filter_top_p(probs, 0.5)).tolist() == [False, True, True]
    assert torch.isinf(filter_top_p(probs, 1.0)).tolist() == [False, False, False]
    seen = torch.tensor([True, False, True, False])
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([1.0, 1.0, 0.25, -1.0]))


def reference_probs(logits, temperature, top_k, top_p):
    x = logits / temperature
    x = filter_top_k(x, top_k) if top_k is not None else x
    return (filter_top_p(x, top_p) if top_p is not None else x).softmax(-1)


def dense(ids, weights, vocab):
    full = weights if ids is None else torch.zeros(weights.shape[0], vocab).scatter(1, ids, weights)
    return full / full.sum(-1, keepdim=True)


@pytest.mark.parametrize("vocab,scale", [(50, 3.0), (3000, 6.0), (3000, 0.2), (20000, 1.0)])
@pytest.mark.parametrize("top_k", [None, 1, 5, 200])
@pytest.mark.parametrize("top_p", [None, 0.3, 0.9, 1.0])
def test_candidates_are_the_filters_distribution(vocab, scale, top_k, top_p):
    """The sampler's kept tokens and probabilities are those of filter_top_k / filter_top_p."""
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(vocab + top_k if top_k else vocab)) * scale
    for temperature in (0.7, 1.3):
        ids, weights = candidates(logits, temperature, top_k, top_p)
        got, want = dense(ids, weights, vocab), reference_probs(logits, temperature, top_k, top_p)
        assert torch.equal(got > 0, want > 0)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        if top_k is not None and top_k < vocab:  # no sort, no full-vocabulary mask
            assert ids is not None and ids.shape == (3, top_k)
        elif top_p is not None and top_p < 1:  # the fewest candidates that hold p, else a sort
            mass = (logits / temperature).softmax(-1).sort(-1, descending=True).values.cumsum(-1)
            fits = [n for n in NUCLEUS_CANDIDATES if n < vocab and (mass[:, n - 1] >= top_p).all()]
            assert (ids.shape[1] if ids is not None else None) == (fits[0] if fits else None)


def test_candidates_keep_ties_with_the_kth():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0], [1.0, 4.0, 0.0, 3.0, 2.0]])
    ids, weights = candidates(logits, 1.0, 2, None)
    got = dense(ids, weights, 5)
    assert (got > 0).tolist() == [[True, True, True, True, False], [False, True, False, True, False]]
    torch.testing.assert_close(got, reference_probs(logits, 1.0, 2, None))


def test_sample_next_draws_the_kept_distribution():
    """Inverse-CDF draws: frequencies within 5 sigma of the probabilities, dropped ids never."""
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.5, 0.0, -3.0]]).expand(40000, -1)
    g = torch.Generator().manual_seed(0)
    for top_k, top_p in [(None, None), (3, None), (None, 0.8), (4, 0.9)]:
        want = reference_probs(logits[:1], 1.0, top_k, top_p)[0]
        draws = sample_next(logits, 1.0, top_k, top_p, g)
        assert draws.shape == (40000, 1)
        freq = torch.bincount(draws[:, 0], minlength=6).double() / 40000
        assert (freq[want == 0] == 0).all()
        sigma = (want * (1 - want) / 40000).sqrt()
        assert ((freq - want).abs() <= 5 * sigma + 1e-9).all(), (top_k, top_p, freq, want)
    with pytest.raises(ValueError, match="NaN or inf"):
        sample_next(torch.tensor([[0.0, float("nan"), 1.0]]), 1.0, None, None, g)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(repetition_penalty=0), dict(top_k=0)])
def test_bad_arguments(model, kwargs):
    with pytest.raises(ValueError):
        generate(model, PROMPT, 5, **kwargs)
    with pytest.raises(ValueError):
        generate(model, [], 5)


def test_restores_training_mode(model):
    model.train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            generate(model, PROMPT, 3, temperature=0)
        assert model.training
    finally:
        model.eval()


# --- batched sampling -------------------------------------------------------------


def test_batch_greedy_rows_equal_reference(model):
    for n, penalty in [(10, 1.0), (2 * BLOCK, 1.0), (12, 1.5)]:  # 2 * BLOCK slides the window
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = generate_batch(model, PROMPT, n, 3, temperature=0, repetition_penalty=penalty)
        assert got == [reference_greedy(model, PROMPT, n, penalty=penalty)] * 3


def test_batch_rows_sample_from_their_own_context(model):
    """Each row's every token lies in the top-k of a full forward over that row's own history."""
    k, n = 3, BLOCK + 8  # past block_size: each row re-prefills its own recent tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = generate_batch(model, PROMPT, n, 4, temperature=1.5, top_k=k,
                              generator=torch.Generator().manual_seed(0))
    assert len({tuple(r) for r in rows}) > 1  # independent samples
    keep = int(BLOCK * KEEP_FRACTION)
    for row in rows:
        assert len(row) == n
        hist, win = list(PROMPT), list(PROMPT)
        for token in row:
            with torch.no_grad():
                logits = model(torch.tensor([win]))[0][0, -1]
            assert token in logits.topk(k).indices.tolist()
            hist.append(token)
            win = win + [token] if len(win) < BLOCK else hist[-keep:]


def test_batch_rows_stop_independently(model):
    rows = generate_batch(model, PROMPT, 12, 6, temperature=2.0, generator=torch.Generator().manual_seed(1))
    stop = rows[0][3]  # a token one row emits; others may or may not
    got = generate_batch(model, PROMPT, 12, 6, temperature=2.0, stop_ids=[stop],
                         generator=torch.Generator().manual_seed(1))
    for full, cut in zip(rows, got):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert cut == expected
    assert len({len(r) for r in got}) > 1
    assert generate_batch(model, PROMPT, 0, 2) == [[], []]
    with pytest.raises(ValueError, match="num_samples"):
        generate_batch(model, PROMPT, 3, 2, on_token=print)
    with pytest.raises(ValueError, match="num_samples"):
        generate_batch(model, PROMPT, 3, 0)


# --- ragged greedy batches (the eval stage's answers) ------------------------------------------


def test_greedy_batch_equals_one_prompt_at_a_time(model):
    """Prompts of different lengths, rows stopping at different steps (so rows leave the batch),
    and one prompt too long for the answer to fit (decoded alone): each row is `generate`'s."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (1, 3, 7, 2, 5, 12, 4)]
    n = 5
    alone = [generate(model, p, n, temperature=0.0) for p in prompts]
    stops = {alone[1][1], alone[4][3]}  # tokens some rows emit early
    want = [generate(model, p, n, temperature=0.0, stop_ids=stops) for p in prompts]
    assert len({len(w) for w in want}) > 1  # rows really finish at different steps
    assert greedy_batch(model, prompts, n, stop_ids=stops) == want
    assert greedy_batch(model, prompts, n) == alone
    assert prompts[5] and len(prompts[5]) + n > BLOCK  # the fallback row
    assert greedy_batch(model, prompts, 0) == [[] for _ in prompts]
    assert greedy_batch(model, [], 4) == []
    with pytest.raises(ValueError, match="at least one token"):
        greedy_batch(model, [[1], []], 3)


@pytest.mark.parametrize("slow_threads", ["all", "one"])
def test_step_threads_keeps_the_faster_thread_count(slow_threads):
    # a step that is slow on all threads (another process holds a core) or on one (idle machine)
    from minigpt.sample import PROBE_EVERY, StepThreads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def fake_step():
            n = torch.get_num_threads()
            seen.append(n)
            time.sleep(0.02 if (n > 1) == (slow_threads == "all") else 0.001)

        step = StepThreads(torch.device("cpu"))
        for _ in range(PROBE_EVERY + 3):
            step(fake_step)
        faster = 1 if slow_threads == "all" else 2
        assert seen[:2] == [1, 2]  # one timed step on each
        assert set(seen[2:PROBE_EVERY]) == {faster}
        assert seen[PROBE_EVERY : PROBE_EVERY + 2] == [1, 2]  # timed again
        step.restore()
        assert torch.get_num_threads() == 2
        assert StepThreads(torch.device("cuda")).all == 1  # GPUs: nothing to choose
    finally:
        torch.set_num_threads(before)


def test_decode_steps_give_the_same_numbers_on_any_thread_count(model):
    # StepThreads switches the count by timing: a step's logits must not depend on it
    # (the eval stage's answers and seeded samples are a function of their inputs)
    x = torch.randint(0, V, (3, BLOCK))
    before = torch.get_num_threads()
    got = {}
    try:
        with torch.inference_mode():
            for threads in (1, 2, 3):
                torch.set_num_threads(2)  # the same slabs for every run
                cache = model.new_cache(3)
                model(x[:, :6], cache=cache)
                torch.set_num_threads(threads)
                got[threads] = torch.cat([model(x[:, i : i + 1], cache=cache)[0] for i in range(6, BLOCK)])
                cache.reset()
                torch.set_num_threads(2)
                cache.lengths = torch.tensor([3, 4, 5])  # ragged rows (greedy_batch)
                cache.pos = 5
                torch.set_num_threads(threads)
                got[threads, "ragged"] = model(x[:, 6:7], cache=cache)[0]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[1], got[2]) and torch.equal(got[1], got[3])
    assert torch.equal(got[1, "ragged"], got[2, "ragged"]) and torch.equal(got[1, "ragged"], got[3, "ragged"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_greedy_decoding_of_a_diverged_model_raises_like_sampling(bad):
    """argmax over NaN logits picks an arbitrary id (0: an empty answer); sampling already raised."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=BLOCK)).eval()
    with torch.no_grad():
        m.norm.weight.fill_(bad)  # every logit NaN (inf * 0 and inf - inf in the head)
    for decode in (lambda: generate(m, [1, 2, 3], 5, temperature=0.0),
                   lambda: generate(m, [1, 2, 3], 5, temperature=1.0, top_k=1),
                   lambda: generate_batch(m, [1, 2, 3], 5, 3, temperature=0.0),
                   lambda: greedy_batch(m, [[1, 2], [3, 4, 5]], 5)):
        with pytest.raises(ValueError, match=r"cannot decode: the logits hold NaN or inf"):
            decode()
    with pytest.raises(ValueError, match=r"cannot sample: the logits hold NaN or inf"):
        generate(m, [1, 2, 3], 5, temperature=1.0)


@pytest.mark.parametrize("temperature,penalty", [(float("inf"), 1.0), (float("nan"), 1.0),
                                                 (1.0, float("inf")), (1.0, float("nan"))])
def test_non_finite_settings_are_refused(model, temperature, penalty):
    with pytest.raises(ValueError, match="finite"):
        generate(model, [1, 2], 3, temperature=temperature, repetition_penalty=penalty)
