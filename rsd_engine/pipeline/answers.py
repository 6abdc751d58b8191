"""Final answers: the last \\boxed{...} after the reasoning, checked with math-verify."""

from __future__ import annotations

import functools
import logging
import re
import threading

THINK_END = "</think>"
_BOXED = re.compile(r"\\boxed\s*\{")
# A math delimiter: a $ not escaped by a backslash (\$ is LaTeX for a dollar sign, as in \$42).
_MATH_DELIMITER = re.compile(r"(?<!\\)(?:\\\\)*\$")


def extract_final_answer(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces allowed), looked for after the last </think> first,
    then anywhere; None when there is none, or the last one is never closed (a box before it is an answer
    the model went on from, not its final one). traces.final_answer looks only after a reasoning block."""
    if THINK_END in text:
        after = text[text.rindex(THINK_END) + len(THINK_END):]
        if _BOXED.search(after):
            return _last_boxed(after)
    return _last_boxed(text)


def _last_boxed(text: str) -> str | None:
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    depth, start = 1, matches[-1].end()
    for i in range(start, len(text)):
        if text[i] in "{}" and not _escaped(text, i):
            depth += 1 if text[i] == "{" else -1
            if depth == 0:
                return text[start:i].strip()
    return None


def _escaped(text: str, i: int) -> bool:
    """Whether text[i] follows an odd run of backslashes (\\{ is a brace; \\\\ is a line break, then a brace)."""
    j = i
    while j > 0 and text[j - 1] == "\\":
        j -= 1
    return (i - j) % 2 == 1


def is_correct(predicted: str | None, reference: str | None) -> bool:
    """math-verify equivalence of a predicted final answer (LaTeX, as written inside \\boxed)
    and a reference answer; any failure to parse or compare is False, never an exception, and so is
    either side that math-verify does not read whole (see _read_whole)."""
    if not predicted or not reference:
        return False
    try:
        from math_verify import verify

        gold, answer = _parse_reference(reference), _parse(f"${predicted}$")
        if not gold or not answer or not _read_whole(gold) or not _read_whole(answer):
            return False
        return bool(verify(gold, answer, timeout_seconds=_timeout()))
    except Exception:  # sympy and the LaTeX parser fail in many ways on model output
        return False


def reference_readable(reference: str) -> bool:
    """Whether math-verify reads all of a reference answer (is_correct accepts no answer to one it does
    not: a plain-text formula such as 2^floor(n/2) is read as 2)."""
    try:
        gold = _parse_reference(reference)
    except Exception:
        return False
    return bool(gold) and _read_whole(gold)


def _timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(text: str):
    from math_verify import parse

    return parse(text, parsing_timeout=_timeout())


def _parse_reference(reference: str):
    # A problem's reference is checked against every attempt (16 by default) and first for readability: parsed
    # once (sympy expressions are immutable; the list is copied).
    return list(_parsed_reference(reference))


@functools.lru_cache(maxsize=1 << 16)
def _parsed_reference(reference: str) -> tuple:
    # In $...$, LaTeX such as 2^{n-1} is read whole, not as its first number. A reference that is already
    # LaTeX with delimiters or \boxed is parsed as written; an escaped \$ (LaTeX currency, \$42) is a
    # dollar sign, not a delimiter.
    delimited = _MATH_DELIMITER.search(reference) or "\\boxed" in reference
    return tuple(_parse(reference if delimited else f"${reference}$") or _parse(reference))


# Text that math-verify drops by design (units, labels), and LaTeX commands: letters left in an answer
# besides these were not read as math.
_TEXT_GROUP = re.compile(r"\\(?:text|textrm|textbf|mbox|mathrm|mathbf|operatorname)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_RELATION = re.compile(r"=|\\(?:approx|equiv|sim|simeq|cong|to|rightarrow|Rightarrow|implies|therefore)(?![A-Za-z])")
_MODULUS = re.compile(r"\\[pb]mod\s*(?:\{[^{}]*\}|[0-9A-Za-z]+)|\(\s*\\(?:text|mathrm)\{mod\}[^)]*\)")


def _read_whole(parsed) -> bool:
    """Whether math-verify read all of an answer. Its LaTeX parser stops at what it does not know and keeps
    the number before it: plain-text 2^floor(n/2)*floor(n/2)! or sum_(k=1)^n 1/k parse as 2 and 1, and a
    model answering that number would be judged correct. A bare number parsed from text that holds letters
    (outside LaTeX commands and text groups) is such a partial read unless the letters only follow a whole
    leading expression as a remark: "100 (i.e., all values)" is 100."""
    expr, text = parsed[0], parsed[-1]
    if not getattr(expr, "is_Number", False) or not isinstance(text, str):
        return True
    # The number of "x \\approx 3.14", "f_{\\max} = 5" or "a \\equiv 3 \\pmod{5}" is what follows the last relation.
    text = _RELATION.split(_TEXT_GROUP.sub("", _MODULUS.sub("", text)))[-1]
    masked = _COMMAND.sub("\\\\", text)  # a command leaves its backslash, not its letters
    first = re.search(r"[A-Za-z]", masked)
    if first is None:
        return True
    head = masked[: first.start()].rstrip(" ,;:(")
    return bool(head) and head[-1] in "0123456789)}]!%"


# math-verify logs every unparsable model answer; a long run would drown in them.
logging.getLogger("math_verify").setLevel(logging.ERROR)
