"""`minigpt serve`: the real server in a subprocess, talked to by the `openai` client, httpx and Chromium.

Two servers (an instruction-tuned and a base tiny model, built here) run on free localhost ports for
the whole module. Expected answers come from `minigpt generate` run as a subprocess with the same
seed/greedy settings, so the tests pin that the server and the CLI give the same text.
The base model's <|endoftext|> embedding row is zeroed: greedy decoding then never stops early,
which gives the disconnect test a long generation to interrupt.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from minigpt.checkpoint import load_model, save_model  # noqa: E402
from minigpt.tokenizer import EOT, save_tokenizer, train_tokenizer  # noqa: E402
from test_cli import CORPUS, _model_dir, run_module  # noqa: E402

pytestmark = pytest.mark.slow  # server subprocesses and headless Chromium

ROOT = Path(__file__).resolve().parents[1]
CAP = 4000  # the servers' --max_tokens
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir: Path, log: Path, env: dict | None = None, headers: dict | None = None,
           script: str | None = None, *script_args: str, flags: tuple = ()) -> SimpleNamespace:
    """`minigpt serve [flags]` (or `python -c script model_dir port *script_args`) on a free port."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    out = open(log, "wb")
    if script is None:
        argv = ["-m", "minigpt.cli", "serve", "--checkpoint_path", str(model_dir), "--port",
                str(port), "--device", "cpu", "--max_tokens", str(CAP), *flags]
    else:
        argv = ["-c", script, str(model_dir), str(port), *script_args]
    proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=out, stderr=out, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()}")
        try:
            if httpx.get(url + "/health", headers=headers, timeout=1).status_code == 200:
                return SimpleNamespace(url=url, proc=proc, log=log, dir=model_dir, out=out)
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start: {log.read_text()}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok = train_tokenizer(CORPUS, vocab_size=320)
    tok_file = root / "tokenizer.json"
    save_tokenizer(tok, tok_file)
    chat = _model_dir(root / "chat", tok_file, tok.get_vocab_size(), chat=True, seed=0)
    base = _model_dir(root / "base", tok_file, tok.get_vocab_size(), chat=False, seed=1)
    model, _, config = load_model(base, "cpu")
    with torch.no_grad():
        model.tok_emb.weight[tok.token_to_id(EOT)] = 0.0  # logit 0: never the greedy choice
    save_model(model, base, tokenizer_file=tok_file,
               meta={k: config[k] for k in ("tokenizer_hash", "stage", "chat_template")})
    s = SimpleNamespace(chat=_start(chat, root / "chat.log"), base=_start(base, root / "base.log"))
    yield s
    for srv in (s.chat, s.base):
        srv.proc.terminate()
        srv.proc.wait(timeout=30)
        srv.out.close()


KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def keyed(servers, tmp_path_factory):
    """The chat model served with an API key, given the way a user would: MINIGPT_API_KEY."""
    log = tmp_path_factory.mktemp("keyed") / "keyed.log"
    srv = _start(servers.chat.dir, log, {"MINIGPT_API_KEY": KEY}, {"Authorization": f"Bearer {KEY}"})
    yield srv
    srv.proc.terminate()
    srv.proc.wait(timeout=30)
    srv.out.close()


# A server whose tokenizer waits (for the file FLAGS/release) on any text holding "HOLD", whose
# sampler fails on max_tokens=13, and whose next batched step fails once FLAGS/step_fault exists:
# a slow tokenization and bugs, at a moment the test chooses.
RIGGED = """
import sys, threading, time
from pathlib import Path
import minigpt.serve as serve
import minigpt.serve_batch as serve_batch
from minigpt.engine import load

model_dir, port, flags = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
m = load(model_dir, "cpu")


class HeldTokenizer:
    def __init__(self, tok):
        object.__setattr__(self, "tok", tok)

    def __setattr__(self, name, value):
        setattr(self.tok, name, value)

    def __getattr__(self, name):
        attr = getattr(self.tok, name)
        if not name.startswith("encode") or not callable(attr):
            return attr

        def encode(*args, **kw):
            if "HOLD" in repr(args):
                (flags / "encoding").touch()
                deadline = time.time() + 60
                while not (flags / "release").exists() and time.time() < deadline:
                    time.sleep(0.05)
            return attr(*args, **kw)
        return encode


m.tok = HeldTokenizer(m.tok)
real_pick = serve_batch.pick


def pick(row):
    if row.job.max_tokens == 13:
        raise RuntimeError("injected fault")
    return real_pick(row)


serve_batch.pick = pick
real_forward = m.model.forward


def forward(idx, *args, **kw):  # a step of several rows fails once the file FLAGS/step_fault exists
    (flags / "model_thread").write_text(threading.current_thread().name)
    if idx.shape[0] > 1 and (flags / "step_fault").exists():
        (flags / "step_fault").unlink()
        raise RuntimeError("injected step fault")
    return real_forward(idx, *args, **kw)


m.model.forward = forward
serve.serve(m, "rigged", "127.0.0.1", port, 100)
"""


