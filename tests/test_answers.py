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
        # several boxes of one answer, joined by commas, "and" or "x =" on one line, are its values
        (r"So the solutions are $x = \boxed{16}$ and $x = \boxed{81}$.", "16, 81"),
        (r"\boxed{1}, \boxed{4} and \boxed{9}", "1, 4, 9"),
        ("\\boxed{3}\n\\boxed{5}", "5"),  # a line apart: the later one is final
        (r"\boxed{\boxed{3}}", "3"),
        (r"I had \boxed{16} and then \boxed{81", None),
        (r"k = \boxed{3}; n = \boxed{4}", "4"),  # values of two names: the last box
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


@pytest.mark.parametrize("predicted, reference", [
    # math-verify reads the last number of an answer with a remark: the answer's own value is its head
    ("15 (for n = 3)", "3"),
    ("5 (i.e., not 7)", "7"),
    ("0 (when x = 2)", "2"),
    ("3 (or 4)", "4"),  # math-verify reads "or" as a comma: "3 (, 4)"
    (r"6 \text{ (mod } 7)", "7"),
    # LaTeX spacing as a thousands separator is no product: 10\,000 is not 10*0
    (r"10\,000", "0"),
    ("0", r"10\,000"),
    # a reference in words is not its first number (nor a product of letters that an answer 0 matches)
    ("20", "Always greater than 20"),
    ("1", "At least 1 number"),
    ("1", "0 is the only possible value"),
    ("3", "-3 is the only possible value"),
    ("81", "x=16 and x=81"),
    (r"\text{No}", "Yes"),
    ("n", "n times"),
    ("0", "f(x)=0 or f(x)=1"),  # both functions are the answer
    # found by the diff review: "abc" is a product, not a word; a remark outside brackets that takes the value back
    ("a^3+b^3+c^3-3", "a^3+b^3+c^3-3abc"),
    ("2", "2xyz"),
    ("3", "3 is not possible"),
    ("on", "No"),
])
def test_answers_that_a_partial_reading_took_for_right_are_wrong(predicted, reference):
    assert is_correct(predicted, reference) is False


@pytest.mark.parametrize("predicted, reference", [
    # references in words, as champ writes 119 of its 270: the value they state
    ("3", "3 is the only possible value"),
    ("-3", "-3 is the only possible value"),
    ("0", "0 is the only possible value"),
    ("98", "98 values"),
    (r"98 \text{ values}", "98 values"),
    ("2", "The limit exists and is equal to 2"),
    (r"\frac{a+3b}{2}", "The limit exists and is equal to (a+3b)/2"),
    ("8", "The function is periodic, with a period of 8"),
    ("999", "999 (i.e., all except for one value)"),
    # either form of "A, or equivalently B"
    ("252", "C(10, 5), or equivalently 252"),
    (r"\frac{5}{14}", "5/14, or approximately 35.7%"),
    (r"\frac{n(n+1)(2n+1)}{6}", "sum_(i=1)^n i^2, or equivalently n(n+1)(2n+1)/6"),
    # words only: the same words
    (r"\text{Yes}", "Yes"),
    (r"\text{No integer solutions.}", "No integer solutions"),
    # thousands separators, boxed answers of several values
    (r"10\,000", "10000"),
    ("10000", r"10\,000"),
    (r"1{,}000", "1000"),
    ("16, 81", "x=16 and x=81"),
    ("376, 625", "376 and 625"),
    # a remark whose number is the answer's own
    ("100 (i.e., all values)", "100"),
    (r"\frac{1}{2} \text{ hours}", "1/2"),
    (r"\text{Answer: } 42", "42"),
    # the reference's own words, copied
    (r"\text{3 is the only possible value.}", "3 is the only possible value"),
    (r"(x+y+z)(x^2+y^2+z^2-xy-yz-xz)", "(x+y+z)(x^2+y^2+z^2-xy-yz-xz)"),  # xy: a product, not a word
    ("(a+b+c)(a^2+b^2+c^2-ab-bc-ca)", "a^3+b^3+c^3-3abc"),
    ("zyx", "xyz"),
    ("2, 3", "2 or 3"),  # "or" joins values as "and" does
    ("1, 2", "x = 1 or 2"),
    ("infinity", r"\infty"),
    ("0", "0 (i.e., no such values)"),  # a remark in brackets explains the value
])
def test_answers_in_the_forms_references_and_models_write_them(predicted, reference):
    assert is_correct(predicted, reference)


