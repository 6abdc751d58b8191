"""Sentences of a response, and which sentence each token of a tokenisation belongs to.

Splitting is pysbd's (rule-based, offline, no model to download): it keeps enumerators with their
step ("1. First step", "Step 2. ...") and decimals inside sentences ("$x = 1.5$."). It does not
know LaTeX, so a boundary it puts inside a math span (`$...$`, `$$...$$`, `\\[...\\]`, `\\(...\\)`)
is dropped: a displayed equation ending in "." stays one piece with the text around it.

A sentence covers the characters from its first one up to the next sentence's first one (so
trailing whitespace belongs to the sentence before it, leading whitespace of the response to the
first). A token belongs to the sentence holding its first non-space character (DESIGN §9), which
is why scores compare across tokenizers: every model splits the same text into the same sentences.
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import dataclass

_MATH = re.compile(r"(?<!\\)\$\$.+?(?<!\\)\$\$|(?<!\\)\$.+?(?<!\\)\$|\\\[.+?\\\]|\\\(.+?\\\)", re.DOTALL)


@dataclass(frozen=True)
class Sentence:
    start: int  # character offsets into the response
    end: int
    text: str  # the sentence without surrounding whitespace


@functools.lru_cache(maxsize=1)
def _segmenter():
    try:
        import pysbd
    except ImportError:
        raise ImportError("sentence splitting needs pysbd: pip install 'rsd-engine[pipeline]' (or pip install "
                          "pysbd)") from None
    return pysbd.Segmenter(language="en", clean=False)


def sentence_starts(text: str) -> list[int]:
    """Offsets where sentences begin: pysbd's boundaries, less those inside math spans."""
    starts, cursor = [], 0
    for piece in _segmenter().segment(text):
        piece = piece.strip()
        if not piece:
            continue
        at = text.find(piece, cursor)
        if at < 0:  # pysbd normalised something: fall back to where the last piece ended
            at = cursor
        starts.append(at)
        cursor = at + len(piece)
    inside = [(m.start(), m.end()) for m in _MATH.finditer(text)]
    starts = [s for s in starts if not any(a < s < b for a, b in inside)]
    return [0] + [s for s in sorted(set(starts)) if s > 0] if text else []


def split_sentences(text: str, starts: list[int] | None = None) -> list[Sentence]:
    """The sentences of `text` (see the module docstring); whitespace-only text has none."""
    if not text.strip():
        return []
    starts = sentence_starts(text) if starts is None else starts
    ends = starts[1:] + [len(text)]
    return [Sentence(a, b, text[a:b].strip()) for a, b in zip(starts, ends)]


def token_sentences(text: str, offsets: list[tuple[int, int]], starts: list[int]) -> list[int]:
    """Index of the sentence each token belongs to, from the tokens' character offsets into `text`:
    the sentence holding the token's first non-space character (its first character if it has none)."""
    out = []
    for a, b in offsets:
        first = next((k for k in range(a, min(b, len(text))) if not text[k].isspace()), a)
        out.append(max(bisect.bisect_right(starts, first) - 1, 0))
    return out


def merge_empty(starts: list[int], counts: list[list[int]]) -> list[int]:
    """Drop sentence starts so that every sentence holds at least one token under every model.

    counts[m][i] is the number of model m's tokens in sentence i. A sentence without tokens (a
    token ran across its start) joins the sentence before it, the first one joins the next; the
    result is the same for every model, so sentences stay comparable."""
    empty = {i for per_model in counts for i, n in enumerate(per_model) if n == 0}
    kept = [s for i, s in enumerate(starts) if i not in empty or i == 0]
    if 0 in empty and len(kept) > 1:
        kept.pop(1)  # the first sentence absorbs the second instead
    return kept
