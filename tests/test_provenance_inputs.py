"""`rsd provenance` / `rsd select` on the inputs a researcher actually has (issue 16): currency `$`,
template markers, unencodable and truncated responses, inputs named another way or changed since
the last run, and candidates that are wrong or belong to different questions."""
import json
import math
from pathlib import Path

import pytest
import torch

from rsd_engine.cli import main
from rsd_engine.pipeline.prompts import DEFAULT_SYSTEM_PROMPT, build_prompt
from rsd_engine.pipeline.records import read_records
from rsd_engine.pipeline.sentences import split_sentences

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"id": "a", "question": "What is 2 + 2?", "response": "Two and two make four. The answer is \\boxed{4}."},
    {"id": "b", "question": "What is 3 + 3?", "response": "Three and three make six. The answer is \\boxed{6}."},
]


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def provenance_argv(tiny_pair, data, out, *extra):
    return ["provenance", "--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]), "--data", str(data),
            "--out", str(out), "--device", "cpu", "--no-progress", *extra]


def provenance(tiny_pair, data, out, *extra):
    assert main(provenance_argv(tiny_pair, data, out, *extra)) == 0
    return read_records(out)


def select_argv(tiny_pair, data, out, *extra):
    return ["select", "--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]), "--data", str(data),
            "--out", str(out), "--device", "cpu", "--no-progress", "--beta", "1e-7", *extra]


# ---------------------------------------------------------------------------------------------- sentences

def rerun_refused(tiny_pair, data, out, capsys) -> str:
    """A rerun of rsd provenance over `data` into `out`, refused (exit 2) with nothing written: its error."""
    before = read_records(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(provenance_argv(tiny_pair, data, out))
    assert exit_info.value.code == 2 and read_records(out) == before
    return capsys.readouterr().err


def test_dollar_before_a_number_is_currency_unless_closed_in_its_sentence():
    assert [s.text for s in split_sentences("It costs $5. Then $3. Then $2. Total $10.")] == [
        "It costs $5.", "Then $3.", "Then $2.", "Total $10."]
    assert [s.text for s in split_sentences("It costs $5. We solve $2.5x = 10$. So $x = 4$. Done.")] == [
        "It costs $5.", "We solve $2.5x = 10$.", "So $x = 4$.", "Done."]
    # Math that does span a boundary still holds it together.
    assert [s.text for s in split_sentences("We get $x = 1. y = 2$ here. Done.")] == ["We get $x = 1. y = 2$ here.",
                                                                                      "Done."]


def test_a_currency_dollar_does_not_pair_with_a_dollar_that_cannot_close_math():
    """"$5 for $x$": the `$` before x has a space on its left, so it opens math and cannot close "$5 for $" (as
    pandoc reads TeX math); pairing them shifted every later `$` by one and swallowed a sentence boundary."""
    assert [s.text for s in split_sentences("Pay $5 for $x$ items. Then $y$. Done.")] == [
        "Pay $5 for $x$ items.", "Then $y$.", "Done."]
    assert [s.text for s in split_sentences("Buy $5 or $6 worth. So $a + b$ is even. Done.")] == [
        "Buy $5 or $6 worth.", "So $a + b$ is even.", "Done."]
    assert [s.text for s in split_sentences("We have $5x = 10$. So x = 2. Done.")] == [
        "We have $5x = 10$.", "So x = 2.", "Done."]


@pytest.mark.parametrize("text", ["", "   \n", "<think>\n\n</think>", "<think>x</think>", "<|im_end|>", " a ",
                                  "<think>\n</think>\n\nThe answer.", "$5.", "<think><|im_end|></think>  \n"])
def test_has_sentence_is_whether_the_text_splits_into_any(text):
    """Tracer.prepare and select's scorer ask only whether a response has a sentence: answered without pysbd."""
    from rsd_engine.pipeline.sentences import has_sentence, sentence_spans

    markers = ("<think>", "</think>", "<|im_end|>")
    assert has_sentence(text, markers) == bool(sentence_spans(text, markers))


def test_template_markers_are_never_sentences():
    text = "Let me add. 2 + 2 = 4.\n</think>\n\nThe answer is 4.<|im_end|>"
    sentences = split_sentences(text, markers=["</think>", "<|im_end|>", "<think>"])
    assert [s.text for s in sentences] == ["Let me add.", "2 + 2 = 4.", "The answer is 4."]
    assert all("</think>" not in text[s.start:s.end] and "<|im_end|>" not in text[s.start:s.end] for s in sentences)
    assert split_sentences("</think>\n\n<|im_end|>", markers=["</think>", "<|im_end|>"]) == []


def test_tokenless_sentences_join_within_their_segment_only():
    from rsd_engine.pipeline.sentences import merge_empty, token_sentences

    text = "One. Two.</think>Three. Four."
    spans = [(0, 5), (5, 9), (17, 24), (24, 29)]
    # A token over "One. T" leaves "Two." empty under one model: it joins "One.", not across the marker.
    assert merge_empty(spans, [[2, 0, 1, 1], [1, 1, 1, 1]]) == [(0, 9), (17, 24), (24, 29)]
    # The first sentence of a segment joins the next; a segment without any token has no sentence left.
    assert merge_empty(spans, [[1, 1, 0, 1]]) == [(0, 5), (5, 9), (17, 29)]
    assert merge_empty(spans, [[0, 0, 1, 1]]) == [(17, 24), (24, 29)]
    offsets = [(0, 4), (4, 9), (9, 17), (17, 23), (23, 24), (24, 29)]
    assert token_sentences(text, offsets, spans) == [0, 1, -1, 2, 2, 3]


def test_think_markers_are_markers_even_for_a_tokenizer_without_them():
    """As with the demo pair (SmolLM2 has no <think> token) reading records of a reasoning model."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rsd_engine.pipeline.readers import Reader
    from rsd_engine.pipeline.sentences import sentence_spans, token_sentences
    from tiny import CORPUS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS.splitlines(), trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
    reader = Reader("student", "unused", model=SimpleNamespace(config=SimpleNamespace(vocab_size=10**6)),
                    tokenizer=tokenizer)
    assert {"<think>", "</think>", "<|im_end|>"} <= reader.markers
    text = "So x = 4.\n</think>\n\nThe answer is 4."
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert len([t for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if 10 <= a < 18]) > 1  # split up
    spans = sentence_spans(text, reader.markers)
    assert [text[a:b].strip() for a, b in spans] == ["So x = 4.", "The answer is 4."]
    owners = token_sentences(text, enc["offset_mapping"], spans)
    assert {o for o, (a, b) in zip(owners, enc["offset_mapping"]) if 10 <= a < 18} == {-1}


def test_reader_refuses_unencodable_text_as_unreadable(tiny_pair):
    from rsd_engine.pipeline.readers import Reader, Unreadable

    with pytest.raises(Unreadable, match=r"'\\ud800' at character 16 is a lone surrogate"):
        Reader("student", tiny_pair[1]).read("Q?", "The answer is 5 \ud800 ok.", "")


def hf_response_logprobs(folder, question, response):
    """Per response token of HF transformers' float32 forward: (log p, (start, end))."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    prompt = tok(build_prompt(tok, question, DEFAULT_SYSTEM_PROMPT).text, add_special_tokens=False)["input_ids"]
    enc = tok(response, add_special_tokens=False, return_offsets_mapping=True)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt + enc["input_ids"]])).logits[0].double(), -1)
    return [(logprobs[len(prompt) - 1 + k, t].item(), span)
            for k, (t, span) in enumerate(zip(enc["input_ids"], enc["offset_mapping"]))]


