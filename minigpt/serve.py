"""`minigpt serve`: an OpenAI-compatible HTTP server for one model directory, plus a chat page.

    POST /v1/chat/completions   chat models (the minigpt-v1 template), stream: true as SSE
    POST /v1/completions        raw text continued after <|endoftext|> (base models; `generate --raw`)
    GET  /v1/models, /health    the model's name and size
    GET  /                      a static chat page (serve_page.html: no CDN, no build step)

Design choices (errors and limits in docs/FORMATS.md)
- FastAPI + uvicorn + pydantic: bad JSON and fields are rejected before any work; every error is a
  4xx in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
- The CLI's code path (`template`, `engine.sample_ids`, `engine.TextStream`), so a seeded request
  answers what `minigpt generate` prints with the same sampling settings (OpenAI has no top_k: off).
- One model thread: requests run one at a time in arrival order, never sharing the KV cache or the
  seeded generator, while the event loop keeps accepting (and /health answers). A dropped client
  cancels its generation at the next token; a failure after the 200 ends the stream with an error
  event, then `[DONE]`. Text that may begin a `stop` string is held back until it cannot.
- Any web page the user opens can reach a port on localhost, so requests are hostile: POST bodies
  must be JSON (415: no CORS preflight is answered), a loopback-bound server checks the Host header
  (403: DNS rebinding), `--api-key` / MINIGPT_API_KEY guards every route but `/` (401, constant-time
  compare). Binds 127.0.0.1 unless `--host` says otherwise; 0.0.0.0 without a key only warns.
- Cheap requests must not cost a lot: a body size limit (413), few and short `stop` strings,
  prompts tokenized on the model thread; a prompt longer than the context or `max_tokens` above
  `--max_tokens` is a 400 (an answer that runs past the context slides the window, as `generate`
  does). Values the model code cannot take (a seed outside 64 bits, lone surrogates) are 400s.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from minigpt.engine import Loaded, Sampling, TextStream, UsageError, make_generator, sample_ids
from minigpt.files import lone_surrogate

log = logging.getLogger("minigpt.serve")
PAGE = Path(__file__).with_name("serve_page.html")
MAX_STOPS = 16  # OpenAI allows 4
MAX_STOP_CHARS = 256
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "[::1]"}  # what a Host header may say on loopback


class APIError(Exception):
    """A client error, answered as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def internal_error(e: Exception) -> str:
    """A 500's message: our own one-line errors (a diverged model's NaN logits) say what went
    wrong; anything else names only its type, never a traceback or a path."""
    return f"internal error: {e if isinstance(e, UsageError) else type(e).__name__}"


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- request bodies -----------------------------------------------------------------------------

def _unicode(s: str) -> str:
    """`s`, if it can be encoded (JSON's "\\ud800" escape decodes to a lone surrogate)."""
    if (at := lone_surrogate(s)) is not None:
        raise ValueError(f"not valid Unicode: lone surrogate U+{ord(s[at]):04X} "
                         f"at character {at + 1}")
    return s


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]

    @field_validator("content")
    @classmethod
    def _valid_unicode(cls, content):
        _unicode(content if isinstance(content, str) else "".join(p.text for p in content))
        return content

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(BaseModel):
    """Fields shared by both endpoints (OpenAI's names and ranges; unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None  # any name is accepted: there is one model
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch's manual_seed takes
    stream: bool = False
    n: int = Field(1, ge=1, le=1)  # one choice per request

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters, "
                             f"got one of {longest}")
        for s in stops:
            _unicode(s)
        return stop


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]] = ""

    @field_validator("prompt")
    @classmethod
    def _valid_unicode(cls, prompt):
        for p in [prompt] if isinstance(prompt, str) else prompt:
            _unicode(p)
        return prompt


async def read_body(request: Request, limit: int) -> bytes:
    """The body of a JSON request, at most `limit` bytes; else a 415 or 413."""
    ctype = request.headers.get("content-type")
    if ctype is None or ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'}",
                       code="unsupported_media_type")
    too_big = APIError(413, f"request body is over this server's limit of {limit} bytes",
                       code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():  # a chunked body has no Content-Length: count it
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def parse(request: Request, kind: type[BaseModel], limit: int) -> tuple[BaseModel, dict]:
    """The request body as `kind` (and the raw dict); else a 4xx."""
    try:
        raw = json.loads(await read_body(request, limit))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e})") from None
    except RecursionError:  # e.g. 100,000 "[": Python's parser gives up
        raise APIError(400, "request body is nested too deeply") from None
    if not isinstance(raw, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return kind.model_validate(raw), raw
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {message}", param) from None


def include_usage(raw: dict) -> bool:
    opts = raw.get("stream_options")
    return bool(opts.get("include_usage")) if isinstance(opts, dict) else False


# --- generation (runs on the worker thread) -----------------------------------------------------

class Cancelled(Exception):
    """Raised from the sampler's on_token callback: the client left or a stop string appeared."""


