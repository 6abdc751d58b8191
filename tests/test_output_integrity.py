"""A rerun must never silently make a wrong dataset: ids that survive reordering, one writer per
output, settings checked against the manifest, duplicates reported, and problems that were cut
short or failed redone instead of counted as finished."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rsd_engine.cli import main
from rsd_engine.pipeline.manifest import manifest_path, model_fingerprint, read_manifest
from rsd_engine.pipeline.prompts import build_prompt
from rsd_engine.pipeline.records import OutputBusy, RecordWriter, read_records
from rsd_engine.pipeline.score import read_traces
from rsd_engine.results import GenerationResult
from solver_pair import PROBLEMS, SYSTEM, solver_pair, write_problems

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return solver_pair(tmp_path_factory.getbasetemp() / "solver_pair")


def argv(pair, data, out, *extra):
    return ["generate", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(data), "--out", str(out),
            "--system-prompt", SYSTEM, "--attempts", "2", "--max-new-tokens", "40", "--max-batch-size", "4",
            "--no-progress", *extra]


def generate(pair, data, out, *extra, status=0):
    assert main(argv(pair, data, out, *extra)) == status
    return read_records(out)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reordered_data_resumes_without_duplicates_or_gaps(pair, tmp_path, capsys):
    rows = [{"question": p["question"], "answer": p["answer"]} for p in PROBLEMS]  # no id column: question hashes
    out = tmp_path / "out.jsonl"
    generate(pair, write_rows(tmp_path / "a.jsonl", rows), out, "--limit", "2")
    resumed = generate(pair, write_rows(tmp_path / "b.jsonl", rows[::-1]), out)
    assert "problems: 4 (2 already in the output, 2 written now)" in capsys.readouterr().out
    clean = generate(pair, tmp_path / "a.jsonl", tmp_path / "clean.jsonl")
    assert sorted(r["question"] for r in resumed) == sorted(p["question"] for p in PROBLEMS)
    assert {r["id"]: r["token_ids"] for r in resumed} == {r["id"]: r["token_ids"] for r in clean}


def test_sharded_runs_resume_from_every_part_whatever_the_input_order_or_world_size(pair, tmp_path, as_ranks,
                                                                                   capsys):
    """Ranks take rows by position, so a row added at the top moves every problem to another rank, and a
    rerun with another number of ranks (or one process) finds other part names: each run must resume from
    all of OUT's files, or it writes again what another part holds and the merge keeps two copies."""
    rows = [{k: p[k] for k in ("id", "question", "answer") if p[k] is not None} for p in PROBLEMS]
    data, out = write_rows(tmp_path / "p.jsonl", rows[1:]), tmp_path / "out.jsonl"
    as_ranks(lambda: generate(pair, data, out))
    write_rows(data, rows)  # a problem added at the top: every other row now goes to the other rank
    capsys.readouterr()
    as_ranks(lambda: generate(pair, data, out))
    said = capsys.readouterr().out
    assert "[rank 0/2] problems: 2 (1 already in the output, 1 written now)" in said
    assert "[rank 1/2] problems: 2 (2 already in the output, 0 written now)" in said
    write_rows(data, [*rows, {"id": "sub", "question": "What is 5-2?", "answer": "3"}])
    as_ranks(lambda: generate(pair, data, out), world=3)  # resumed with three ranks
    assert main(["merge", str(out)]) == 0
    assert f"merged 5 records into {out}" in capsys.readouterr().out  # 5 problems over 5 part files
    merged = read_records(out)
    assert sorted(r["id"] for r in merged) == sorted([p["id"] for p in PROBLEMS] + ["sub"])
    # One process after the merge, beside the parts: nothing is done twice, and no merge is asked for (the parts'
    # records are all in OUT).
    records = generate(pair, data, out)
    said = capsys.readouterr().out
    assert "problems: 5 (5 already in the output, 0 written now)" in said and "rsd merge" not in said
    assert records == merged
    # A part holding a record OUT lacks is named again.
    part = next(p for p in sorted(tmp_path.glob("out.rank*.jsonl")) if read_records(p))
    extra = {**read_records(part)[0], "id": "only-in-a-part"}
    with part.open("a") as f:
        f.write(json.dumps(extra) + "\n")
    generate(pair, data, out)
    assert f"also in its part files ({part.name}), done and not written again; rsd merge" in capsys.readouterr().out


