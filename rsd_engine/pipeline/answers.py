"""Final answers: the last \\boxed{...} after the reasoning, checked with math-verify."""

from __future__ import annotations

import logging
import re
import threading

THINK_END = "</think>"
_BOXED = re.compile(r"\\boxed\s*\{")
# A math delimiter: a $ not escaped by a backslash (\$ is LaTeX for a dollar sign, as in \$42).
_MATH_DELIMITER = re.compile(r"(?<!\\)(?:\\\\)*\$")


def extract_final_answer(text: str) -> str | None:
    """Content of the last complete \\boxed{...} (nested braces allowed), looked for after the
    last </think> first, then anywhere; None when there is none."""
    if THINK_END in text:
        answer = _last_boxed(text[text.rindex(THINK_END) + len(THINK_END) :])
        if answer is not None:
            return answer
    return _last_boxed(text)


def _last_boxed(text: str) -> str | None:
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{" and text[i - 1] != "\\":
                depth += 1
            elif text[i] == "}" and text[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def is_correct(predicted: str | None, reference: str | None) -> bool:
    """math-verify equivalence of a predicted final answer (LaTeX, as written inside \\boxed)
    and a reference answer; any failure to parse or compare is False, never an exception."""
    if not predicted or not reference:
        return False
    try:
        from math_verify import parse, verify

        # math-verify's timeouts use SIGALRM, which only the main thread may set.
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        # Both sides in $...$: LaTeX such as 2^{n-1} is then read whole, not as its first number.
        # A reference that is already LaTeX with delimiters or \boxed is parsed as written; an escaped
        # \$ (LaTeX currency, \$42) is a dollar sign, not a delimiter.
        delimited = _MATH_DELIMITER.search(reference) or "\\boxed" in reference
        gold_text = reference if delimited else f"${reference}$"
        gold = parse(gold_text, parsing_timeout=timeout)
        if not gold:
            gold = parse(reference, parsing_timeout=timeout)
        answer = parse(f"${predicted}$", parsing_timeout=timeout)
        if not gold or not answer:
            return False
        return bool(verify(gold, answer, timeout_seconds=timeout))
    except Exception:  # sympy and the LaTeX parser fail in many ways on model output
        return False


# math-verify logs every unparsable model answer; a long run would drown in them.
logging.getLogger("math_verify").setLevel(logging.ERROR)
