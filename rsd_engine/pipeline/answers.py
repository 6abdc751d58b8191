"""Final answers: the last \\boxed{...} after the reasoning, checked with math-verify."""

from __future__ import annotations

import functools
import logging
import re
import threading

THINK_END = "</think>"
# The rules that judge an answer, as outputs record them ("answer check" in a manifest): bump when a verdict can
# change, so records judged one way are not resumed beside records judged another (1: before references in words,
# remarks, thousands separators and joined boxes were read as they are now).
ANSWER_CHECK = 2
_BOXED = re.compile(r"\\boxed\s*\{")
# A math delimiter: a $ not escaped by a backslash (\$ is LaTeX for a dollar sign, as in \$42).
_MATH_DELIMITER = re.compile(r"(?<!\\)(?:\\\\)*\$")


def extract_final_answer(text: str) -> str | None:
    """The final answer: the content of the last \\boxed{...} (nested braces allowed), looked for after the last
    </think> first, then anywhere; None when there is none, or the last one is never closed (a box before it is an
    answer the model went on from, not its final one). Boxes the last one continues, joined only by commas, "and" or
    "x =" ("$x = \\boxed{16}$ and $x = \\boxed{81}$"), are one answer of several values: "16, 81". traces.final_answer
    looks only after a reasoning block."""
    if THINK_END in text:
        after = text[text.rindex(THINK_END) + len(THINK_END):]
        if _BOXED.search(after):
            return _final_boxes(after)
    return _final_boxes(text)


# What may stand between two boxes of one answer, on one line: math delimiters, commas, "and", spacing, a variable
# and "=".
_BOX_GAP = re.compile(r"(?:[ \t]|\$|,|;|&|\band\b|\\[,;: ]|\\q?quad\b|\\text\s*\{\s*(?:and|,)\s*\}"
                      r"|[A-Za-z](?:_\{?\w+\}?)?[ \t]*=)*")


def _final_boxes(text: str) -> str | None:
    values, next_start = [], None
    for match in reversed(list(_BOXED.finditer(text))):
        end = _closing_brace(text, match.end())
        if end is None:  # never closed: the last box is no answer; an earlier one ends the run
            if not values:
                return None
            break
        if next_start is not None and (end >= next_start or not _BOX_GAP.fullmatch(text[end + 1 : next_start])
                                       or _named(text, match.start()) != _named(text, next_start)):
            break  # a box inside the next one, words between them, or values of two names: the later box alone
        values.append(text[match.end() : end].strip())
        next_start = match.start()
    return ", ".join(reversed(values)) if values else None


_NAMED = re.compile(r"([A-Za-z](?:_\{?\w+\}?)?)[ \t]*=[ \t$]*$")


def _named(text: str, box_start: int) -> str | None:
    """The name a box is the value of ("x" in "x = \\boxed{16}"), None if it follows no "name =": the values of
    "x = \\boxed{16} and x = \\boxed{81}" are one answer, those of "k = \\boxed{3}; n = \\boxed{4}" two."""
    match = _NAMED.search(text[max(0, box_start - 24) : box_start])
    return match[1] if match else None


def _closing_brace(text: str, start: int) -> int | None:
    depth = 1
    for i in range(start, len(text)):
        if text[i] in "{}" and not _escaped(text, i):
            depth += 1 if text[i] == "{" else -1
            if depth == 0:
                return i
    return None


def _escaped(text: str, i: int) -> bool:
    """Whether text[i] follows an odd run of backslashes (\\{ is a brace; \\\\ is a line break, then a brace)."""
    j = i
    while j > 0 and text[j - 1] == "\\":
        j -= 1
    return (i - j) % 2 == 1


def is_correct(predicted: str | None, reference: str | None) -> bool:
    """math-verify equivalence of a predicted final answer (LaTeX, as written inside \\boxed) and a reference
    answer (one of its readings, _reference_readings); any failure to parse or compare is False, never an
    exception, and so is an answer that math-verify does not read whole (see _read_whole)."""
    return bool(check_answer(predicted, reference))


