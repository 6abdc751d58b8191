"""`rsd provenance-report` and the category rules: shares, position curves, area and correlation
against a case computed by hand; the bootstrap against its definition; re-categorising under the
ratio rule; bad input refused."""
import json
import math

import numpy as np
import pytest

from rsd_engine.cli import main
from rsd_engine.pipeline.categories import DEFAULT_MARGIN, Rule, make_rule
from rsd_engine.pipeline.provenance_report import PositionCounts, analyse, read_sentences, run_report

# Difference rule, beta 0.1: (pT, pS) -> category
T, S, SH = (0.6, 0.3), (0.2, 0.6), (0.5, 0.5)
# problem a: a correct [teacher, shared] and an incorrect [student, teacher];
# problem b: a correct [teacher, teacher, student, shared] and an incorrect [shared].
CASE = [("a", 0, True, [T, SH]), ("a", 1, False, [S, T]), ("b", 0, True, [T, T, S, SH]), ("b", 1, False, [SH])]


def sentence_lines(case, **extra):
    lines = []
    for rid, sample, correct, sentences in case:
        for i, (pt, ps) in enumerate(sentences):
            lines.append({"id": rid, "sample": sample, "index": i, "sentences": len(sentences), "text": f"s{i}.",
                          "p_teacher": pt, "p_student": ps, "category": "shared", "correct": correct,
                          "finish_reason": "eos", **extra})
    return lines