def test_problems_changed_since_their_records_are_refused(pair, tmp_path, capsys):
    """Resume matches records to problems by id: a problem whose question or reference answer changed under
    the same id (the file edited, or another dataset numbered alike) would keep its old record beside the
    new problems' records, graded against the old answer."""
    data, out = write_problems(tmp_path / "p.jsonl"), tmp_path / "out.jsonl"
    generate(pair, data, out, "--limit", "2")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[1]["answer"] = "8"  # a corrected reference answer
    write_rows(data, rows)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv(pair, data, out))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "1 problems differ (question or reference answer)" in err
    assert f"their records in {out}: mul;" in err and "--force" in err
    assert len(read_records(out)) == 2
    other = write_rows(tmp_path / "other.jsonl", [{"id": "add", "question": "Name a colour.", "answer": "red"}])
    with pytest.raises(SystemExit):
        main(argv(pair, other, out))
    assert "1 problems differ" in capsys.readouterr().err
    records = generate(pair, data, out, "--force")
    assert len(records) == 4 and next(r for r in records if r["id"] == "mul")["answer"] == "9"  # kept, as said
    assert "records of 1 problems changed since kept (mul)" in capsys.readouterr().out
    # --format sft records carry their question and reference answer too.
    sft = tmp_path / "sft.jsonl"
    generate(pair, data, sft, "--format", "sft", "--limit", "1")
    answer = rows[0]["answer"]
    rows[0]["answer"] = "5"
    write_rows(data, rows)
    with pytest.raises(SystemExit):
        main(argv(pair, data, sft, "--format", "sft"))
    assert "1 problems differ" in capsys.readouterr().err
    rows[0]["answer"], rows[0]["question"] = answer, "What is 2+2, again?"
    write_rows(data, rows)
    with pytest.raises(SystemExit):
        main(argv(pair, data, sft, "--format", "sft"))
    assert "1 problems differ" in capsys.readouterr().err


def test_a_second_writer_fails_at_once(tmp_path):
    out = tmp_path / "out.jsonl"
    with RecordWriter(out) as first:
        first.write({"id": "a"})
        with pytest.raises(OutputBusy, match=rf"out.jsonl is being written by another process \(pid {os.getpid()}\)"):
            RecordWriter(out)
    with RecordWriter(out) as again:  # released on close
        again.write({"id": "b"})
    assert [r["id"] for r in read_records(out)] == ["a", "b"]


def test_two_concurrent_generate_runs(pair, tmp_path, capsys):
    rows = [{"id": f"q{i}", "question": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(40)]
    data, out = write_rows(tmp_path / "p.jsonl", rows), tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "rsd_engine.cli", *argv(pair, data, out, "--max-batch-size", "2", "--threads", "1")]
    first = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and read_records(out)) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early: " + first.stderr.read().decode()[-2000:]
        with pytest.raises(SystemExit) as exit_info:
            main(argv(pair, data, out))
        assert first.poll() is None  # the second run did not wait for the first
        assert exit_info.value.code == 2
        assert f"is being written by another process (pid {first.pid})" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    ids = [r["id"] for r in read_records(out)]
    assert len(ids) == len(set(ids))


def test_records_written_after_another_prompt_are_refused(pair, tmp_path, capsys):
    """An output an earlier rsd wrote under other prompt rules (a reasoning block opened, a system turn folded, a
    date), with the same question, system prompt and tokenizer: extending it mixed two prompts, silently."""
    data, out = write_problems(tmp_path / "p.jsonl"), tmp_path / "out.jsonl"
    records = generate(pair, data, out, "--limit", "2")
    records[1]["prompt"] = records[1]["prompt"].removesuffix("<think>\n")  # as a rule that opened no block wrote it
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv(pair, data, out))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{out}: the records of 1 problems were written after another prompt" in err
    assert f"({records[1]['id']}): an earlier rsd's prompt rules" in err and len(read_records(out)) == 2
    assert len(generate(pair, data, out, "--force")) == len(PROBLEMS)
    assert f"records of 1 problems written after another prompt ({records[1]['id']})" in capsys.readouterr().out
    assert len(generate(pair, data, out)) == len(PROBLEMS)  # nothing left to write: nothing to mix
    # Records written after the prompt built now resume, in either format (an SFT record's prompt is that text).
    for extra in ((), ("--format", "sft")):
        resumed = tmp_path / f"resumed{len(extra)}.jsonl"
        generate(pair, data, resumed, "--limit", "2", *extra)
        generate(pair, data, resumed, *extra)
        assert "written after another prompt" not in capsys.readouterr().out
    # A question edited beyond --limit is no prompt rule: the record's own question is the one its prompt is built
    # from (it was the data's, and the run refused a problem it does not even resume).
    full = tmp_path / "full.jsonl"
    records = generate(pair, data, full)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    full.write_text("".join(json.dumps(r) + "\n" for r in records if r["id"] != rows[1]["id"]))  # one left to do
    rows[-1]["question"] = "An edited question?"
    write_rows(data, rows)
    assert len(generate(pair, data, full, "--limit", "2")) == len(PROBLEMS)


