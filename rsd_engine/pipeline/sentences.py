"""Sentences of a response, and which sentence each token of a tokenisation belongs to.

Splitting is pysbd's (rule-based, offline, no model to download): it keeps enumerators with their
step ("1. First step", "Step 2. ...") and decimals inside sentences ("$x = 1.5$."). It does not
know LaTeX, so a boundary it puts inside a math span (`$...$`, `$$...$$`, `\\[...\\]`, `\\(...\\)`)
is dropped: a displayed equation ending in "." stays one piece with the text around it. A `$`
before a number is currency, not math, unless its closing `$` comes before pysbd's next boundary:
"It costs $5. Then $3." is two sentences, "$5x = 10$." one.

Template markers (`<think>`, `</think>`, `<|im_end|>`: the tokenizers' special and added tokens,
found by the caller) are never sentences: they cut the text into segments, each split on its own,
and their characters belong to no sentence.

A sentence is a span (start, end) of the response: from its first character up to the next
sentence's first one, or to the marker or end of text closing its segment (so trailing whitespace
belongs to the sentence before it, leading whitespace of a segment to its first). A token belongs
to the sentence holding its first non-space character (DESIGN §9), which is why scores compare
across tokenizers: every model splits the same text into the same sentences. A token whose first
non-space character lies in a marker, or in a whitespace-only segment, belongs to none (index -1).
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import dataclass

from . import pysbd_linear

# How responses are cut into sentences and read, as outputs record it ("sentence reading" in a manifest): bump when a
# sentence or its probabilities can change, so an output is not extended with sentences made another way
# (1: before punctuation alone joined the sentence before it; 2: before "We get 3. Then" was read as a list item and
# a LaTeX line break "\\[2pt]" as display math).
READING = 3

# (A \[ or \( after an odd number of backslashes is a line break's spacing, "\\[2pt]", or an escaped bracket: no
# math; "\\\[" is a line break, then display math.)
_DELIMITED = re.compile(r"(?<!\\)\$\$.+?(?<!\\)\$\$|(?<!\\)(?:\\\\)*\\\[.+?\\\]|(?<!\\)(?:\\\\)*\\\(.+?\\\)",
                        re.DOTALL)
# pysbd reads a number or a lone lowercase letter ending a sentence inside a line as a list item: "We get 3. Then we
# get 4." was "We get" | "3. Then we get" | "4.", and "Try n = 1. Then n = 2." one sentence. Such a number or letter
# (after a word on its line that ends no sentence, before ". " and a capital or the end) is masked for pysbd,
# offsets unchanged, unless its successor opens a sentence later on its line ("The plan is 1. Add. 2. Check.": a
# list, as pysbd reads it); a list item that opens a line or follows a sentence ("... $a^2$. 2. Second.") is pysbd's.
_INLINE_ENUMERATOR = re.compile(r"(?<=[^\s.!?:;] )(\d+|[a-z])(?=\.(?:\s+[A-Z]|\s*$))")


# An inline list's item: a number or letter right after a sentence's end, then ". ".
_LIST_ITEM = re.compile(r"(?<=[.!?])[ \t]+(\d+|[a-z])\.(?=\s|$)")


def _mask_enumerators(text: str) -> str:
    items: dict[str, list[int]] = {}
    for m in _LIST_ITEM.finditer(text):
        items.setdefault(m[1], []).append(m.start(1))

    def mask(m: re.Match) -> str:
        item = m[1]
        following = str(int(item) + 1) if item.isdigit() else chr(ord(item) + 1)
        line_end = text.find("\n", m.end())
        line_end = len(text) if line_end < 0 else line_end
        later = items.get(following, ())
        i = bisect.bisect_right(later, m.end())
        in_a_list = i < len(later) and later[i] < line_end  # the next item follows on its line
        return item if in_a_list else "#" * len(item)

    return _INLINE_ENUMERATOR.sub(mask, text)
_DOLLAR = re.compile(r"(?<![\\$])\$(?!\$)")  # a lone, unescaped `$`
_AMOUNT = re.compile(r"\s?\.?\d")  # what follows a currency `$`: "$5", "$ 5", "$.50"

Span = tuple[int, int]


@dataclass(frozen=True)
class Sentence:
    start: int  # character offsets into the response
    end: int
    text: str  # the sentence without surrounding whitespace


@functools.lru_cache(maxsize=1)
def _segmenter():
    try:
        segmenter = pysbd_linear.segmenter_class()
    except ImportError:
        raise ImportError("sentence splitting needs pysbd: pip install 'rsd-engine[pipeline]' (or pip install "
                          "pysbd)") from None
    return segmenter(language="en", clean=False)


def marker_spans(text: str, markers=()) -> list[Span]:
    """Where the markers occur in `text`, longest marker first at any position, not overlapping."""
    if not markers:
        return []
    pattern = re.compile("|".join(re.escape(m) for m in sorted(set(markers), key=len, reverse=True)))
    return [(m.start(), m.end()) for m in pattern.finditer(text)]


def math_spans(text: str, boundaries: list[int]) -> list[Span]:
    """Math spans of `text`; a `$` before a number is currency and opens none where its closing `$` lies past
    one of `boundaries` (pysbd's sentence starts) or cannot close math (as pandoc reads TeX math: a space on
    its left, or a digit on its right: "Pay $5 for $x$ items." pairs `$x$`, not `$5 for $`)."""
    spans = [(m.start(), m.end()) for m in _DELIMITED.finditer(text)]
    dollars = [m.start() for m in _DOLLAR.finditer(text) if not any(a <= m.start() < b for a, b in spans)]
    k = 0
    while k + 1 < len(dollars):
        a, b = dollars[k], dollars[k + 1]
        if _AMOUNT.match(text, a + 1) and (any(a < s <= b for s in boundaries) or text[b - 1].isspace()
                                            or text[b + 1:b + 2].isdigit()):
            k += 1
            continue
        spans.append((a, b + 1))
        k += 2
    return spans


def _segment_starts(text: str) -> list[int]:
    """Sentence starts within one marker-free piece of text: pysbd's, less those inside math."""
    starts, cursor = [], 0
    masked = _mask_enumerators(text)
    for piece in _segmenter().segment(masked):
        piece = piece.strip()
        if not piece:
            continue
        at = masked.find(piece, cursor)
        if at < 0:  # pysbd normalised something: fall back to where the last piece ended
            at = cursor
        piece = text[at:at + len(piece)]
        # A piece of punctuation alone is no sentence: pysbd cuts "x = 3... Wait" as "x = 3..", ".", "Wait"
        # (a sentence of one character, with a category of its own); it ends the sentence before it (or, first,
        # opens the one after it).
        if not any(ch.isalnum() for ch in piece):
            cursor = at + len(piece)
            continue
        starts.append(at)
        cursor = at + len(piece)
    inside = math_spans(text, starts)
    starts = sorted({s for s in starts if not any(a < s < b for a, b in inside)})
    return [0] + starts[1:]  # the first sentence takes the segment's leading whitespace