def test_champ_references_in_words_are_read_or_named_unreadable():
    from rsd_engine.pipeline.answers import _reference_readings
    from rsd_engine.pipeline.data import champ_problems

    readings = {p.answer: _reference_readings(p.answer) for p in champ_problems()}
    # no reading of a reference is a product of its letters (what wrapping "98 values" in $...$ made of it)
    for answer, forms in readings.items():
        for form in forms:
            if not isinstance(form, str):
                assert not {"E", "a", "l", "s", "u", "v"} <= {str(x) for x in getattr(form[0], "free_symbols", ())}, answer
    assert [str(form[0]) for form in readings["The limit exists and is equal to 2/3"]] == ["2/3"]
    assert readings["Always greater than 20"] == () and readings["No such values"] == ("no such values",)


def test_without_math_verify_answers_are_not_all_wrong_but_refused(monkeypatch, tmp_path, capsys):
    """Without math-verify (an optional extra) every answer read as wrong, silently (0% accuracy, exit 0): checking
    an answer says what to install instead, and generate and eval stop before any model loads."""
    import sys

    from rsd_engine.cli import main

    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ImportError, match=r"pip install 'rsd-engine\[pipeline\]'"):
        is_correct("4", "4")
    with pytest.raises(ImportError, match="needs math-verify"):
        reference_readable("4")
    data = tmp_path / "p.jsonl"
    data.write_text('{"question": "2+2?", "answer": "4"}\n')
    missing = tmp_path / "models-without-weights"  # loading them would fail: the refusal comes first
    missing.mkdir()
    for argv in (["generate", "--teacher", str(missing), "--student", str(missing)], ["eval", "--model", str(missing)]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--data", str(data), "--out", str(tmp_path / "out.jsonl")])
        assert exit_info.value.code == 2
        assert "checking answers needs math-verify" in capsys.readouterr().err


def test_a_text_math_verify_cannot_read_in_time_is_not_graded_wrong(monkeypatch):
    """math-verify's parse returns no reading when it runs out of time (5 s), which read as unreadable: the
    answer was graded wrong without the "timed out" mark, and a reference's empty reading stayed cached, so the
    rest of the run graded every answer to it wrong and named it unreadable. Both are "not known" now (None), and
    nothing that timed out is cached."""
    import math_verify.errors
    import math_verify.parser

    from rsd_engine.pipeline import answers

    real = math_verify.parser.extract_target_from_pred
    slow = {"77"}

    def extract(pred, *args, **kwargs):
        if any(s in pred for s in slow):
            raise math_verify.errors.TimeoutException("parsing ran out of time")
        return real(pred, *args, **kwargs)

    monkeypatch.setattr(math_verify.parser, "extract_target_from_pred", extract)
    answers._read_reference.cache_clear()
    assert answers.check_answer("77", "4") is None  # the answer's reading timed out
    assert answers.check_answer("4", "77") is None and answers.reference_readable("77")  # the reference's
    assert answers.check_answer("5", "4") is False
    slow.clear()  # a reference that timed out stays so (not read again at every attempt), an answer does not
    assert answers.check_answer("4", "77") is None and answers.check_answer("77.0", "4") is False
    answers._TIMED_OUT_REFERENCES.clear()  # (a new process): read, and nothing of the timed-out reading was kept
    assert answers.check_answer("77.0", "77") is True and answers.check_answer("4", "77") is False
    assert answers.reference_readable("77")
    answers._read_reference.cache_clear()