def test_changed_settings_are_refused_and_force_appends(pair, tmp_path, capsys):
    data, out = write_problems(tmp_path / "p.jsonl"), tmp_path / "out.jsonl"
    generate(pair, data, out, "--limit", "1")
    manifest = read_manifest(out)
    assert manifest["settings"]["--seed"] == 0 and manifest["settings"]["--id-field"] == "id"
    assert manifest["settings"]["student model"] == model_fingerprint(pair[1])
    assert manifest["about"]["--limit"] == 1  # which problems run is not a setting: extending is resuming
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        main(argv(pair, data, out, "--seed", "3", "--temperature", "0.5"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "holds records made with other settings" in err
    assert "--seed: 0 in the output, 3 now" in err and "--temperature: 0.7 in the output, 0.5 now" in err
    assert "--force" in err and [r["id"] for r in read_records(out)] == ["add"]

    records = generate(pair, data, out, "--seed", "3", "--temperature", "0.5", "--force")
    assert sorted(r["id"] for r in records) == sorted(p["id"] for p in PROBLEMS)
    forced_line = next(line for line in capsys.readouterr().out.splitlines() if "under --force" in line)
    assert "--seed: 0 in the output, 3 now" in forced_line
    forced = read_manifest(out)["forced"]
    assert len(forced) == 1 and forced[0]["settings"]["--seed"] == 3
    assert read_manifest(out)["settings"]["--seed"] == 0  # what the first records were made with

    # Later runs say the output is mixed: resumed with the first settings (which matched silently), refused with the
    # forced ones (which said only "0 in the output", though the file holds both).
    generate(pair, data, out, "--limit", "1")
    assert (f"warning: {out} mixes settings: 1 run appended records under --force with other settings [--temperature: "
            f"0.7 in the output, 0.5 now; --seed: 0 in the output, 3 now] (all in out.jsonl.manifest.json, 'forced'); its "
            f"records do not say which settings made them") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(argv(pair, data, out, "--seed", "3", "--temperature", "0.5"))
    assert f"(and {out} mixes settings: 1 run appended records under --force" in capsys.readouterr().err


def test_records_of_no_problem_in_the_data_are_named(pair, tmp_path, capsys):
    """Without an id column a problem's id is a hash of its question: a question edited since its record was made
    is another problem, and its old record stayed beside the new one without a word. Records of no problem in the
    data are named (a problem removed from the data too)."""
    rows = [{"question": p["question"], "answer": p["answer"]} for p in PROBLEMS if p["answer"]]
    data, out = write_rows(tmp_path / "p.jsonl", rows), tmp_path / "out.jsonl"
    generate(pair, data, out)
    edited = [dict(rows[0], question="What is 2 + 2?"), *rows[1:]]
    write_rows(data, edited)
    capsys.readouterr()
    records = generate(pair, data, out)
    said = capsys.readouterr().out
    old_id = next(r["id"] for r in records if r["question"] == "What is 2+2?")
    assert len(records) == len(rows) + 1
    assert f"warning: 1 records in the output are of no problem in --data (the data has no id column" in said
    assert f"remove the old records, or give the data ids): {old_id}\n" in said
    capsys.readouterr()
    data_ids, out_ids = write_problems(tmp_path / "ids.jsonl"), tmp_path / "ids_out.jsonl"
    generate(pair, data_ids, out_ids)
    write_rows(data_ids, [{k: p[k] for k in ("id", "question", "answer") if p[k] is not None} for p in PROBLEMS[1:]])
    capsys.readouterr()
    generate(pair, data_ids, out_ids)
    assert ("warning: 1 records in the output are of no problem in --data (problems removed from the data, or "
            "another data file): add") in capsys.readouterr().out
    generate(pair, data_ids, out_ids, "--limit", "1")  # --limit runs fewer problems: the rest are in the data
    assert "another data file): add\n" in capsys.readouterr().out


def test_float_ids_of_a_table_resume_as_the_integers_they_are(tiny_pair, tmp_path, capsys):
    """A table's integer id column with a missing value is read as floats: its ids 1.0, 2.0 were other problems than
    the 1, 2 of the same column filled, and every problem was generated again beside its old record (exit 0, a
    warning). Records an earlier version wrote under '1.0' resume as problem 1's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    questions = ["What is 2+2?", "What is 3*3?", "Name a prime."]
    gap, filled = tmp_path / "gap.parquet", tmp_path / "filled.parquet"
    answers = ["4", "9", "7"]
    pq.write_table(pa.table({"id": pa.array([1.0, 2.0, None], pa.float64()), "question": questions,
                             "answer": answers}), gap)
    pq.write_table(pa.table({"id": [1, 2, 3], "question": questions, "answer": answers}), filled)
    out, short = tmp_path / "out.jsonl", ("--attempts", "1", "--max-new-tokens", "4")
    assert [r["id"] for r in generate(tiny_pair, gap, out, *short)] == ["1", "2"]
    assert "skipped rows: 1 of 3 (row 2: no 'id' id)" in capsys.readouterr().out
    assert [r["id"] for r in generate(tiny_pair, filled, out, *short)] == ["1", "2", "3"]
    said = capsys.readouterr().out
    assert "problems: 3 (2 already in the output, 1 written now)" in said and "no problem in --data" not in said
    # An output an earlier version wrote from the gap's floats holds '1.0' and '2.0': the same problems.
    old = write_rows(tmp_path / "old.jsonl", [{"id": f"{i + 1}.0", "question": questions[i], "answer": answers[i]}
                                              for i in range(2)])
    earlier = tmp_path / "earlier.jsonl"
    generate(tiny_pair, old, earlier, *short)
    capsys.readouterr()
    assert [r["id"] for r in generate(tiny_pair, filled, earlier, *short)] == ["1.0", "2.0", "3"]
    said = capsys.readouterr().out
    assert "problems: 3 (2 already in the output, 1 written now)" in said and "no problem in --data" not in said
    # An output the earlier version extended with each problem again (ids 1, 2 beside 1.0, 2.0) says so.
    with earlier.open("a") as f:
        f.writelines(line for line in out.read_text().splitlines(keepends=True) if '"id": "3"' not in line)
    generate(tiny_pair, filled, earlier, *short)
    said = capsys.readouterr().out
    assert "problems: 3 (3 already in the output, 0 written now)" in said
    assert "warning: the output already held duplicates: 2 ids occur more than once (1 ×2, 2 ×2)" in said


def test_another_model_dtype_is_refused_and_auto_is_compared_as_it_resolves(pair, tmp_path, capsys):
    """bfloat16 models sample other tokens than float32 ones: a run resumed under another dtype (the same
    command line moved from a CPU, where auto is float32, to a GPU, where it is bfloat16) mixed two datasets.
    The dtype the models run in is compared; auto as it resolves on the device."""
    from rsd_engine.pipeline.manifest import MODEL_DTYPE, differences, write_manifest

    data, out = write_problems(tmp_path / "p.jsonl"), tmp_path / "out.jsonl"
    generate(pair, data, out, "--limit", "1")  # auto: float32 on this CPU
    assert read_manifest(out)["settings"][MODEL_DTYPE] == "float32"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv(pair, data, out, "--dtype", "bfloat16"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and 'model dtype: "float32" in the output, "bfloat16" now' in err
    assert [r["id"] for r in read_records(out)] == ["add"]
    assert len(generate(pair, data, out, "--dtype", "float32", "--limit", "2")) == 2  # auto resolved the same

    # An older manifest kept --dtype and --device under "about", unresolved: compared as they resolve.
    now = {MODEL_DTYPE: "bfloat16"}
    assert differences({}, now, {"--dtype": "auto", "--device": "cpu"}) == [
        'model dtype: "float32" in the output, "bfloat16" now']
    assert differences({}, now, {"--dtype": "float16", "--device": "auto"}) == [
        'model dtype: "float16" in the output, "bfloat16" now']
    assert differences({}, now, {"--dtype": "auto", "--device": "cuda:1"}) == []
    assert differences({}, now, {"--dtype": "auto", "--device": "auto"}) == []  # unknowable: not compared
    manifest = read_manifest(out)
    del manifest["settings"][MODEL_DTYPE]
    manifest["about"].update({"--dtype": "auto", "--device": "auto"})
    write_manifest(out, manifest)
    assert len(generate(pair, data, out, "--limit", "3")) == 3  # resumes an older output


def test_output_without_manifest_is_refused(pair, tmp_path, capsys):
    data, out = write_problems(tmp_path / "p.jsonl"), tmp_path / "out.jsonl"
    generate(pair, data, out, "--limit", "1")
    manifest_path(out).unlink()
    with pytest.raises(SystemExit):
        main(argv(pair, data, out))
    assert "no out.jsonl.manifest.json beside it" in capsys.readouterr().err
    generate(pair, data, out, "--force")  # adopts the records: later runs with these settings resume
    assert read_manifest(out)["settings"]["--seed"] == 0 and len(read_manifest(out)["forced"]) == 1
    assert len(generate(pair, data, out)) == 4


def test_a_run_refused_before_its_first_record_leaves_no_output_behind(pair, tmp_path, capsys):
    """A --draft-tokens the engine refuses (a round longer than --max-seq-len) failed once OUT was open: an empty OUT
    and its manifest stayed, an output begun. Now a run that wrote nothing removes what it created; a resumed OUT
    is left as it was, and resumes."""
    data, out = write_problems(tmp_path / "p.jsonl"), tmp_path / "out.jsonl"
    refused = ["--draft-tokens", "100", "--max-seq-len", "64"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv(pair, data, out, *refused))
    assert exit_info.value.code == 2 and "draft_tokens = 100" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]
    generate(pair, data, out, "--limit", "1")
    before = out.read_bytes(), read_manifest(out)
    with pytest.raises(SystemExit):
        main(argv(pair, data, out, *refused))
    assert (out.read_bytes(), read_manifest(out)) == before
    assert len(generate(pair, data, out)) == 4


def test_model_fingerprint_follows_content_not_path(tiny_pair, tmp_path):
    copy = shutil.copytree(tiny_pair[1], tmp_path / "copy")
    assert model_fingerprint(copy) == model_fingerprint(tiny_pair[1])
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one byte of the last tensor
    weights.write_bytes(bytes(data))
    changed = model_fingerprint(copy)
    assert [name for name in changed if changed[name] != model_fingerprint(tiny_pair[1])[name]] == ["model.safetensors"]


def test_duplicate_ids_are_reported_on_resume_and_by_score(pair, tmp_path, capsys):
    data, out = write_problems(tmp_path / "p.jsonl"), tmp_path / "out.jsonl"
    records = generate(pair, data, out, "--limit", "2")
    with open(out, "a") as f:
        f.write(json.dumps(records[0]) + "\n")  # as two unlocked writers left it
    capsys.readouterr()
    generate(pair, data, out)
    assert "warning: the output already held duplicates: 1 ids occur more than once (add ×2)" in capsys.readouterr().out

    traces = read_traces(out, AutoTokenizer.from_pretrained(str(pair[1])))
    assert traces.duplicates == {"add": 2}


def _prompt_lengths(pair):
    tok = AutoTokenizer.from_pretrained(str(pair[1]))
    return [len(tok.encode(build_prompt(tok, p["question"], SYSTEM).text, add_special_tokens=False))
            for p in PROBLEMS]


def test_problems_cut_short_by_max_seq_len_are_redone(pair, tmp_path, capsys):
    data, out = write_problems(tmp_path / "p.jsonl"), tmp_path / "out.jsonl"
    # Room for every prompt, not for any answer: every attempt stops at the sequence limit.
    records = generate(pair, data, out, "--max-seq-len", str(max(_prompt_lengths(pair)) + 4), status=3)
    report = capsys.readouterr().out
    assert records == []
    assert "not written, cut short by --max-seq-len: 4 (add, mul, open, unclosed)" in report
    assert report.splitlines()[-1] == "rsd generate: 4 of 4 problems were cut short by --max-seq-len: exit status 3"
    records = generate(pair, data, out)  # the default fits: all four are redone
    assert sorted(r["id"] for r in records) == ["add", "mul", "open", "unclosed"]
    assert "problems: 4 (0 already in the output, 4 written now)" in capsys.readouterr().out


def test_a_failed_request_is_recorded_as_failed_and_retried(pair, tmp_path, monkeypatch, capsys):
    from rsd_engine.engine import Engine

    real = Engine.generate_iter

    def one_attempt_fails(self, requests, params):
        for index, result in real(self, requests, params):
            if index == 3:  # problem 1 ('mul'), attempt 1
                result = GenerationResult(result.prompt_token_ids, result.token_ids[:2], "", result.accepted[:2],
                                          result.teacher_logprobs[:2], result.student_logprobs[:2], "error",
                                          result.seed)
                result.error = "the teacher model produced NaN or +inf logits"  # as the engine reports it
            yield index, result

    data, out = write_problems(tmp_path / "p.jsonl"), tmp_path / "out.jsonl"
    monkeypatch.setattr(Engine, "generate_iter", one_attempt_fails)
    summary_records = generate(pair, data, out, status=3)
    report = capsys.readouterr().out
    assert sorted(r["id"] for r in summary_records) == ["add", "open", "unclosed"]  # the run went on
    assert "failed, not written: 1 (mul: attempt 1: the teacher model produced NaN or +inf logits)" in report
    monkeypatch.setattr(Engine, "generate_iter", real)
    records = generate(pair, data, out)
    assert "problems: 4 (3 already in the output, 1 written now)" in capsys.readouterr().out
    assert sorted(r["id"] for r in records) == ["add", "mul", "open", "unclosed"]


def test_a_request_the_engine_fails_is_named_and_the_run_goes_on(pair, tmp_path, capsys):
    """The real engine path: a NaN embedding row for a token only one question holds makes the
    teacher's logits non-finite for that request alone."""
    import torch
    from safetensors.torch import load_file, save_file

    tok = AutoTokenizer.from_pretrained(str(pair[1]))
    ids = {p["id"]: set(tok.encode(build_prompt(tok, p["question"], SYSTEM).text, add_special_tokens=False))
           for p in PROBLEMS}
    only_open = ids["open"] - set().union(*(v for k, v in ids.items() if k != "open"))
    teacher = Path(shutil.copytree(pair[0], tmp_path / "teacher"))
    weights = load_file(str(teacher / "model.safetensors"))
    weights["model.embed_tokens.weight"][min(only_open)] = torch.nan
    save_file(weights, str(teacher / "model.safetensors"), metadata={"format": "pt"})

    data, out = write_problems(tmp_path / "p.jsonl"), tmp_path / "out.jsonl"
    records = generate((teacher, pair[1]), data, out, status=3)
    report = capsys.readouterr().out
    assert sorted(r["id"] for r in records) == ["add", "mul", "unclosed"]
    assert "failed, not written: 1 (open: attempt " in report and "the teacher's logits" in report


def test_an_output_that_is_no_regular_file_is_refused(pair, tmp_path, capsys):
    """--out a link to /dev/full or /dev/zero was read back as an endless file until memory ran out (then "out of
    memory ... lower --max-batch-size"), and a FIFO blocked; a report over /dev/null, as root, would replace the
    device. Refused before any work, naming what the path is. (/dev/null stands in for the endless devices: it reads
    empty, so this test cannot run away where the check is missing.)"""
    data = write_problems(tmp_path / "p.jsonl")
    null, fifo, report = tmp_path / "null.jsonl", tmp_path / "fifo.jsonl", tmp_path / "report.json"
    null.symlink_to(os.devnull)
    report.symlink_to(os.devnull)
    os.mkfifo(fifo)
    runs = [(argv(pair, data, null), f"output path {null} is a character device ({os.devnull}), not a regular file"),
            (argv(pair, data, fifo), f"output path {fifo} is a FIFO (a named pipe), not a regular file"),
            (["score", "--student", str(pair[1]), "--data", str(data), "--out", str(report), "--no-progress"],
             f"output path {report} is a character device ({os.devnull}), not a regular file")]
    for command, said in runs:
        with pytest.raises(SystemExit) as stopped:
            main(command)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and said in err and len(err.splitlines()) == 1, err
    assert null.is_symlink() and report.is_symlink() and not manifest_path(null).exists()