class Job:
    """One generation: its ids and settings, and how its text gets out (a callback per piece)."""

    def __init__(self, ids: list[int], req: _Sampling, max_tokens: int):
        self.ids, self.req, self.max_tokens = ids, req, max_tokens
        stop = req.stop if isinstance(req.stop, list) else [req.stop] if req.stop else []
        self.stops = [s for s in stop if s]
        self.cancel = threading.Event()
        self.text = ""
        self.completion_tokens = 0
        self.finish_reason = "length"


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    if not text:
        return 0
    for s in stops:
        # only prefixes s[:k] that end in text's last character can match: jump between them
        j = s.rfind(text[-1], 0, min(len(s) - 1, len(text)))  # k = j + 1
        while j >= best:
            if text.endswith(s[:j + 1]):
                best = j + 1
                break
            j = s.rfind(text[-1], 0, j)
    return best


def run_job(m: Loaded, job: Job, emit) -> None:
    """Generate for `job` on the model, calling emit(piece) with text that is final."""
    stream = TextStream(m.tok)
    sent = 0  # characters of the decoded text already emitted
    searched = 0  # text[:searched] held no stop string: a new one must end after it

    def flush(final: bool) -> bool:
        """Emit what is final; True when a stop string appeared (the text is cut before it)."""
        nonlocal sent, searched
        text = stream.text() if final else stream.text().rstrip("\ufffd")
        found = (text.find(s, max(0, searched - len(s) + 1)) for s in job.stops)
        cut = min((i for i in found if i >= 0), default=-1)
        searched = len(text)
        if cut >= 0:
            text, job.finish_reason = text[:cut], "stop"
        upto = len(text) if final or cut >= 0 else len(text) - _held_back(text, job.stops)
        if upto > sent:
            emit(text[sent:upto])
            sent = upto
        job.text = text[:sent]
        return cut >= 0

    def on_token(token_id: int) -> None:
        if job.cancel.is_set():
            raise Cancelled
        job.completion_tokens += 1
        if int(token_id) == m.eot:
            job.finish_reason = "stop"
        else:
            stream.ids.append(int(token_id))
            if flush(final=False):
                raise Cancelled

    settings = Sampling(max_new_tokens=job.max_tokens, temperature=job.req.temperature, top_k=0,
                        top_p=job.req.top_p, repetition_penalty=1.0, seed=job.req.seed)
    try:
        sample_ids(m, job.ids, settings, make_generator(settings.seed, m.device), on_token)
        flush(final=True)
    except Cancelled:  # a stop string (already flushed), or the client left
        if job.cancel.is_set():
            log.info("client disconnected: stopped after %d tokens", job.completion_tokens)


# --- who may ask -------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether binding `host` listens on this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


