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
