"""pysbd's sentences in time linear in the text (pysbd 0.3.4 takes quadratic time in three places).

Reasoning traces are long: pysbd 0.3.4 took 1.1 s on a 64 KB window of maths text and 6 s on a
64 KB text of many short list items (here), and provenance splits every response. Three steps of
pysbd are quadratic; each is replaced here by one that returns the same result:

- ``ListItemReplacer.scan_lists`` marks numbered list items ("2." or "2)" whose neighbour in the text's
  list of item numbers is 1 or 3) with one ``re.sub`` over the whole text per marked item, so a text
  with k items costs k passes. The item numbers are one or two digits, a pass rewrites only the items
  whose number it is given (the separators a match needs around it are spaces, "-", "⁃" and ")",
  which no pass writes, so no pass adds or removes a match of another), and a pass given a number
  already marked finds nothing left to rewrite: one pass given the set of marked numbers writes the
  same text. (pysbd read an item's number with int() of the match and the whitespace before it, and
  raised ValueError on whitespace int() keeps, such as "\\x1c2. ": the number is read here.)
- ``ListItemReplacer.iterate_alphabet_array`` does the same for lettered and roman items ("a.", "(b)",
  "x." in "so the value is x."): a pass per item. pysbd's own tests decide which letters are items
  (recorded instead of applied); one rewrite then applies them: "a." becomes "\\ra∯" once, "(b"
  becomes "\\r&✂&b" once, and a bare "b)" gains one "\\r" per item of that letter (each of pysbd's
  passes matched it again after the "\\r" the last one wrote).
- ``Segmenter.sentences_with_char_spans`` finds each sentence in the original text by scanning from
  its start for the first of the sentence's non-overlapping occurrences (each taking the whitespace
  after it) that ends past the previous sentence's end: k sentences cost k scans of the text. An
  occurrence starting before ``j - len(sentence)`` (j: where the whitespace just before the previous
  end begins) ends before j, so the first occurrence at or after that point is the first candidate.
  Where no occurrence overlaps that one from the left and the sentence does not begin with
  whitespace, the scan from the start takes it too (the scan's previous match ends before it: it
  starts at least a sentence's length earlier and its whitespace stops at the sentence's first
  character), and the scan continues from there as pysbd's. Otherwise pysbd's scan runs as it is
  (occurrences overlapping from the left: "aa" in "aaa").

Only pysbd 0.3.4's code was read for this (tests/test_pysbd_linear.py compares both on generated
texts and on champ's maths text; bench/bench_sentences.py times both); another version is used as it is.
"""
from __future__ import annotations

import collections
import functools
import re

PYSBD_VERSION = "0.3.4"
ORIGINAL = {}  # pysbd's own methods, once replaced (the tests compare both)


def _scan_lists(self, regex1, regex2, replacement, strip=False):
    """ListItemReplacer.scan_lists of pysbd 0.3.4 in one pass (module docstring)."""
    items = [int(v.strip()) for v in re.findall(regex1, self.text)]  # pysbd: int(v), a ValueError on "\x1c2"
    marked = set()
    for ind, item in enumerate(items):
        if ind < len(items) - 1 and item + 1 == items[ind + 1]:
            marked.add(str(item))
        elif ind > 0 and (item - 1 == items[ind - 1] or (item == 0 and items[ind - 1] == 9)
                          or (item == 9 and items[ind - 1] == 0)):
            marked.add(str(item))
    if not marked:
        return

    def rewrite(match):
        found = match.group().strip() if strip else match.group()
        number = found if len(found) == 1 else found.strip(".])")
        return number + replacement if number in marked else found

    self.text = re.sub(regex2, rewrite, self.text)


