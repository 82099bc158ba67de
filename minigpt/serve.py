"""`minigpt serve`: an OpenAI-compatible HTTP server for one model directory, plus a chat page.

    POST /v1/chat/completions   chat models (the minigpt-v1 template), stream: true as SSE
    POST /v1/completions        raw text continued after <|endoftext|> (base models; `generate --raw`)
    GET  /v1/models, /health    the model's name and size
    GET  /                      a static chat page (serve_page.html: no CDN, no build step)

Design choices (errors and limits in docs/FORMATS.md)
- FastAPI + uvicorn + pydantic; the wire format is `serve_api`, who may ask `serve_guard`, a
  generation `serve_jobs`, the one model thread that decodes up to `--parallel` of them as one
  batch `serve_batch` (`serve` runs it on the main thread, where the model was loaded, and
  uvicorn on another). This module is the routes and how a job's text reaches the client: one
  JSON body, or server-sent events as the text becomes final.
- A dropped client cancels its generation at the next token; a failure after the 200 ends the
  stream with an error event, then `[DONE]`. /health answers while a generation runs.
- Cheap requests must not cost a lot: prompts are tokenized on the model thread; a prompt longer
  than the context or `max_tokens` above `--max_tokens` is a 400 (an answer that runs past the
  context slides the window, as `generate` does).
- Binds 127.0.0.1 unless `--host` says otherwise; another host without an API key only warns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minigpt.engine import Loaded, UsageError
from minigpt.serve_api import (APIError, ChatRequest, CompletionRequest, ResponseShape, error_body,
                               include_usage, internal_error, parse)
from minigpt.serve_batch import Batcher
from minigpt.serve_guard import Guard, is_loopback
from minigpt.serve_jobs import Job

log = logging.getLogger("minigpt.serve")
PAGE = Path(__file__).with_name("serve_page.html")


@dataclass
class Served:
    """The model being served, its one thread, and this server's limits."""

    m: Loaded
    name: str
    max_tokens_cap: int
    worker: Batcher
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def block(self) -> int:
        return self.m.model.config.block_size

    @property
    def body_limit(self) -> int:
        return max(1 << 20, 32 * self.block)  # bytes: a full context of text fits many times over

    def info(self) -> dict:
        c = self.m.model.config
        return {"model": self.name, "chat": self.m.is_chat, "block_size": self.block,
                "max_tokens": self.max_tokens_cap, "parameters": self.m.model.num_params(),
                "vocab_size": c.vocab_size, "n_layer": c.n_layer, "n_embd": c.n_embd}

    async def on_worker(self, fn, *args):
        """`fn(*args)` on the model thread (between two decode steps)."""
        return await asyncio.wrap_future(self.worker.call(fn, *args))

    def max_tokens(self, value: int | None, param: str) -> int:
        if value is None:
            return min(self.max_tokens_cap, self.block)
        if value > self.max_tokens_cap:
            raise APIError(400, f"{param}={value} is over this server's cap of "
                           f"{self.max_tokens_cap} (minigpt serve --max_tokens)", param,
                           "max_tokens_exceeded")
        return value

    def check_prompt(self, ids: list[int], param: str) -> None:
        if len(ids) > self.block:
            raise APIError(400, f"the prompt is {len(ids)} tokens, longer than the model's "
                           f"context of {self.block} tokens", param, "context_length_exceeded")


# --- requests to jobs ---------------------------------------------------------------------------

async def chat_job(s: Served, req: ChatRequest) -> Job:
    from minigpt.template import encode_conversation

    if not s.m.is_chat:
        raise APIError(400, f"{s.name} is not instruction-tuned (config.json has no "
                       "chat_template): use /v1/completions", "model", "model_not_chat")
    messages = [{"role": x.role, "content": x.text()} for x in req.messages]
    if any(x["role"] == "system" for x in messages[1:]):
        raise APIError(400, "messages: a system message may only come first", "messages")
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "messages: the last message must be from the user (or system)",
                       "messages")
    max_tokens = s.max_tokens(req.max_completion_tokens or req.max_tokens,
                              "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
    # On the model thread: a long message must not hold the event loop (nor encode from two
    # threads with one tokenizer, see minigpt.tokenizer.ordinary_text).
    ids = await s.on_worker(lambda: encode_conversation(s.m.tok, messages, add_generation_prompt=True))
    s.check_prompt(ids, "messages")
    return Job(ids, req, max_tokens, s.m.tok, s.m.eot)


async def completion_job(s: Served, req: CompletionRequest) -> Job:
    from minigpt.tokenizer import encode_text

    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "prompt: one prompt per request", "prompt")
        prompt = prompt[0]
    max_tokens = s.max_tokens(req.max_tokens, "max_tokens")
    # what `generate --raw` feeds the model, tokenized on the model thread (see chat_job)
    ids = [s.m.eot] + await s.on_worker(encode_text, s.m.tok, prompt)
    s.check_prompt(ids, "prompt")
    return Job(ids, req, max_tokens, s.m.tok, s.m.eot)