@pytest.fixture(scope="module")
def rigged(servers, tmp_path_factory):
    root = tmp_path_factory.mktemp("rigged")
    srv = _start(servers.chat.dir, root / "rigged.log", None, None, RIGGED, str(root))
    srv.flags = root
    yield srv
    (root / "release").touch()
    srv.proc.terminate()
    srv.proc.wait(timeout=30)
    srv.out.close()


def generate_cli(model_dir: Path, prompt: str, *flags: str) -> str:
    """What `minigpt generate` prints (one sample), without the closing newline."""
    r = run_module("minigpt.cli", "generate", "--checkpoint_path", model_dir, "--prompt", prompt,
                   "--device", "cpu", *flags)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")
    return r.stdout[:-1]


def sse(response) -> list[dict | str]:
    """The `data:` payloads of an SSE response: JSON objects, then the final "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def chat(url: str, content: str, **kw) -> httpx.Response:
    body = {"model": "chat", "messages": [{"role": "user", "content": content}], **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


# --- answers equal `minigpt generate` -----------------------------------------------------------

@pytest.mark.parametrize("cli_flags,api", [
    (["--temperature", "0"], {"temperature": 0}),
    (["--temperature", "0.9", "--top_k", "0", "--top_p", "0.9", "--seed", "7"],
     {"temperature": 0.9, "top_p": 0.9, "seed": 7}),
])
def test_openai_client_chat_and_stream_equal_generate(servers, cli_flags, api):
    openai = pytest.importorskip("openai")
    prompt = "What is the capital of France?"
    want = generate_cli(servers.chat.dir, prompt, "--max_new_tokens", "24", *cli_flags)
    client = openai.OpenAI(base_url=servers.chat.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": prompt}]
    r = client.chat.completions.create(model="chat", messages=messages, max_tokens=24, **api)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model="chat", messages=messages, max_tokens=24,
                                                 stream=True, **api))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_httpx_completions_base_model_equal_generate(servers):
    prompt = "The river runs"
    want = generate_cli(servers.base.dir, prompt, "--max_new_tokens", "30", "--temperature", "0")
    assert want.startswith(prompt)  # a raw prompt is echoed by generate, not by the API
    body = {"model": "base", "prompt": prompt, "max_tokens": 30, "temperature": 0}
    r = httpx.post(servers.base.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    got = r.json()
    assert got["object"] == "text_completion"
    assert prompt + got["choices"][0]["text"] == want
    assert got["choices"][0]["finish_reason"] == "length"
    assert got["usage"]["completion_tokens"] == 30
    with httpx.stream("POST", servers.base.url + "/v1/completions", json={**body, "stream": True},
                      timeout=60) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = sse(s)
    assert events[-1] == "[DONE]"
    assert prompt + "".join(e["choices"][0]["text"] for e in events[:-1]) == want


def test_chat_on_base_model_is_a_400(servers):
    r = chat(servers.base.url, "hi")
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_chat"


def test_stop_string_cuts_the_answer(servers):
    full = chat(servers.chat.url, "Write a short poem", temperature=0, max_tokens=30).json()
    text = full["choices"][0]["message"]["content"]
    stop = text[6:9]
    cut = text.index(stop)
    r = chat(servers.chat.url, "Write a short poem", temperature=0, max_tokens=30, stop=[stop, "zzzz"])
    assert r.json()["choices"][0]["message"]["content"] == text[:cut]
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    body = {"messages": [{"role": "user", "content": "Write a short poem"}], "temperature": 0,
            "max_tokens": 30, "stop": stop, "stream": True}
    with httpx.stream("POST", servers.chat.url + "/v1/chat/completions", json=body, timeout=60) as s:
        events = sse(s)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == text[:cut]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_multi_turn_and_system_message_use_the_chat_template(servers):
    """The server encodes conversations with minigpt.template, like `minigpt chat`: check against the
    sampler on the same ids."""
    from minigpt.template import encode_conversation
    from minigpt.engine import load, sample_ids
    from minigpt.tokenizer import decode

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sea?"}]
    m = load(str(servers.chat.dir), "cpu")
    ids = encode_conversation(m.tok, messages)
    args = SimpleNamespace(max_new_tokens=20, temperature=0.0, top_k=0, top_p=1.0,
                           repetition_penalty=1.0)
    want = decode(m.tok, sample_ids(m, ids, args, None))
    r = httpx.post(servers.chat.url + "/v1/chat/completions", timeout=60,
                   json={"messages": messages, "temperature": 0, "max_tokens": 20})
    assert r.json()["choices"][0]["message"]["content"] == want
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


# --- concurrency --------------------------------------------------------------------------------

def test_20_concurrent_requests_match_sequential_answers(servers):
    def request(i: int) -> str:
        kw = {"temperature": 1.0, "top_p": 0.95, "seed": i, "max_tokens": 40}
        if i % 2:
            return chat(servers.chat.url, f"Question {i}?", **kw).json()["choices"][0]["message"]["content"]
        body = {"messages": [{"role": "user", "content": f"Question {i}?"}], "stream": True, **kw}
        with httpx.stream("POST", servers.chat.url + "/v1/chat/completions", json=body,
                          timeout=120) as s:
            return "".join(e["choices"][0]["delta"].get("content", "") for e in sse(s)[:-1])

    sequential = [request(i) for i in range(20)]
    assert len(set(sequential)) > 10  # different seeds and prompts: different answers
    with ThreadPoolExecutor(20) as pool:
        concurrent = list(pool.map(request, range(20)))
    assert concurrent == sequential


# --- batching: --parallel ---------------------------------------------------------------------

def complete(url: str, body: dict) -> str:
    """A /v1/completions answer's text, streamed or not."""
    if not body.get("stream"):
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as s:
        events = sse(s)
    assert events[-1] == "[DONE]"
    return "".join(e["choices"][0]["text"] for e in events[:-1])