def test_think_close_in_a_response_is_no_sentence_and_its_token_counts_nowhere(tiny_pair, tmp_path):
    response = "Let me add the numbers. So 2 + 2 = 4.\n</think>\n\nThe answer is \\boxed{4}."
    lines = provenance(tiny_pair, write_rows(tmp_path / "r.jsonl", [{**ROWS[0], "response": response}]),
                       tmp_path / "s.jsonl")
    assert [s["text"] for s in lines] == ["Let me add the numbers.", "So 2 + 2 = 4.", "The answer is \\boxed{4}."]
    marker = response.index("</think>")
    tokens = hf_response_logprobs(tiny_pair[0], ROWS[0]["question"], response)
    after = [lp for lp, (a, b) in tokens if a >= marker + len("</think>")]  # "\n\n" included: leading space
    before = [lp for lp, (a, b) in tokens if response.index("So") <= a < marker]
    assert lines[2]["p_teacher"] == pytest.approx(math.exp(sum(after) / len(after)), rel=1e-4)
    assert lines[1]["p_teacher"] == pytest.approx(math.exp(sum(before) / len(before)), rel=1e-4)


# ---------------------------------------------------------------------------------------------- rows

def test_unencodable_response_is_skipped_counted_and_named(tiny_pair, tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    # json.dumps escapes the lone surrogate as \ud800, as a file from elsewhere would hold it.
    write_rows(path, [ROWS[0], {"id": "bad", "question": "Q?", "response": "The answer is 5 \ud800 ok."}, ROWS[1]])
    lines = provenance(tiny_pair, path, tmp_path / "s.jsonl")
    report = capsys.readouterr().out
    assert ("skipped rows: 1 of 3 (row 1: 'response' is not valid Unicode: '\\ud800' at character 16 is a "
            "lone surrogate)") in report
    assert {s["id"] for s in lines} == {"a", "b"}


def eval_rows():
    """As `rsd eval` writes them: several samples per id, graded, with the finish reason."""
    return [{**ROWS[0], "sample": 0, "correct": True, "finish_reason": "eos"},
            {**ROWS[0], "sample": 1, "response": "Two and two make five. In", "correct": False,
             "finish_reason": "length"},
            {**ROWS[1], "sample": 0, "correct": False, "finish_reason": "eos"}]


def test_truncated_responses_are_skipped_unless_included_and_then_marked(tiny_pair, tmp_path, capsys):
    data = write_rows(tmp_path / "r.jsonl", eval_rows())
    lines = provenance(tiny_pair, data, tmp_path / "s.jsonl")
    assert {(s["id"], s["sample"]) for s in lines} == {("a", 0), ("b", 0)}
    assert "cut off by the length limit, skipped: 1 (first: id a sample 1; --include-truncated" in capsys.readouterr().out
    # Sentences carry what the analysis splits by: correctness, finish reason, sample.
    assert {(s["id"], s["sample"], s["correct"], s["finish_reason"]) for s in lines} == {
        ("a", 0, True, "eos"), ("b", 0, False, "eos")}
    assert not any("truncated" in s for s in lines)

    kept = provenance(tiny_pair, data, tmp_path / "t.jsonl", "--include-truncated")
    cut = [s for s in kept if (s["id"], s["sample"]) == ("a", 1)]
    assert [s["text"] for s in cut] == ["Two and two make five.", "In"]
    assert all(s["truncated"] and s["finish_reason"] == "length" and s["correct"] is False for s in cut)
    assert "kept (--include-truncated): 1" in capsys.readouterr().out


def test_failed_generations_are_skipped_and_named(tiny_pair, tmp_path, capsys):
    rows = [{**ROWS[0], "finish_reason": "error", "error": "non-finite logits"}, ROWS[1]]
    lines = provenance(tiny_pair, write_rows(tmp_path / "r.jsonl", rows), tmp_path / "s.jsonl")
    assert {s["id"] for s in lines} == {"b"}
    assert ("skipped rows: 1 of 2 (row 0: the generation failed (finish_reason 'error': non-finite logits))"
            in capsys.readouterr().out)


@pytest.mark.parametrize("field, value, said", [
    ("sample", "x", "\"sample\": 'x' is no sample number; it must be an integer >= 0"),
    ("sample", -1, "\"sample\": -1 is no sample number"),
    ("sample", 1.5, "\"sample\": 1.5 is no sample number"),
    ("sample", True, "\"sample\": True is no sample number"),
    ("correct", "yes", "\"correct\": 'yes'; it must be true or false"),
    ("correct", "false", "\"correct\": 'false'; it must be true or false"),
    ("finish_reason", 5, "\"finish_reason\": 5; it must be a string"),
])
def test_a_malformed_eval_field_is_refused_not_renumbered_or_carried(tiny_pair, tmp_path, capsys, field, value, said):
    # Renumbered, "x", -1 and 1.5 became samples 0, 1, 2 (three candidates out of whatever the file meant); a
    # "correct" of "yes" was carried into the sentences and read by provenance-report as ungraded.
    rows = [ROWS[0], {**ROWS[1], field: value}]
    out = tmp_path / "s.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(provenance_argv(tiny_pair, write_rows(tmp_path / "r.jsonl", rows), out))
    assert exit_info.value.code == 2
    assert f"row 1, id 'b', has {said}" in capsys.readouterr().err
    assert not out.exists() or not read_records(out)


def test_all_truncated_is_an_error_naming_the_option(tiny_pair, tmp_path, capsys):
    data = write_rows(tmp_path / "r.jsonl", [eval_rows()[1]])
    with pytest.raises(SystemExit):
        main(provenance_argv(tiny_pair, data, tmp_path / "s.jsonl"))
    err = capsys.readouterr().err
    assert "all 1 usable responses were cut off by the length limit" in err and "--include-truncated" in err


@pytest.mark.parametrize("ids", [(1, "1"), ("a", "a")])
def test_an_id_holding_different_questions_is_refused_as_select_refuses_it(tiny_pair, tmp_path, capsys, ids):
    # They were traced as samples 0 and 1 of one problem, which provenance-report then resampled as one.
    out = tmp_path / "s.jsonl"
    mixed = [{**ROWS[0], "id": ids[0]}, {**ROWS[1], "id": ids[1]}]
    with pytest.raises(SystemExit) as exit_info:
        main(provenance_argv(tiny_pair, write_rows(tmp_path / "mixed.jsonl", mixed), out))
    assert exit_info.value.code == 2
    assert (f"id '{ids[1]}' holds 2 different questions: 'What is 2 + 2?'; 'What is 3 + 3?'. rsd provenance reads "
            f"an id's rows as samples of one problem") in capsys.readouterr().err
    assert not out.exists()
    # Samples of one question (rsd eval writes several per problem) are one problem's responses.
    samples = [{**ROWS[0], "id": ids[0]}, {**ROWS[0], "id": ids[1], "response": "Four. The answer is \\boxed{4}."}]
    lines = provenance(tiny_pair, write_rows(tmp_path / "samples.jsonl", samples), out)
    assert {(s["id"], s["sample"]) for s in lines} == {(str(ids[1]), 0), (str(ids[1]), 1)}


# ---------------------------------------------------------------------------------------------- resume

def test_changed_response_is_named_refused_and_traced_again_under_force(tiny_pair, tmp_path, capsys):
    from rsd_engine.pipeline.provenance import current_sentences

    data, out = tmp_path / "r.jsonl", tmp_path / "s.jsonl"
    first = provenance(tiny_pair, write_rows(data, ROWS), out)
    changed = [ROWS[0], {**ROWS[1], "response": "Three and three make six. So six. The answer is \\boxed{6}."}]
    write_rows(data, changed)
    err = rerun_refused(tiny_pair, data, out, capsys)
    assert "1 response changed (id b sample 0) since" in err and "--force" in err

    provenance(tiny_pair, data, out, "--force")
    report = capsys.readouterr().out
    assert "(1 already in the output, 1 traced now)" in report and "1 response changed (id b sample 0)" in report
    fresh = provenance(tiny_pair, data, tmp_path / "fresh.jsonl")
    assert current_sentences(read_records(out)) == [s for s in first if s["id"] == "a"] + [
        {**s, "version": 2} for s in fresh if s["id"] == "b"]
    # The printed report reads the newest version: b has 3 sentences now, not the old 2.
    assert "\nb                3 " in report
    # A rerun is a no-op: the newest version matches the input.
    provenance(tiny_pair, data, out)
    assert "(2 already in the output, 0 traced now)" in capsys.readouterr().out


def test_a_row_edited_around_its_response_is_named_refused_and_traced_again_under_force(tiny_pair, tmp_path, capsys):
    """A rerun knew a response as done by its id, sample and text alone: a row regraded (`correct`), its question
    or its system turn edited in place, the text left as it was, kept the old labels and the probabilities read
    under the old question, silently (exit 0). Such rows are named and refused as an edited text is; --force
    traces them again."""
    from rsd_engine.pipeline.provenance import current_sentences

    chat = {"id": "c", "correct": True, "messages": [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "One and one make two. The answer is \\boxed{2}."}]}
    rows = [{**ROWS[0], "correct": True}, {**ROWS[1], "correct": True}, chat]
    data, out = write_rows(tmp_path / "r.jsonl", rows), tmp_path / "s.jsonl"
    first = provenance(tiny_pair, data, out)
    edited = [{**rows[0], "correct": False},  # regraded
              {**rows[1], "question": "What is 10 - 4?"},  # the same response under another question
              {**chat, "messages": [{"role": "system", "content": "Answer at length."}, *chat["messages"][1:]]}]
    write_rows(data, edited)
    err = rerun_refused(tiny_pair, data, out, capsys)
    assert "3 responses changed (id a sample 0, id b sample 0, id c sample 0) since" in err and "--force" in err

    provenance(tiny_pair, data, out, "--force")
    report = capsys.readouterr().out
    assert "(0 already in the output, 3 traced now)" in report and "3 responses changed (id a sample 0" in report
    fresh = provenance(tiny_pair, data, tmp_path / "fresh.jsonl")
    assert current_sentences(read_records(out)) == [{**s, "version": 2} for s in fresh]
    assert {s["correct"] for s in current_sentences(read_records(out)) if s["id"] == "a"} == {False}
    assert [s["p_teacher"] for s in fresh if s["id"] == "b"] != [s["p_teacher"] for s in first if s["id"] == "b"]
    provenance(tiny_pair, data, out)  # a rerun is a no-op: the newest versions match the input
    assert "(3 already in the output, 0 traced now)" in capsys.readouterr().out