def check_answer(predicted: str | None, reference: str | None) -> bool | None:
    """is_correct, and None where no reading matched and math-verify ran out of time reading the answer or the
    reference or comparing them (5 s on the main thread; a tower of powers can take longer): not known to be wrong."""
    if not predicted or not reference:
        return False
    math_verify = _math_verify()
    timed_out = False
    if _verbatim(predicted) == _verbatim(reference):  # the reference's own text, "3 is the only possible value"
        return True
    try:
        readings = _reference_readings(reference)
        predicted = _THOUSANDS.sub("", predicted)
        answer = None
        for gold in readings:
            if isinstance(gold, str):  # a reference in words: the same words
                if _words(predicted) == gold:
                    return True
                continue
            if answer is None:
                answer = _parse(f"${predicted}$")
                answer = answer if answer and _read_whole(answer, predicted) else []
            if not answer:
                continue
            try:
                if math_verify.verify(gold, answer, timeout_seconds=_timeout(), raise_on_error=True):
                    return True
            except math_verify.errors.TimeoutException:
                timed_out = True
            except Exception:  # one pair sympy fails on: the others are still compared, as verify does by default
                try:
                    if math_verify.verify(gold, answer, timeout_seconds=_timeout()):
                        return True
                except Exception:
                    pass
        return None if timed_out else False
    except ParseTimedOut:
        return None
    except Exception:  # and so does the LaTeX parser
        return False


def reference_readable(reference: str) -> bool:
    """Whether math-verify reads a reference answer whole, or it is one in words (is_correct accepts no answer to
    one it does not: a plain-text formula such as 2^floor(n/2) is read as 2)."""
    _math_verify()
    try:
        return bool(_reference_readings(reference))
    except ParseTimedOut:  # not known to be unreadable: each answer's check says "timed out" instead
        return True
    except Exception:
        return False


def check_available() -> None:
    """ImportError naming the install when math-verify, which checks every answer, is missing (else each answer
    would be judged wrong, silently)."""
    _math_verify()


def _math_verify():
    try:
        import math_verify
        import math_verify.errors
    except ImportError:
        raise ImportError("checking answers needs math-verify: pip install 'rsd-engine[pipeline]' (or pip install "
                          "math-verify)") from None
    return math_verify


def _timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


class ParseTimedOut(Exception):
    """math-verify ran out of time reading a text: neither unreadable nor read (math-verify itself returns no
    reading, which graded the answer wrong as unreadable, and kept a reference unreadable for the whole run)."""


def _parse(text: str):
    math_verify = _math_verify()
    try:
        return math_verify.parse(text, parsing_timeout=_timeout(), raise_on_error=True)
    except math_verify.errors.TimeoutException:  # a BaseException: raised through _read_reference's cache
        raise ParseTimedOut(text) from None
    except Exception:  # no reading, as math-verify gives without raise_on_error
        return []


# A thousands separator written as LaTeX spacing (10\,000, 1\;000, 10{,}000): math-verify reads 10\,000 as 10*0.
_THOUSANDS = re.compile(r"(?<=\d)(?:\\[,;:! ]|\{,\})[ \t]*(?=\d{3}(?!\d))")
# Words of English (two letters or more, not a LaTeX command's), but the few that plain-text maths uses.
# Short words are English only from a list: "abc", "xyz" and "2xyz" are products.
_SHORT_WORDS = ("is|of|to|no|at|an|as|if|in|on|be|by|it|so|yes|the|all|for|not|are|any|one|two|odd|but|has|can|its|"
                "was|per|set|way|non|nor|few|new|only|none")
_WORD = re.compile(r"(?<![\\A-Za-z])(?:[A-Za-z]{4,}|(?:" + _SHORT_WORDS + r")(?![A-Za-z]))", re.IGNORECASE)
_MATH_WORDS = frozenset({"and", "or", "sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp", "infty", "inf"})
# A remark outside brackets that takes its value back: "3 is not possible" is not 3.
_NEGATION = re.compile(r"\b(?:not|no|none|never|except|impossible|cannot|nor)\b", re.IGNORECASE)
# Maths in a remark: digits, operators, a lone letter (a variable; "i.e.", "e.g." and the words "a" and "I" are not).
_MATH_IN_REMARK = re.compile(r"[0-9=<>^/*+\\≤≥]|(?<![A-Za-z.])[B-HJ-Zb-z](?![A-Za-z.])")
# champ's way of giving one answer in two forms: "C(10, 5), or equivalently 252".
_ALTERNATIVES = re.compile(r",?\s+or\s+(?:equivalently|approximately|an\s+equivalent\s+form\s+such\s+as)\s+")
# A reference in words that ends in its value: "The limit exists and is equal to 2", "... with a period of 8".
_STATED_VALUE = re.compile(r"\b(?:is\s+equal\s+to|equal\s+to|equals|is|of)\s+([^,;]+?)\.?\s*$")


