"""Final-answer extraction and math-verify checking."""

import threading

import pytest

pytest.importorskip("math_verify")

from rsd_engine.pipeline.answers import extract_final_answer, is_correct  # noqa: E402


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{ 2 }", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1, 2\}} is the set", r"\{1, 2\}"),
        (r"\boxed {x^{2^{n}}}", "x^{2^{n}}"),
        (r"<think>maybe \boxed{3}</think> The answer is \boxed{4}.", "4"),
        (r"<think>I get \boxed{3}.</think> So it is three.", "3"),
        (r"<think>\boxed{1}</think><think>\boxed{2}</think>Final: \boxed{5}", "5"),
        (r"complete \boxed{7} then cut off \boxed{8", "7"),
        ("no box here", None),
        (r"\boxed{unclosed", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("252", "252"),
        (r"\frac{1}{2}", "1/2"),
        ("0.5", "1/2"),
        ("2^{n-1}", "2^(n-1)"),
        ("x = 3", "3"),
        ("[-1, 1]", "[-1,1]"),
        (r"\dfrac{3}{4}", r"The answer is $\frac{3}{4}$."),
        ("12", r"Adding up gives \boxed{12}."),
        ("n!", "n!"),
        # LaTeX currency: \$ is a dollar sign, not a math delimiter, in the reference as in the answer
        (r"\$42", r"\$42"),
        ("42", r"\$42"),
        ("18.90", r"\$18.90"),
        ("1000", r"\$1,000"),
    ],
)
def test_equivalent_answers(predicted, reference):
    assert is_correct(predicted, reference)


@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("5", "6"),
        ("2", "2^(n-1)"),  # a reference must be read whole, not as its first number
        ("x^2", "x^3"),
        ("", "3"),
        (None, "3"),
        ("3", None),
        (r"\frac{", "1/2"),
        (r"\left( \right] \sqrt{", "3"),
        ("}}}{{{", "{"),
        ("43", r"\$42"),
    ],
)
def test_different_or_unparsable_answers_are_false(predicted, reference):
    assert is_correct(predicted, reference) is False


def test_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append((is_correct("4", "4"), is_correct("4", "5"))))
    thread.start()
    thread.join()
    assert results == [(True, False)]