def test_lines_without_a_row_hash_are_resumed_unchecked(tiny_pair, tmp_path, capsys):
    """Lines an older rsd wrote hold no row hash: their row is not compared (their text still is)."""
    rows = [{**r, "correct": True} for r in ROWS]
    data, out = write_rows(tmp_path / "r.jsonl", rows), tmp_path / "s.jsonl"
    first = provenance(tiny_pair, data, out)
    write_rows(out, [{k: v for k, v in s.items() if k != "row_hash"} for s in first])
    write_rows(data, [{**rows[0], "correct": False}, rows[1]])
    provenance(tiny_pair, data, out)
    assert "(2 already in the output, 0 traced now)" in capsys.readouterr().out


def test_the_row_hash_covers_the_question_system_turn_text_and_carried_fields():
    from rsd_engine.pipeline.responses import Response

    def response(question="Q?", system="S", text="A.", **row):
        return Response("a", 0, question, system, text, {"note": "x", **row})

    base = response(correct=True, finish_reason="stop")
    assert response(correct=True, finish_reason="stop", note="y").row_hash == base.row_hash  # not read: not covered
    for other in (response("Q2?", correct=True, finish_reason="stop"), response(system="S2", correct=True,
                  finish_reason="stop"), response(text="B.", correct=True, finish_reason="stop"),
                  response(correct=False, finish_reason="stop"), response(correct=True, finish_reason="length"),
                  response(finish_reason="stop"), response(correct=None, finish_reason="stop")):
        assert other.row_hash != base.row_hash