def sentence_spans(text: str, markers=()) -> list[Span]:
    """The sentences of `text` as (start, end) spans (see the module docstring)."""
    spans, cursor = [], 0
    for a, b in [*marker_spans(text, markers), (len(text), len(text))]:
        segment = text[cursor:a]
        if segment.strip():
            starts = [cursor + s for s in _segment_starts(segment)]
            spans += list(zip(starts, starts[1:] + [a]))
        cursor = b
    return spans


def has_sentence(text: str, markers=()) -> bool:
    """Whether `text` has a sentence (sentence_spans not empty): text outside the markers that is not all
    whitespace. Without splitting (a 64 KB response takes pysbd a fifth of a second, pysbd_linear.py)."""
    cursor = 0
    for a, b in [*marker_spans(text, markers), (len(text), len(text))]:
        if text[cursor:a].strip():
            return True
        cursor = b
    return False


def split_sentences(text: str, spans: list[Span] | None = None, markers=()) -> list[Sentence]:
    """The sentences of `text` (see the module docstring); whitespace-only text has none."""
    spans = sentence_spans(text, markers) if spans is None else spans
    return [Sentence(a, b, text[a:b].strip()) for a, b in spans]


def token_sentences(text: str, offsets: list[tuple[int, int]], spans: list[Span]) -> list[int]:
    """Index of the sentence each token belongs to, from the tokens' character offsets into `text`:
    the sentence holding the token's first non-space character (its first character if it has
    none); -1 for a token in no sentence (a marker)."""
    starts = [a for a, _ in spans]
    out = []
    for a, b in offsets:
        first = next((k for k in range(a, min(b, len(text))) if not text[k].isspace()), a)
        i = bisect.bisect_right(starts, first) - 1
        out.append(i if i >= 0 and first < spans[i][1] else -1)
    return out


def merge_empty(spans: list[Span], counts: list[list[int]]) -> list[Span]:
    """Join sentences so that every sentence holds at least one token under every model.

    counts[m][i] is the number of model m's tokens in sentence i. A sentence without tokens (a
    token ran across its start) joins the sentence before it in its segment, else the next one; a
    segment with no token at all under some model has no sentence left. The result is the same
    for every model, so sentences stay comparable."""
    empty = {i for per_model in counts for i, n in enumerate(per_model) if n == 0}
    out, pending = [], None  # pending: an empty sentence waiting to join the next one
    for i, (a, b) in enumerate(spans):
        if pending is not None and pending[1] == a:
            a = pending[0]
        pending = None
        if i not in empty:
            out.append((a, b))
        elif out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            pending = (a, b)
    return out
