"""WikiText: regrouping lines into articles, and detokenizing them back into ordinary prose.

Design choices
- WikiText (`format: wikitext`): rows are lines; an article starts at a top-level heading
  ` = Title = ` (never at ` = = Section = = `). Hub rows end in "\\n", raw-file lines do not:
  both are handled by dropping the line ending first. Whitespace-only lines before the first
  heading are not a document. `format: auto` needs evidence (`starts_like_wikitext`): the first
  non-blank line is a title, as in every WikiText file and hub split.
- Detokenization (`detokenize: true`) turns WikiText back into ordinary prose, line by line, with
  token-level rules (`detokenize_line`: ` @-@ ` -> `-`, no space before `, . ; : ! ? %` or
  attached apostrophes, quotes re-attached when they pair up on a line, `3 : 04` -> `3:04`, ...).
  Where the tokenized text is ambiguous the rule leaves it alone: an unpaired quote stays as it
  is, and dashes (`–`, `—`) keep their spaces (Wikipedia writes both `1996–97` and `a – b`).
  Headings become plain lines, each paragraph one line, runs of blank lines collapse to one.
- With `detokenize: false` the article is the source lines verbatim (only leading/trailing blank
  lines removed), which is what published WikiText perplexities are computed on. The rules assume
  WikiText's tokenization: on ordinary text they are nearly, not exactly, a no-op (`written
  'aleph` becomes `written'aleph`), so set `detokenize: false` for plain corpora.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Optional, Sequence

_TITLE = re.compile(r"= (?!=)(.*\S) =")              # "= Title =", not "= = Section = ="
_HEADING = re.compile(r"(=(?: =)*) (.*?) ((?:= )*=)")  # any level: "= = = Sub = = ="
_NUMBER_SEPARATORS = {"@-@": "-", "@,@": ",", "@.@": "."}
_CLOSING = re.compile(r"[,.;:!?%)\]}…]+")            # never a space before these
_OPENING = {"(", "[", "{", "“", "‘"}                   # never a space after these
_CLOSERS = {"”", "°", "′", "″"}                        # `50 ° 3 ′ N` -> `50° 3′ N`
_JOINERS = {"‑", "⁄"}                                  # non-breaking hyphen; fraction slash
_CURRENCY = {"$", "£", "€", "¥", "₹", "₱", "₤"}
_ATTACHED_APOSTROPHE = re.compile(r"'[^\W\d_]")       # 's 't 're O 'Neil d 'Italia
_CONTRACTION_TAILS = {"s", "t", "m", "d", "re", "ve", "ll"}
_DECADE = re.compile(r"\d0s")
# Words ending in "s" after which a lone ' is a quote, not a plural possessive.
_NOT_PLURAL = {"as", "is", "was", "has", "his", "its", "this", "thus", "us", "yes", "does",
               "whereas", "always", "perhaps", "less", "unless", "across", "towards", "plus",
               "hers", "ours", "yours", "theirs", "'s"}


def is_title(line: str) -> bool:
    """Is this line a WikiText article title (` = Title = `), as opposed to a section heading?"""
    return _TITLE.fullmatch(line.strip()) is not None


def starts_like_wikitext(lines: Iterable[str]) -> bool:
    """Is the first non-blank line of `lines` a ` = Title = ` heading? (False when all are blank.)"""
    for line in lines:
        if line.strip():
            return is_title(line)
    return False


def heading_text(line: str) -> Optional[str]:
    """The text of a heading line of any level (balanced `=` on both sides), else None."""
    m = _HEADING.fullmatch(line.strip())
    if m and m.group(1).count("=") == m.group(3).count("=") and m.group(2).strip():
        return m.group(2).strip()
    return None


def wikitext_articles(lines: Iterable[str]) -> Iterator[list[str]]:
    """Group WikiText lines (rows) into articles, each starting at its ` = Title = ` line.

    Line endings are removed first: hub rows end in "\\n", lines of the raw files do not."""
    article: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if is_title(line) and article:
            if any(x.strip() for x in article):
                yield article
            article = []
        article.append(line)
    if any(x.strip() for x in article):
        yield article


def _pair(indices: list[int], glue_left: list[bool], glue_right: list[bool]) -> None:
    """Attach alternate quote marks to what they enclose: odd ones open, even ones close."""
    for k, i in enumerate(indices):
        if k % 2 == 0:
            glue_right[i] = True
        else:
            glue_left[i] = True


def detokenize_line(line: str) -> str:
    """Undo WikiText's tokenization on one line (one paragraph).

    ` @-@ ` -> `-`, ` @,@ ` -> `,`, ` @.@ ` -> `.`; no space before `, . ; : ! ? % ) ] }` or before
    `'s 't 're 'll n't` and other attached apostrophes; no space after `( [ {`; none around `‑`
    (non-breaking hyphen) and `⁄`; `"` and `'` quotes re-attached to what they enclose when they
    pair up on the line (an unpaired one is left as it is: guessing wrong would glue words
    together); ` ' ` after a plural (`ships ' hulls`) is a possessive; `3 : 04` -> `3:04`;
    `$ 5` -> `$5`; `50 °` -> `50°`. Dashes keep their spaces. Whitespace is normalised to single
    spaces.

    Works on whitespace-separated tokens: each rule only decides whether the space before or
    after a token goes, so no rule can delete text, and rules never interact through regex
    re-matching on text another rule has already rewritten."""
    tokens = line.split()
    n = len(tokens)
    glue_left, glue_right = [False] * n, [False] * n
    double_quotes: list[int] = []
    open_single: Optional[int] = None
    for i, tok in enumerate(tokens):
        if tok.isalnum():
            continue  # most tokens are plain words, which no rule touches: skip them quickly
        prev = tokens[i - 1] if i else ""
        nxt = tokens[i + 1] if i + 1 < n else ""
        if tok in _NUMBER_SEPARATORS:  # 1 @,@ 000 -> 1,000 ; state @-@ of @-@ the @-@ art
            tokens[i] = _NUMBER_SEPARATORS[tok]
            glue_left[i] = glue_right[i] = True
        elif tok in _JOINERS:
            glue_left[i] = glue_right[i] = True
        elif _CLOSING.fullmatch(tok):
            glue_left[i] = True
            if tok == ":" and prev.isdigit() and nxt[:1].isdigit():  # times: 3 : 04 -> 3:04
                glue_right[i] = True
        elif tok in _OPENING:
            glue_right[i] = True
        elif tok in _CLOSERS:
            glue_left[i] = True
        elif tok in _CURRENCY and nxt[:1].isdigit():
            glue_right[i] = True
        elif tok == '"':
            double_quotes.append(i)
        elif tok == "’":  # curly apostrophe, spaced on both sides: don ’ t, women ’ s
            glue_left[i] = True
            glue_right[i] = nxt.lower() in _CONTRACTION_TAILS
        elif _ATTACHED_APOSTROPHE.match(tok) or tok.lower() == "n't":
            glue_left[i] = True
        elif tok == "'":
            if _DECADE.fullmatch(nxt):  # the ' 90s -> the '90s
                glue_right[i] = True
            elif nxt in _CONTRACTION_TAILS:  # a split contraction: U.S. ' s -> U.S.'s
                glue_left[i] = glue_right[i] = True
            elif open_single is not None:  # closes a quote opened earlier on the line
                glue_right[open_single] = glue_left[i] = True
                open_single = None
            elif (prev[-1:] in ("s", "S") and prev.lower() not in _NOT_PLURAL
                  and nxt[:1].isalnum()):  # the ships ' hulls -> the ships' hulls
                glue_left[i] = True
            elif nxt[:1].isalnum():  # may open a quote; glued only if a closing one follows
                open_single = i
    if len(double_quotes) % 2 == 0:  # an odd count means one is stray: leave them all spaced
        _pair(double_quotes, glue_left, glue_right)
    out = tokens[:1]
    for i in range(1, n):
        out.append(tokens[i] if glue_right[i - 1] or glue_left[i] else " " + tokens[i])
    return "".join(out)


def detokenize(text: str) -> str:
    """Detokenize every line of `text`, keeping the line structure."""
    return "\n".join(detokenize_line(line) for line in text.split("\n"))


def _trim_blank_lines(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def article_text(lines: Sequence[str], detokenized: bool) -> str:
    """One WikiText article as a document. Detokenized: headings as plain lines, one paragraph per
    line, single blank lines where the source had blank lines. Otherwise the lines verbatim."""
    lines = [line.rstrip("\r\n") for line in lines]
    if not detokenized:
        return "\n".join(_trim_blank_lines(lines))
    out: list[str] = []
    for line in lines:
        heading = heading_text(line)
        text = detokenize_line(heading if heading is not None else line)
        if text:
            out.append(text)
        elif out and out[-1]:
            out.append("")  # one blank line, however many the source had
    return "\n".join(_trim_blank_lines(out))