def test_merge_keeps_the_newest_version_of_a_response(tmp_path):
    from rsd_engine.pipeline.records import RecordWriter, part_path
    from rsd_engine.pipeline.parts import merge_parts

    old = [{"id": "b", "sample": 0, "response_hash": "old", "index": i, "sentences": 3, "text": f"o{i}"}
           for i in range(3)]
    new = [{"id": "b", "sample": 0, "response_hash": "new", "version": 2, "index": i, "sentences": 2, "text": f"n{i}"}
           for i in range(2)]
    other = [{"id": "a", "sample": 0, "response_hash": "x", "index": 0, "sentences": 1, "text": "a"}]
    out = tmp_path / "s.jsonl"
    for rank, records in enumerate([new + other, old]):  # the newest is not the last seen
        with RecordWriter(part_path(out, rank, 2)) as writer:
            writer.write_many(records)
    report = merge_parts(out)
    assert [r["text"] for r in read_records(out)] == ["a", "n0", "n1"] and report.duplicates == {}
    merge_parts(out)  # again, with out holding the newest and a part the old
    assert [r["text"] for r in read_records(out)] == ["a", "n0", "n1"]


def test_input_named_another_way_or_copied_resumes_but_another_input_is_refused(tiny_pair, tmp_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "gens.jsonl", ROWS)
    provenance(tiny_pair, "gens.jsonl", "s.jsonl", "--limit", "1")
    provenance(tiny_pair, "./gens.jsonl", "s.jsonl")
    assert "(1 already in the output, 1 traced now)" in capsys.readouterr().out
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "gens.jsonl").write_bytes((tmp_path / "gens.jsonl").read_bytes())
    provenance(tiny_pair, tmp_path / "copy" / "gens.jsonl", "s.jsonl")
    assert "(2 already in the output, 0 traced now)" in capsys.readouterr().out
    write_rows(tmp_path / "other.jsonl", ROWS[:1])
    with pytest.raises(SystemExit):
        main(provenance_argv(tiny_pair, "other.jsonl", "s.jsonl"))
    err = capsys.readouterr().err
    assert "holds records made with other settings" in err
    assert f"--data: {tmp_path / 'copy' / 'gens.jsonl'} in the output, {tmp_path / 'other.jsonl'} now" in err


