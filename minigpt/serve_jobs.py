"""What runs on `minigpt serve`'s model thread: one generation (`Job`) and its stop strings.

Design choices
- One model thread: requests run one at a time in arrival order, never sharing the KV cache or
  the seeded generator, while the event loop keeps accepting. The sampler is the CLI's
  (`engine.sample_ids`, `engine.TextStream`), so a seeded request answers what `minigpt generate`
  prints with the same sampling settings (OpenAI has no top_k: off).
- Text leaves through a callback per piece, only once it is final: a piece that may begin a `stop`
  string is held back until it cannot, and the text is cut before a stop string that appears.
- A dropped client sets the job's `cancel` event; the sampler stops at its next token.
"""

from __future__ import annotations

import logging
import threading

from minigpt.engine import Loaded, Sampling, TextStream, make_generator, sample_ids
from minigpt.serve_api import SamplingRequest

log = logging.getLogger("minigpt.serve")


class Cancelled(Exception):
    """Raised from the sampler's on_token callback: the client left or a stop string appeared."""


class Job:
    """One generation: its ids and settings, and how its text gets out (a callback per piece)."""

    def __init__(self, ids: list[int], req: SamplingRequest, max_tokens: int):
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
