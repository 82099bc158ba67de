"""`minigpt.serve_batch`: the serve model thread's continuous batching, in-process on a tiny model.

The model's forward is wrapped to record the shape of every call (prefills (1, T), steps (rows, 1)),
and to act at a chosen step (a request arriving, a client leaving, a fault). Expected answers come
from `engine.sample_ids`, the CLI's sampler, on the same model, one request at a time.
"""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("pydantic")

from minigpt import cli  # noqa: E402
from minigpt.engine import load, make_generator, sample_ids  # noqa: E402
from minigpt.serve_api import CompletionRequest  # noqa: E402
from minigpt.serve_batch import Batcher  # noqa: E402
from minigpt.serve_jobs import Job  # noqa: E402
from minigpt.tokenizer import decode, encode_text, save_tokenizer, train_tokenizer  # noqa: E402
from test_cli import BLOCK_SIZE, CORPUS, _model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    tok = train_tokenizer(CORPUS, vocab_size=320)
    save_tokenizer(tok, root / "tokenizer.json")
    return _model_dir(root / "base", root / "tokenizer.json", tok.get_vocab_size(), chat=False,
                      seed=1)


@pytest.fixture(scope="module")
def m(model_dir):
    """A tiny base model whose <|endoftext|> logit is 0, never the greedy choice: answers run to
    max_tokens."""
    loaded = load(str(model_dir), "cpu")
    with torch.no_grad():
        loaded.model.tok_emb.weight[loaded.eot] = 0.0
    loaded.warn_slide = lambda message: None
    return loaded


def job(m, prompt: str, max_tokens: int, **kw) -> Job:
    req = CompletionRequest(prompt=prompt, max_tokens=max_tokens, **kw)
    return Job([m.eot] + encode_text(m.tok, prompt), req, max_tokens, m.tok, m.eot)


def solo(m, prompt: str, max_tokens: int, **kw) -> str:
    """What the CLI's sampler makes of the same request, alone."""
    s = job(m, prompt, max_tokens, **kw).sampling()
    return decode(m.tok, sample_ids(m, job(m, prompt, max_tokens).ids, s,
                                    make_generator(s.seed, m.device)))


class Recorder:
    """Wraps m.model.forward: records every call's input shape, runs `at[n]` before step n."""

    def __init__(self, m, at: dict | None = None):
        self.m, self.at, self.calls, self.steps = m, at or {}, [], 0
        self.real = m.model.forward

    def __enter__(self):
        def forward(idx, *args, **kw):
            self.calls.append(tuple(idx.shape))
            if idx.shape[1] == 1:
                self.steps += 1
                if self.steps in self.at:
                    self.at[self.steps]()
            return self.real(idx, *args, **kw)

        self.m.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.m.model.forward

    def step_rows(self) -> list[int]:
        return [rows for rows, t in self.calls if t == 1]


def run(batcher: Batcher, jobs: list[Job]) -> list[str]:
    """The jobs' texts, all submitted while the model thread waits: they start as one batch."""
    gate = threading.Event()
    batcher.call(gate.wait)
    futures = [batcher.submit(j) for j in jobs]
    gate.set()
    for future in futures:
        future.result(timeout=120)
    return [j.text for j in jobs]


def test_requests_join_a_running_batch_and_leave_it(m):
    """A alone, then B and C arrive mid-flight: they join A's batch (3-row steps), leave as they
    end, and every answer is the one it gets alone. A later request alone is exact too."""
    specs = [("The river", 60), ("What is the capital of France?", 20), ("a", 35)]
    want = [solo(m, p, n, temperature=0) for p, n in specs]
    b = Batcher(m, 4)
    later = [job(m, p, n, temperature=0) for p, n in specs[1:]]
    futures = []
    try:
        with Recorder(m, {5: lambda: futures.extend(b.submit(j) for j in later)}) as rec:
            first = job(m, *specs[0], temperature=0)
            b.submit(first).result(timeout=120)
            for f in futures:
                f.result(timeout=120)
        rows = rec.step_rows()
        assert rows[:5] == [1] * 5 and 3 in rows and rows[-1] == 1
        joined = rows.index(3)
        assert rows[joined:] == sorted(rows[joined:], reverse=True)  # rows only leave after that
        assert [first.text] + [j.text for j in later] == want
        assert run(b, [job(m, "The river", 90, temperature=0.9, seed=3)]) == [
            solo(m, "The river", 90, temperature=0.9, seed=3)]  # past the context: a slide, exact
    finally:
        b.close()