def concurrently(url: str, bodies: list[dict]) -> tuple[list[str], list[dict]]:
    """The answers to `bodies` sent at once, and /health as polled while they ran."""
    health = []
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(complete, url, body) for body in bodies]
        while not all(f.done() for f in futures):
            health.append(httpx.get(url + "/health", timeout=10).json())
        return [f.result() for f in futures], health


def test_concurrent_requests_decode_together_and_answer_as_alone(servers):
    """Four clients at once (the default --parallel 4): /health shows them decoding as one batch,
    and each answer (streamed or not, greedy or seeded, its own prompt length, max_tokens and
    stop string, past the context) is the one it gets alone: equal up to float rounding of the
    batched matmuls, which moves no token on these tiny models."""
    url = servers.base.url
    full = complete(url, {"prompt": "The river", "max_tokens": 150, "temperature": 0})
    stop = next(full[k:k + 3] for k in range(40, 80) if full.index(full[k:k + 3]) == k)
    bodies = [{"prompt": "The river", "max_tokens": 150, "temperature": 0, "stop": stop, "stream": True},
              {"prompt": "What is the capital of France? The capital", "max_tokens": 300,
               "temperature": 0},
              {"prompt": "a", "max_tokens": 200, "temperature": 0, "stream": True},
              {"prompt": "Write a short poem", "max_tokens": 250, "temperature": 0.9, "seed": 4}]
    alone = [complete(url, body) for body in bodies]
    assert alone[0] == full[:full.index(stop)]
    together, health = concurrently(url, bodies)
    assert together == alone
    assert max(h["decoding"] for h in health) >= 3  # rows shared steps


def test_a_client_leaving_a_batch_frees_its_row_and_the_others_finish(servers):
    url, log = servers.base.url, servers.base.log
    bodies = [{"prompt": p, "max_tokens": 300, "temperature": 0, "stream": True} for p in ("a", "What")]
    alone = [complete(url, body) for body in bodies]
    left = log.read_text().count("client disconnected")

    shared = threading.Event()

    def leave() -> None:  # once /health has shown the three rows, with thousands of tokens to go
        body = {"prompt": "The river", "max_tokens": CAP, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as s:
            next(line for line in s.iter_lines() if shared.is_set() or time.time() > deadline)

    deadline = time.time() + 30
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(complete, url, body) for body in bodies] + [pool.submit(leave)]
        rows = []
        while not all(f.done() for f in futures):
            rows.append(httpx.get(url + "/health", timeout=10).json()["decoding"])
            if rows[-1] == 3:
                shared.set()
        assert [f.result() for f in futures] == [*alone, None]
    assert 3 in rows and 2 in rows[rows.index(3):]  # three rows shared steps, one left early
    deadline = time.time() + 30
    while log.read_text().count("client disconnected") == left and time.time() < deadline:
        time.sleep(0.1)
    line = [x for x in log.read_text().splitlines() if "client disconnected" in x][left]
    assert int(line.split("stopped after ")[1].split()[0]) < CAP, line


