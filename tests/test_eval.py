"""`rsd eval`: exact accuracy on constructed cases (a model that learned its answers, and generation
replaced by fixed responses), the bootstrap interval, resume, shards, and bad input."""
import json
import os
import re

import numpy as np
import pytest

from rsd_engine.cli import main
from rsd_engine.pipeline import evaluate
from rsd_engine.pipeline.evaluate import accuracy_summary
from rsd_engine.pipeline.records import part_path, read_records
from rsd_engine.results import GenerationResult
from solver_pair import PROBLEMS, SYSTEM, solver_pair, write_problems

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return solver_pair(tmp_path_factory.getbasetemp() / "solver_pair")


def run_eval(model, data, out, *extra, status=0):
    argv = ["eval", "--model", str(model), "--data", str(data), "--out", str(out), "--id-field", "id",
            "--system-prompt", SYSTEM, "--max-new-tokens", "40", "--device", "cpu", "--no-progress", *extra]
    assert main(argv) == status
    return read_records(out)


def test_learned_answers_give_exact_accuracy(pair, tmp_path, capsys):
    """The student answers add right (4), mul wrong (8, not 9), unclosed without closing its reasoning
    (no answer); open has no reference and is not graded: accuracy exactly 1/3 whatever the seed."""
    records = run_eval(pair[1], write_problems(tmp_path / "p.jsonl"), tmp_path / "gens.jsonl", "--samples", "3")
    report = capsys.readouterr().out
    completions = {p["id"]: p["completion"] for p in PROBLEMS}
    assert sorted((r["id"], r["sample"]) for r in records) == [(i, s) for i in ("add", "mul", "unclosed")
                                                                for s in range(3)]
    for r in records:
        assert r["response"] == completions[r["id"]]
        assert r["correct"] == (r["id"] == "add")
    assert "skipped problems without a reference answer: 1 (open)" in report  # named: it was a count alone
    assert "accuracy: 33.33%  (95% bootstrap interval over problems: 0.00% to 100.00%; 3 problems x 3 samples" in report


ROWS = [{"id": "a", "question": "1+3?", "answer": "4"}, {"id": "b", "question": "2*3?", "answer": "6"},
        {"id": "c", "question": "x?", "answer": "\\frac{1}{2}"}]
ANSWERS = {("a", 0): "4", ("a", 1): "5", ("b", 0): "6", ("b", 1): "3 + 3", ("c", 0): "0.5", ("c", 1): "2"}
CORRECT = {("a", 0): True, ("a", 1): False, ("b", 0): True, ("b", 1): True, ("c", 0): True, ("c", 1): False}


@pytest.fixture
def forced(monkeypatch, pair):
    """Generation forced to ANSWERS: (id, sample) -> the boxed answer, after a closed reasoning block."""
    seen = []

    def generate_samples(opts, prompts, params, device, max_seq_len):
        seen.append(len(prompts))
        for index, p in enumerate(params):
            key = next(k for k in ANSWERS if evaluate.attempt_seed(opts.seed, *k) == p.seed)
            yield index, GenerationResult(prompts[index], token_ids=[1, 2],
                                          text=f"Work.</think>\nSo \\boxed{{{ANSWERS[key]}}}.", finish_reason="eos",
                                          seed=p.seed)

    monkeypatch.setattr(evaluate, "generate_samples", generate_samples)
    return seen