def _reference_readings(reference: str) -> tuple:
    # A problem's reference is checked against every attempt (16 by default) and first for readability: read
    # once (sympy expressions are immutable; the lists are copied). One math-verify ran out of time reading stays
    # timed out (not cached as unreadable, and not read again for 5 s at every attempt).
    if reference in _TIMED_OUT_REFERENCES:
        raise ParseTimedOut(reference)
    try:
        return tuple(list(r) if isinstance(r, tuple) else r for r in _read_reference(reference))
    except ParseTimedOut:
        _TIMED_OUT_REFERENCES.add(reference)
        raise


_TIMED_OUT_REFERENCES: set[str] = set()


@functools.lru_cache(maxsize=1 << 16)
def _read_reference(reference: str) -> tuple:
    """The readings of a reference that an answer may match: math-verify's parses read whole (as tuples), or the
    words of a reference in words (a string, compared as _words). Empty when none reads whole."""
    reference = _THOUSANDS.sub("", reference)
    # In $...$, LaTeX such as 2^{n-1} is read whole, not as its first number. A reference that is already
    # LaTeX with delimiters or \boxed is parsed as written; an escaped \$ (LaTeX currency, \$42) is a
    # dollar sign, not a delimiter.
    if _MATH_DELIMITER.search(reference) or "\\boxed" in reference:
        return _whole(_parse(reference))
    readings = ()
    for form in _ALTERNATIVES.split(reference.strip()):
        readings += _read_plain(form)
    return readings


def _read_plain(form: str) -> tuple:
    """A plain-text reference (or one form of it): maths, maths with a remark in words ("3 is the only possible
    value", "100 (i.e., all values)", "98 values": a remark without maths of its own), words that end in the value
    ("... is equal to 2"), or words only ("No integer solutions"). Anything else in words is no reading: "Always
    greater than 20" is not 20, "f(x)=0 or f(x)=1" not f(x)=0."""
    masked = _TEXT_GROUP.sub(lambda m: " " * len(m[0]), form)  # \text{...}: math-verify's units and labels
    words = [m for m in _WORD.finditer(masked) if m[0].lower() not in _MATH_WORDS]
    if not words:
        return _whole(_parse(f"${form}$") or _parse(form), form)
    head = _math_head(form, masked)
    remark = masked[len(head):] if head is not None else ""
    # (a remark in brackets explains the value, "0 (i.e., no such values)"; one outside states something of it)
    if head is not None and not _MATH_IN_REMARK.search(remark) and \
            not _NEGATION.search(re.sub(r"\([^()]*\)|\[[^\[\]]*\]", " ", remark)):
        return _whole(_parse(f"${head}$"), head)
    if not re.search(r"[0-9=<>^/*+()\[\]{}]", masked):
        return (_words(form),)
    stated = _STATED_VALUE.search(form)
    if stated and not _MATH_IN_REMARK.search(masked[: stated.start(1)]) and \
            not [m for m in _WORD.finditer(stated[1]) if m[0].lower() not in _MATH_WORDS]:
        return _whole(_parse(f"${stated[1]}$"), stated[1])
    return ()


def _math_head(text: str, masked: str) -> str | None:
    """The maths a text opens with, when the rest is a remark: the text up to the first word (of _WORD, outside
    brackets) or bracketed group holding one, if what is before it is a whole expression; None otherwise."""
    depth, group_start = 0, None
    words = {m.start() for m in _WORD.finditer(masked) if m[0].lower() not in _MATH_WORDS}
    cut = None
    for i, ch in enumerate(masked):
        if ch in "([{":
            if depth == 0:
                group_start = i
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif i in words:
            cut = i if depth == 0 else group_start
            break
    if cut is None:
        return None
    head = text[:cut].rstrip(" \t,;:")
    return head if head and head[-1] in "0123456789)}]!%" else None


