"""Final-answer extraction and math-verify checking."""

import threading

import pytest

pytest.importorskip("math_verify")

from rsd_engine.pipeline.answers import extract_final_answer, is_correct, reference_readable  # noqa: E402


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
        # the last box is the final answer: cut off, there is none (not the one the model went on from)
        (r"complete \boxed{7} then cut off \boxed{8", None),
        (r"First guess \boxed{3}. Wait, that is wrong; the answer is \boxed{5", None),
        (r"</think>\boxed{4} is what I had; no: \boxed{5", None),
        # a brace after an even run of backslashes (a LaTeX line break) is a brace
        (r"So \boxed{5\\} (end)", r"5\\"),
        (r"\boxed{a \} b}", r"a \} b"),
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
        # plain-text formulas that math-verify reads as their first number, as references and as answers
        ("2", "2^floor(n/2)*floor(n/2)!"),
        ("1", "sum_(k=1)^n 1/k"),
        ("1", "((-1)^(n+1)+n+1)/(n+2) (i.e., 1 if for odd n, and n/(n+2) for even n)"),
        ("2^floor(n/2)", "2"),
    ],
)
def test_different_or_unparsable_answers_are_false(predicted, reference):
    assert is_correct(predicted, reference) is False


@pytest.mark.parametrize("predicted, reference", [
    ("100", "100 (i.e., all values)"),  # a remark after a whole answer
    ("0", "0 (i.e., no such values)"),
    (r"3 \text{ apples}", "3"),
    (r"\log_2 8", "3"),  # letters of LaTeX commands are math
    (r"30^\circ", "30"),
    (r"2^{\lfloor n/2 \rfloor} \lfloor n/2 \rfloor !", r"2^{\lfloor n/2 \rfloor} \lfloor n/2 \rfloor !"),
    # the number after a relation is the answer (math-verify reads the right-hand side)
    (r"x \approx 3.14", "3.14"),
    (r"a \equiv 3 \pmod{5}", "3"),
    (r"\therefore x = 5", "5"),
    (r"f_{\max} = 5", "5"),
    (r"\det A = 5", "5"),
    (r"x \to 5", "5"),
    ("3", r"x \equiv 3 \pmod{7}"),
])
def test_answers_read_whole_still_compare(predicted, reference):
    assert is_correct(predicted, reference)


def test_references_read_whole():
    assert reference_readable("2^{n-1}") and reference_readable("100 (i.e., all values)")
    assert not reference_readable("2^floor(n/2)*floor(n/2)!") and not reference_readable("sum_(k=1)^n 1/k")
    # The bundled problems the demo draws from are all readable; of all 270, the plain-text formulas are not.
    from rsd_engine.pipeline.data import champ_problems

    assert all(reference_readable(p.answer) for p in champ_problems(numeric_only=True))
    unreadable = [p.id for p in champ_problems() if not reference_readable(p.answer)]
    assert "P_Combinatorics_3" in unreadable and len(unreadable) < 15


def test_works_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append((is_correct("4", "4"), is_correct("4", "5"))))
    thread.start()
    thread.join()
    assert results == [(True, False)]