def test_a_batch_of_mixed_requests_answers_what_each_gets_alone(m):
    """Greedy and seeded-sampled rows, stop strings and slides past the context (block 64) in
    one batch: per-row settings, generators and windows. Equal to the solo answers up to float
    rounding of the batched matmuls, which moves no token on this fixture."""
    greedy = solo(m, "The river runs", 50, temperature=0)
    stop = next(greedy[k:k + 3] for k in range(15, 40) if greedy.index(greedy[k:k + 3]) == k)
    specs = [("The river runs", 50, dict(temperature=0, stop=stop)),
             ("What", 2 * BLOCK_SIZE, dict(temperature=0)),
             ("Write a short poem about the sea.", BLOCK_SIZE + 10, dict(temperature=1.0, seed=5)),
             ("a", 30, dict(temperature=0.7, top_p=0.5, seed=11))]
    want = [greedy[:greedy.index(stop)]] + [solo(m, p, n, **kw) for p, n, kw in specs[1:]]
    b = Batcher(m, 4)
    try:
        with Recorder(m) as rec:
            jobs = [job(m, p, n, **kw) for p, n, kw in specs]
            got = run(b, jobs)
        assert got == want
        assert jobs[0].finish_reason == "stop" and jobs[1].completion_tokens == 2 * BLOCK_SIZE
        assert max(rec.step_rows()) == 4
        assert sum(t == BLOCK_SIZE * 3 // 4 - 1 for _, t in rec.calls) >= 1  # a slide in the batch
    finally:
        b.close()


def test_a_cancelled_row_leaves_and_the_others_finish(m):
    specs = [("The river", 40), ("What", 40), ("a", 40)]
    want = [solo(m, p, n, temperature=0) for p, n in specs]
    jobs = [job(m, p, n, temperature=0) for p, n in specs]
    b = Batcher(m, 3)
    try:
        with Recorder(m, {10: jobs[1].cancel.set}) as rec:
            run(b, jobs)
        assert jobs[1].completion_tokens < 40 and jobs[1].text == want[1][:len(jobs[1].text)]
        assert [jobs[0].text, jobs[2].text] == [want[0], want[2]]
        rows = rec.step_rows()
        assert rows[:9] == [3] * 9 and rows[10:] == [2] * (len(rows) - 10)
    finally:
        b.close()


def test_a_failing_step_ends_every_row_and_the_thread_serves_on(m):
    def fault():
        raise RuntimeError("injected fault")

    b = Batcher(m, 2)
    try:
        with Recorder(m, {3: fault}) as rec:
            jobs = [job(m, p, 20, temperature=0) for p in ("The river", "What")]
            with pytest.raises(RuntimeError, match="injected fault"):
                run(b, jobs)
        assert rec.step_rows() == [2, 2, 2]
        assert all(j.completion_tokens == 3 for j in jobs)
        assert run(b, [job(m, "a", 12, temperature=0)]) == [solo(m, "a", 12, temperature=0)]
        assert b.call(lambda x: x + 1, 41).result(timeout=60) == 42  # calls still run
    finally:
        b.close()


def test_parallel_1_is_one_request_at_a_time_in_arrival_order(m):
    specs = [("The river", 15), ("What", 25), ("a", 10)]
    b = Batcher(m, 1)
    order = []
    try:
        with Recorder(m) as rec:
            jobs = [job(m, p, n, temperature=0) for p, n in specs]
            futures = [b.submit(j) for j in jobs]
            for i, f in enumerate(futures):
                f.add_done_callback(lambda _, i=i: order.append(i))
            for f in futures:
                f.result(timeout=120)
        assert set(rec.step_rows()) == {1} and order == [0, 1, 2]
        assert [j.text for j in jobs] == [solo(m, p, n, temperature=0) for p, n in specs]
    finally:
        b.close()


def test_calls_run_between_steps_while_a_batch_decodes(m):
    """Tokenizing (a call) does not wait for the running batch to end."""
    b = Batcher(m, 2)
    long = job(m, "The river", 3 * BLOCK_SIZE, temperature=0)
    try:
        calls = []
        with Recorder(m, {20: lambda: calls.append(b.call(lambda: long.completion_tokens))}):
            b.submit(long).result(timeout=120)
        assert 20 <= calls[0].result(timeout=60) < 3 * BLOCK_SIZE  # ran mid-answer
    finally:
        b.close()


@pytest.mark.parametrize("value,message", [("0", "must be >= 1, got 0"),
                                           ("65", "must be <= 64, got 65"),
                                           ("two", "not an integer")])
def test_bad_parallel_is_a_one_line_error(capsys, value, message):
    assert cli.main(["serve", "--parallel", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--parallel" in err and message in err, err


def test_parallel_that_cannot_fit_is_refused_before_serving(model_dir, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    import minigpt.memory
    import minigpt.serve

    monkeypatch.setattr(minigpt.memory, "available_memory", lambda device: 100_000)
    monkeypatch.setattr(minigpt.serve, "serve", lambda *a, **kw: pytest.fail("served"))
    argv = ["serve", "--checkpoint_path", str(model_dir), "--device", "cpu", "--parallel", "8"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --parallel 8: the KV cache of 8 rows")
    assert "GiB free" in err
