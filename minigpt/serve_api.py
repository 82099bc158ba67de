"""The OpenAI wire format of `minigpt serve`: request bodies in, errors and response bodies out.

Design choices (the fields and codes are listed in docs/FORMATS.md)
- pydantic models with OpenAI's names and ranges: bad JSON and fields are rejected before any
  work, and every error is a 4xx in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`
  naming the field. Unknown fields are ignored, as OpenAI's clients send many.
- Bodies must be `application/json` (415: no CORS preflight is answered, so a web page cannot
  post one) and at most a size limit (413, counted as it arrives: a chunked body has no
  Content-Length). Few and short `stop` strings; values the model code cannot take (a seed
  outside 64 bits, lone surrogates) are 400s.
- A 500 names only its exception's type (or our own one-line message), never a traceback or path.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal, Union

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from minigpt.engine import UsageError
from minigpt.files import lone_surrogate

MAX_STOPS = 16  # OpenAI allows 4
MAX_STOP_CHARS = 256


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


class SamplingRequest(BaseModel):
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


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingRequest):
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


# --- response bodies ----------------------------------------------------------------------------

class ResponseShape:
    """The bodies of one response: a whole completion, or the chunks of its stream."""

    def __init__(self, kind: str, model: str, prompt_tokens: int):
        self.chat = kind == "chat"
        self.model, self.prompt_tokens = model, prompt_tokens
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def completion(self, text: str, finish: str, completion_tokens: int) -> dict:
        """The body of a response that is not streamed."""
        if self.chat:
            c = {"index": 0, "message": {"role": "assistant", "content": text},
                 "logprobs": None, "finish_reason": finish}
        else:
            c = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": None,
                "choices": [c], "usage": self.usage(completion_tokens)}

    def choice(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        """A stream chunk's choice: a piece of text, the finish reason, or (chat) the role."""
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": ""}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def chunk(self, c: dict | None, usage: dict | None = None) -> str:
        """One server-sent event holding choice `c` (or none), and `usage` when given."""
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": None,
                "choices": [c] if c else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
