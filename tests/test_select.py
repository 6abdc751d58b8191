"""`rsd select`'s ranking: --budget over the whole dataset (responses or problems), the random and
student-likelihood baselines at the same budget, resume, and bad options refused."""
import json
import math
import os

import pytest

from rsd_engine.cli import main
from rsd_engine.pipeline.records import part_path, read_records
from rsd_engine.pipeline.select import Candidate, SelectOptions, pick, random_key, scores_path, select_budget

pytestmark = pytest.mark.usefixtures("one_thread")


def cand(order, teacher, sentences, tokens, **kw):
    return Candidate(order, teacher, sentences, tokens, **kw)


# problem -> candidates (teacher sentences, sentences, tokens)
PROBLEMS = {
    "p1": [cand(0, 1, 4, 40), cand(1, 3, 4, 50)],  # shares 0.25, 0.75
    "p2": [cand(0, 2, 2, 30)],  # 1.0
    "p3": [cand(0, 0, 3, 20), cand(1, 4, 8, 90), cand(2, 1, 2, 25)],  # 0, 0.5, 0.5 (the shorter first)
}


def names(kept):
    return [(pid, c.order) for pid, c in kept]


def test_budget_of_responses_takes_the_highest_shares_of_the_dataset():
    assert names(select_budget(PROBLEMS, 3, "responses", "share")) == [("p2", 0), ("p1", 1), ("p3", 2)]
    assert names(select_budget(PROBLEMS, 4, "responses", "share"))[3] == ("p3", 1)  # tie at 0.5: the shorter first
    assert len(select_budget(PROBLEMS, 100, "responses", "share")) == 6  # no more than there are


def test_budget_of_problems_keeps_each_problems_best():
    assert names(select_budget(PROBLEMS, 2, "problems", "share")) == [("p2", 0), ("p1", 1)]
    assert names(select_budget(PROBLEMS, 3, "problems", "count")) == [("p3", 1), ("p1", 1), ("p2", 0)]


def test_budget_of_problems_picks_each_problems_best_by_the_same_ranking():
    """A problem competes with its best candidate under --by, not under the count: p3's best share is 1 of 2
    (0.5, tied with 4 of 8 and shorter), not its most teacher sentences (4 of 8)."""
    assert names(select_budget(PROBLEMS, 3, "problems", "share")) == [("p2", 0), ("p1", 1), ("p3", 2)]


def test_budget_ties_of_score_and_length_go_to_the_dataset_order_then_the_earlier_candidate():
    same = [cand(0, 1, 2, 30), cand(1, 1, 2, 30)]
    problems = {"z": list(same), "a": list(same), "m": [cand(0, 2, 2, 30)]}  # dataset order z, a, m: not id order
    assert names(select_budget(problems, 5, "responses", "share")) == [("m", 0), ("z", 0), ("z", 1), ("a", 0),
                                                                       ("a", 1)]
    assert names(select_budget(problems, 3, "problems", "share")) == [("m", 0), ("z", 0), ("a", 0)]


def test_student_likelihood_ranks_by_the_mean_log_probability():
    problems = {"a": [Candidate(0, tokens=10, student_logprob=-2.0), Candidate(1, tokens=12, student_logprob=-0.5)],
                "b": [Candidate(0, tokens=9, student_logprob=-1.0)]}
    assert names(select_budget(problems, 2, "responses", "student-likelihood")) == [("a", 1), ("b", 0)]
    assert pick(problems["a"], "student-likelihood").order == 1


def test_random_keys_are_uniform_and_fixed_by_seed_id_and_sample():
    from scipy.stats import kstest

    keys = [random_key(0, f"p{i}", s) for i in range(500) for s in range(4)]
    assert kstest(keys, "uniform").pvalue > 1e-3
    assert random_key(0, "p1", 0) == random_key(0, "p1", 0) != random_key(1, "p1", 0) != random_key(0, "p1", 1)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"id": f"q{i}", "sample": s, "question": f"What is {i} + 1?", "response": f"It is {i + s}. " * (1 + s)}
        for i in range(5) for s in range(3)]