def test_select_and_eval_compare_inputs_by_content_and_resolved_path(tiny_pair, tmp_path, monkeypatch, capsys):
    from solver_pair import write_problems

    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "c.jsonl", ROWS)
    assert main(select_argv(tiny_pair, "c.jsonl", "sel.jsonl")) == 0
    assert main(select_argv(tiny_pair, "./c.jsonl", "sel.jsonl")) == 0
    assert "problems: 2 (2 already in the output, 0 written now)" in capsys.readouterr().out

    write_problems(tmp_path / "p.jsonl")
    argv = ["eval", "--model", str(tiny_pair[1]), "--out", "g.jsonl", "--id-field", "id",
            "--max-new-tokens", "8", "--device", "cpu", "--no-progress", "--limit", "1", "--data"]
    assert main(argv + ["p.jsonl"]) == 0
    assert main(argv + ["./p.jsonl"]) == 0
    assert "(1 samples already in the output, 0 written now" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- select

CANDIDATES = [
    {"id": "q1", "question": "What is 2 + 2?", "response": "Two and two make four. The answer is \\boxed{4}."},
    {"id": "q1", "question": "What is 2 + 2?", "response": "We have $x = 1.5$. Then 2 + 2 = 4.\n1. First step: add "
                                                           "the numbers. 2. Second step, check it. The answer is 4."},
    {"id": "q1", "question": "What is 2 + 2?", "response": "Hmm, that does not look right. Let me try a different "
                                                           "approach. So 2 + 2 = 4. The answer is \\boxed{4}."},
    {"id": "q2", "question": "What is 3 + 3?", "response": "Three and three make six. The answer is \\boxed{6}."},
]


def select(tiny_pair, rows, tmp_path, name, *extra):
    assert main(select_argv(tiny_pair, write_rows(tmp_path / f"{name}.in.jsonl", rows), tmp_path / name, *extra)) == 0
    return {r["id"]: r for r in read_records(tmp_path / name)}


def test_select_never_keeps_a_candidate_its_row_calls_wrong(tiny_pair, tmp_path, capsys):
    ungraded = select(tiny_pair, CANDIDATES, tmp_path, "a.jsonl")
    wrong = ungraded["q1"]["response"]
    graded = [{**c, "correct": c["response"] != wrong} for c in CANDIDATES]
    kept = select(tiny_pair, graded, tmp_path, "b.jsonl")
    assert kept["q1"]["response"] != wrong and kept["q1"]["correct"] is True
    assert kept["q1"]["candidates"] == 3
    assert "incorrect candidates set aside: 1 (--include-incorrect ranks them)" in capsys.readouterr().out
    assert select(tiny_pair, graded, tmp_path, "c.jsonl", "--include-incorrect")["q1"]["response"] == wrong
    # A problem with no correct candidate is named and not written.
    all_wrong = [{**c, "correct": c["id"] == "q2"} for c in CANDIDATES]
    assert set(select(tiny_pair, all_wrong, tmp_path, "d.jsonl")) == {"q2"}
    assert "problems without a usable, correct candidate: 1 (first: q1)" in capsys.readouterr().out