def test_parallel_1_answers_one_request_at_a_time(servers, tmp_path):
    srv = _start(servers.base.dir, tmp_path / "one.log", flags=("--parallel", "1"))
    try:
        bodies = [{"prompt": p, "max_tokens": 150, "temperature": 0} for p in ("a", "The", "What")]
        answers, health = concurrently(srv.url, bodies)
        assert {h["parallel"] for h in health} == {1} and max(h["decoding"] for h in health) == 1
        assert max(h["waiting"] for h in health) >= 1
        assert answers == [complete(servers.base.url, body) for body in bodies]
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=30)
        srv.out.close()


# --- bad input: OpenAI's error shape, a 4xx, and the server keeps serving -----------------------

BAD = {
    "malformed JSON": (b'{"messages": [', None),
    "nested 100,000 deep": (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    "not an object": (b"[1, 2]", None),
    "missing messages": ({"model": "chat"}, "messages"),
    "empty messages": ({"messages": []}, "messages"),
    "wrong role": ({"messages": [{"role": "bot", "content": "hi"}]}, "messages.0.role"),
    "content not text": ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content.str"),
    "system not first": ({"messages": [{"role": "user", "content": "a"},
                                       {"role": "system", "content": "b"}]}, "messages"),
    "ends with assistant": ({"messages": [{"role": "user", "content": "a"},
                                          {"role": "assistant", "content": "b"}]}, "messages"),
    "max_tokens over cap": ({"messages": [{"role": "user", "content": "a"}],
                             "max_tokens": CAP + 1}, "max_tokens"),
    "prompt over context": ({"messages": [{"role": "user", "content": "the river " * 60}]},
                            "messages"),
    "negative temperature": ({"messages": [{"role": "user", "content": "a"}],
                              "temperature": -1}, "temperature"),
    "n > 1": ({"messages": [{"role": "user", "content": "a"}], "n": 2}, "n"),
    # values the model code cannot take: 400s, not 500s
    "seed 2**70": ({"messages": [{"role": "user", "content": "a"}], "seed": 2**70}, "seed"),
    "seed 2**70 streamed": ({"messages": [{"role": "user", "content": "a"}], "seed": 2**70,
                             "stream": True}, "seed"),
    "seed -2**63-1": ({"messages": [{"role": "user", "content": "a"}], "seed": -2**63 - 1}, "seed"),
    "lone surrogate in content": (json.dumps({"messages": [{"role": "user", "content": "a\ud800"}]})
                                  .encode(), "messages.0.content"),
    "lone surrogate in a part": (json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "\udfff"}]}]}).encode(), "messages.0.content"),
    "lone surrogate in stop": (json.dumps({"messages": [{"role": "user", "content": "a"}],
                                           "stop": ["\ud800"]}).encode(), "stop"),
    # requests that would cost far more than they look: capped
    "17 stop strings": ({"messages": [{"role": "user", "content": "a"}],
                         "stop": [f"s{i}" for i in range(17)]}, "stop"),
    "a 257-character stop": ({"messages": [{"role": "user", "content": "a"}],
                              "stop": "x" * 257}, "stop"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_openai_error_4xx(servers, case):
    body, param = BAD[case]
    kw = ({"content": body, "headers": {"Content-Type": "application/json"}}
          if isinstance(body, bytes) else {"json": body})
    r = httpx.post(servers.chat.url + "/v1/chat/completions", timeout=30, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    if case == "prompt over context":
        assert err["code"] == "context_length_exceeded" and "64" in err["message"]
    assert httpx.get(servers.chat.url + "/health", timeout=10).json()["status"] == "ok"


def test_unknown_path_and_method_are_openai_errors(servers):
    r = httpx.get(servers.chat.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(servers.chat.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_client_disconnect_mid_stream_stops_generation(servers):
    """A client that leaves after the first piece frees the model: the sampler stops (logged),
    and the next request is answered."""
    body = {"prompt": "The river", "max_tokens": CAP, "temperature": 0, "stream": True}
    with httpx.stream("POST", servers.base.url + "/v1/completions", json=body, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk
    r = httpx.post(servers.base.url + "/v1/completions", timeout=60,
                   json={"prompt": "The river", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    deadline = time.time() + 30
    while "client disconnected" not in servers.base.log.read_text() and time.time() < deadline:
        time.sleep(0.1)
    line = next(x for x in servers.base.log.read_text().splitlines() if "client disconnected" in x)
    stopped_after = int(line.split("stopped after ")[1].split()[0])
    assert stopped_after < CAP, line


def test_window_slide_notice_is_a_log_line_not_in_the_answer(servers):
    """An answer past the context slides the window; the notice is one stderr log line."""
    r = httpx.post(servers.base.url + "/v1/completions", timeout=60,
                   json={"prompt": "The river", "max_tokens": 100, "temperature": 0})
    text = r.json()["choices"][0]["text"]
    assert "context of" not in text and "warning" not in text.lower()
    lines = [x for x in servers.base.log.read_text().splitlines() if "exceeds block_size" in x]
    assert lines and all(x.startswith("WARNING:") for x in lines)


def test_models_and_health(servers):
    models = httpx.get(servers.chat.url + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["chat"]
    health = httpx.get(servers.chat.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["chat"] is True and health["block_size"] == 64
    assert health["parameters"] > 0 and health["max_tokens"] == CAP
    assert (health["parallel"], health["decoding"], health["waiting"]) == (4, 0, 0)  # the default


def test_binds_localhost_by_default():
    from minigpt.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"


# --- the chat page in a real headless Chromium ---------------------------------------------------

def _playwright():
    """playwright's sync API; the test is skipped without it or without the browser."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium)")
    return playwright


def _chromium(p):
    """Headless Chromium that calls home for nothing."""
    return p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])


def test_chat_page_in_headless_chromium(servers, tmp_path):
    playwright = _playwright()
    url = servers.chat.url
    outside: list[str] = []
    with playwright.sync_playwright() as p:
        browser = _chromium(p)
        try:
            page = browser.new_page()

            def route(r):  # the network is off: only the server itself answers
                if r.request.url.startswith(url + "/"):
                    r.continue_()
                else:
                    outside.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'chat'")
            assert "context 64 tokens" in page.text_content("#info")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "30")
            # Record every text the answer bubble shows: a streamed reply grows in several steps.
            page.evaluate("""() => { window.seen = [];
                new MutationObserver(() => { const a = document.querySelector('.assistant');
                  if (a) window.seen.push(a.textContent); })
                .observe(document.getElementById('log'), {subtree: true, childList: true,
                                                          characterData: true}); }""")
            page.fill("#input", "What is the capital of France?")
            page.press("#input", "Enter")
            page.wait_for_function("!document.getElementById('send').disabled && "
                                   "document.querySelectorAll('.assistant').length === 1")
            want = chat(url, "What is the capital of France?", temperature=0, max_tokens=30)
            want = want.json()["choices"][0]["message"]["content"]
            assert page.text_content(".assistant") == want
            seen = [s for s in page.evaluate("window.seen") if s]
            assert len(set(seen)) > 2 and all(want.startswith(s) for s in seen)  # streamed in
            page.fill("#input", "And the sea?")  # second turn: the history goes with it
            page.press("#input", "Enter")
            page.wait_for_function("!document.getElementById('send').disabled && "
                                   "document.querySelectorAll('.assistant').length === 2")
            assert page.locator(".error").count() == 0
            # The page sends the history; when it no longer fits, it drops the oldest turn (like
            # `minigpt chat`) and says so in a notice of its own.
            history = [{"role": "user", "content": "What is the capital of France?"},
                       {"role": "assistant", "content": want},
                       {"role": "user", "content": "And the sea?"}]
            body = {"messages": history, "temperature": 0, "max_tokens": 30}
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            if r.status_code == 400:
                assert r.json()["error"]["code"] == "context_length_exceeded"
                assert "dropped the oldest turn" in page.text_content(".notice")
                r = httpx.post(url + "/v1/chat/completions", timeout=60,
                               json={**body, "messages": history[2:]})
            else:
                assert page.locator(".notice").count() == 0
            second = page.locator(".assistant").nth(1).text_content()
            assert second == r.json()["choices"][0]["message"]["content"]
            shot = tmp_path / "chat_page.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("MINIGPT_SCREENSHOT"):
                shutil.copy(shot, os.environ["MINIGPT_SCREENSHOT"])
            page.click("#reset")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()
    assert outside == []


def test_chat_page_asks_for_the_api_key_in_headless_chromium(keyed):
    """With a key set, the page (public, keyless) asks for the key, keeps it for the tab and sends
    it as a Bearer token with JSON bodies: the checks a hostile page fails, the page passes."""
    playwright = _playwright()
    with playwright.sync_playwright() as p:
        browser = _chromium(p)
        try:
            page = browser.new_page()
            page.goto(keyed.url + "/")
            page.wait_for_selector("#keyform:not([hidden])")
            assert "didn't provide an API key" in page.text_content(".error")
            page.fill("#apikey", "wrong")
            page.press("#apikey", "Enter")
            page.wait_for_function("[...document.querySelectorAll('.error')].some("
                                   "e => e.textContent.includes('Incorrect API key'))")
            assert page.is_visible("#keyform")
            page.fill("#apikey", KEY)
            page.press("#apikey", "Enter")
            page.wait_for_function("document.getElementById('model').textContent === 'chat'")
            assert not page.is_visible("#keyform") and page.locator(".error").count() == 0
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "20")
            page.fill("#input", "What is the capital of France?")
            page.press("#input", "Enter")
            page.wait_for_function("!document.getElementById('send').disabled && "
                                   "document.querySelectorAll('.assistant').length === 1")
            want = httpx.post(keyed.url + "/v1/chat/completions", timeout=60,
                              headers={"Authorization": f"Bearer {KEY}"},
                              json={"messages": [{"role": "user",
                                                  "content": "What is the capital of France?"}],
                                    "temperature": 0, "max_tokens": 20})
            assert page.text_content(".assistant") == want.json()["choices"][0]["message"]["content"]
            assert page.evaluate("sessionStorage.getItem('minigpt-api-key')") == KEY
        finally:
            browser.close()


# --- hostile web pages and expensive requests ----------------------------------------------------

def test_post_bodies_must_be_json(servers):
    """A cross-site page can POST text/plain or a form without a CORS preflight: refused (415)."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    url = servers.chat.url + "/v1/chat/completions"
    for ctype in [None, "text/plain", "text/plain; charset=utf-8",
                  "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/jsonp"]:
        r = httpx.post(url, content=body, headers={"Content-Type": ctype} if ctype else {},
                       timeout=30)
        assert r.status_code == 415, (ctype, r.text)
        err = r.json()["error"]
        assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
    prompt = json.dumps({"prompt": "The river", "max_tokens": 2}).encode()
    r = httpx.post(servers.base.url + "/v1/completions", content=prompt,
                   headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415
    for ctype in ["application/json", "Application/JSON; charset=utf-8"]:
        r = httpx.post(url, content=body, headers={"Content-Type": ctype}, timeout=30)
        assert r.status_code == 200, r.text
    # ... and a page cannot send JSON cross-site: its CORS preflight is not granted
    r = httpx.options(url, timeout=30, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert r.status_code >= 400 and "access-control-allow-origin" not in r.headers


def test_host_header_must_name_loopback(servers):
    """Bound to 127.0.0.1, a request for any other host name (DNS rebinding) is a 403."""
    port = servers.chat.url.rsplit(":", 1)[1]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for host in ["evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}",
                 f"localhost.evil.example:{port}", f"0.0.0.0:{port}", f"192.168.1.5:{port}", ""]:
        for method, path in [("GET", "/"), ("GET", "/health"), ("GET", "/v1/models"),
                             ("POST", "/v1/chat/completions")]:
            r = httpx.request(method, servers.chat.url + path, headers={"Host": host}, timeout=30,
                              json=body if method == "POST" else None)
            assert r.status_code == 403, (host, path, r.text)
            assert r.json()["error"]["code"] == "host_not_allowed"
    for host in ["127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"]:
        r = httpx.post(servers.chat.url + "/v1/chat/completions", headers={"Host": host},
                       json=body, timeout=30)
        assert r.status_code == 200, (host, r.text)


def test_api_key_is_a_bearer_token(keyed):
    openai = pytest.importorskip("openai")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"},
                    {"Authorization": f"Bearer {KEY[:-1]}"}]:
        for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/v1/nothing"),
                             ("POST", "/v1/chat/completions")]:
            r = httpx.request(method, keyed.url + path, headers=headers, timeout=30,
                              json=body if method == "POST" else None)
            assert r.status_code == 401, (headers, path, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["code"] == "invalid_api_key" and KEY not in err["message"]
            assert r.headers["www-authenticate"] == "Bearer"
    page = httpx.get(keyed.url + "/", timeout=30)  # the page is public and holds no key
    assert page.status_code == 200 and KEY not in page.text
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    r = client.chat.completions.create(model="chat", messages=body["messages"], max_tokens=2)
    assert r.choices[0].message.role == "assistant"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_bad_api_key_is_a_usage_error(servers, monkeypatch):
    r = run_module("minigpt.cli", "serve", "--checkpoint_path", servers.chat.dir, "--api-key", "a b")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--api-key must be" in r.stderr
    monkeypatch.setenv("MINIGPT_API_KEY", "k\u00e9y")
    r = run_module("minigpt.cli", "serve", "--checkpoint_path", servers.chat.dir)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "MINIGPT_API_KEY must be" in r.stderr


def test_non_loopback_host_without_key_warns(servers, monkeypatch, caplog):
    import logging

    import uvicorn
    from minigpt import serve
    from minigpt.engine import load

    hosts = []

    class Server:  # uvicorn's, as serve() drives it: records the host and stops at once
        def __init__(self, config):
            self.config, self.started, self.should_exit = config, True, False

        def run(self):
            hosts.append(self.config.host)

    monkeypatch.setattr(uvicorn, "Server", Server)
    m = load(str(servers.chat.dir), "cpu")
    with caplog.at_level(logging.WARNING, logger="minigpt.serve"):
        for host, key in [("0.0.0.0", None), ("0.0.0.0", "k"), ("127.0.0.1", None), ("::1", None),
                          ("localhost", None)]:
            serve.serve(m, "chat", host, 8000, 10, key)
    assert hosts == ["0.0.0.0", "0.0.0.0", "127.0.0.1", "::1", "localhost"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "--host 0.0.0.0 without an API key" in warnings[0]


def test_request_body_limit(servers):
    """A body over the limit is a 413, whether it says its length or comes chunked."""
    big = json.dumps({"messages": [{"role": "user", "content": "a" * (2 << 20)}]}).encode()
    url = servers.chat.url + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    r = httpx.post(url, content=big, headers=headers, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "1048576 bytes" in r.json()["error"]["message"]
    chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))
    r = httpx.post(url, content=chunks, headers=headers, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(servers.chat.url + "/health", timeout=10).status_code == 200


def test_surrogate_prompt_and_streamed_seed_on_completions(servers):
    url = servers.base.url + "/v1/completions"
    r = httpx.post(url, content=b'{"prompt": "ab\\ud800"}', timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "U+D800 at character 3" in r.json()["error"]["message"]
    r = httpx.post(url, json={"prompt": "a", "seed": 2**70, "stream": True}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    r = httpx.post(url, json={"prompt": "a", "seed": 2**64 - 1, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200  # the whole of torch's range is accepted


def test_tokenizing_a_long_message_does_not_hold_the_event_loop(rigged):
    """While a prompt is being tokenized (held as long as the test likes), /health answers."""
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(chat, rigged.url, "HOLD " * 1000, max_tokens=2)
            deadline = time.time() + 60
            while not (rigged.flags / "encoding").exists() and time.time() < deadline:
                time.sleep(0.05)
            assert (rigged.flags / "encoding").exists()
            r = httpx.get(rigged.url + "/health", timeout=10)
            assert r.status_code == 200
            (rigged.flags / "release").touch()
            r = pending.result()
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    finally:
        (rigged.flags / "release").touch()


def test_the_model_runs_on_the_main_thread_where_it_was_loaded(rigged):
    # one OpenMP team in the process (serve_batch.Batcher): a model thread of its own made every
    # matmul wait for sleeping workers, ~1.5x slower steps (bench/serve_throughput.py)
    assert chat(rigged.url, "hi", max_tokens=2).status_code == 200
    assert (rigged.flags / "model_thread").read_text() == "MainThread"


# `minigpt serve` as started from a terminal: Ctrl-C raises KeyboardInterrupt. A job a shell runs in
# the background inherits SIGINT ignored (as CI's pytest may be), and the server rightly keeps that.
CTRL_C_SERVE = """
import signal, sys
from minigpt.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main(["serve", "--checkpoint_path", sys.argv[1], "--port", sys.argv[2], "--device", "cpu",
               "--max_tokens", sys.argv[3]]))
"""


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_serve_stops_cleanly_on_ctrl_c_and_sigterm_and_a_taken_port_is_one_line(servers, tmp_path, how):
    import signal

    # the base model: greedy there never ends early
    srv = _start(servers.base.dir, tmp_path / "stop.log", None, None, CTRL_C_SERVE, str(CAP))
    try:
        taken = run_module("minigpt.cli", "serve", "--checkpoint_path", servers.base.dir, "--port",
                           srv.url.rsplit(":", 1)[1], "--device", "cpu")
        assert taken.returncode == 2
        assert taken.stderr.strip().splitlines()[-1] == (
            f"error: could not serve on 127.0.0.1:{srv.url.rsplit(':', 1)[1]} (the reason is logged above)")
        body = {"prompt": "the", "max_tokens": CAP, "temperature": 0, "stream": True}
        with ThreadPoolExecutor(1) as pool:
            def events() -> list:
                with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as s:
                    return [s.status_code, *sse(s)]
            answer = pool.submit(events)
            deadline = time.time() + 30  # a generation is running when the signal comes (its
            while httpx.get(srv.url + "/health", timeout=10).json()["decoding"] != 1:  # text may
                assert time.time() < deadline and not answer.done()  # be held back: not a piece)
                time.sleep(0.05)
            srv.proc.send_signal(getattr(signal, how))
            got = answer.result(timeout=60)
        assert got[0] == 200 and got[-1] == "[DONE]", got[-3:]  # the stream ends with an error
        assert got[-2]["error"]["type"] == "server_error", got[-3:]  # event: shutting down
        assert srv.proc.wait(timeout=30) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
        srv.out.close()


def test_a_failure_mid_stream_ends_with_an_error_event_and_done(rigged):
    """A bug while generating (max_tokens=13 raises in the rigged sampler): a 500 in OpenAI's shape,
    or, once a stream's 200 is sent, an error event followed by [DONE]."""
    r = chat(rigged.url, "hi", max_tokens=13)
    assert r.status_code == 500
    assert r.json()["error"] == {**r.json()["error"], "type": "server_error",
                                 "message": "internal error: RuntimeError"}  # not its text
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 13, "stream": True}
    with httpx.stream("POST", rigged.url + "/v1/chat/completions", json=body, timeout=60) as s:
        assert s.status_code == 200
        events = sse(s)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error"
    assert chat(rigged.url, "hi", max_tokens=2).status_code == 200  # and it keeps serving


def test_a_failure_in_a_batch_ends_the_rows_it_hits_and_the_server_serves_on(rigged):
    """A failing row (max_tokens=13) ends only its own stream; a failing batched step ends every
    row in it (an error event, then [DONE], or a 500); later requests are answered."""
    def ask(max_tokens: int, stream: bool) -> list | httpx.Response:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                "temperature": 0, "stream": stream}
        if not stream:
            return httpx.post(rigged.url + "/v1/chat/completions", json=body, timeout=60)
        with httpx.stream("POST", rigged.url + "/v1/chat/completions", json=body, timeout=60) as s:
            return sse(s)

    with ThreadPoolExecutor(2) as pool:
        bad, good = pool.submit(ask, 13, True), pool.submit(ask, 60, True)
        assert bad.result()[-2]["error"]["message"] == "internal error: RuntimeError"
        assert "error" not in good.result()[-2] and good.result()[-1] == "[DONE]"
    (rigged.flags / "step_fault").touch()
    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(ask, 100, True), pool.submit(ask, 100, False)]  # they overlap
        events, response = answers[0].result(), answers[1].result()
    assert not (rigged.flags / "step_fault").exists()  # a step of two rows ran, and failed
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert ask(4, False).status_code == 200


def test_a_diverged_model_is_a_500_that_says_so(servers, tmp_path):
    """NaN weights: the sampler's one-line error reaches the client (not just its type), with or
    without a stream; a bug's own message (a path, say) never does: only its type."""
    model, _, config = load_model(servers.chat.dir, "cpu")
    with torch.no_grad():
        model.tok_emb.weight.fill_(float("nan"))  # tied: the logits are NaN
    nan_dir = tmp_path / "nan"
    save_model(model, nan_dir, tokenizer_file=servers.chat.dir / "tokenizer.json",
               meta={k: config[k] for k in ("tokenizer_hash", "stage", "chat_template")})
    srv = _start(nan_dir, tmp_path / "nan.log")
    try:
        r = chat(srv.url, "hi", max_tokens=4, temperature=0)
        assert r.status_code == 500
        assert r.json()["error"]["message"] == ("internal error: cannot decode: the logits hold "
                                                "NaN or inf (has the model diverged?)")
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as s:
            events = sse(s)
        assert events[-1] == "[DONE]" and "diverged" in events[-2]["error"]["message"]
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=30)
        srv.out.close()