def test_forced_answers_give_exact_accuracy(pair, forced, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    records = run_eval(pair[1], data, tmp_path / "gens.jsonl", "--samples", "2")
    assert {(r["id"], r["sample"]): r["correct"] for r in records} == CORRECT
    summary = accuracy_summary(records)
    assert summary["accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # The interval, independently: problem means resampled as the docstring says.
    means = np.array([0.5, 1.0, 0.5])
    boot = means[np.random.default_rng(0).integers(0, 3, size=(10_000, 3))].mean(axis=1)
    assert summary["interval"] == pytest.approx(list(np.percentile(boot, [2.5, 97.5])))
    assert "accuracy: 66.67%" in capsys.readouterr().out


def test_failed_and_cut_short_generations_exit_3_and_say_so_last(pair, forced, tmp_path, capsys, monkeypatch):
    """Generations that failed or were cut short by --max-seq-len are written, and the exit status is 3."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    forced_samples = evaluate.generate_samples

    def spoiled(opts, prompts, params, device, max_seq_len):
        for index, result in forced_samples(opts, prompts, params, device, max_seq_len):
            if index == 0:
                result.finish_reason, result.error = "error", "the model produced NaN or +inf logits"
            elif index == 1:
                result.finish_reason = "length"  # 2 tokens < --max-new-tokens: the cache limit stopped it
            yield index, result

    monkeypatch.setattr(evaluate, "generate_samples", spoiled)
    records = run_eval(pair[1], data, tmp_path / "gens.jsonl", "--samples", "2", status=3)
    assert len(records) == 6 and sum("error" in r for r in records) == 1
    report = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"rsd eval: 1 of 6 generations failed \(error\); 1 of 6 generations were cut short by "
                        r"--max-seq-len's default \(\d+ positions, sized by the longest prompt and --max-new-tokens\): "
                        r"exit status 3", report[-1])  # (no --max-seq-len given: its default, named with its value)
    assert "failed (error, written with it): 1 generations" in report


def test_no_problem_or_every_one_solved_has_the_exact_binomial_interval():
    """Every bootstrap resample of all-right (or all-wrong) problems is that value: a zero-width interval whatever
    the number of problems. The exact binomial bound over problems is given there instead: (alpha/2)^(1/n)."""
    right = [{"id": i, "sample": s, "correct": True} for i in "abc" for s in range(4)]
    summary = accuracy_summary(right)
    assert summary["interval"] == pytest.approx([0.025 ** (1 / 3), 1.0])
    assert summary["interval_method"] == "exact binomial"
    wrong = [{"id": str(i), "sample": 0, "correct": False} for i in range(8)]
    summary = accuracy_summary(wrong)
    assert summary["interval"] == pytest.approx([0.0, 1 - 0.025 ** (1 / 8)])
    assert "(no problem solved: 95% exact binomial interval over problems 0.00% to 36.94%; 8 problems x 1 samples" in (
        evaluate.format_accuracy(summary, "gens.jsonl"))
    mixed = right + [{"id": "d", "sample": 0, "correct": False}]
    summary = accuracy_summary(mixed)
    low, high = summary["interval"]
    assert 0.0 <= low < summary["accuracy"] < high <= 1.0 and summary["interval_method"] == "percentile bootstrap"


def test_resume_adds_only_missing_samples(pair, forced, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "gens.jsonl"
    run_eval(pair[1], data, out, "--samples", "1")
    records = run_eval(pair[1], data, out, "--samples", "2")
    assert forced == [3, 3]  # the second run generated only sample 1 of each problem
    assert len(records) == 6 and "3 samples already in the output, 3 written now" in capsys.readouterr().out


def test_samples_written_after_another_prompt_are_refused(pair, forced, tmp_path, capsys):
    """Each record keeps the prompt it was written after; a rerun that would add samples of a problem whose records
    hold another prompt than it builds (another template's rules, an earlier rsd's) is refused: eval's records held
    no prompt, so such an output was extended silently, its accuracy over two prompts."""
    from rsd_engine.pipeline.prompts import build_prompt
    from rsd_engine.tokens import load_tokenizer

    data, out = tmp_path / "p.jsonl", tmp_path / "gens.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    records = run_eval(pair[1], data, out, "--samples", "1")
    tokenizer = load_tokenizer(pair[1])
    assert [r["prompt"] for r in records] == [build_prompt(tokenizer, r["question"], SYSTEM).text for r in records]
    changed = next(r for r in records if r["id"] == "b")
    built = changed["prompt"]
    changed["prompt"] = built.removesuffix("<think>\n")  # as a rule that opened no block wrote it
    assert changed["prompt"] != built
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(pair[1]), "--data", str(data), "--out", str(out), "--id-field", "id",
              "--system-prompt", SYSTEM, "--max-new-tokens", "40", "--device", "cpu", "--no-progress",
              "--samples", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{out}: the samples of 1 problems were written after another prompt" in err
    assert "(b)" in err and len(read_records(out)) == 3 and forced == [3]
    assert len(run_eval(pair[1], data, out, "--samples", "2", "--force")) == 6
    assert "kept under --force: the samples of 1 problems written after another prompt (b)" in capsys.readouterr().out
    assert len(run_eval(pair[1], data, out, "--samples", "2")) == 6  # nothing left to sample: nothing to mix
    resumed = tmp_path / "resumed.jsonl"  # records written after the prompt built now resume
    run_eval(pair[1], data, resumed, "--samples", "1")
    assert len(run_eval(pair[1], data, resumed, "--samples", "2")) == 6


def test_a_rerun_with_nothing_to_sample_still_names_unreadable_references(pair, forced, tmp_path, capsys):
    """A reference math-verify does not read whole (2^floor(n/2): no answer to it is judged correct) was named only
    while its problem had samples to make: a rerun printed the same accuracy, that problem's zeros included, without
    the warning."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2] + [{**ROWS[2], "answer": "2^floor(n/2)"}]))
    out = tmp_path / "gens.jsonl"
    warning = "no attempt at them is judged correct: c"
    run_eval(pair[1], data, out, "--samples", "2")
    assert warning in capsys.readouterr().out
    run_eval(pair[1], data, out, "--samples", "2")
    report = capsys.readouterr().out
    assert forced == [6] and "6 samples already in the output, 0 written now" in report and warning in report


def test_other_records_of_one_sample_are_named_not_graded(pair, forced, tmp_path, capsys):
    """Two different records of one (id, sample) (files joined by hand) were read as one, the first, silently; the
    summary names the others. An exact copy is no other record (rsd merge leaves the parts it joined)."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "gens.jsonl"
    records = run_eval(pair[1], data, out, "--samples", "2")
    other = {**records[0], "response": "Other.", "correct": not records[0]["correct"]}
    with open(out, "a") as f:
        f.write(json.dumps(records[1]) + "\n" + json.dumps(other) + "\n")
    capsys.readouterr()
    run_eval(pair[1], data, out, "--samples", "2")
    report = capsys.readouterr().out
    assert "accuracy: 66.67%" in report
    assert "; 1 other records of an (id, sample) already read not graded (its first record counts)" in report


def test_records_under_an_earlier_float_spelling_of_an_id_resume_as_its_problem(tiny_pair, tmp_path, capsys,
                                                                              monkeypatch):
    """A table's integer id column with a missing value is read as floats, which an earlier version wrote as '1.0':
    once the column is filled (ids 1, 2) those records are problems 1 and 2's samples, not other problems whose
    samples were all generated again and graded apart; their new samples are written under the id the file already
    gives them (rsd select and rsd provenance group a problem's samples by it)."""
    def generate_samples(opts, prompts, params, device, max_seq_len):
        for index, p in enumerate(params):
            yield index, GenerationResult(prompts[index], token_ids=[1, 2], text="Work.</think>\nSo \\boxed{4}.",
                                          finish_reason="eos", seed=p.seed)

    monkeypatch.setattr(evaluate, "generate_samples", generate_samples)
    rows = [{"question": "1+3?", "answer": "4"}, {"question": "2*3?", "answer": "6"}]
    data, out = tmp_path / "p.jsonl", tmp_path / "gens.jsonl"
    data.write_text("".join(json.dumps({"id": f"{i}.0", **r}) + "\n" for i, r in enumerate(rows, 1)))
    run_eval(tiny_pair[1], data, out, "--samples", "1")  # the records an earlier version wrote from 1.0 and 2.0
    data.write_text("".join(json.dumps({"id": i, **r}) + "\n" for i, r in enumerate(rows, 1)))  # the gap filled
    capsys.readouterr()
    records = run_eval(tiny_pair[1], data, out, "--samples", "2")
    report = capsys.readouterr().out
    assert sorted((r["id"], r["sample"]) for r in records) == [("1.0", 0), ("1.0", 1), ("2.0", 0), ("2.0", 1)]
    assert "2 samples already in the output, 2 written now" in report
    assert "accuracy: 50.00%" in report and "2 problems x 2 samples" in report and "other problems" not in report


def test_accuracy_is_of_the_problems_and_samples_this_run_asks_for(pair, forced, tmp_path, capsys):
    """A rerun with --limit or fewer --samples on an output that holds more grades what it asks for (it graded the
    whole file: problems past --limit, samples past --samples) and counts the rest apart."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "gens.jsonl"
    run_eval(pair[1], data, out, "--samples", "2")
    capsys.readouterr()
    run_eval(pair[1], data, out, "--samples", "2", "--limit", "1")
    report = capsys.readouterr().out
    assert "accuracy: 50.00%" in report and "1 problems x 2 samples" in report  # a: right, then wrong
    assert "4 generations of other problems or samples than this run's" in report
    run_eval(pair[1], data, out, "--samples", "1")
    report = capsys.readouterr().out
    assert "accuracy: 100.00%" in report and "3 problems x 1 samples" in report  # every sample 0 is right
    assert "3 generations of other problems or samples" in report
    run_eval(pair[1], data, out, "--samples", "2")
    assert "accuracy: 66.67%" in (report := capsys.readouterr().out) and "other problems" not in report


def test_ranks_write_parts_that_merge(pair, forced, tmp_path, as_ranks):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "gens.jsonl"
    assert as_ranks(lambda: main(["eval", "--model", str(pair[1]), "--data", str(data), "--out", str(out),
                                  "--id-field", "id", "--samples", "2", "--no-progress"])) == [0, 0]
    assert main(["merge", str(out)]) == 0
    records = read_records(out)
    assert [(r["id"], r["sample"]) for r in records] == sorted(CORRECT)
    assert accuracy_summary(records)["accuracy"] == pytest.approx(2 / 3)


def test_a_rank_stopped_before_its_first_sample_leaves_a_part_that_merges(pair, tmp_path, as_ranks, monkeypatch,
                                                                           capsys):
    """Ctrl-C on a rank before its first record removed its (empty) part: rsd merge joins only whole sets, so the
    other rank's part could never be merged again, --force or not. A rank stopped after its first record says its
    records stay (it said "nothing was written": it looked for OUT, not its part)."""
    data, out = tmp_path / "p.jsonl", tmp_path / "gens.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    stop_after = {"0": 1, "1": 0}  # rank 0 writes one sample, rank 1 none

    def generate_samples(opts, prompts, params, device, max_seq_len):
        for index in range(stop_after[os.environ["RANK"]]):
            yield index, GenerationResult(prompts[index], token_ids=[1], text="\\boxed{4}", finish_reason="eos",
                                          seed=params[index].seed)
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "generate_samples", generate_samples)

    def rank():
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--model", str(pair[1]), "--data", str(data), "--out", str(out), "--id-field", "id",
                  "--samples", "2", "--no-progress"])
        return exit_info.value.code, capsys.readouterr().err

    (code0, err0), (code1, err1) = as_ranks(rank)
    assert code0 == code1 == 130
    assert f"what it wrote stays in {out}" in err0 and "nothing was written" in err1
    assert part_path(out, 1, 2).exists() and read_records(part_path(out, 1, 2)) == []
    assert main(["merge", str(out)]) == 3  # merged; rank 1's run stopped before its end: said, exit 3
    assert len(read_records(out)) == 1


def test_one_process_after_unmerged_parts_grades_them_too(pair, forced, tmp_path, as_ranks, capsys):
    """The parts' generations are done (not generated again): the accuracy is over them too, not over OUT's
    records only (here none)."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "gens.jsonl"
    as_ranks(lambda: run_eval(pair[1], data, out, "--samples", "2"))
    capsys.readouterr()
    assert run_eval(pair[1], data, out, "--samples", "2") == []
    said = capsys.readouterr().out
    assert "6 samples already in the output, 0 written now" in said and "rsd merge" in said
    assert "accuracy: 66.67%" in said and "and its part files" in said
    assert main(["merge", str(out)]) == 0
    capsys.readouterr()
    run_eval(pair[1], data, out, "--samples", "2")
    said = capsys.readouterr().out  # merged: the parts stay beside OUT, but nothing is left to merge
    assert "accuracy: 66.67%" in said and "rsd merge" not in said and "part files" not in said


def test_output_named_as_the_data_or_of_another_command_is_refused_as_such(pair, forced, tmp_path, capsys):
    """--out naming the --data file (it appended its records to the problems, --force or not), or holding
    another command's records (eval named the settings of rsd generate's manifest 'not set' and asked for a rerun
    with the same settings), is refused saying so; the file is left as it was. A progress bar is drawn on a
    terminal only (stderr here is none)."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    before = data.read_bytes()
    for extra in ([], ["--force"]):
        with pytest.raises(SystemExit) as exit_info:
            run_eval(pair[1], data, data, *extra)
        assert exit_info.value.code == 2
        assert f"--out {data} is also --data: the output would be written into the file it reads" in (
            capsys.readouterr().err)
    assert data.read_bytes() == before
    out = tmp_path / "gens.jsonl"
    assert main(["eval", "--model", str(pair[1]), "--data", str(data), "--out", str(out), "--id-field", "id",
                 "--system-prompt", SYSTEM, "--max-new-tokens", "40", "--device", "cpu"]) == 0
    assert "%|" not in capsys.readouterr().err  # tqdm's bar
    other = tmp_path / "gens2.jsonl"
    run_eval(pair[1], data, other)
    held = other.read_bytes()
    argv = ["select", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(out), "--out", str(other),
            "--system-prompt", SYSTEM, "--device", "cpu", "--no-progress"]
    for extra in ([], ["--force"]):  # never forced: a file of both is neither command's output
        with pytest.raises(SystemExit):
            main(argv + extra)
        assert "gens2.jsonl holds records of rsd eval, not of rsd select (its manifest, gens2.jsonl.manifest.json, " \
               "says so): give another --out" in capsys.readouterr().err
        assert other.read_bytes() == held


def test_generations_feed_provenance(pair, tmp_path):
    gens = run_eval(pair[1], write_problems(tmp_path / "p.jsonl"), tmp_path / "gens.jsonl", "--samples", "2")
    argv = ["provenance", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(tmp_path / "gens.jsonl"),
            "--out", str(tmp_path / "s.jsonl"), "--system-prompt", SYSTEM, "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    lines = read_records(tmp_path / "s.jsonl")
    assert {(s["id"], s["sample"]) for s in lines} == {(r["id"], r["sample"]) for r in gens}


def test_bad_input(pair, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"id": "x", "question": "Q?", "answer": None}) + "\n")  # a column, never filled
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(pair[1]), "--data", str(data), "--out", str(tmp_path / "g.jsonl")])
    assert exit_info.value.code == 2
    assert "none of the 1 problems has a reference answer (field 'answer')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(pair[1]), "--data", str(data), "--out", str(tmp_path / "g.jsonl"),
              "--samples", "0"])
    assert "--samples: must be an integer in [1, 10000], got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(pair[1]), "--data", str(data), "--out", str(tmp_path / "g.jsonl"),
              "--top-p", "1.5"])
    assert "--top-p" in capsys.readouterr().err


def test_a_run_that_fails_before_its_first_generation_leaves_no_output(pair, tmp_path, capsys):
    """A --max-seq-len no KV cache can hold failed once OUT was open, and left it empty beside its manifest."""
    data, out = write_problems(tmp_path / "p.jsonl"), tmp_path / "gens.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        run_eval(pair[1], data, out, "--max-seq-len", str(2**31 - 1), "--max-batch-size", str(2**31 - 1))
    assert exit_info.value.code == 2 and "out of memory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_rerun_with_other_sampling_is_refused(pair, forced, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run_eval(pair[1], data, tmp_path / "gens.jsonl", "--samples", "1")
    with pytest.raises(SystemExit):
        run_eval(pair[1], data, tmp_path / "gens.jsonl", "--samples", "2", "--temperature", "1.0")
    err = capsys.readouterr().err
    assert "holds records made with other settings" in err and "--temperature" in err


@pytest.fixture
def nan_model(pair, tmp_path):
    """A copy of the student whose final norm is NaN: every generation fails (finish_reason "error")."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(pair[1], tmp_path / "nan_model")
    state = load_file(folder / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"] * float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_failed_generations_are_counted_apart_never_graded(nan_model, tmp_path, capsys):
    """Generations that failed have no answer to grade: they are not wrong answers, they are counted (and a
    rerun that generates nothing still says so, with exit status 3)."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "gens.jsonl"
    records = run_eval(nan_model, data, out, "--samples", "2", "--max-new-tokens", "4", status=3)
    assert len(records) == 6 and all(r["finish_reason"] == "error" for r in records)
    summary = accuracy_summary(records)
    assert summary["accuracy"] is None and summary["problems_graded"] == 0 and summary["failed_in_output"] == 6
    report = capsys.readouterr().out.splitlines()
    assert report[-2] == f"no graded generations in {out}; 6 failed generations (finish_reason 'error') not graded"
    assert report[-1] == "rsd eval: 6 of 6 generations failed (error): exit status 3"
    assert run_eval(nan_model, data, out, "--samples", "2", "--max-new-tokens", "4", status=3) == records
    report = capsys.readouterr().out
    assert "6 samples already in the output, 0 written now" in report
    assert report.splitlines()[-1] == "rsd eval: 6 of 6 generations failed (error): exit status 3"


def test_the_interval_does_not_depend_on_the_order_of_the_lines():
    """One process writes records as generations finish, merged ranks in id order, a resume appends: the same
    records in any order give the same interval (problems are resampled in id order)."""
    import random

    records = [{"id": f"p{i:02d}", "sample": 0, "correct": (i * 2 + i // 3) % 2 == 0} for i in range(13)]
    summaries = [accuracy_summary(records), accuracy_summary(records[::-1])]  # (moved a bound a step before)
    for seed in range(4):
        shuffled = records[:]
        random.Random(seed).shuffle(shuffled)
        summaries.append(accuracy_summary(shuffled))
    assert all(s == summaries[0] for s in summaries)


@pytest.mark.parametrize("n", [13, 1000])
def test_the_interval_is_a_percentile_bootstrap_of_10000_resamples_over_problems(n):
    """The module's rule, computed here independently: problem means (in id order) resampled with replacement
    10,000 times from one seeded stream (numpy's default_rng(0), as test_forced_answers_give_exact_accuracy), the
    2.5th and 97.5th percentiles of the resampled accuracies. Many problems with varied means, so that fewer
    resamples, or more (1,000 problems: the resamples are drawn in chunks), move the bounds."""
    records = [{"id": f"p{i:04d}", "sample": s, "correct": s < (i * 7) % 5} for i in range(n) for s in range(4)]
    means = np.array([min((i * 7) % 5, 4) / 4 for i in range(n)])  # ids p0000.. sort as their numbers
    boot = means[np.random.default_rng(0).integers(0, n, size=(10_000, n))].mean(axis=1)
    summary = accuracy_summary(records)
    assert summary["accuracy"] == pytest.approx(means.mean())
    assert summary["interval"] == pytest.approx(list(np.percentile(boot, [2.5, 97.5])), abs=1e-12)
    assert summary["interval_method"] == "percentile bootstrap"


def test_problems_all_half_solved_keep_the_bootstrap_not_the_all_or_none_bound():
    """The exact binomial bound is for no problem solved or every one (module docstring); problems that each solve
    half their samples are neither: their (zero-width) bootstrap interval stays, and the line says no "solved"."""
    records = [{"id": i, "sample": s, "correct": s == 0} for i in "abcd" for s in range(2)]
    summary = accuracy_summary(records)
    assert summary["accuracy"] == 0.5 and summary["interval_method"] == "percentile bootstrap"
    assert summary["interval"] == pytest.approx([0.5, 0.5])
    line = evaluate.format_accuracy(summary, "g.jsonl")
    assert "95% bootstrap interval over problems: 50.00% to 50.00%" in line and "solved" not in line


def test_lines_that_are_no_eval_record_are_not_graded_and_said():
    """Another tool's lines, appended under --force: counted apart, not graded as wrong answers of made-up
    problems, and no KeyError after the run for a line without an id."""
    records = [{"id": "a", "sample": 0, "correct": True}, {"id": "b", "sample": 0, "correct": False},
               {"id": "x", "text": "from another tool"}, {"note": "no id"},
               {"id": "y", "sample": True, "correct": True}, {"id": "z", "sample": 0, "correct": "yes"}]
    summary = accuracy_summary(records)
    assert (summary["accuracy"], summary["problems_graded"], summary["not_eval_records"]) == (0.5, 2, 4)
    assert "4 lines that are no eval record (no id, integer sample and true/false correct) not graded" in (
        evaluate.format_accuracy(summary, "gens.jsonl"))


def test_lines_of_another_tool_in_the_output_are_counted_apart_by_rsd_eval(pair, forced, tmp_path, capsys):
    """In the run itself, not only in accuracy_summary: each such line counted once, and one that carries a problem's
    id and sample (but no true/false correct) neither replaces that problem's record nor marks its sample done."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "gens.jsonl"
    run_eval(pair[1], data, out, "--samples", "1")
    first = capsys.readouterr().out
    with out.open("a") as f:
        for line in ({"note": "from another tool"}, {"note": "and another"}, {"id": "a", "sample": 0, "score": 0.3}):
            f.write(json.dumps(line) + "\n")
    run_eval(pair[1], data, out, "--samples", "1", "--force")
    said = capsys.readouterr().out
    graded = re.search(r"accuracy: \S+  \([^;]*95% \D+ interval over problems:? \S+ to \S+; 3 problems x 1 samples",
                       first)
    assert graded and graded.group(0) in said and forced == [3]  # nothing generated again
    assert "3 lines that are no eval record (no id, integer sample and true/false correct) not graded" in said


def test_one_problem_has_no_interval_over_problems():
    summary = accuracy_summary([{"id": "a", "sample": s, "correct": s < 3} for s in range(8)])
    assert summary["accuracy"] == 3 / 8 and summary["interval"] is None
    assert evaluate.format_accuracy(summary, "g.jsonl").startswith(
        "accuracy: 37.50%  (one problem: no interval over problems; 1 problems x 8 samples")


def test_accuracy_summary_leaves_failed_generations_out_and_counts_cut_short():
    records = [{"id": "a", "sample": 0, "correct": True, "finish_reason": "eos", "tokens": 5},
               {"id": "a", "sample": 1, "correct": False, "finish_reason": "error", "tokens": 1},
               {"id": "b", "sample": 0, "correct": False, "finish_reason": "length", "tokens": 3},
               {"id": "b", "sample": 1, "correct": True, "finish_reason": "length", "tokens": 8},
               {"id": "c", "sample": 0, "correct": False, "finish_reason": "error", "tokens": 0}]
    summary = accuracy_summary(records, max_new_tokens=8)
    assert summary["accuracy"] == pytest.approx((1.0 + 0.5) / 2)  # a: 1 of 1 graded; b: 1 of 2; c: none graded
    assert (summary["problems_graded"], summary["samples"], summary["samples_per_problem"]) == (2, 3, [1, 2])
    assert (summary["failed_in_output"], summary["cut_short_in_output"]) == (2, 1)  # b/0: 3 of 8 tokens
    line = evaluate.format_accuracy(summary, "gens.jsonl")
    assert line.endswith("gens.jsonl; 2 failed generations (finish_reason 'error') not graded; 1 cut short by "
                         "--max-seq-len, graded as they stopped; 1 of 3 graded generations stopped at "
                         "--max-new-tokens, graded as they stopped)")  # b/1: 8 of 8
    assert accuracy_summary(records)["cut_short_in_output"] == 0  # without max_new_tokens nothing is known


def test_rerun_with_another_max_seq_len_is_refused(pair, forced, tmp_path, capsys):
    """--max-seq-len cuts generations short: records made under another value are not mixed in."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run_eval(pair[1], data, tmp_path / "gens.jsonl", "--samples", "1", "--max-seq-len", "200")
    with pytest.raises(SystemExit) as exit_info:
        run_eval(pair[1], data, tmp_path / "gens.jsonl", "--samples", "2", "--max-seq-len", "300")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "holds records made with other settings" in err and "--max-seq-len" in err
    assert forced == [3]  # the refused run generated nothing


def test_distributed_rerun_against_a_merged_output_checks_its_settings(pair, forced, tmp_path, as_ranks, capsys):
    """Ranks of a rerun read the merged output of an earlier run: other settings are refused there too,
    not taken as 'every sample already done'."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "gens.jsonl"
    argv = ["eval", "--model", str(pair[1]), "--data", str(data), "--out", str(out), "--id-field", "id",
            "--samples", "2", "--no-progress"]
    assert as_ranks(lambda: main(argv)) == [0, 0]
    assert main(["merge", str(out)]) == 0
    for part in tmp_path.glob("gens.rank*"):
        part.unlink()
    capsys.readouterr()

    def refused():
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--temperature", "0.2"])
        return exit_info.value.code, capsys.readouterr().err

    for code, err in as_ranks(refused):
        assert code == 2 and "holds records made with other settings" in err and "--temperature" in err
    assert not list(tmp_path.glob("gens.rank*"))  # no part was started under the other settings


def test_rows_with_lone_surrogates_are_skipped(pair, forced, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    bad = {"id": "s", "question": "What is \ud800 2+2?", "answer": "4"}  # json.dumps writes the escape \ud800
    data.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS, bad]))
    records = run_eval(pair[1], data, tmp_path / "gens.jsonl", "--samples", "2")
    assert {(r["id"], r["sample"]): r["correct"] for r in records} == CORRECT
    report = capsys.readouterr().out
    assert "skipped rows: 1 of 4 (row 3: 'question' is not valid Unicode: '\\ud800' at character 8 is a lone " \
           "surrogate)" in report


def test_answer_field_empty_says_reference_answers_are_needed(pair, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for field, message in [("", "none of the 3 problems has a reference answer (field ''); rsd eval needs answers"),
                           ("solution", "--answer-field 'solution' is not a column; columns are id, question, answer; "
                                        "name the column of reference answers, which rsd eval grades against")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--model", str(pair[1]), "--data", str(data), "--out", str(tmp_path / "g.jsonl"),
                  "--answer-field", field])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err
        assert "--answer-field '' for problems without reference answers" not in err


def test_rerun_resumes_whatever_names_the_output_and_runs_it(pair, forced, tmp_path, capsys, monkeypatch):
    """--out spelled another way, another batch size or sampler backend: the same records, so the rerun resumes;
    an output whose manifest an older rsd wrote (--out compared, --max-seq-len kept under "about") too."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "gens.jsonl"
    run_eval(pair[1], data, out, "--samples", "1")
    monkeypatch.chdir(tmp_path)
    for extra in (("--max-batch-size", "4"), ("--sampler", "reference"), ()):
        records = run_eval(pair[1], data, "./gens.jsonl", "--samples", "2", *extra)
        assert sorted((r["id"], r["sample"]) for r in records) == sorted(CORRECT)
    manifest = json.loads((tmp_path / "gens.jsonl.manifest.json").read_text())
    settings = manifest["settings"]
    assert not {"--out", "--max-batch-size", "--sampler"} & set(settings) and "--max-seq-len" in settings
    manifest["settings"] = {**{k: v for k, v in settings.items() if k != "--max-seq-len"}, "--out": "elsewhere.jsonl"}
    manifest["about"]["--max-seq-len"] = settings["--max-seq-len"]
    (tmp_path / "gens.jsonl.manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    run_eval(pair[1], data, out, "--samples", "2")
    assert "6 samples already in the output, 0 written now" in capsys.readouterr().out


def test_generations_stopped_at_max_new_tokens_are_graded_and_named(pair, forced, tmp_path, capsys, monkeypatch):
    """Generations --max-new-tokens stopped (mostly without an answer) were graded wrong and never mentioned: a budget
    too small for the model's reasoning read as a weak model. They are graded as they stopped, and counted."""
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    forced_samples = evaluate.generate_samples

    def at_limit(opts, prompts, params, device, max_seq_len):
        for index, result in forced_samples(opts, prompts, params, device, max_seq_len):
            if index < 2:
                result.finish_reason, result.token_ids = "length", list(range(opts.params.max_new_tokens))
            yield index, result

    monkeypatch.setattr(evaluate, "generate_samples", at_limit)
    records = run_eval(pair[1], data, tmp_path / "gens.jsonl", "--samples", "2")
    assert accuracy_summary(records, 40)["at_max_new_tokens_in_output"] == 2
    assert "2 of 6 graded generations stopped at --max-new-tokens, graded as they stopped" in capsys.readouterr().out


def test_an_answer_math_verify_cannot_compare_in_time_is_marked_and_counted(pair, forced, tmp_path, capsys,
                                                                           monkeypatch):
    """A comparison that ran out of time (5 s: a tower of powers) was a wrong answer like any other, with the warning
    hidden: it is graded wrong, marked, and counted in the summary."""
    import math_verify.errors

    from rsd_engine.pipeline import answers

    real = answers._math_verify

    class SlowVerify:
        errors = math_verify.errors
        parse = staticmethod(real().parse)

        @staticmethod
        def verify(gold, answer, **kwargs):
            raise math_verify.errors.TimeoutException("Timeout during comparison")

    monkeypatch.setattr(answers, "_math_verify", lambda: SlowVerify)
    monkeypatch.setattr(answers, "_verbatim", lambda text: object())  # no answer taken as the reference's own text
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    records = run_eval(pair[1], data, tmp_path / "gens.jsonl", "--samples", "2")
    assert all(r["correct"] is False and r["grading"] == "timed out" for r in records)
    assert 'answers math-verify could not compare in time ("grading": "timed out"), graded wrong' in \
        capsys.readouterr().out
    assert answers.check_answer("4", "4") is None and answers.is_correct("4", "4") is False


def test_the_sampling_options_reach_every_sample(pair, forced, tmp_path, monkeypatch):
    """--temperature, --top-p, --top-k and --max-new-tokens are the law of every sample (the model's alone: no
    teacher, so no RSD check), each sample seeded by (--seed, problem, sample); the learned answers come out
    whatever the law, so only the parameters the generator is handed can show a dropped option."""
    handed = []
    forced_samples = evaluate.generate_samples

    def generate_samples(opts, prompts, params, device, max_seq_len):
        handed.extend(params)
        yield from forced_samples(opts, prompts, params, device, max_seq_len)

    monkeypatch.setattr(evaluate, "generate_samples", generate_samples)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run_eval(pair[1], data, tmp_path / "gens.jsonl", "--samples", "2", "--temperature", "0.3", "--top-p", "0.8",
             "--top-k", "5", "--seed", "11")
    assert len(handed) == 6
    assert {(p.temperature, p.top_p, p.top_k, p.max_new_tokens) for p in handed} == {(0.3, 0.8, 5, 40)}
    assert sorted(p.seed for p in handed) == sorted(evaluate.attempt_seed(11, i, s) for i in "abc" for s in (0, 1))