def test_select_refuses_an_id_holding_different_questions(tiny_pair, tmp_path, capsys):
    rows = [*CANDIDATES, {"id": "q2", "question": "What is 5 + 5?", "response": "Ten. The answer is \\boxed{10}."}]
    with pytest.raises(SystemExit) as exit_info:
        main(select_argv(tiny_pair, write_rows(tmp_path / "c.jsonl", rows), tmp_path / "sel.jsonl"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "id 'q2' holds 2 different questions: 'What is 3 + 3?'; 'What is 5 + 5?'" in err
    assert not (tmp_path / "sel.jsonl").exists()


def test_select_refuses_a_correct_field_that_is_not_true_or_false(tiny_pair, tmp_path, capsys):
    rows = [{**CANDIDATES[0], "correct": "yes"}]
    with pytest.raises(SystemExit):
        main(select_argv(tiny_pair, write_rows(tmp_path / "c.jsonl", rows), tmp_path / "sel.jsonl"))
    assert "row 0, id 'q1', has \"correct\": 'yes'; it must be true or false" in capsys.readouterr().err


def test_select_sets_truncated_candidates_aside_unless_included(tiny_pair, tmp_path, capsys):
    rows = [{**CANDIDATES[3], "finish_reason": "length"}, *CANDIDATES[:3]]
    assert set(select(tiny_pair, rows, tmp_path, "a.jsonl")) == {"q1"}
    assert "cut off by the length limit, set aside: 1 (first: id q2 candidate 0" in capsys.readouterr().out
    kept = select(tiny_pair, rows, tmp_path, "b.jsonl", "--include-truncated")
    assert kept["q2"]["finish_reason"] == "length"


def test_kill_while_tracing_a_changed_response_again_loses_nothing(tiny_pair, tmp_path, capsys):
    from rsd_engine.pipeline.provenance import current_sentences

    data, out = tmp_path / "r.jsonl", tmp_path / "s.jsonl"
    first = provenance(tiny_pair, write_rows(data, ROWS), out)
    write_rows(data, [ROWS[0], {**ROWS[1], "response": "Three and three make six. So six. The answer is 6."}])
    provenance(tiny_pair, data, out, "--force")
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-2]) + lines[-2][:15])  # killed while writing b's new lines
    assert current_sentences(read_records(out)) == first  # the old version is still whole, and read
    with pytest.raises(SystemExit):
        main(provenance_argv(tiny_pair, data, out))  # the output still holds b's old text
    assert "1 response changed (id b sample 0)" in capsys.readouterr().err
    provenance(tiny_pair, data, out, "--force")
    assert "cut short by the last run" in capsys.readouterr().out
    fresh = provenance(tiny_pair, data, tmp_path / "fresh.jsonl")
    assert current_sentences(read_records(out)) == [s for s in first if s["id"] == "a"] + [
        {**s, "version": 2} for s in fresh if s["id"] == "b"]


def test_include_truncated_only_chooses_rows_for_provenance_but_shapes_selection(tiny_pair, tmp_path, capsys):
    data = write_rows(tmp_path / "r.jsonl", eval_rows())
    provenance(tiny_pair, data, tmp_path / "s.jsonl")
    lines = provenance(tiny_pair, data, tmp_path / "s.jsonl", "--include-truncated")  # resumes: adds the cut one
    assert sorted({(s["id"], s["sample"]) for s in lines}) == [("a", 0), ("a", 1), ("b", 0)]
    assert main(select_argv(tiny_pair, data, tmp_path / "sel.jsonl", "--include-incorrect")) == 0
    with pytest.raises(SystemExit):
        main(select_argv(tiny_pair, data, tmp_path / "sel.jsonl", "--include-incorrect", "--include-truncated"))
    assert "--include-truncated: false in the output, true now" in capsys.readouterr().err


def test_a_text_changed_back_is_a_new_version_and_a_torn_one_is_none():
    from rsd_engine.pipeline.provenance import complete_keys, current_sentences

    def version(text_hash, number, n, upto=None):
        extra = {} if number == 1 else {"version": number}
        return [{"id": "b", "sample": 0, "response_hash": text_hash, **extra, "index": i, "sentences": n,
                 "text": f"{text_hash}{number}.{i}"} for i in range(n)][:upto]

    lines = version("A", 1, 2) + version("B", 2, 3) + version("A", 3, 2)
    assert [s["text"] for s in current_sentences(lines)] == ["A3.0", "A3.1"]
    torn = version("A", 1, 2) + version("B", 2, 3) + version("A", 3, 2, upto=1)
    assert [s["text"] for s in current_sentences(torn)] == ["B2.0", "B2.1", "B2.2"]
    assert complete_keys(torn) == {("b", 0)}