def host_name(header: str) -> str:
    """The name in a Host header, lowercased, without its port ("[::1]:8000" -> "[::1]")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1]
    name, _, port = header.rpartition(":")
    return name if name and port.isdigit() else header


class Guard:
    """ASGI middleware run before routing: the Host check (bound to loopback) and the API key."""

    def __init__(self, app, host: str, api_key: str | None):
        self.app = app
        self.hosts = LOOPBACK_NAMES | {host.lower() if ":" not in host else f"[{host}]"}
        self.check_host = is_loopback(host)
        self.key = api_key.encode() if api_key else None

    def refusal(self, scope) -> tuple[int, dict, dict] | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self.check_host:
            host = headers.get("host", "")
            if host_name(host) not in self.hosts:
                return 403, error_body(
                    f"Host header {host or '(none)'!r} is not allowed: this server is bound to "
                    "loopback and answers only 127.0.0.1, localhost and [::1] (a page on another "
                    "site may reach it by DNS rebinding)", code="host_not_allowed"), {}
        if self.key is not None and not (scope["method"] == "GET" and scope["path"] == "/"):
            scheme, _, token = headers.get("authorization", "").strip().partition(" ")
            if not (scheme.lower() == "bearer"
                    and hmac.compare_digest(token.strip().encode("latin-1"), self.key)):
                message = ("Incorrect API key provided" if token else
                           "You didn't provide an API key: send the header "
                           "'Authorization: Bearer <key>' (the key of minigpt serve --api-key)")
                return 401, error_body(message, code="invalid_api_key"), {
                    "WWW-Authenticate": "Bearer"}
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (refused := self.refusal(scope)):
            status, body, headers = refused
            await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --- the app ------------------------------------------------------------------------------------

def create_app(m: Loaded, name: str, max_tokens_cap: int, host: str = "127.0.0.1",
               api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="minigpt", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, host=host, api_key=api_key)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minigpt-model")
    block = m.model.config.block_size
    body_limit = max(1 << 20, 32 * block)  # bytes: a full context of text fits many times over
    created = int(time.time())
    info = {"model": name, "chat": m.is_chat, "block_size": block, "max_tokens": max_tokens_cap,
            "parameters": m.model.num_params(), "vocab_size": m.model.config.vocab_size,
            "n_layer": m.model.config.n_layer, "n_embd": m.model.config.n_embd}

    def slide_notice(message: str) -> None:  # the sampler's context-overflow notice: a log line
        log.warning("%s", message)

    m.warn_slide = slide_notice  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(error_body(str(e.detail), param=None, code=code),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):  # logged with its traceback by starlette
        return JSONResponse(error_body(internal_error(e), "server_error"), status_code=500)

    def check_max_tokens(value: int | None, param: str) -> int:
        if value is None:
            return min(max_tokens_cap, block)
        if value > max_tokens_cap:
            raise APIError(400, f"{param}={value} is over this server's cap of {max_tokens_cap} "
                           f"(minigpt serve --max_tokens)", param, "max_tokens_exceeded")
        return value

    def check_prompt(ids: list[int], param: str) -> None:
        if len(ids) > block:
            raise APIError(400, f"the prompt is {len(ids)} tokens, longer than the model's "
                           f"context of {block} tokens", param, "context_length_exceeded")

    async def answer(job: Job, kind: str, prompt_tokens: int, with_usage: bool):
        """A JSON response, or an SSE stream of OpenAI chunks, for `job` run on the worker."""
        loop = asyncio.get_running_loop()
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())

        def usage() -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": job.completion_tokens,
                    "total_tokens": prompt_tokens + job.completion_tokens}

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                if first:
                    delta = {"role": "assistant", "content": ""}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(c: dict | None, with_usage: bool = False) -> str:
            body = {"id": rid, "object": obj, "created": now, "model": name,
                    "system_fingerprint": None, "choices": [c] if c else []}
            if with_usage:
                body["usage"] = usage()
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        if not job.req.stream:
            await loop.run_in_executor(worker, run_job, m, job, lambda piece: None)
            if kind == "chat":
                c = {"index": 0, "message": {"role": "assistant", "content": job.text},
                     "logprobs": None, "finish_reason": job.finish_reason}
            else:
                c = {"index": 0, "text": job.text, "logprobs": None,
                     "finish_reason": job.finish_reason}
            return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                    "created": now, "model": name, "system_fingerprint": None,
                    "choices": [c], "usage": usage()}

        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def emit(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        def run() -> None:
            try:
                run_job(m, job, emit)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        future = loop.run_in_executor(worker, run)

        async def events():
            try:
                if kind == "chat":
                    yield chunk(choice(None, None, first=True))
                while (piece := await queue.get()) is not done:
                    yield chunk(choice(piece, None))
                try:
                    await future  # re-raises a genuine bug from the worker
                except Exception as e:  # the 200 is sent: the client learns it from the stream
                    log.exception("generation failed")
                    body = error_body(internal_error(e), "server_error")
                    yield f"data: {json.dumps(body)}\n\n"
                else:
                    yield chunk(choice(None, job.finish_reason))
                    if with_usage:
                        yield chunk(None, with_usage=True)
                yield "data: [DONE]\n\n"
            finally:  # the client left (or we are done): stop the sampler at its next token
                job.cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from minigpt.template import encode_conversation

        req, raw = await parse(request, ChatRequest, body_limit)
        if not m.is_chat:
            raise APIError(400, f"{name} is not instruction-tuned (config.json has no "
                           "chat_template): use /v1/completions", "model", "model_not_chat")
        messages = [{"role": x.role, "content": x.text()} for x in req.messages]
        if any(x["role"] == "system" for x in messages[1:]):
            raise APIError(400, "messages: a system message may only come first", "messages")
        if messages[-1]["role"] == "assistant":
            raise APIError(400, "messages: the last message must be from the user (or system)",
                           "messages")
        max_tokens = check_max_tokens(req.max_completion_tokens or req.max_tokens,
                                      "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        # On the model thread: a long message must not hold the event loop (nor encode from two
        # threads with one tokenizer, see minigpt.tokenizer.ordinary_text).
        ids = await asyncio.get_running_loop().run_in_executor(
            worker, lambda: encode_conversation(m.tok, messages, add_generation_prompt=True))
        check_prompt(ids, "messages")
        return await answer(Job(ids, req, max_tokens), "chat", len(ids), include_usage(raw))

    @app.post("/v1/completions")
    async def completions(request: Request):
        from minigpt.tokenizer import encode_text

        req, raw = await parse(request, CompletionRequest, body_limit)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt: one prompt per request", "prompt")
            prompt = prompt[0]
        max_tokens = check_max_tokens(req.max_tokens, "max_tokens")
        # what `generate --raw` feeds the model, tokenized on the model thread (see chat)
        ids = [m.eot] + await asyncio.get_running_loop().run_in_executor(
            worker, encode_text, m.tok, prompt)
        check_prompt(ids, "prompt")
        return await answer(Job(ids, req, max_tokens), "text", len(ids), include_usage(raw))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "minigpt"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **info}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app


def serve(m: Loaded, name: str, host: str, port: int, max_tokens_cap: int,
          api_key: str | None = None) -> None:
    """Run the server until Ctrl-C (logs go to stderr, one line each)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s:     %(message)s")
    app = create_app(m, name, max_tokens_cap, host, api_key)
    if not is_loopback(host) and not api_key:
        log.warning("--host %s without an API key: anyone who can reach this port can use the "
                    "model, and web pages can reach it through DNS rebinding; set --api-key or "
                    "MINIGPT_API_KEY", host)
    log.info("serving %s (%s, %d parameters, context %d) on http://%s:%d", name,
             "chat" if m.is_chat else "base", m.model.num_params(), m.model.config.block_size,
             host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