def write_lines(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def report_of(tmp_path, case=CASE, rule=Rule(), **kw):
    responses, _ = read_sentences(write_lines(tmp_path / "s.jsonl", sentence_lines(case)), rule)
    return analyse(responses, **kw)


def test_shares_overall_by_correctness_and_per_response(tmp_path):
    r = report_of(tmp_path, resamples=10)
    assert r["responses"] == 4 and r["sentences"] == 9
    assert r["shares"]["all"]["teacher"] == pytest.approx(4 / 9)
    assert r["shares"]["all"]["student"] == pytest.approx(2 / 9)
    assert r["shares"]["all"]["shared"] == pytest.approx(3 / 9)
    assert r["shares"]["correct"]["sentences"] == 6 and r["shares"]["correct"]["teacher"] == pytest.approx(3 / 6)
    assert r["shares"]["incorrect"]["sentences"] == 3 and r["shares"]["incorrect"]["teacher"] == pytest.approx(1 / 3)
    assert [(p["id"], p["sample"], p["correct"], p["teacher"]) for p in r["per_response"]] == [
        ("a", 0, True, 0.5), ("a", 1, False, 0.5), ("b", 0, True, 0.5), ("b", 1, False, 0.0)]


def test_position_curves_and_area_in_two_bins(tmp_path):
    # Midpoints: 2 sentences at 0.25 / 0.75, 4 at 0.125 ... 0.875, 1 at 0.5 (second half).
    # correct:   first half T T T, second half SH S SH -> teacher 1, 0
    # incorrect: first half S,     second half T SH   -> teacher 0, 1/2
    r = report_of(tmp_path, bins=2, resamples=10)
    pos = r["by_position"]
    assert pos["position"] == [0.25, 0.75]
    assert pos["correct"]["teacher"] == [1.0, 0.0] and pos["correct"]["sentences"] == [3, 3]
    assert pos["incorrect"]["teacher"] == [0.0, 0.5] and pos["incorrect"]["sentences"] == [1, 2]
    assert pos["incorrect"]["student"] == [1.0, 0.0]
    assert r["teacher_area"]["value"] == pytest.approx(((1 - 0) + (0 - 0.5)) / 2)


def test_position_bins_are_exact_at_the_bin_edges():
    """Sentence i of n sits at (2i + 1) / 2n and falls in the half-open bin holding it, computed exactly:
    in floats, (7 + 0.5) / 11 * 22 is 14.999..., one bin too low."""
    from fractions import Fraction

    from rsd_engine.pipeline.categories import CATEGORIES
    from rsd_engine.pipeline.provenance_report import ScoredResponse, position_bin

    for bins in range(1, 31):
        for n in range(1, 61):
            assert [position_bin(i, n, bins) for i in range(n)] == [
                int(Fraction(2 * i + 1, 2 * n) * bins) for i in range(n)], (n, bins)
    counts = PositionCounts([ScoredResponse("a", 0, ["teacher"] * 11, True, "eos")], 22)
    assert np.flatnonzero(counts.counts[0, 1, CATEGORIES.index("teacher")]).tolist() == [2 * i + 1 for i in range(11)]


def test_deciles_leave_empty_bins_out_of_the_area(tmp_path):
    r = report_of(tmp_path, resamples=10)
    correct, incorrect = r["by_position"]["correct"]["teacher"], r["by_position"]["incorrect"]["teacher"]
    assert correct == [None, 1.0, 1.0, 1.0, None, None, 0.0, 0.0, 0.0, None]
    assert incorrect == [None, None, 0.0, None, None, 0.0, None, 1.0, None, None]
    assert r["teacher_area"]["deciles_compared"] == 2  # bins 2 and 7: (1 - 0) and (0 - 1)
    assert r["teacher_area"]["value"] == pytest.approx(0.0)


def test_correlation_is_the_point_biserial_r(tmp_path):
    from scipy.stats import pointbiserialr

    r = report_of(tmp_path, resamples=10)
    expected = pointbiserialr([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.0]).statistic
    assert r["correlation"]["value"] == pytest.approx(expected) and expected == pytest.approx(1 / 3 ** 0.5)
    assert r["correlation"]["responses"] == 4


def test_responses_without_a_grade_are_in_the_shares_but_out_of_the_split(tmp_path):
    """A response whose line has no "correct" counts in the overall shares, and in neither group of the split by
    correctness: not as an incorrect answer (the curves, the area and the correlation are CASE's alone)."""
    ungraded = ("c", 0, None, [T, T, T])
    r, plain = report_of(tmp_path, case=CASE + [ungraded], resamples=10), report_of(tmp_path, resamples=10)
    assert (r["responses"], r["unjudged"], r["shares"]["all"]["sentences"]) == (5, 1, 12)
    assert r["shares"]["all"]["teacher"] == pytest.approx(7 / 12)
    for name in ("correct", "incorrect"):
        assert r["shares"][name] == plain["shares"][name]
    assert r["by_position"] == plain["by_position"]
    assert r["correlation"]["responses"] == 4 and r["correlation"]["value"] == pytest.approx(1 / 3 ** 0.5)
    assert r["teacher_area"]["value"] == pytest.approx(plain["teacher_area"]["value"])


def test_bootstrap_replicate_is_the_estimate_on_the_resampled_problems(tmp_path):
    """Weights (2, 1, 1) over problems (a, b, c) give what the plain estimate gives on a, a, b, c; weights (2, 0, 1)
    the correlation on a, a, c, and an area only if a, a, c fill every bin the whole data compares (a replicate is the
    same mean over the same bins: over fewer it was another quantity, found by the provenance review)."""
    extra = [("c", 0, True, [S, T, T]), ("c", 1, False, [T, SH, S, S, T])]
    responses, _ = read_sentences(write_lines(tmp_path / "s.jsonl", sentence_lines(CASE + extra)), Rule())
    counts = PositionCounts(responses, 10)
    a = [r for r in responses if r.id == "a"]
    a_again = [type(r)("a'", r.sample, r.categories, r.correct, r.finish_reason) for r in a]
    resampled = a + a_again + [r for r in responses if r.id in ("b", "c")]
    direct = PositionCounts(resampled, 10)
    ones = np.ones((1, direct.problems))
    assert direct.compared() == counts.compared()
    assert counts.area(np.array([[2.0, 1.0, 1.0]]))[0] == pytest.approx(direct.area(ones)[0])
    assert counts.correlation(np.array([[2.0, 1.0, 1.0]]))[0] == pytest.approx(direct.correlation(ones)[0])
    without_b = PositionCounts([r for r in resampled if r.id != "b"], 10)
    weights = np.array([[2.0, 0.0, 1.0]])
    assert counts.correlation(weights)[0] == pytest.approx(without_b.correlation(np.ones((1, without_b.problems)))[0])
    if without_b.compared() < counts.compared():
        assert np.isnan(counts.area(weights)[0])
    else:
        assert counts.area(weights)[0] == pytest.approx(without_b.area(np.ones((1, without_b.problems)))[0])


def test_bootstrap_interval_is_fixed_by_its_seed(tmp_path):
    extra = [(f"x{k}", s, s == 0, [T, S, SH][k % 3:] + [T] * s) for k in range(6) for s in range(2)]
    one = report_of(tmp_path, case=CASE + extra, resamples=200, seed=1)
    again = report_of(tmp_path, case=CASE + extra, resamples=200, seed=1)
    other = report_of(tmp_path, case=CASE + extra, resamples=200, seed=2)
    assert one["teacher_area"] == again["teacher_area"] and one["correlation"] == again["correlation"]
    assert one["teacher_area"]["interval"] != other["teacher_area"]["interval"]
    lo, hi = one["teacher_area"]["interval"]
    assert lo <= hi and 0 < one["teacher_area"]["resamples"] <= 200 == one["teacher_area"]["resamples_drawn"]


def test_bootstrap_interval_does_not_depend_on_the_order_of_the_responses(tmp_path):
    """Problems are resampled in id order: the same sentences in another order (merged ranks, a resume) give the
    same intervals."""
    extra = [(f"x{k}", s, s == 0, [T, S, SH][k % 3:] + [T] * s) for k in range(6) for s in range(2)]
    one = report_of(tmp_path, case=CASE + extra, resamples=200, seed=1)
    backwards = report_of(tmp_path, case=list(reversed(CASE + extra)), resamples=200, seed=1)
    for name in ("teacher_area", "correlation"):  # (sums taken in another order: equal to rounding)
        assert one[name]["interval"] == pytest.approx(backwards[name]["interval"], rel=1e-12, abs=1e-12)
        assert one[name]["value"] == pytest.approx(backwards[name]["value"], rel=1e-12, abs=1e-12)


def test_resamples_without_both_kinds_of_answer_are_left_out_and_counted(tmp_path):
    from rsd_engine.pipeline.provenance_report import format_report

    case = [("a", 0, True, [T, SH]), ("b", 0, False, [S, SH]), ("c", 0, True, [T]), ("c", 1, False, [SH])]
    r = report_of(tmp_path, case=case, resamples=300, seed=0)
    used = r["teacher_area"]["resamples"]
    # Without c, a resample of three problems is all a or all b (one kind of answer) with chance 2 / 27; others
    # lack a sentence of one kind in a bin the whole data compares.
    assert 5 < 300 - used < 300 and r["teacher_area"]["resamples_drawn"] == 300
    shown = format_report({"source": "s", "rule": {"rule": "difference", "beta": 0.1}, "recategorised": 0, **r})
    assert f"; {used} of 300 resamples have a value" in shown


def test_without_incorrect_answers_the_split_is_undefined_not_an_error(tmp_path):
    r = report_of(tmp_path, case=[c for c in CASE if c[2]], resamples=10)
    assert r["teacher_area"]["value"] is None and r["correlation"]["value"] is None
    assert r["correlation"]["why"] == "needs correct and incorrect answers"
    flat = report_of(tmp_path, case=[("a", 0, True, [S]), ("b", 0, False, [SH])], resamples=10)
    assert flat["correlation"]["value"] is None and flat["teacher_area"]["value"] == 0.0
    assert flat["correlation"]["why"] == "the teacher share is the same in every response"
    assert r["shares"]["incorrect"]["sentences"] == 0


def test_ratio_rule_flags_what_the_difference_never_does(tmp_path):
    low = [("a", 0, True, [(0.05, 0.001), (0.9, 0.85)])]
    diff = report_of(tmp_path, case=low, resamples=1)
    ratio = report_of(tmp_path, case=low, rule=make_rule("ratio"), resamples=1)
    assert diff["per_response"][0]["teacher"] == 0.0  # 0.049 apart: "shared" at beta 0.1
    assert ratio["per_response"][0]["teacher"] == 0.5  # log 50 = 3.9 > 0.5; log(0.9/0.85) = 0.06 is not


@pytest.mark.parametrize("pt, ps, pd, margin, category", [
    (0.05, 0.001, None, DEFAULT_MARGIN, "teacher"), (0.001, 0.05, None, DEFAULT_MARGIN, "student"),
    (0.5, 0.4, None, 0.3, "shared"),  # log 1.25 = 0.22
    (0.5, 0.4, None, 0.2, "teacher"),
    (0.2, 0.2, 0.4, 0.5, "boosted"),  # log 2 = 0.69 over the larger
    (0.2, 0.2, 0.3, 0.5, "shared"),  # log 1.5 = 0.41
    (0.3, 0.0, None, 0.5, "teacher"), (0.0, 0.0, None, 0.5, "shared"),  # underflowed geometric means
])
def test_ratio_rule(pt, ps, pd, margin, category):
    assert Rule("ratio", margin).categorize(pt, ps, pd) == category


def test_a_margin_exactly_met_is_not_much_greater():
    """">>" is strict under both rules (DESIGN §9: pT - pS > beta; log pT - log pS > delta): a sentence exactly at the
    margin, in floats as computed, is shared; a little past it is the teacher's or the student's."""
    difference = Rule("difference", 0.25)  # 0.75 - 0.5 and 0.75 - 0.5 are exact in floats
    assert difference.categorize(0.75, 0.5) == difference.categorize(0.5, 0.75) == "shared"
    assert difference.categorize(0.5, 0.5, 0.75) == "shared"
    assert (difference.categorize(0.75, 0.49), difference.categorize(0.49, 0.75)) == ("teacher", "student")
    assert difference.categorize(0.5, 0.5, 0.76) == "boosted"
    delta = math.log(0.5) - math.log(0.25)
    ratio = Rule("ratio", delta)
    assert ratio.categorize(0.5, 0.25) == ratio.categorize(0.25, 0.5) == ratio.categorize(0.25, 0.25, 0.5) == "shared"
    assert (ratio.categorize(0.5, 0.24), ratio.categorize(0.24, 0.5), ratio.categorize(0.25, 0.25, 0.51)) == (
        "teacher", "student", "boosted")


@pytest.mark.parametrize("rule", [Rule("difference", 0.1), Rule("ratio", 0.5)])
def test_boosted_is_only_a_sentence_neither_model_owns(rule):
    """boosted: neither pT >> pS nor pS >> pT, and pD >> max(pT, pS); a distilled model that raises a teacher's or
    student's sentence further does not make it boosted."""
    assert rule.categorize(0.3, 0.05, 0.99) == "teacher"
    assert rule.categorize(0.05, 0.3, 0.99) == "student"
    assert rule.categorize(0.5, 0.5, 0.99) == "boosted"


def test_the_ratio_rules_default_margin_is_half_a_nat():
    """README and DESIGN: --rule ratio defaults to delta = 0.5 (each token about 1.65 times as likely)."""
    assert DEFAULT_MARGIN == 0.5 and make_rule("ratio").margin == 0.5
    assert make_rule("ratio").categorize(0.5, 0.3) == "teacher"  # log(5/3) = 0.51
    assert make_rule("ratio").categorize(0.5, 0.31) == "shared"  # log(0.5/0.31) = 0.48


def test_the_interval_is_the_central_percentile_range_of_the_finite_replicates():
    """A level-L percentile bootstrap interval is the (1 - L)/2 and (1 + L)/2 quantiles of the replicates with a
    value (NaN replicates, resamples without both kinds of answer, are left out and counted)."""
    from rsd_engine.pipeline.provenance_report import _estimate

    replicates = np.concatenate([np.arange(1001) / 10.0, [np.nan] * 7])  # 0.0, 0.1, ... 100.0: quantile q is 100 q
    for level, interval in ((0.95, [2.5, 97.5]), (0.9, [5.0, 95.0]), (0.5, [25.0, 75.0])):
        e = _estimate(50.0, replicates, level, len(replicates), 3)
        assert e["interval"] == pytest.approx(interval, abs=1e-9) and e["value"] == 50.0
        assert (e["resamples"], e["resamples_drawn"], e["level"], e["seed"]) == (1001, 1008, level, 3)


@pytest.mark.parametrize("case, defined", [
    ([("a", 0, True, [T]), ("b", 0, False, [S])], 1 / 2),  # both drawn: 1 - 2 (1/2)^2
    ([("a", 0, True, [T]), ("b", 0, False, [S]), ("c", 0, False, [SH])], 2 / 3),  # 1 - (1/3)^3 - (2/3)^3
])
def test_a_resample_draws_as_many_problems_as_there_are(tmp_path, case, defined):
    """Each bootstrap resample draws the data's number of problems with replacement: the share of resamples holding
    both a correct and an incorrect answer (those that have an area and a correlation) is its probability."""
    r = report_of(tmp_path, case=case, resamples=4000, seed=0)
    for name in ("teacher_area", "correlation"):
        assert r[name]["resamples"] / 4000 == pytest.approx(defined, abs=0.03), name


def test_rule_options_are_checked():
    assert make_rule() == Rule("difference", 0.1)
    assert make_rule("ratio") == Rule("ratio", DEFAULT_MARGIN)
    with pytest.raises(ValueError, match="--rule = 'sum': must be one of difference, ratio"):
        make_rule("sum")
    with pytest.raises(ValueError, match="--margin = -1.0: must be a finite number > 0"):
        make_rule("ratio", margin=-1.0)
    with pytest.raises(ValueError, match="--beta = 0.2 is the difference rule's margin; --rule ratio takes --margin"):
        make_rule("ratio", beta=0.2)
    with pytest.raises(ValueError, match="--margin = 1.0 is the ratio rule's margin"):
        make_rule("difference", margin=1.0)


def test_newest_lines_of_a_response_win(tmp_path):
    old = sentence_lines([("a", 0, True, [S, S])])
    new = sentence_lines([("a", 0, True, [T, T, SH])])
    responses, read = read_sentences(write_lines(tmp_path / "s.jsonl", old + new), Rule())
    assert [(r.id, r.categories) for r in responses] == [("a", ["teacher", "teacher", "shared"])]
    assert read["lines"] == 5


def test_only_the_newest_complete_version_counts(tmp_path):
    old = sentence_lines([("a", 0, True, [S, S])], response_hash="h1")
    new = sentence_lines([("a", 0, True, [T, SH])], response_hash="h2")
    torn = sentence_lines([("a", 0, True, [S, S, S])], response_hash="h3")[:2]
    other = sentence_lines([("b", 0, False, [S])], response_hash="h4")
    responses, read = read_sentences(write_lines(tmp_path / "s.jsonl", old + new + other + torn), Rule())
    assert [(r.id, r.categories) for r in responses] == [("a", ["teacher", "shared"]), ("b", ["student"])]
    assert read["lines"] == 7 and read["lines_used"] == 3


def test_a_response_read_from_an_older_version_is_named(tmp_path, capsys):
    """A response traced again after its text changed (version 2) whose new lines were cut short is read from its
    older version: the figures were over a text the data no longer holds, without a word."""
    old = sentence_lines([("a", 0, True, [S, S])], response_hash="h1")
    torn = sentence_lines([("a", 0, True, [T, SH, T])], response_hash="h2", version=2)[:2]
    other = sentence_lines([("b", 0, False, [S])], response_hash="h3")
    path = write_lines(tmp_path / "s.jsonl", old + other + torn)
    responses, read = read_sentences(path, Rule())
    assert [(r.id, r.categories) for r in responses] == [("a", ["student", "student"]), ("b", ["student"])]
    assert read["older_version"] == {"count": 1, "first": ["a/0"]} and read["incomplete"]["count"] == 0
    assert main(["provenance-report", str(path), "--resamples", "5"]) == 0
    assert ("read from an older version, the newest one's sentence lines incomplete: 1 responses (a/0)"
            in capsys.readouterr().out)


def test_truncated_responses_are_left_out_unless_asked(tmp_path):
    lines = sentence_lines(CASE)
    for line in lines:
        if line["id"] == "b" and line["sample"] == 1:
            line["finish_reason"] = "length"
        if line["id"] == "a" and line["sample"] == 1:
            line["truncated"] = True  # how rsd provenance --include-truncated marks them
    responses, _ = read_sentences(write_lines(tmp_path / "s.jsonl", lines), Rule())
    left_out = analyse(responses, resamples=5)
    assert left_out["responses"] == 2 and left_out["truncated"] == {"count": 2, "included": False}
    assert analyse(responses, resamples=5, include_truncated=True)["responses"] == 4


def test_cli_writes_report_and_plot(tmp_path, capsys):
    path = write_lines(tmp_path / "s.jsonl", sentence_lines(CASE))
    out, plot = tmp_path / "report.json", tmp_path / "report.png"
    assert main(["provenance-report", str(path), "--out", str(out), "--plot", str(plot), "--bins", "2",
                 "--resamples", "50", "--rule", "ratio", "--margin", "0.2"]) == 0
    report = json.loads(out.read_text())
    assert report["rule"] == {"rule": "ratio", "margin": 0.2}
    assert report["recategorised"] == 6  # stored "shared", re-categorised to teacher / student
    # both problems hold correct and incorrect answers; a resample of one problem twice may leave a bin without one
    assert 0 < report["teacher_area"]["resamples"] <= 50 == report["teacher_area"]["resamples_drawn"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "+0.250, 95% bootstrap interval over problems [" in printed
    assert "area between the curves (correct - incorrect): +0.250" in printed
    assert "point-biserial r" in printed


@pytest.mark.parametrize("suffix", [".pdf", ".png", ".svg"])
def test_a_plot_write_cut_short_leaves_the_old_plot(tmp_path, capsys, monkeypatch, suffix):
    """A plot was written straight over --plot: a kill in the write left it torn, the old one gone, and a PDF
    without its title yet (written last), which every rerun then refused as no plot of rsd's."""
    from matplotlib.figure import Figure

    path = write_lines(tmp_path / "s.jsonl", sentence_lines(CASE))
    plot = tmp_path / f"p{suffix}"
    argv = ["provenance-report", str(path), "--plot", str(plot), "--resamples", "20"]
    assert main(argv) == 0
    before = plot.read_bytes()
    real = Figure.savefig

    def cut_short(self, fname, **kw):
        real(self, fname, **kw)
        with open(fname, "r+b") as f:
            f.truncate(200)  # the first bytes on disk, as a kill leaves them
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(SystemExit) as stopped:  # (Ctrl-C: exit status 130)
        main(argv)
    assert stopped.value.code == 130 and plot.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [plot.name, "s.jsonl"]
    monkeypatch.setattr(Figure, "savefig", real)
    assert main(argv) == 0 and plot.read_bytes()[:4] == before[:4]


def test_plot_names_the_file_it_writes_and_refuses_a_format_before_any_work(tmp_path, capsys, monkeypatch):
    """matplotlib adds ".png" to a name without an extension (the plot was said to be at the name given, which
    held nothing), and fails on an extension it cannot write, after all the work, in its own words."""
    from rsd_engine.pipeline import provenance_report

    path = write_lines(tmp_path / "s.jsonl", sentence_lines(CASE))
    assert main(["provenance-report", str(path), "--plot", str(tmp_path / "noext"), "--resamples", "20"]) == 0
    assert f"plot: {tmp_path / 'noext.png'}\n" in capsys.readouterr().out
    assert (tmp_path / "noext.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(provenance_report, "analyse", lambda *a, **k: pytest.fail("analysed before the check"))
    with pytest.raises(SystemExit) as stopped:
        main(["provenance-report", str(path), "--plot", str(tmp_path / "p.txt")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "--plot" in err and "not .txt; give one of these extensions" in err


@pytest.mark.parametrize("argv, message", [
    (["--rule", "sum"], "argument --rule: invalid choice: 'sum'"),
    (["--rule", "ratio", "--margin", "-0.5"], "--margin: must be a finite number > 0, got '-0.5'"),
    (["--beta", "1.5"], "--beta: must be a number in (0, 1), got '1.5'"),
    (["--rule", "ratio", "--beta", "0.2"], "--beta = 0.2 is the difference rule's margin"),
    (["--bins", "0"], "--bins: must be an integer in [1, 1000], got '0'"),
])
def test_cli_refuses_bad_options(tmp_path, capsys, argv, message):
    path = write_lines(tmp_path / "s.jsonl", sentence_lines(CASE))
    with pytest.raises(SystemExit) as exit_info:
        main(["provenance-report", str(path), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("drop, change, message", [
    ("p_teacher", {}, "line 1: no 'p_teacher' field"),
    ("index", {}, "line 1: no 'index' field"),
    ("sentences", {}, "line 1: no 'sentences' field"),
    (None, {"p_student": 1.5}, "line 1: p_student = 1.5, not a probability in [0, 1]"),
    (None, {"p_distilled": "x"}, "line 1: p_distilled = 'x', not a probability"),
])
def test_lines_without_what_the_analysis_needs_are_refused(tmp_path, capsys, drop, change, message):
    lines = sentence_lines(CASE)
    lines[0].update(change)
    lines[0].pop(drop, None)
    path = write_lines(tmp_path / "s.jsonl", lines)
    with pytest.raises(SystemExit):
        main(["provenance-report", str(path)])
    assert message in capsys.readouterr().err


def test_run_report_refuses_an_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match="no sentence lines"):
        run_report(tmp_path / "e.jsonl", rule=Rule(), log=lambda *_: None)


def test_provenance_records_follow_the_ratio_rule_and_the_report_agrees(tiny_pair, tmp_path):
    rows = [{"id": "a", "question": "What is 2 + 2?", "response": "We add them. So 2 + 2 = 4. The answer is 4.",
             "correct": True},
            {"id": "b", "question": "What is 3 + 3?", "response": "Three and three. It is 7, I think.",
             "correct": False}]
    data = write_lines(tmp_path / "gens.jsonl", rows)
    out = tmp_path / "s.jsonl"
    assert main(["provenance", "--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]), "--data", str(data),
                 "--out", str(out), "--rule", "ratio", "--margin", "0.05", "--device", "cpu", "--no-progress"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    rule = Rule("ratio", 0.05)
    assert [line["category"] for line in lines] == [rule.categorize(line["p_teacher"], line["p_student"])
                                                    for line in lines]
    assert {line["category"] for line in lines} - {"shared"}  # the margin is small enough to see the models differ
    report = run_report(out, rule=rule, resamples=10, log=lambda *_: None)
    assert report["recategorised"] == 0 and [r["correct"] for r in report["per_response"]] == [True, False]


def test_merge_keeps_ids_equal_as_numbers_apart_and_the_report_uses_every_line(tmp_path):
    from rsd_engine.pipeline.records import part_path, read_records

    out = tmp_path / "s.jsonl"
    # The same text (response hash) under ids "p01" and "p1", one part each.
    for rank, (rid, correct) in enumerate([("p01", False), ("p1", True)]):
        write_lines(part_path(out, rank, 2), sentence_lines([(rid, 0, correct, [T, S, SH])], response_hash="h"))
    assert main(["merge", str(out)]) == 0
    assert [(r["id"], r["index"]) for r in read_records(out)] == [("p01", 0), ("p01", 1), ("p01", 2),
                                                                   ("p1", 0), ("p1", 1), ("p1", 2)]
    responses, read = read_sentences(out, Rule())
    assert [(r.id, r.categories) for r in responses] == [("p01", ["teacher", "student", "shared"]),
                                                         ("p1", ["teacher", "student", "shared"])]
    assert read["lines"] == read["lines_used"] == 6
    # A response's lines are read together wherever they lie in the file.
    a, b = sentence_lines([("p01", 0, False, [T, S, SH])]), sentence_lines([("p1", 0, True, [S, T])])
    interleaved = [a[0], b[0], a[1], b[1], a[2]]
    responses, read = read_sentences(write_lines(tmp_path / "i.jsonl", interleaved), Rule())
    assert sorted((r.id, len(r.categories)) for r in responses) == [("p01", 3), ("p1", 2)]
    assert read["lines_used"] == 5


def test_no_complete_response_is_named_as_such(tmp_path, capsys):
    torn = sentence_lines([("a", 0, True, [T, S])], response_hash="x")[:1]  # one of its 2 lines
    with pytest.raises(SystemExit) as exit_info:
        main(["provenance-report", str(write_lines(tmp_path / "s.jsonl", torn))])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no response has all of its sentence lines" in err and "length limit" not in err
    # Beside a complete response cut off by the length limit, the torn one is left out and the length limit
    # is what is named; --include-truncated then reports the complete one.
    cut = sentence_lines([("b", 0, True, [T, S, S])], response_hash="y", finish_reason="length")
    data = write_lines(tmp_path / "t.jsonl", torn + cut)
    with pytest.raises(SystemExit) as exit_info:
        main(["provenance-report", str(data)])
    assert exit_info.value.code == 2 and "cut off by the length limit" in capsys.readouterr().err
    out = tmp_path / "r.json"
    assert main(["provenance-report", str(data), "--include-truncated", "--resamples", "10", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["lines_used"] == 3


def test_ids_written_two_ways_that_read_as_one_are_refused(tmp_path, capsys):
    """Lines of ids 1 and "1" of one sample were read as two versions of one response: the one written first
    vanished ("lines 5 used 3"), without a word."""
    one = sentence_lines([("1", 0, True, [T, S])], response_hash="h1")
    other = sentence_lines([("1", 0, False, [S, SH, T])], response_hash="h2")
    for line in one:
        line["id"] = 1
    with pytest.raises(SystemExit) as exit_info:
        main(["provenance-report", str(write_lines(tmp_path / "s.jsonl", one + other))])
    assert exit_info.value.code == 2
    assert "lines 1 and 3 give id 1 and '1', which read as one id" in capsys.readouterr().err


def test_a_copy_of_a_line_that_differs_is_refused_and_an_identical_one_read_once(tmp_path, capsys):
    """A duplicated sentence line with other numbers replaced the original: the figures changed, without a word."""
    lines = sentence_lines(CASE, response_hash="h")
    with pytest.raises(SystemExit) as exit_info:
        main(["provenance-report", str(write_lines(tmp_path / "s.jsonl", lines + [{**lines[0], "p_student": 0.95}]))])
    assert exit_info.value.code == 2
    assert ("lines 1 and 10 are both sentence 0 of id a sample 0 (one version of its text) but differ in p_student"
            in capsys.readouterr().err)
    responses, read = read_sentences(write_lines(tmp_path / "t.jsonl", lines + [lines[0]]), Rule())
    assert [len(r.categories) for r in responses] == [2, 2, 4, 1] and read["lines_used"] == 9


def test_responses_missing_a_line_are_left_out_counted_and_named(tmp_path, capsys):
    """A response missing one of its sentence lines dropped out of every figure; only lines_used told."""
    lines = [line for line in sentence_lines(CASE, response_hash="h") if (line["id"], line["index"]) != ("b", 2)]
    out = tmp_path / "r.json"
    assert main(["provenance-report", str(write_lines(tmp_path / "s.jsonl", lines)), "--resamples", "10",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ": 3 responses, 5 sentences" in printed
    assert "left out, some of their sentence lines missing: 1 responses (b/0); a run cut short" in printed
    assert json.loads(out.read_text())["incomplete"] == {"count": 1, "first": ["b/0"]}


def test_a_missing_input_or_an_output_over_it_is_refused_as_such(tmp_path, capsys):
    """A missing sentences file was 'no sentence lines'; --out or --plot naming the input would have renamed the
    report over the sentences."""
    with pytest.raises(SystemExit) as exit_info:
        main(["provenance-report", str(tmp_path / "none.jsonl")])
    assert exit_info.value.code == 2 and "none.jsonl: no such file" in capsys.readouterr().err
    path = write_lines(tmp_path / "s.jsonl", sentence_lines(CASE))
    before = path.read_bytes()
    for flag in ("--out", "--plot"):
        with pytest.raises(SystemExit):
            main(["provenance-report", str(path), flag, str(path)])
        assert f"{flag} {path} is also the sentences file" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_a_reader_that_goes_away_ends_the_report_without_a_traceback(tmp_path):
    """`rsd provenance-report ... | head -1`: a BrokenPipeError traceback and exit status 1 before; now 141, as a
    shell reports SIGPIPE, and nothing on stderr."""
    import subprocess
    import sys

    path = write_lines(tmp_path / "s.jsonl", sentence_lines(CASE))
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from rsd_engine.cli import main; sys.exit(main())",
                             "provenance-report", str(path), "--resamples", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the report is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_the_area_interval_is_of_the_same_bins_as_the_area():
    """A correct answer of one teacher sentence (problem A, in bin 5 only) beside one of ten non-teacher sentences
    (B): the area over the ten bins is 0.05, but a resample without B averaged bin 5 alone (1.0) and the interval
    read [0, 1] (found by the provenance review). Every replicate is the mean over the same ten bins, or none."""
    import tempfile
    from pathlib import Path

    case = [("A", 0, True, [T]), ("B", 0, True, [S] * 10)] + [(f"w{k}", 0, False, [S] * 10) for k in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        r = report_of(Path(tmp), case=case, resamples=1000, seed=0)
    area = r["teacher_area"]
    assert area["value"] == pytest.approx(0.05) and area["deciles_compared"] == 10
    assert area["interval"][1] < 0.2 and area["resamples"] < 1000


def test_out_and_plot_replace_only_the_report_and_plot_this_command_wrote(tmp_path, capsys):
    """--out and --plot were written over whatever was there: a generate output, another command's report, a
    picture, and a --plot folder got FOLDER.png beside it. Now a rerun replaces its own report and plot only; any
    other file is refused, named, before any work, and left as it was."""
    path = write_lines(tmp_path / "s.jsonl", sentence_lines(CASE))
    out, plot = tmp_path / "report.json", tmp_path / "report.png"
    argv = ["provenance-report", str(path), "--resamples", "10"]
    for _ in range(2):  # the rerun replaces what the first run wrote
        assert main([*argv, "--out", str(out), "--plot", str(plot)]) == 0
    assert json.loads(out.read_text())["rsd command"] == "provenance-report"
    older = tmp_path / "older.json"  # a report of an rsd before the mark: known by its fields
    older.write_text(json.dumps({k: v for k, v in json.loads(out.read_text()).items() if k != "rsd command"},
                                indent=1) + "\n")
    assert main([*argv, "--out", str(older)]) == 0 and json.loads(older.read_text())["rsd command"]

    traces = tmp_path / "traces.jsonl"
    traces.write_text('{"id": "a", "token_ids": [1, 2]}\n')
    score = tmp_path / "score.json"
    score.write_text(json.dumps({"rsd command": "score", "files": []}, indent=1) + "\n")
    picture = tmp_path / "picture.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n not ours")
    for flag, foreign in [("--out", traces), ("--out", score), ("--plot", picture), ("--plot", tmp_path / "noext")]:
        if foreign.name == "noext":
            (tmp_path / "noext.png").write_bytes(picture.read_bytes())  # what --plot noext writes
        before = foreign.with_suffix(foreign.suffix or ".png").read_bytes()
        with pytest.raises(SystemExit) as stopped:
            main([*argv, flag, str(foreign)])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and "is no" in err and "not written over" in err and len(err.splitlines()) == 1
        assert foreign.with_suffix(foreign.suffix or ".png").read_bytes() == before

    # Plots of an older rsd (matplotlib's, untitled) are replaced; a titled picture of matplotlib's is not; a format
    # that carries no title (.jpg) is refused at the first run (it was written once, then refused by every rerun).
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure = plt.figure()
    for suffix in (".png", ".pdf", ".svg"):
        old, titled = tmp_path / f"old{suffix}", tmp_path / f"titled{suffix}"
        figure.savefig(old)
        figure.savefig(titled, metadata={"Title": "my figure"})
        assert main([*argv, "--plot", str(old)]) == 0 and old.read_bytes() != b""
        before = titled.read_bytes()
        with pytest.raises(SystemExit):
            main([*argv, "--plot", str(titled)])
        assert "not written over" in capsys.readouterr().err and titled.read_bytes() == before
    plt.close(figure)
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--plot", str(tmp_path / "p.jpg")])
    assert stopped.value.code == 2 and "rsd writes .png, .pdf or .svg plots" in capsys.readouterr().err
    assert not (tmp_path / "p.jpg").exists()

    folder = tmp_path / "plots"
    folder.mkdir()
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--plot", str(folder)])
    assert stopped.value.code == 2 and f"--plot {folder} is a folder" in capsys.readouterr().err
    assert not (tmp_path / "plots.png").exists() and not any(folder.iterdir())