def _iterate_alphabet_array(self, regex, parens=False, roman_numeral=False):
    """ListItemReplacer.iterate_alphabet_array of pysbd 0.3.4 in one pass (module docstring): its own tests
    decide which letters are list items, recorded instead of applied, then one rewrite applies them."""
    letters = re.findall(regex, self.text)
    alphabet = self.ROMAN_NUMERALS if roman_numeral else self.LATIN_NUMERALS
    letters = [letter for letter in letters if letter in alphabet]
    applied = collections.Counter()

    def record(letter, parens):
        applied[letter] += 1
        return self.text

    self.replace_correct_alphabet_list = record  # what pysbd's tests call on a list item
    try:
        for ind, letter in enumerate(letters):
            if ind == len(letters) - 1:
                self.last_array_item_replacement(letter, ind, alphabet, letters, parens)
            else:
                self.other_items_replacement(letter, ind, alphabet, letters, parens)
    finally:
        del self.replace_correct_alphabet_list
    if not applied:
        return self.text

    def rewrite_period(match):  # "a." -> "\ra∯" (a second pass finds no period left)
        found = match.group()
        letter = found.strip(".")
        return "\r" + letter + "∯" if letter in applied else found

    def rewrite_paren(match):  # "(a" -> "\r&✂&a" once; a bare "a" gains a "\r" per pass (each pass matches it again)
        found = match.group()
        if "(" in found:
            letter = found.strip("(")
            return "\r&✂&" + letter if letter in applied else found
        return "\r" * applied[found] + found if found in applied else found

    if parens:
        self.text = re.sub(self.EXTRACT_ALPHABETICAL_LIST_LETTERS_REGEX, rewrite_paren, self.text, flags=re.IGNORECASE)
    else:
        self.text = re.sub(self.ALPHABETICAL_LIST_LETTERS_AND_PERIODS_REGEX, rewrite_period, self.text,
                           flags=re.IGNORECASE)
    return self.text


_WHITESPACE = re.compile(r"\s*")


def _matches(text: str, sent: str, pos: int):
    """The non-overlapping matches of `sent` and the whitespace after it (pysbd's pattern, re.escape(sent) + r"\\s*")
    from `pos` on, as (start, end): found with str.find, so no pattern is compiled per sentence (compiling one was
    half of the split's time on champ text). `sent` is not empty."""
    while (at := text.find(sent, pos)) >= 0:
        pos = _WHITESPACE.match(text, at + len(sent)).end()
        yield at, pos


def _first_span_after(text: str, sent: str, prior_end: int):
    """pysbd's match for `sent`: of the non-overlapping matches of `sent` and the whitespace after it, scanned from
    the text's start, the first that ends past prior_end, as (start, end) (None if none). Found from near prior_end
    where that is provably the same match (module docstring), else by pysbd's scan."""
    if not sent:  # pysbd's pattern matches the whitespace at every position
        return next(((m.start(), m.end()) for m in _WHITESPACE.finditer(text) if m.end() > prior_end), None)
    start = 0
    if not sent[0].isspace():
        j = prior_end
        while j > 0 and text[j - 1].isspace():
            j -= 1
        at = text.find(sent, max(0, j - len(sent)))
        if at < 0:
            return None
        left = text.find(sent, max(0, at - len(sent) + 1), at - 1 + len(sent))
        if left < 0 or left >= at:  # no occurrence overlaps it from the left: the scan from the start takes it
            start = at
    return next(((a, b) for a, b in _matches(text, sent, start) if b > prior_end), None)


@functools.lru_cache(maxsize=1)
def segmenter_class():
    """pysbd.Segmenter, linear where pysbd is 0.3.4 (its ListItemReplacer patched, once per process)."""
    import pysbd
    from pysbd.lists_item_replacer import ListItemReplacer
    from pysbd.utils import TextSpan

    if getattr(pysbd, "__version__", None) != PYSBD_VERSION:
        return pysbd.Segmenter
    ORIGINAL["scan_lists"] = ListItemReplacer.scan_lists
    ORIGINAL["iterate_alphabet_array"] = ListItemReplacer.iterate_alphabet_array
    ListItemReplacer.scan_lists = _scan_lists
    ListItemReplacer.iterate_alphabet_array = _iterate_alphabet_array

    class LinearSegmenter(pysbd.Segmenter):
        def sentences_with_char_spans(self, sentences):
            text = self.original_text
            spans, prior_end = [], 0
            for sent in sentences:
                found = _first_span_after(text, sent, prior_end)
                if found is not None:
                    start, prior_end = found
                    spans.append(TextSpan(text[start:prior_end], start, prior_end))
            return spans

    return LinearSegmenter