# ---------------------------------------------------------------------------------------------- strict inputs

def test_a_malformed_last_line_is_an_error_naming_it(tmp_path, capsys):
    data = tmp_path / "c.jsonl"
    # No newline after the last row: not a torn write of ours to ignore, a row of the input that is wrong.
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + '{"id": "c", "question": "Q?", "response": "A." x}')
    with pytest.raises(SystemExit) as exit_info:
        main(["select", "--by", "random", "--data", str(data), "--out", str(tmp_path / "sel.jsonl"), "--no-progress"])
    assert exit_info.value.code == 2
    assert f"{data}, line 3: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "sel.jsonl").exists()


def test_a_response_whose_id_is_no_finite_number_is_skipped(tmp_path):
    """A NaN id (a table's missing value) or an infinite one (1e400 reads as one) was the text "nan" or "inf": the
    rows of every such problem under one id."""
    from rsd_engine.pipeline.responses import load_responses

    data = tmp_path / "c.jsonl"
    data.write_text('{"id": NaN, "question": "q1", "response": "r1"}\n{"id": 1e400, "question": "q2", "response": '
                    '"r2"}\n{"id": 3, "question": "q3", "response": "r3"}\n')
    loaded = load_responses(data)
    assert [r.id for r in loaded.responses] == ["3"]
    assert [why for _, why in loaded.skipped] == ["'id' is nan, not an id", "'id' is inf, not an id"]