def test_random_baseline_keeps_the_budget_without_any_model(tmp_path, capsys):
    data, out = write_rows(tmp_path / "c.jsonl", ROWS), tmp_path / "sel.jsonl"
    assert main(["select", "--by", "random", "--budget", "4", "--data", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    kept = read_records(out)
    expected = sorted(((r["id"], r["sample"]) for r in ROWS), key=lambda k: random_key(0, *k))[:4]
    assert [(r["id"], r["sample"]) for r in kept] == expected
    assert [r["rank"] for r in kept] == [1, 2, 3, 4] and all(r["candidates"] == 3 for r in kept)
    assert [r["random_key"] for r in kept] == [random_key(0, *k) for k in expected] and "tokens" not in kept[0]
    assert len(read_records(scores_path(out))) == len(ROWS)
    assert "kept: 4 of 15 scored candidates (0 already in the output, 4 written now)" in capsys.readouterr().out
    # Another seed, another draw; the same budget of problems keeps one response per problem.
    other = tmp_path / "other.jsonl"
    assert main(["select", "--by", "random", "--budget", "3", "--budget-unit", "problems", "--seed", "5",
                 "--data", str(data), "--out", str(other), "--no-progress"]) == 0
    kept = read_records(other)
    assert len({r["id"] for r in kept}) == 3


def test_without_budget_each_problem_keeps_its_best_under_by(tmp_path):
    """Without --budget a problem keeps its best candidate under --by (here random: the smallest draw of (seed, id,
    sample)), not under the count's default."""
    data, out = write_rows(tmp_path / "c.jsonl", ROWS), tmp_path / "sel.jsonl"
    assert main(["select", "--by", "random", "--seed", "3", "--data", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    expected = {f"q{i}": min(range(3), key=lambda s: random_key(3, f"q{i}", s)) for i in range(5)}
    assert set(expected.values()) != {0}  # the draw is not the first candidate's
    assert {r["id"]: r["sample"] for r in read_records(out)} == expected


@pytest.mark.parametrize("data_name, extra", [("sel.scores.jsonl", ["--budget", "4", "--force"]),
                                             ("sel.jsonl.manifest.json", []),
                                             ("sel.scores.jsonl.manifest.json", ["--budget", "4"])])
def test_data_named_as_a_file_written_beside_out_is_refused(tmp_path, capsys, data_name, extra):
    """The files written beside OUT (its manifest, --budget's scores file and that file's manifest) were not checked
    against --data as OUT is: a dataset named sel.jsonl.manifest.json (JSON, a format --data reads) was written over
    by the manifest, and --budget --force appended score lines to a dataset named sel.scores.jsonl."""
    rows = json.dumps(ROWS) if data_name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in ROWS)
    data, out = tmp_path / data_name, tmp_path / "sel.jsonl"
    data.write_text(rows)
    with pytest.raises(SystemExit) as stopped:
        main(["select", "--by", "random", "--data", str(data), "--out", str(out), "--no-progress", *extra])
    said = capsys.readouterr().err
    assert stopped.value.code == 2 and str(data) in said and "give --out another name" in said
    assert data.read_text() == rows and not out.exists()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_scores_file_that_is_no_regular_file_is_refused(tmp_path, capsys, kind):
    """The scores file --budget writes beside OUT is read back as OUT is: a FIFO there blocked the run for good, a
    link to a device (/dev/null stands in for /dev/zero, which reads without end) was read until memory ran out.
    Refused, naming it, before anything is scored or written."""
    data, out = write_rows(tmp_path / "c.jsonl", ROWS), tmp_path / "sel.jsonl"
    scores = scores_path(out)
    if kind == "fifo":
        os.mkfifo(scores)
    else:
        scores.symlink_to("/dev/null")
    with pytest.raises(SystemExit) as stopped:
        main(["select", "--by", "random", "--budget", "4", "--data", str(data), "--out", str(out), "--no-progress"])
    assert stopped.value.code == 2
    said = capsys.readouterr().err
    assert f"{scores} is a {'FIFO' if kind == 'fifo' else 'character device'}" in said and "not a regular file" in said
    assert not out.exists()


def test_budget_keeps_only_correct_candidates_unless_asked(tmp_path, capsys):
    rows = [{**r, "correct": r["sample"] == 0} for r in ROWS]
    data, out = write_rows(tmp_path / "c.jsonl", rows), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "random", "--budget", "8", "--data", str(data), "--no-progress", "--out"]
    assert main(argv + [str(out)]) == 0
    assert [(r["sample"], r["correct"]) for r in read_records(out)] == [(0, True)] * 5  # no more than are correct
    assert "incorrect candidates set aside: 10 (--include-incorrect ranks them)" in capsys.readouterr().out
    assert main(argv + [str(tmp_path / "all.jsonl"), "--include-incorrect"]) == 0
    kept = read_records(tmp_path / "all.jsonl")
    expected = sorted(((r["id"], r["sample"]) for r in rows), key=lambda k: random_key(0, *k))[:8]
    assert [(r["id"], r["sample"]) for r in kept] == expected and [r["candidates"] for r in kept] == [3] * 8


def test_budget_run_resumes_the_writing_and_refuses_another_selection(tmp_path, capsys):
    data, out = write_rows(tmp_path / "c.jsonl", ROWS), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "random", "--budget", "5", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    whole = out.read_text()
    out.write_text("".join(whole.splitlines(keepends=True)[:2]))  # as if killed while writing
    assert main(argv) == 0
    assert out.read_text() == whole
    assert "candidates: 15 already in the scores file, 0 scored now" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([("6" if a == "5" else a) for a in argv])
    assert "--budget: 5 in the output, 6 now" in capsys.readouterr().err


def test_a_candidate_added_to_a_kept_problem_but_not_kept_is_named(tmp_path, capsys):
    """A candidate added to the problem of a kept row that does not rank among the kept still changes that row
    (its `candidates` count): refused, naming the row and the field, not as a row taken by another candidate."""
    data, out = write_rows(tmp_path / "c.jsonl", ROWS), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "random", "--budget", "4", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    kept = read_records(out)
    worst = max(r["random_key"] for r in kept)
    pid = kept[0]["id"]
    sample = next(s for s in range(10, 1000) if random_key(0, pid, s) > worst)  # ranks below every kept row
    write_rows(data, ROWS + [{**next(r for r in ROWS if r["id"] == pid), "sample": sample, "response": "Other."}])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    said = capsys.readouterr().err
    assert f"its row 0 (id {pid} candidate {kept[0]['sample']}) is this run's too, but with candidates 3 -> 4 (a " \
           f"candidate of its problem added or removed since)" in said


def test_a_non_finite_score_an_older_rsd_wrote_is_scored_again(tmp_path, capsys):
    """rsd select used to write a NaN score (a model's non-finite logits) to the scores file; a resumed run must
    score that candidate again, never rank the NaN (a NaN key sorts by input order)."""
    data, out = write_rows(tmp_path / "c.jsonl", ROWS), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "random", "--budget", "4", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    kept = out.read_text()
    lines = read_records(scores_path(out))
    lines[0]["random_key"] = float("nan")
    scores_path(out).write_text("".join(json.dumps(r) + "\n" for r in lines))
    out.unlink()
    assert main(argv) == 0
    assert "candidates: 14 already in the scores file, 1 scored now" in capsys.readouterr().out
    assert out.read_text() == kept


def test_student_likelihood_baseline_matches_the_students_log_probabilities(tiny_pair, tmp_path):
    from rsd_engine.pipeline.prompts import DEFAULT_SYSTEM_PROMPT
    from rsd_engine.pipeline.readers import Reader

    data, out = write_rows(tmp_path / "c.jsonl", ROWS[:6]), tmp_path / "sel.jsonl"
    assert main(["select", "--by", "student-likelihood", "--student", str(tiny_pair[1]), "--budget", "2",
                 "--data", str(data), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    reader = Reader("student", tiny_pair[1], device="cpu")
    readings = [reader.read(r["question"], r["response"], DEFAULT_SYSTEM_PROMPT) for r in ROWS[:6]]
    reader.allocate(max(len(x) for x in readings), 1)
    means = [sum(lp) / len(lp) for lp in (reader.logprobs([x])[0] for x in readings)]
    best = sorted(range(6), key=lambda k: -means[k])[:2]
    kept = read_records(out)
    assert [(r["id"], r["sample"]) for r in kept] == [(ROWS[k]["id"], ROWS[k]["sample"]) for k in best]
    assert [r["student_logprob"] for r in kept] == pytest.approx([means[k] for k in best], abs=1e-5)
    assert all(math.isfinite(r["student_logprob"]) for r in kept)


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0"], "--budget: must be an integer >= 1, got '0'"),
    (["--budget-unit", "tokens"], "--budget-unit: invalid choice: 'tokens'"),
    (["--by", "length"], "--by: invalid choice: 'length'"),
    (["--by", "share"], "--by share needs --teacher"),
    (["--by", "student-likelihood"], "--by student-likelihood needs --student"),
    (["--by", "random", "--rule", "ratio", "--beta", "0.2"], "--beta = 0.2 is the difference rule's margin"),
    (["--by", "random", "--rule", "ratio", "--margin", "0"], "--margin: must be a finite number > 0, got '0'"),
])
def test_bad_options_are_refused(tmp_path, capsys, argv, message):
    data = write_rows(tmp_path / "c.jsonl", ROWS)
    with pytest.raises(SystemExit) as exit_info:
        main(["select", "--data", str(data), "--out", str(tmp_path / "o.jsonl"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_options_default_by_follows_the_budget():
    assert SelectOptions("t", "s", "d", "o").by == "count"
    assert SelectOptions("t", "s", "d", "o", budget=3).by == "share"
    with pytest.raises(ValueError, match="--budget = 0: must be an integer >= 1"):
        SelectOptions("t", "s", "d", "o", budget=0)


def test_generate_takes_the_selection_options_only_with_select_provenance(tmp_path, tiny_pair):
    from rsd_engine.pipeline.generate import GenerateOptions, record_settings

    t, s = map(str, tiny_pair)
    plain = GenerateOptions(t, s, "d", "o")
    assert not {"--by", "--rule", "--beta", "--margin"} & set(record_settings(plain, "id")[0])  # resumes as before
    chosen = GenerateOptions(t, s, "d", "o", select="provenance", by="share", rule="ratio", margin=1.0)
    assert chosen.category_rule.name == "ratio" and chosen.category_rule.margin == 1.0
    settings = record_settings(chosen, "id")[0]
    assert (settings["--by"], settings["--rule"], settings["--margin"], settings["--beta"]) == ("share", "ratio", 1.0,
                                                                                                 None)
    assert GenerateOptions("t", "s", "d", "o", select="provenance").by == "count"
    with pytest.raises(ValueError, match="--beta: only with --select provenance"):
        GenerateOptions("t", "s", "d", "o", beta=0.2)
    with pytest.raises(ValueError, match="--by = 'length': must be one of"):
        GenerateOptions("t", "s", "d", "o", select="provenance", by="length")


@pytest.mark.parametrize("by", ["random", "student-likelihood"])
def test_generate_chooser_baselines(tiny_pair, by):
    """`rsd generate --select provenance --by B` keeps among correct attempts what `pick` keeps."""
    from rsd_engine import Engine
    from rsd_engine.pipeline.data import Problem
    from rsd_engine.pipeline.prompts import DEFAULT_SYSTEM_PROMPT
    from rsd_engine.pipeline.readers import Reader
    from rsd_engine.pipeline.select import provenance_chooser
    from rsd_engine.pipeline.traces import Attempt
    from rsd_engine.results import GenerationResult

    engine = Engine(*tiny_pair, device="cpu", max_batch_size=1, max_seq_len=128)
    texts = [r["response"] for r in ROWS[:4]]
    attempts = []
    for k, text in enumerate(texts):
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        attempts.append(Attempt(k, GenerationResult([1], token_ids=ids, text=text, finish_reason="eos"), ids, "1",
                                True, True, True, 0.0, True))
    problem = Problem("q0", ROWS[0]["question"], "1")
    kept, fields = provenance_chooser(engine, DEFAULT_SYSTEM_PROMPT, by=by, seed=3)(problem, attempts)
    if by == "random":
        expected = min(range(4), key=lambda k: random_key(3, "q0", k))
        assert fields == {"random_key": random_key(3, "q0", expected)}
    else:
        reader = Reader("student", tiny_pair[1], device="cpu")
        readings = [reader.read(problem.question, t, DEFAULT_SYSTEM_PROMPT) for t in texts]
        reader.allocate(max(len(x) for x in readings), 1)
        means = [sum(lp) / len(lp) for lp in (reader.logprobs([x])[0] for x in readings)]
        assert len(set(means)) == 4
        expected = max(range(4), key=lambda k: means[k])
        assert fields["student_logprob"] == pytest.approx(means[expected], abs=1e-5)
    assert kept.index == expected


def test_budget_under_ranks_gives_the_single_runs_selection(tmp_path, as_ranks, capsys):
    data = write_rows(tmp_path / "c.jsonl", ROWS)
    argv = ["select", "--by", "random", "--budget", "7", "--data", str(data), "--no-progress", "--out"]
    assert main(argv + [str(tmp_path / "whole.jsonl")]) == 0
    assert as_ranks(lambda: main(argv + [str(tmp_path / "sel.jsonl")])) == [0, 0]
    assert "scores part written; when every rank is done: rsd merge" in capsys.readouterr().out
    assert not (tmp_path / "sel.jsonl").exists()
    assert main(["merge", str(scores_path(tmp_path / "sel.jsonl"))]) == 0
    assert main(argv + [str(tmp_path / "sel.jsonl")]) == 0
    assert read_records(tmp_path / "sel.jsonl") == read_records(tmp_path / "whole.jsonl")


def test_budget_ranks_name_the_files_they_wrote(tmp_path, as_ranks, capsys):
    """Each rank's last line named sel.rankN-of-2.scores.jsonl, a file no rank writes: the parts are the scores
    file's, sel.scores.rankN-of-2.jsonl, the names `rsd merge sel.scores.jsonl` joins."""
    data = write_rows(tmp_path / "c.jsonl", ROWS)
    argv = ["select", "--by", "random", "--budget", "7", "--data", str(data), "--no-progress", "--out"]
    assert as_ranks(lambda: main(argv + [str(tmp_path / "sel.jsonl")])) == [0, 0]
    named = [line.split("scores: ", 1)[1] for line in capsys.readouterr().out.splitlines() if "scores: " in line]
    assert named == [str(part_path(scores_path(tmp_path / "sel.jsonl"), rank, 2)) for rank in range(2)]
    assert all(os.path.exists(name) for name in named)


# ------------------------------------------------------------------------------ resume, merge, stale scores

def rerun_writes_nothing(argv, out, capsys):
    assert main(argv) == 0
    first = out.read_text()
    capsys.readouterr()
    assert main(argv) == 0
    assert out.read_text() == first
    return capsys.readouterr().out


def test_rerun_without_budget_resumes_by_the_id_field_it_was_given(tmp_path, capsys):
    rows = [{"pid": r["id"], **{k: v for k, v in r.items() if k != "id"}} for r in ROWS]  # no "id" column
    data, out = write_rows(tmp_path / "c.jsonl", rows), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "random", "--id-field", "pid", "--data", str(data), "--out", str(out), "--no-progress"]
    report = rerun_writes_nothing(argv, out, capsys)
    assert "problems: 5 (5 already in the output, 0 written now)" in report
    kept = read_records(out)
    assert sorted(r["pid"] for r in kept) == [f"q{i}" for i in range(5)] and [r["id"] for r in kept] == [
        r["pid"] for r in kept]  # the problem id written as "id", so merge keeps problems apart


def test_rerun_without_budget_resumes_a_problem_keyed_by_its_question(tmp_path, capsys):
    from rsd_engine.pipeline.data import question_id

    rows = [ROWS[0], {k: v for k, v in ROWS[3].items() if k != "id"}]  # the second has no id: its question's hash
    data, out = write_rows(tmp_path / "c.jsonl", rows), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "random", "--data", str(data), "--out", str(out), "--no-progress"]
    report = rerun_writes_nothing(argv, out, capsys)
    assert "problems: 2 (2 already in the output, 0 written now)" in report
    assert sorted(r["id"] for r in read_records(out)) == sorted(["q0", question_id(ROWS[3]["question"])])


def test_rerun_without_budget_refuses_problems_whose_candidates_changed_since(tmp_path, capsys):
    """A problem's row was chosen among its candidates as they were: candidates appended since (rsd eval --samples
    4 after 3, the same file), edited or regraded left the old choice done, silently. Refused, naming the ids;
    --force keeps the rows and says so."""
    data, out = write_rows(tmp_path / "c.jsonl", ROWS), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "random", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    selected = out.read_bytes()
    regraded = [{**r, "correct": True} if r["id"] == "q1" else r for r in ROWS]  # q1's candidates are graded now
    write_rows(data, [*regraded, {**ROWS[0], "sample": 3, "response": "It is 1, surely."}])  # and q0 has a new one
    with pytest.raises(SystemExit):
        main(argv)
    assert ("the candidates of 2 problems changed (added, removed, edited or regraded, or their question or system "
            f"turn edited) since their rows in {out} were selected: q0, q1" in capsys.readouterr().err)
    assert out.read_bytes() == selected
    assert main([*argv, "--force"]) == 0
    assert "kept under --force: the rows of 2 problems whose candidates changed since they were selected (q0, q1)" \
        in capsys.readouterr().out
    assert out.read_bytes() == selected
    # The same candidates in another order are no change, also where rows carry no "sample" (their place is it).
    unnumbered = [{k: v for k, v in r.items() if k != "sample"} for r in ROWS]
    data2, out2 = write_rows(tmp_path / "u.jsonl", unnumbered), tmp_path / "sel2.jsonl"
    argv2 = ["select", "--by", "random", "--data", str(data2), "--out", str(out2), "--no-progress"]
    assert main(argv2) == 0
    write_rows(data2, unnumbered[::-1])
    assert main(argv2) == 0


def test_rerun_without_budget_refuses_problems_whose_question_or_system_turn_changed_since(tmp_path, capsys):
    """The candidates' hash covered their texts and grades, not what they answer: a question edited in place (the
    responses left as they were) kept the row selected under the old question, silently (and under --by count,
    share or student-likelihood its score was read after the old question). So did a chat row's system turn.
    Refused as changed candidates; --force keeps the rows."""
    data, out = write_rows(tmp_path / "c.jsonl", ROWS), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "random", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    selected = out.read_bytes()
    write_rows(data, [{**r, "question": "What is 0 plus 1?"} if r["id"] == "q0" else r for r in ROWS])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert "the candidates of 1 problem changed" in err and f"since their rows in {out} were selected: q0;" in err
    assert out.read_bytes() == selected
    assert main([*argv, "--force"]) == 0
    assert "whose candidates changed since they were selected (q0)" in capsys.readouterr().out
    assert out.read_bytes() == selected

    def chat(row, system):
        return {"id": row["id"], "sample": row["sample"], "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["response"]}]}

    data2, out2 = write_rows(tmp_path / "m.jsonl", [chat(r, "Be brief.") for r in ROWS]), tmp_path / "sel2.jsonl"
    argv2 = ["select", "--by", "random", "--data", str(data2), "--out", str(out2), "--no-progress"]
    assert main(argv2) == 0
    write_rows(data2, [chat(r, "Be thorough." if r["id"] == "q3" else "Be brief.") for r in ROWS])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(argv2)
    assert "were selected: q3;" in capsys.readouterr().err


def test_rows_an_older_rsd_selected_resume_and_their_question_is_still_compared(tmp_path, capsys):
    """Rows an older rsd wrote hold a candidates hash of the texts and grades alone: they resume as they are,
    and their question (the kept row's own) is compared with the problem's now."""
    import hashlib

    def old_hash(rows):  # the hash an older rsd wrote: sample, text hash, correct, finish_reason
        items = sorted(json.dumps([r.get("sample"), hashlib.blake2b(r["response"].encode(), digest_size=8).hexdigest(),
                                   r.get("correct"), r.get("finish_reason")]) for r in rows)
        return hashlib.blake2b("\n".join(items).encode(), digest_size=8).hexdigest()

    data, out = write_rows(tmp_path / "c.jsonl", ROWS), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "random", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    write_rows(out, [{**r, "candidates_hash": old_hash([c for c in ROWS if c["id"] == r["id"]])}
                     for r in read_records(out)])
    capsys.readouterr()
    assert main(argv) == 0
    assert "problems: 5 (5 already in the output, 0 written now)" in capsys.readouterr().out
    write_rows(data, [{**r, "question": "What is 0 plus 1?"} if r["id"] == "q0" else r for r in ROWS])
    with pytest.raises(SystemExit):
        main(argv)
    assert "were selected: q0;" in capsys.readouterr().err


def test_ranks_with_another_id_field_merge_to_every_problem(tmp_path, as_ranks):
    rows = [{"pid": r["id"], **{k: v for k, v in r.items() if k != "id"}} for r in ROWS]
    data = write_rows(tmp_path / "c.jsonl", rows)
    argv = ["select", "--by", "random", "--id-field", "pid", "--data", str(data), "--no-progress", "--out"]
    assert main(argv + [str(tmp_path / "whole.jsonl")]) == 0
    assert as_ranks(lambda: main(argv + [str(tmp_path / "sel.jsonl")])) == [0, 0]
    assert main(["merge", str(tmp_path / "sel.jsonl")]) == 0
    merged = read_records(tmp_path / "sel.jsonl")
    assert sorted(r["pid"] for r in merged) == [f"q{i}" for i in range(5)]
    assert sorted(map(json.dumps, merged)) == sorted(map(json.dumps, read_records(tmp_path / "whole.jsonl")))


@pytest.mark.parametrize("own_id", ["gsm8k", {"source": "gsm8k"}])
def test_ranks_whose_rows_have_an_id_of_their_own_merge_by_the_id_field(tmp_path, as_ranks, capsys, own_id):
    """--id-field names the problem column and every row also has an "id" that names no problem (its source, as
    "gsm8k"): the kept rows keep that id as the input has it, and `rsd merge`, with --force or not, keeps the
    problems apart by the id the run read them by (not one record of "gsm8k" kept, the others refused or dropped;
    an "id" that is no string, not refused as a line that is no record)."""
    rows = [{**r, "id": own_id, "pid": r["id"]} for r in ROWS]
    data = write_rows(tmp_path / "c.jsonl", rows)
    argv = ["select", "--by", "random", "--id-field", "pid", "--data", str(data), "--no-progress", "--out"]
    assert main(argv + [str(tmp_path / "whole.jsonl")]) == 0
    whole = read_records(tmp_path / "whole.jsonl")
    assert sorted(r["pid"] for r in whole) == [f"q{i}" for i in range(5)] and all(r["id"] == own_id for r in whole)
    assert as_ranks(lambda: main(argv + [str(tmp_path / "sel.jsonl")])) == [0, 0]
    capsys.readouterr()
    for force in (["--force"], []):  # the parts alone, then the parts and the merged file
        assert main(["merge", *force, str(tmp_path / "sel.jsonl")]) == 0
        assert capsys.readouterr().out.strip() == f"merged 5 records into {tmp_path / 'sel.jsonl'}"
        merged = read_records(tmp_path / "sel.jsonl")
        assert sorted(map(json.dumps, merged)) == sorted(map(json.dumps, whole))
    assert as_ranks(lambda: main(argv + [str(tmp_path / "sel.jsonl")])) == [0, 0]  # resumed: nothing to do
    said = capsys.readouterr().out
    assert "problems: 3 (3 already in the output, 0 written now)" in said
    assert "problems: 2 (2 already in the output, 0 written now)" in said


def test_a_run_on_one_process_resumes_from_the_parts_ranks_left(tmp_path, as_ranks, capsys):
    """The rows of ranks' parts not merged yet are done: a run on one process writes none of them into OUT again."""
    data = write_rows(tmp_path / "c.jsonl", ROWS)
    argv = ["select", "--by", "random", "--data", str(data), "--no-progress", "--out", str(tmp_path / "sel.jsonl")]
    assert as_ranks(lambda: main(argv)) == [0, 0]
    capsys.readouterr()
    assert main(argv) == 0
    assert "problems: 5 (5 already in the output, 0 written now)" in capsys.readouterr().out
    assert read_records(tmp_path / "sel.jsonl") == []


def test_budget_scores_follow_the_text_not_the_row_place(tiny_pair, tmp_path):
    """A scores file from before the candidates were reordered (rows without "sample": their place is
    their sample) or edited: each kept row's score is its own text's, as a fresh run gives."""
    question = "What is 2 + 2?"
    short, long_ = "It is 4.", "Let me think step by step about the problem. We compute 2 + 2 = 4. The answer is 4."
    data, out = tmp_path / "c.jsonl", tmp_path / "sel.jsonl"
    argv = ["select", "--by", "student-likelihood", "--student", str(tiny_pair[1]), "--budget", "4", "--data",
            str(data), "--device", "cpu", "--no-progress", "--out"]
    write_rows(data, [{"id": "p1", "question": question, "response": t} for t in (short, long_)]
               + [{"id": "p2", "question": "What is 3 + 3?", "response": "It is 6."}])
    assert main(argv + [str(out)]) == 0
    assert all("response_hash" in s for s in read_records(scores_path(out)))
    changed = [{"id": "p1", "question": question, "response": t} for t in (long_, short)]  # reordered
    changed.append({"id": "p2", "question": "What is 3 + 3?", "response": "Three and three make six."})  # edited
    for stale in (out, tmp_path / "sel.jsonl.manifest.json"):  # as if killed after scoring, before writing
        stale.unlink()
    write_rows(data, changed)
    assert main(argv + [str(out)]) == 0
    assert main(argv + [str(tmp_path / "fresh.jsonl")]) == 0
    fields = ("id", "response", "tokens", "student_logprob")
    resumed, fresh = ([{k: r[k] for k in fields} for r in read_records(p)] for p in (out, tmp_path / "fresh.jsonl"))
    assert sorted(map(json.dumps, resumed)) == sorted(map(json.dumps, fresh))


def chat_row(pid, sample, question, system, response):
    return {"id": pid, "sample": sample, "messages": [{"role": "system", "content": system},
                                                      {"role": "user", "content": question},
                                                      {"role": "assistant", "content": response}]}


@pytest.mark.parametrize("edit", ["question", "system"])
def test_budget_scores_are_read_again_after_their_question_or_system_turn_changed(tiny_pair, tmp_path, capsys, edit):
    """A score is read after the candidate's question and system turn, but the scores file knew a score by the
    candidate's (id, sample, text hash): a run killed after scoring, resumed after the question (or a chat row's
    system turn) was edited in place, wrote the new question with the scores read after the old one, silently.
    The candidates whose question or system turn changed are scored again, and the report says why."""
    texts = ["It is 4.", "Let me think step by step. We compute 2 + 2 = 4. The answer is 4."]
    before = [chat_row("p1", k, "What is 2 + 2?", "Be brief.", t) for k, t in enumerate(texts)]
    before.append(chat_row("p2", 0, "What is 3 + 3?", "Be brief.", "It is 6."))
    after = [chat_row("p1", k, "What is 2 + 2? Explain." if edit == "question" else "What is 2 + 2?",
                      "Show your work." if edit == "system" else "Be brief.", t) for k, t in enumerate(texts)]
    after.append(before[2])
    data, out = write_rows(tmp_path / "c.jsonl", before), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "student-likelihood", "--student", str(tiny_pair[1]), "--budget", "3", "--data",
            str(data), "--device", "cpu", "--no-progress", "--out"]
    assert main(argv + [str(out)]) == 0
    old = {r["sample"]: r["student_logprob"] for r in read_records(out) if r["id"] == "p1"}
    for stale in (out, tmp_path / "sel.jsonl.manifest.json"):  # as if killed after scoring, before writing
        stale.unlink()
    write_rows(data, after)
    capsys.readouterr()
    assert main(argv + [str(out)]) == 0
    report = capsys.readouterr().out
    assert main(argv + [str(tmp_path / "fresh.jsonl")]) == 0
    resumed, fresh = read_records(out), read_records(tmp_path / "fresh.jsonl")
    assert [(r["id"], r["sample"], r["messages"]) for r in resumed] == [(r["id"], r["sample"], r["messages"])
                                                                      for r in fresh]
    assert [r["student_logprob"] for r in resumed] == pytest.approx([r["student_logprob"] for r in fresh], abs=1e-5)
    new = {r["sample"]: r["student_logprob"] for r in resumed if r["id"] == "p1"}
    assert all(abs(new[k] - old[k]) > 1e-3 for k in old)  # the old scores were another question's
    assert "candidates: 1 already in the scores file, 2 scored now" in report
    assert ("scored again: 2 whose question or system turn changed since they were scored (first: id p1 candidate 0)"
            in report)


def test_budget_rerun_names_kept_rows_whose_question_changed_since(tmp_path, capsys):
    """A finished budget run, rerun after a kept row's question was edited (its response left as it was), was
    refused as holding 'another selection ... the scores changed?': the scores had not changed, the question had.
    The refusal names the problems whose kept rows changed and how, --force or not (a selection is one ranking:
    rows of two would mix); the output is left as it was. A question edited outside the selection changes
    nothing: the rerun writes nothing."""
    data, out = write_rows(tmp_path / "c.jsonl", ROWS), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "random", "--budget", "4", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    selected = out.read_bytes()
    kept = {r["id"] for r in read_records(out)}
    first, outside = read_records(out)[0]["id"], next(r["id"] for r in ROWS if r["id"] not in kept)
    write_rows(data, [{**r, "question": "What is one more?"} if r["id"] == outside else r for r in ROWS])
    capsys.readouterr()
    assert main(argv) == 0
    assert "kept: 4 of 15 scored candidates (4 already in the output, 0 written now)" in capsys.readouterr().out
    assert out.read_bytes() == selected
    write_rows(data, [{**r, "question": "What is one more?"} if r["id"] in (outside, first) else r for r in ROWS])
    for force in ([], ["--force"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv + force)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "scores" not in err.split("error:")[1].split(";")[0]  # not blamed on the scores
        assert (f"{out} holds a selection made before --data changed: the kept rows of 1 problem changed since they "
                f"were selected: {first} (question or system turn edited)") in err
        assert (f"give another --out, or remove {out} (and {out.name}.manifest.json) to write the selection "
                "again") in err
        assert out.read_bytes() == selected


def test_budget_rerun_names_a_candidate_that_enters_the_selection(tmp_path, capsys):
    """A candidate added since (its score computed now) that ranks among the kept: named as the row it would be."""
    data, out = write_rows(tmp_path / "c.jsonl", ROWS), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "random", "--budget", "4", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    selected = out.read_bytes()
    best = read_records(out)[0]["random_key"]
    sample = next(s for s in range(3, 1000) if random_key(0, "q4", s) < best)
    write_rows(data, [*ROWS, {"id": "q4", "sample": sample, "question": "What is 4 + 1?", "response": "Five."}])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert (f"{out} holds a selection made before --data changed: its row 0 would now be id q4 candidate {sample}, "
            f"scored in this run (a candidate added, edited or regraded since") in err
    assert out.read_bytes() == selected


def test_budget_scores_an_older_rsd_wrote_are_scored_again(tmp_path, capsys):
    """Scores lines of an older rsd record the text they were read from, not its question or system turn: what
    they were read after cannot be told, so they are scored again (once), never trusted; the report says so."""
    data, out = write_rows(tmp_path / "c.jsonl", ROWS), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "random", "--budget", "4", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    kept = out.read_bytes()
    lines = read_records(scores_path(out))
    assert all("context_hash" in line for line in lines)
    write_rows(scores_path(out), [{k: v for k, v in line.items() if k != "context_hash"} for line in lines])
    out.unlink()
    capsys.readouterr()
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "candidates: 0 already in the scores file, 15 scored now" in report
    assert ("scored again: 15 whose scores an older rsd wrote, without the question and system turn they were read "
            "after (first: id q0 candidate 0)") in report
    assert out.read_bytes() == kept
    capsys.readouterr()
    assert main(argv) == 0  # resumed from the new lines
    assert "candidates: 15 already in the scores file, 0 scored now" in capsys.readouterr().out


def test_budget_scores_of_an_edited_question_merge_beside_the_old_ones(tmp_path, as_ranks):
    """Ranks resumed after a question was edited append the candidates' new scores beside their old lines; rsd
    merge keeps both (a reader matches the question), as it keeps an edited text's, and the selection written
    from the merged scores is the one a fresh run on the edited data makes."""
    data = write_rows(tmp_path / "c.jsonl", ROWS)
    argv = ["select", "--by", "random", "--budget", "7", "--data", str(data), "--no-progress", "--out"]
    assert as_ranks(lambda: main(argv + [str(tmp_path / "sel.jsonl")])) == [0, 0]
    assert main(["merge", str(scores_path(tmp_path / "sel.jsonl"))]) == 0
    write_rows(data, [{**r, "question": "What is one more?"} if r["id"] == "q2" else r for r in ROWS])
    assert as_ranks(lambda: main(argv + [str(tmp_path / "sel.jsonl")])) == [0, 0]
    assert main(["merge", str(scores_path(tmp_path / "sel.jsonl"))]) == 0
    merged = read_records(scores_path(tmp_path / "sel.jsonl"))
    assert len(merged) == len(ROWS) + 3 and len({r["context_hash"] for r in merged if r["id"] == "q2"}) == 2
    assert main(argv + [str(tmp_path / "sel.jsonl")]) == 0
    assert main(argv + [str(tmp_path / "fresh.jsonl")]) == 0
    assert read_records(tmp_path / "sel.jsonl") == read_records(tmp_path / "fresh.jsonl")


def test_max_seq_len_is_a_setting_of_the_selection(tiny_pair, tmp_path, capsys):
    rows = [{"id": "a", "sample": 0, "question": "What is 2 + 2?", "response": "It is 4. I think it is 4."},
            {"id": "a", "sample": 1, "question": "What is 2 + 2?", "response": "The answer is 4. " * 4}]
    data, out = write_rows(tmp_path / "c.jsonl", rows), tmp_path / "sel.jsonl"
    argv = ["select", "--by", "student-likelihood", "--student", str(tiny_pair[1]), "--data", str(data), "--out",
            str(out), "--device", "cpu", "--no-progress"]
    assert main(argv + ["--max-seq-len", "80"]) == 3  # the longer candidate skipped, the other kept
    kept = out.read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)  # another --max-seq-len: other competitors, maybe another row kept
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "holds records made with other settings" in err and "--max-seq-len" in err
    assert out.read_text() == kept
