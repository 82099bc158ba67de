"""One `minigpt serve` generation (`Job`): its settings, and how its text leaves, stop strings cut.

Design choices
- The model thread (`minigpt.serve_batch`) decodes a job's tokens, alone or batched with others;
  it hands the job each new token (`Job.take`), which says when the job is over. The sampling
  settings are the CLI's (`engine.Sampling`; OpenAI has no top_k: off), so a seeded request
  served alone answers what `minigpt generate` prints with the same settings.
- Text leaves through a callback per piece (`Job.emit`), only once it is final: a piece that may
  begin a `stop` string is held back until it cannot, and the text is cut before a stop string
  that appears. Decoding goes through `engine.TextStream`, on the model thread.
- A dropped client sets the job's `cancel` event; the model thread drops its row at the next step.
"""

from __future__ import annotations

import threading
from typing import Callable

from minigpt.engine import Sampling, TextStream
from minigpt.serve_api import SamplingRequest


class Job:
    """One generation: its ids and settings, and how its text gets out (a callback per piece)."""

    def __init__(self, ids: list[int], req: SamplingRequest, max_tokens: int, tok, eot: int):
        self.ids, self.req, self.max_tokens, self.eot = ids, req, max_tokens, eot
        stop = req.stop if isinstance(req.stop, list) else [req.stop] if req.stop else []
        self.stops = [s for s in stop if s]
        self.cancel = threading.Event()
        self.emit: Callable[[str], None] = lambda piece: None
        self.text = ""
        self.completion_tokens = 0
        self.finish_reason = "length"
        self._stream = TextStream(tok)
        self._sent = 0  # characters of the decoded text already emitted
        self._searched = 0  # text[:searched] held no stop string: a new one must end after it
        self._stopped = False  # a stop string was found: the text is final

    def sampling(self) -> Sampling:
        return Sampling(max_new_tokens=self.max_tokens, temperature=self.req.temperature, top_k=0,
                        top_p=self.req.top_p, repetition_penalty=1.0, seed=self.req.seed)

    def take(self, token_id: int) -> bool:
        """A new token; True when the job is over (<|endoftext|>, a stop string, max_tokens)."""
        self.completion_tokens += 1
        if token_id == self.eot:
            self.finish_reason = "stop"
            return True
        self._stream.ids.append(token_id)
        return self._flush(final=False) or self.completion_tokens >= self.max_tokens

    def finish(self) -> None:
        """Emit the text held back (nothing after a stop string: the text was cut there)."""
        if not self._stopped:
            self._flush(final=True)

    def _flush(self, final: bool) -> bool:
        """Emit what is final; True when a stop string appeared (the text is cut before it)."""
        text = self._stream.text() if final else self._stream.text().rstrip("\ufffd")
        found = (text.find(s, max(0, self._searched - len(s) + 1)) for s in self.stops)
        cut = min((i for i in found if i >= 0), default=-1)
        self._searched = len(text)
        if cut >= 0:
            text, self.finish_reason, self._stopped = text[:cut], "stop", True
        upto = len(text) if final or cut >= 0 else len(text) - _held_back(text, self.stops)
        if upto > self._sent:
            self.emit(text[self._sent:upto])
            self._sent = upto
        self.text = text[:self._sent]
        return cut >= 0


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