def test_an_input_with_a_byte_order_mark_is_read(tmp_path, capsys):
    from rsd_engine.pipeline.responses import load_responses

    data = tmp_path / "c.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    assert [r.id for r in load_responses(data).responses] == ["a", "b"]
    out = tmp_path / "sel.jsonl"
    assert main(["select", "--by", "random", "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    assert [r["id"] for r in read_records(out)] == ["a", "b"]


def test_a_system_turn_that_is_not_text_is_skipped_with_the_reason(tiny_pair, tmp_path, capsys):
    def chat(rid, system):
        return {"id": rid, "messages": [{"role": "system", "content": system},
                                        {"role": "user", "content": "What is 2 + 2?"},
                                        {"role": "assistant", "content": "We compute 2 + 2 = 4. The answer is 4."}]}

    rows = [chat("parts", [{"type": "text", "text": "Be brief."}]), chat("number", 7), chat("text", "Be brief.")]
    lines = provenance(tiny_pair, write_rows(tmp_path / "r.jsonl", rows), tmp_path / "s.jsonl")
    assert {s["id"] for s in lines} == {"text"}
    assert ("skipped rows: 2 of 3 (row 0: 'messages' has a system turn whose content is not text (list); row 1: "
            "'messages' has a system turn whose content is not text (int))" in capsys.readouterr().out)


def test_a_response_opening_the_block_its_prompt_opened_is_read_once(tiny_pair, tmp_path):
    """The tiny templates open "<think>\n" in the prompt: a question/response row whose response opens it again (a
    record of another tool) was read after "<think>\n<think>\n", the same record as chat messages after one."""
    question, text = "What is 2 + 2?", "We compute 2 + 2 = 4.</think>The answer is 4."
    rows = [{"id": "opened", "question": question, "response": "<think>\n" + text},
            {"id": "chat", "messages": [{"role": "user", "content": question},
                                        {"role": "assistant", "content": "<think>\n" + text}]},
            {"id": "plain", "question": question, "response": text}]
    lines = provenance(tiny_pair, write_rows(tmp_path / "r.jsonl", rows), tmp_path / "s.jsonl", "--system-prompt", "")
    by_id = {}
    for line in lines:
        by_id.setdefault(line["id"], []).append((line["text"], line["p_teacher"], line["p_student"]))
    assert len(by_id["plain"]) == 2
    for rid in ("opened", "chat"):
        assert [t for t, _, _ in by_id[rid]] == [t for t, _, _ in by_id["plain"]]
        for (_, pt, ps), (_, qt, qs) in zip(by_id[rid], by_id["plain"]):
            assert pt == pytest.approx(qt, rel=1e-5) and ps == pytest.approx(qs, rel=1e-5)


def test_plot_named_as_the_output_is_refused_before_any_tracing(tiny_pair, tmp_path, capsys, monkeypatch):
    from rsd_engine.pipeline import provenance as provenance_module

    monkeypatch.setattr(provenance_module, "make_tracer", lambda *a, **k: pytest.fail("traced before the check"))
    out = tmp_path / "s.jsonl"
    with pytest.raises(SystemExit):
        main(provenance_argv(tiny_pair, write_rows(tmp_path / "r.jsonl", ROWS), out, "--plot", str(out)))
    assert "--out and --plot are the same file" in capsys.readouterr().err and not out.exists()


def test_a_conversation_of_several_turns_is_skipped_not_read_after_its_first_question(tiny_pair, tmp_path, capsys):
    """Each model reads one question through its template: the turns between the first question and the last
    answer were dropped (the answer scored after the first question alone), and select grouped conversations
    by their first question."""
    turns = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."},
             {"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": "Doubled, it is 8."}]
    rows = [{"id": "long", "messages": turns}, {"id": "one", "messages": turns[:2]}]
    lines = provenance(tiny_pair, write_rows(tmp_path / "r.jsonl", rows), tmp_path / "s.jsonl")
    assert {s["id"] for s in lines} == {"one"}
    assert ("skipped rows: 1 of 2 (row 0: 'messages' has 3 turns before the last assistant turn (user, "
            "assistant, user)" in capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------- no sentence

MARKERS_ONLY = "<think>\n\n</think>"  # an empty thinking block: not empty text, but no sentence


def test_a_response_of_template_markers_only_is_skipped_as_no_sentence(tiny_pair, tmp_path, capsys):
    data = write_rows(tmp_path / "r.jsonl", [ROWS[0], {**ROWS[1], "response": MARKERS_ONLY}])
    out = tmp_path / "s.jsonl"
    for _ in range(2):  # skipped each run, never "traced" without a line
        assert main(provenance_argv(tiny_pair, data, out)) == 3
        report = capsys.readouterr().out
        assert "skipped responses: 1 (first: id b sample 0: " in report and "no sentence" in report
        assert report.splitlines()[-1].startswith("rsd provenance: 1 of 2 responses were skipped")
    assert {s["id"] for s in read_records(out)} == {"a"}


def test_select_never_keeps_a_candidate_of_template_markers_only(tiny_pair, tmp_path, capsys):
    rows = [{**ROWS[0], "sample": 0, "correct": True}, {**ROWS[0], "sample": 1, "response": MARKERS_ONLY,
                                                        "correct": True}]
    data, out = write_rows(tmp_path / "c.jsonl", rows), tmp_path / "sel.jsonl"
    # The default margin: both candidates count 0 teacher sentences, and a tie goes to the shorter.
    assert main(["select", "--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]), "--data", str(data),
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 3
    [kept] = read_records(out)
    assert kept["response"] == ROWS[0]["response"] and kept["sample"] == 0
    assert "no sentence" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- merge

def test_merge_keeps_a_complete_version_over_a_torn_newer_one(tmp_path):
    from rsd_engine.pipeline.provenance import current_sentences
    from rsd_engine.pipeline.records import RecordWriter, part_path
    from rsd_engine.pipeline.parts import merge_parts

    old = [{"id": "b", "sample": 0, "response_hash": "old", "index": i, "sentences": 2, "text": f"o{i}"}
           for i in range(2)]
    torn = [{"id": "b", "sample": 0, "response_hash": "new", "version": 2, "index": i, "sentences": 3,
             "text": f"n{i}"} for i in range(2)]  # a rank killed before the last of its 3 lines
    other = [{"id": "a", "sample": 0, "response_hash": "x", "index": 0, "sentences": 1, "text": "a"}]
    out = tmp_path / "s.jsonl"
    for rank, records in enumerate([other + old + torn, []]):
        with RecordWriter(part_path(out, rank, 2)) as writer:
            writer.write_many(records)
    merge_parts(out)
    assert [s["text"] for s in current_sentences(read_records(out))] == ["a", "o0", "o1"]


def test_an_id_field_in_no_row_is_refused(tmp_path):
    """--id-field names a column: one in no row was taken silently for question hashes (select refused it)."""
    from rsd_engine.pipeline.responses import load_responses

    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps({"question": "q", "response": "r", "pid": 3}) + "\n")
    with pytest.raises(ValueError, match="--id-field 'nope' is in no row; fields: question, response, pid"):
        load_responses(data, id_field="nope")
    assert load_responses(data, id_field="pid").responses[0].id == "3"
    assert not load_responses(data).has_ids  # the default: a hash of the question


def test_responses_of_killed_ranks_at_the_end_of_a_merge_are_cut(tmp_path):
    """A merge of two parts whose ranks were killed mid-response can end with two torn responses: both are cut
    (as before the check that refuses lines of anything else), and a complete one before them is kept."""
    from rsd_engine.pipeline.provenance import drop_incomplete
    from rsd_engine.pipeline.records import RecordWriter

    def lines(rid, n, upto=None):
        return [{"id": rid, "sample": 0, "response_hash": rid, "index": i, "sentences": n, "category": "shared"}
                for i in range(n)][:upto]

    out = tmp_path / "s.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in lines("a", 2) + lines("b", 3, 1) + lines("c", 2, 1)))
    with RecordWriter(out) as writer:
        assert drop_incomplete(writer) == 2
    assert [r["id"] for r in read_records(out)] == ["a", "a"]