# --- jobs to responses --------------------------------------------------------------------------

async def answer(s: Served, job: Job, kind: str, with_usage: bool):
    """A JSON response, or an SSE stream of OpenAI chunks, for `job` run on the model thread."""
    shape = ResponseShape(kind, s.name, len(job.ids))
    if not job.req.stream:
        await asyncio.wrap_future(s.worker.submit(job))
        return shape.completion(job.text, job.finish_reason, job.completion_tokens)
    return StreamingResponse(stream(s, job, shape, with_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def stream(s: Served, job: Job, shape: ResponseShape, with_usage: bool) -> AsyncIterator[str]:
    """Queue `job` on the model thread now (arrival order) and return its server-sent events,
    each piece as soon as the model thread emits it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    job.emit = lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece)
    ended = s.worker.submit(job)  # after its last piece (both from the model thread, in order)
    ended.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, done))
    future = asyncio.wrap_future(ended, loop=loop)

    async def events():
        try:
            if shape.chat:
                yield shape.chunk(shape.choice(None, None, first=True))
            while (piece := await queue.get()) is not done:
                yield shape.chunk(shape.choice(piece, None))
            try:
                await future  # re-raises a genuine bug from the worker
            except Exception as e:  # the 200 is sent: the client learns it from the stream
                log.exception("generation failed")
                yield f"data: {json.dumps(error_body(internal_error(e), 'server_error'))}\n\n"
            else:
                yield shape.chunk(shape.choice(None, job.finish_reason))
                if with_usage:
                    yield shape.chunk(None, usage=shape.usage(job.completion_tokens))
            yield "data: [DONE]\n\n"
        finally:  # the client left (or we are done): stop the sampler at its next token
            job.cancel.set()

    return events()


# --- the app ------------------------------------------------------------------------------------

def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours (APIError), Starlette's (404, 405), and bugs (500)."""

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


def _log_slide(message: str) -> None:
    """The sampler's context-overflow notice: a log line (no terminal to keep it off)."""
    log.warning("%s", message)


def create_app(m: Loaded, name: str, max_tokens_cap: int, host: str = "127.0.0.1",
               api_key: str | None = None, parallel: int = 4, batcher: Batcher | None = None) -> FastAPI:
    """The app; `parallel` requests decode as one batch (`minigpt.serve_batch`), on a thread of
    its own unless `batcher` (whose loop the caller runs) is given."""
    app = FastAPI(title="minigpt", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, host=host, api_key=api_key)
    _add_error_handlers(app)
    s = Served(m, name, max_tokens_cap, batcher or Batcher(m, parallel))
    m.warn_slide = _log_slide  # type: ignore[method-assign]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req, raw = await parse(request, ChatRequest, s.body_limit)
        return await answer(s, await chat_job(s, req), "chat", include_usage(raw))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req, raw = await parse(request, CompletionRequest, s.body_limit)
        return await answer(s, await completion_job(s, req), "text", include_usage(raw))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": s.created,
                                            "owned_by": "minigpt"}]}

    info = s.info()

    @app.get("/health")
    async def health():
        return {"status": "ok", **info, **s.worker.load()}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app


def serve(m: Loaded, name: str, host: str, port: int, max_tokens_cap: int,
          api_key: str | None = None, parallel: int = 4) -> None:
    """Run the server until Ctrl-C or SIGTERM (logs go to stderr, one line each). The model
    runs on this thread, where it was loaded (`serve_batch.Batcher`: one OpenMP team), and
    uvicorn's event loop on another."""
    import signal
    import threading

    import uvicorn

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s:     %(message)s")
    batcher = Batcher(m, parallel, thread=False)
    app = create_app(m, name, max_tokens_cap, host, api_key, parallel, batcher)
    if not is_loopback(host) and not api_key:
        log.warning("--host %s without an API key: anyone who can reach this port can use the "
                    "model, and web pages can reach it through DNS rebinding; set --api-key or "
                    "MINIGPT_API_KEY", host)
    log.info("serving %s (%s, %d parameters, context %d, %d requests at a time) on http://%s:%d",
             name, "chat" if m.is_chat else "base", m.model.num_params(),
             m.model.config.block_size, parallel, host, port)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))

    def http() -> None:
        try:
            server.run()
        finally:  # stopped, or it could not start (the port taken): the model loop ends too
            batcher.stop()

    web = threading.Thread(target=http, name="minigpt-http", daemon=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: batcher.stop())
    web.start()
    try:
        batcher.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.should_exit = True
        web.join(timeout=30)
    if not server.started:
        raise UsageError(f"could not serve on {host}:{port} (the reason is logged above)")