def _whole(parsed, source: str | None = None) -> tuple:
    return (tuple(parsed),) if parsed and _read_whole(parsed, source) else ()


_TEXT_WRAPPER = re.compile(r"\\(?:text|textrm|textbf|mbox|mathrm)\s*\{([^{}]*)\}")


def _verbatim(text: str) -> str:
    """A text as written, but for \\text{...} wrappers, $ signs, case, spacing and a final full stop (brackets and
    commas kept: "(1, 2)" is not "[1, 2]")."""
    return " ".join(_TEXT_WRAPPER.sub(r"\1", text).replace("$", "").lower().split()).rstrip(".")


def _words(text: str) -> str:
    """A text answer as compared: \\text{...} unwrapped, lower case, punctuation and spacing dropped."""
    return " ".join(re.sub(r"[$.,;:!?'\"()\\~]", " ", _TEXT_WRAPPER.sub(r"\1", text)).lower().split())


# Text that math-verify drops by design (units, labels), and LaTeX commands: letters left in an answer
# besides these were not read as math.
_TEXT_GROUP = re.compile(r"\\(?:text|textrm|textbf|mbox|mathrm|mathbf|operatorname)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_RELATION = re.compile(r"=|\\(?:approx|equiv|sim|simeq|cong|to|rightarrow|Rightarrow|implies|therefore)(?![A-Za-z])")
_MODULUS = re.compile(r"\\[pb]mod\s*(?:\{[^{}]*\}|[0-9A-Za-z]+)|\(\s*\\(?:text|mathrm)\{mod\}[^)]*\)")


def _read_whole(parsed, source: str | None = None) -> bool:
    """Whether math-verify read all of an answer. Its LaTeX parser stops at what it does not know and keeps
    the number before it, or takes the last one: plain-text 2^floor(n/2)*floor(n/2)! or sum_(k=1)^n 1/k parse as 2
    and 1, and "15 (for n = 3)" as 3; a model answering that number would be judged correct. A bare number parsed
    from text that holds letters (outside LaTeX commands) counts only where the letters are a remark after a whole
    leading expression that is that number: "100 (i.e., all values)" is 100, "98 \\text{ values}" is 98. `source`: the
    text that was parsed, where it is all maths (math-verify's own copy drops words: "3 (or 4)" becomes "3 (, 4)");
    otherwise the part math-verify took from it."""
    expr, text = parsed[0], parsed[-1] if source is None else source
    if not getattr(expr, "is_Number", False) or not isinstance(text, str) or getattr(expr, "is_infinite", False):
        return True  # (infinity: math-verify read a word for it, "infinity", "\\infty")
    text = _MODULUS.sub("", text)
    # The number of "x \\approx 3.14", "f_{\\max} = 5" or "a \\equiv 3 \\pmod{5}" is what follows the last relation
    # outside brackets ("15 (for n = 3)" is no "n = 3").
    text = text[_last_relation_end(text):]
    # A leading label (\text{Answer: }) is dropped; any other text group is words. A command leaves its backslash.
    text = re.sub(r"^\s*" + _TEXT_GROUP.pattern, "", text)
    masked = _COMMAND.sub(lambda m: "\\" + " " * (len(m[0]) - 1), _TEXT_GROUP.sub(lambda m: "T" * len(m[0]), text))
    first = re.search(r"[A-Za-z]", masked)
    if first is None:
        return True
    head = text[: first.start()].rstrip(" \t,;:(")
    if not head or head[-1] not in "0123456789)}]!%":
        return False
    read = _parse(f"${head}$")
    return bool(read) and read[0] == expr


def _last_relation_end(text: str) -> int:
    depth, end = 0, 0
    for match in re.finditer(r"[([{]|[)\]}]|" + _RELATION.pattern, text):
        token = match[0]
        if token in "([{":
            depth += 1
        elif token in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0:
            end = match.end()
    return end


# math-verify logs every unparsable model answer; a long run would drown in them.
logging.getLogger("math_verify").setLevel(logging.ERROR)
