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

def test_dollar_before_a_number_is_currency_unless_closed_in_its_sentence():
    assert [s.text for s in split_sentences("It costs $5. Then $3. Then $2. Total $10.")] == [
        "It costs $5.", "Then $3.", "Then $2.", "Total $10."]
    assert [s.text for s in split_sentences("It costs $5. We solve $2.5x = 10$. So $x = 4$. Done.")] == [
        "It costs $5.", "We solve $2.5x = 10$.", "So $x = 4$.", "Done."]
    # Math that does span a boundary still holds it together.
    assert [s.text for s in split_sentences("We get $x = 1. y = 2$ here. Done.")] == ["We get $x = 1. y = 2$ here.",
                                                                                      "Done."]


def test_template_markers_are_never_sentences():
    text = "Let me add. 2 + 2 = 4.\n</think>\n\nThe answer is 4.<|im_end|>"
    sentences = split_sentences(text, markers=["</think>", "<|im_end|>", "<think>"])
    assert [s.text for s in sentences] == ["Let me add.", "2 + 2 = 4.", "The answer is 4."]
    assert all("</think>" not in text[s.start:s.end] and "<|im_end|>" not in text[s.start:s.end] for s in sentences)
    assert split_sentences("</think>\n\n<|im_end|>", markers=["</think>", "<|im_end|>"]) == []


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
    assert ("skipped rows: 1 of 3 (first: row 1, 'response' is not valid Unicode: '\\ud800' at character 16 is a "
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


def test_all_truncated_is_an_error_naming_the_option(tiny_pair, tmp_path, capsys):
    data = write_rows(tmp_path / "r.jsonl", [eval_rows()[1]])
    with pytest.raises(SystemExit):
        main(provenance_argv(tiny_pair, data, tmp_path / "s.jsonl"))
    err = capsys.readouterr().err
    assert "all 1 usable responses were cut off by the length limit" in err and "--include-truncated" in err


# ---------------------------------------------------------------------------------------------- resume

def test_changed_response_is_named_refused_and_traced_again_under_force(tiny_pair, tmp_path, capsys):
    from rsd_engine.pipeline.provenance import current_sentences

    data, out = tmp_path / "r.jsonl", tmp_path / "s.jsonl"
    first = provenance(tiny_pair, write_rows(data, ROWS), out)
    changed = [ROWS[0], {**ROWS[1], "response": "Three and three make six. So six. The answer is \\boxed{6}."}]
    write_rows(data, changed)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(provenance_argv(tiny_pair, data, out))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "1 response changed (id b sample 0) since" in err and "--force" in err
    assert read_records(out) == first  # nothing written

    provenance(tiny_pair, data, out, "--force")
    report = capsys.readouterr().out
    assert "(1 already in the output, 1 traced now)" in report and "1 response changed (id b sample 0)" in report
    fresh = provenance(tiny_pair, data, tmp_path / "fresh.jsonl")
    assert current_sentences(read_records(out)) == [s for s in first if s["id"] == "a"] + [
        s for s in fresh if s["id"] == "b"]
    # The printed report reads the newest version: b has 3 sentences now, not the old 2.
    assert "\nb                3 " in report
    # A rerun is a no-op: the newest version matches the input.
    provenance(tiny_pair, data, out)
    assert "(2 already in the output, 0 traced now)" in capsys.readouterr().out


def test_merge_keeps_the_newest_version_of_a_response(tmp_path):
    from rsd_engine.pipeline.records import RecordWriter, merge_parts, part_path

    old = [{"id": "b", "sample": 0, "response_hash": "old", "index": i, "sentences": 3, "text": f"o{i}"}
           for i in range(3)]
    new = [{"id": "b", "sample": 0, "response_hash": "new", "index": i, "sentences": 2, "text": f"n{i}"}
           for i in range(2)]
    other = [{"id": "a", "sample": 0, "response_hash": "x", "index": 0, "sentences": 1, "text": "a"}]
    out = tmp_path / "s.jsonl"
    for rank, records in enumerate([old + other, new]):
        with RecordWriter(part_path(out, rank, 2)) as writer:
            writer.write_many(records)
    report = merge_parts(out)
    assert [r["text"] for r in read_records(out)] == ["a", "n0", "n1"] and report.duplicates == {}
