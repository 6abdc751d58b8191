"""`rsd provenance` and `rsd select`: sentence probabilities against HF transformers, identity
properties of the categories, tokenizer independence, selection by the provenance counts,
resume / shards, and bad input."""
import json
import math
from pathlib import Path

import pytest
import torch

from rsd_engine.cli import main
from rsd_engine.pipeline.categories import Rule, categorize, check_beta
from rsd_engine.pipeline.prompts import DEFAULT_SYSTEM_PROMPT, build_prompt
from rsd_engine.pipeline.provenance import ProvenanceOptions, complete_keys
from rsd_engine.pipeline.records import read_records
from rsd_engine.pipeline.select import Candidate, pick, scores_path
from rsd_engine.pipeline.sentences import READING, split_sentences
from tiny import CHAT_TEMPLATE, CORPUS, SPECIAL_TOKENS, build_model, build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

RESPONSES = [
    {"id": "p1", "question": "What is 2 + 2?",
     "response": "We have $x = 1.5$. Then 2 + 2 = 4.\n1. First step: add the numbers. 2. Second step, check it. "
                 "The answer is \\boxed{4}."},
    {"id": "p2", "question": "Solve 5y - 15 = 0.",
     "response": "Adding 15 gives 5y = 15.\n\n$$y = \\frac{15}{5}.$$ So y = 3. The answer is \\boxed{3}."},
    {"id": "p3", "question": "What is the area of a circle?",
     "response": "The area of a circle with radius r is pi r^2. Wait, let me check this again. It is pi r^2."},
]
TINY_BETA = "1e-7"  # random tiny models give sentence probabilities near 1e-6: a small margin sees them differ


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_pair):
    """teacher and student over one tokenizer, plus a Llama over a different tokenizer."""
    root = tmp_path_factory.mktemp("provenance_models")
    other_tok = build_tokenizer(root / "other_tok", vocab_size=380)
    other = build_model(root / "other", "llama", tokenizer_dir=other_tok, hidden_size=64, num_layers=2, seed=3)
    return {"teacher": tiny_pair[0], "student": tiny_pair[1], "other": other}


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def provenance(models, data, out, *extra, teacher="teacher", student="student", status=0):
    argv = ["provenance", "--teacher", str(models[teacher]), "--student", str(models[student]), "--data", str(data),
            "--out", str(out), "--device", "cpu", "--no-progress", *extra]
    assert main(argv) == status
    return read_records(out)


def hf_sentence_probs(folder, question, response, sentences) -> list[float]:
    """Independently of the pipeline: each token's probability from HF transformers, tokens given to
    the sentence holding their first non-space character, geometric mean per sentence."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    prompt = tok(build_prompt(tok, question, DEFAULT_SYSTEM_PROMPT).text, add_special_tokens=False)["input_ids"]
    enc = tok(response, add_special_tokens=False, return_offsets_mapping=True)
    ids = prompt + enc["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    token_lp = [logprobs[len(prompt) - 1 + k, t].item() for k, t in enumerate(enc["input_ids"])]
    starts, cursor = [], 0
    for text in sentences:
        cursor = response.index(text, cursor)
        starts.append(cursor)
    starts[0] = 0
    groups = [[] for _ in sentences]
    for lp, (a, b) in zip(token_lp, enc["offset_mapping"]):
        first = next((k for k in range(a, b) if not response[k].isspace()), a)
        groups[max(i for i, s in enumerate(starts) if s <= first)].append(lp)
    return [math.exp(sum(g) / len(g)) for g in groups]


def assert_same_lines(got, expected):
    """Same sentences and categories; probabilities equal up to float rounding (batches of other
    sizes pad and bucket attention differently)."""
    strip = lambda lines: [{k: v for k, v in s.items() if not k.startswith("p_")} for s in lines]  # noqa: E731
    assert strip(got) == strip(expected)
    for g, e in zip(got, expected):
        assert {k: v for k, v in g.items() if k.startswith("p_")} == pytest.approx(
            {k: v for k, v in e.items() if k.startswith("p_")}, rel=1e-5)


def by_response(lines):
    out = {}
    for line in lines:
        out.setdefault((line["id"], line["sample"]), []).append(line)
    return out


def test_sentence_probabilities_match_hf(models, tmp_path):
    data = write_rows(tmp_path / "r.jsonl", RESPONSES)
    # The student reads through another tokenizer and architecture: both sides are checked.
    lines = provenance(models, data, tmp_path / "s.jsonl", student="other")
    grouped = by_response(lines)
    for row in RESPONSES:
        sentence_lines = grouped[(row["id"], 0)]
        assert [s["index"] for s in sentence_lines] == list(range(len(sentence_lines)))
        texts = [s["text"] for s in sentence_lines]
        for role, name in (("teacher", "teacher"), ("student", "other")):
            expected = hf_sentence_probs(models[name], row["question"], row["response"], texts)
            got = [s[f"p_{role}"] for s in sentence_lines]
            assert got == pytest.approx(expected, rel=1e-4), role


def test_split_keeps_latex_and_numbered_steps():
    text = ("We have $x = 1.5$. Then $y = 2x$.\n1. First step: compute $a^2$. 2. Second step.\n"
            "Next we get\n$$\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}.$$ Therefore the sum is 5/6. "
            "So \\(f(x) = 1.5x\\). Done.")
    assert [s.text for s in split_sentences(text)] == [
        "We have $x = 1.5$.", "Then $y = 2x$.", "1. First step: compute $a^2$.", "2. Second step.",
        "Next we get", "$$\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}.$$ Therefore the sum is 5/6.",
        "So \\(f(x) = 1.5x\\).", "Done."]
    sentences = split_sentences("  Leading space. Two.  ")
    assert (sentences[0].start, sentences[-1].end) == (0, len("  Leading space. Two.  "))
    assert split_sentences(" \n ") == []


@pytest.mark.parametrize("text, sentences", [
    ("We get 3. Then we get 4. So the sum is 7.", ["We get 3.", "Then we get 4.", "So the sum is 7."]),
    ("So x = a. Then y = b. Done here.", ["So x = a.", "Then y = b.", "Done here."]),
    ("Try n = 1. Then n = 2. Then n = 3. Done.", ["Try n = 1.", "Then n = 2.", "Then n = 3.", "Done."]),
    ("We get x = 7. Therefore, x = 8. Hmm.", ["We get x = 7.", "Therefore, x = 8.", "Hmm."]),
    ("Step 2. Multiply by 3. Step 3. Add.", ["Step 2.", "Multiply by 3.", "Step 3.", "Add."]),
    ("Steps:\n1. Add them.\n2. Multiply them.\nDone.", ["Steps:", "1. Add them.", "2. Multiply them.", "Done."]),
    ("We have 1.5. Then stop. See p. 5 for it.", ["We have 1.5.", "Then stop.", "See p. 5 for it."]),
    # An inline list: its items stay pysbd's.
    ("The plan is 1. Compute X. 2. Compute Y.", ["The plan is", "1. Compute X.", "2. Compute Y."]),
    ("Then we have a. The first case. b. The second.", ["Then we have", "a. The first case.", "b. The second."]),
    # ... only where its next item follows on its line (a numbered list further down is no reason).
    ("We get 3. Then we get 5.\nSteps:\n1. Add.\n2. Check.\n3. Redo.\n4. Done.",
     ["We get 3.", "Then we get 5.", "Steps:", "1. Add.", "2. Check.", "3. Redo.", "4. Done."]),
    ("The plan is 1. Compute X.\n2. Compute Y.", ["The plan is 1.", "Compute X.", "2. Compute Y."]),
    # A LaTeX line break's spacing is no display math: its sentences are two, as after a plain \\.
    ("So $a &= 1 \\\\[2pt] b = 2$. Then x. Done.", ["So $a &= 1 \\\\[2pt] b = 2$.", "Then x.", "Done."]),
    ("So a = 1 \\\\[2pt] b = 2. Then x \\] y. Done.", ["So a = 1 \\\\[2pt] b = 2.", "Then x \\] y.", "Done."]),
    ("A break \\\\\\[x = 1. y\\] then. Next.", ["A break \\\\\\[x = 1. y\\] then.", "Next."]),  # \\ then \[ math
])
def test_a_number_or_letter_ending_a_sentence_ends_it(text, sentences):
    """pysbd read a number or letter that ends a sentence inside a line as a list item: "We get 3. Then we get 4."
    was "We get" | "3. Then we get" | "4. ...", and "Try n = 1. Then n = 2." one sentence (found by an audit)."""
    assert [s.text for s in split_sentences(text)] == sentences


def test_responses_written_after_another_prompt_are_named(models, tmp_path, capsys):
    """A generate output made under another --system-prompt (its records hold the prompt they were written after)
    was read after the prompt provenance and select build, silently: the problems are named (rank 0, once)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models["student"]))
    rows = [{**r, "prompt": build_prompt(tok, r["question"], DEFAULT_SYSTEM_PROMPT).text} for r in RESPONSES]
    rows[1]["prompt"] = build_prompt(tok, rows[1]["question"], "Answer briefly.").text
    data = write_rows(tmp_path / "r.jsonl", rows)
    provenance(models, data, tmp_path / "s.jsonl", "--limit", "2")
    assert ("warning: 1 problems' responses were written after another prompt than the student reads them after here "
            "(their \"prompt\" field; another --system-prompt or chat template?): p2;") in capsys.readouterr().out
    data = write_rows(tmp_path / "same.jsonl", rows[:1] + rows[2:])
    provenance(models, data, tmp_path / "same_s.jsonl", "--limit", "2")
    assert "written after another prompt" not in capsys.readouterr().out
    # TRL's prompt-completion rows read with --question-field prompt: the prompt is the question, no other prompt.
    data = write_rows(tmp_path / "trl.jsonl", [{"id": r["id"], "prompt": r["question"], "completion": r["response"]}
                                               for r in RESPONSES])
    provenance(models, data, tmp_path / "trl_s.jsonl", "--limit", "1", "--question-field", "prompt",
               "--response-field", "completion")
    assert "written after another prompt" not in capsys.readouterr().out
    # rsd eval records hold the prompt of the model eval ran (a teacher's, a distilled model's own template): no
    # prompt the student read, never named.
    evals = [{**r, "prompt": "<another model's template>" + r["question"], "sample": 0, "correct": False}
             for r in RESPONSES]
    provenance(models, write_rows(tmp_path / "gens.jsonl", evals), tmp_path / "gens_s.jsonl", "--limit", "2")
    assert "written after another prompt" not in capsys.readouterr().out


def test_distilled_copy_of_teacher_boosts_nothing(models, tmp_path):
    data = write_rows(tmp_path / "r.jsonl", RESPONSES)
    lines = provenance(models, data, tmp_path / "s.jsonl", "--distilled", str(models["teacher"]), "--beta", TINY_BETA)
    assert all(s["p_distilled"] == s["p_teacher"] for s in lines)
    assert all(s["category"] != "boosted" for s in lines)
    assert {s["category"] for s in lines} & {"teacher", "student"}  # the margin does see differences


def test_teacher_copy_as_student_is_shared_or_boosted(models, tmp_path):
    data = write_rows(tmp_path / "r.jsonl", RESPONSES)
    lines = provenance(models, data, tmp_path / "s.jsonl", "--distilled", str(models["student"]), "--beta", TINY_BETA,
                       student="teacher")
    assert all(s["p_student"] == s["p_teacher"] for s in lines)
    assert {s["category"] for s in lines} <= {"shared", "boosted"}
    assert "boosted" in {s["category"] for s in lines}


def test_categories_rule():
    assert categorize(0.5, 0.3) == "teacher" and categorize(0.3, 0.5) == "student"
    assert categorize(0.5, 0.45, 0.7) == "boosted" and categorize(0.5, 0.45, 0.55) == "shared"
    assert categorize(0.5, 0.45) == "shared"
    assert categorize(0.5, 0.45, 0.7, beta=0.3) == "shared"


def test_an_ellipsis_ends_its_sentence_and_is_none_of_its_own():
    """pysbd cuts "x = 3... Wait" as "x = 3..", ".", "Wait": a one-character sentence with a category of its own,
    counted in every share (found by the provenance review). Punctuation alone joins the sentence before it."""
    texts = [s.text for s in split_sentences("So x = 3... Wait, no. We get 12... Then 13.")]
    assert [t.strip() for t in texts] == ["So x = 3...", "Wait, no.", "We get 12...", "Then 13."]
    assert [s.text for s in split_sentences("... Then 13.")] == ["... Then 13."]


def test_tokenizers_differ_but_sentences_agree(models, tmp_path):
    from transformers import AutoTokenizer

    text = RESPONSES[0]["response"]
    a, b = (AutoTokenizer.from_pretrained(str(models[m])) for m in ("student", "other"))
    assert a.tokenize(text) != b.tokenize(text)
    data = write_rows(tmp_path / "r.jsonl", RESPONSES)
    same = provenance(models, data, tmp_path / "same.jsonl")
    cross = provenance(models, data, tmp_path / "cross.jsonl", student="other")
    assert [(s["id"], s["index"], s["text"]) for s in same] == [(s["id"], s["index"], s["text"]) for s in cross]
    # Only the cache length differs (the student's longer tokenisation sets it): attention spans differ in rounding.
    assert [s["p_teacher"] for s in same] == pytest.approx([s["p_teacher"] for s in cross], rel=1e-5)


def test_batch_size_changes_probabilities_only_by_float32_rounding(models):
    """What the README promises of batch size: the same sentences and categories, probabilities equal up
    to float32 rounding (attention spans and summation order differ), not bit for bit."""
    from rsd_engine.pipeline.readers import Reader
    from rsd_engine.pipeline.responses import Response
    from rsd_engine.pipeline.tracing import Tracer

    responses = [Response(r["id"], 0, r["question"], DEFAULT_SYSTEM_PROMPT, r["response"], {}) for r in RESPONSES]

    def traced(batch_size):
        tracer = Tracer({role: Reader(role, models[name], device="cpu") for role, name in
                         (("teacher", "teacher"), ("student", "other"))}, beta=float(TINY_BETA), batch_size=batch_size)
        usable, _ = tracer.prepare(responses)
        tracer.load()
        return [t for k in range(0, len(usable), batch_size) for t in tracer.trace_batch(usable[k: k + batch_size])]

    for alone, together in zip(traced(1), traced(3)):
        assert [s.text for s in alone.sentences] == [s.text for s in together.sentences]
        assert alone.categories == together.categories
        for role in alone.probs:
            assert alone.probs[role] == pytest.approx(together.probs[role], rel=1e-5, abs=0)


def test_chat_records_read_like_question_and_response(models, tmp_path):
    plain = provenance(models, write_rows(tmp_path / "r.jsonl", RESPONSES[:1]), tmp_path / "a.jsonl")
    tok = build_prompt(__import__("transformers").AutoTokenizer.from_pretrained(str(models["student"])),
                       RESPONSES[0]["question"], DEFAULT_SYSTEM_PROMPT)
    chat = [{"id": "p1", "messages": tok.messages(RESPONSES[0]["response"])}]  # as --format sft writes it
    assert chat[0]["messages"][-1]["content"].startswith("<think>\n")
    lines = provenance(models, write_rows(tmp_path / "chat.jsonl", chat), tmp_path / "b.jsonl")
    assert_same_lines(lines, plain)


CANDIDATES = [
    {"id": "q1", "question": "What is 2 + 2?", "response": "Two and two make four. The answer is \\boxed{4}."},
    {"id": "q1", "question": "What is 2 + 2?", "response": RESPONSES[0]["response"]},
    {"id": "q1", "question": "What is 2 + 2?", "response": "Hmm, that does not look right. Let me try a different "
                                                           "approach. So 2 + 2 = 4. The answer is \\boxed{4}."},
    {"id": "q2", "question": RESPONSES[2]["question"], "response": RESPONSES[2]["response"]},
    {"id": "q2", "question": RESPONSES[2]["question"], "response": "It is pi r^2. The answer is \\boxed{pi r^2}."},
]


@pytest.mark.parametrize("by", ["count", "share"])
def test_select_keeps_what_provenance_counts_say(models, tmp_path, by):
    from transformers import AutoTokenizer

    data = write_rows(tmp_path / "c.jsonl", CANDIDATES)
    # Roles swapped: the smaller tiny model happens to give these texts the higher probabilities.
    models = {"teacher": models["student"], "student": models["teacher"]}
    lines = provenance(models, data, tmp_path / "s.jsonl", "--beta", TINY_BETA)
    tok = AutoTokenizer.from_pretrained(str(models["student"]))
    stats = {}
    for (rid, sample), group in by_response(lines).items():
        teacher = sum(s["category"] == "teacher" for s in group)
        stats.setdefault(rid, []).append((teacher, len(group), sample))
    assert len({t for t, _, _ in stats["q1"]}) > 1  # the candidates do differ
    argv = ["select", "--teacher", str(models["teacher"]), "--student", str(models["student"]), "--data", str(data),
            "--out", str(tmp_path / "sel.jsonl"), "--beta", TINY_BETA, "--by", by, "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    kept = {r["id"]: r for r in read_records(tmp_path / "sel.jsonl")}
    for rid, cands in stats.items():
        rows = [c for c in CANDIDATES if c["id"] == rid]
        score = (lambda c: c[0]) if by == "count" else (lambda c: c[0] / c[1])
        best = min(cands, key=lambda c: (-score(c), len(tok.encode(rows[c[2]]["response"])), c[2]))
        assert kept[rid]["response"] == rows[best[2]]["response"]
        assert kept[rid]["teacher_sentences"] == best[0]
        assert kept[rid]["teacher_share"] == pytest.approx(best[0] / best[1])
        assert kept[rid]["candidates"] == len(rows)


def test_pick_ties_go_to_the_shorter():
    cands = [Candidate(0, 2, 4, 50), Candidate(1, 2, 3, 40), Candidate(2, 1, 1, 10)]
    assert pick(cands, "count").order == 1
    assert pick(cands, "share").order == 2
    assert pick([Candidate(0, 1, 2, 30), Candidate(1, 1, 2, 30)]).order == 0


def test_resume_after_torn_output(models, tmp_path, capsys):
    data = write_rows(tmp_path / "r.jsonl", RESPONSES)
    whole = provenance(models, data, tmp_path / "whole.jsonl")
    out = tmp_path / "s.jsonl"
    provenance(models, data, out, "--limit", "2")
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-2]) + lines[-2][:10])  # a kill -9 in the middle of response p2's lines
    assert complete_keys(read_records(out)) == {("p1", 0)}
    capsys.readouterr()
    assert_same_lines(provenance(models, data, out), whole)
    report = capsys.readouterr().out
    assert "1 already in the output, 2 traced now" in report and "cut short by the last run" in report


def test_lines_of_anything_else_are_never_cut(models, tmp_path, capsys):
    """A rerun cuts the sentence lines of a response a kill cut short. It cut every trailing line that was no
    complete response: lines appended to the output (said to be "sentences ... traced again", and nothing was
    traced), or, under --force, every record of another command's output named as --out. Those are refused and
    kept, --force or not."""
    data = write_rows(tmp_path / "r.jsonl", RESPONSES)
    out = tmp_path / "s.jsonl"
    provenance(models, data, out, "--limit", "2")
    appended = [{"id": "p9", "note": "added by hand"}, {"id": "p1", "sample": 0, "response": "x", "correct": True}]
    with out.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in appended))
    before = out.read_bytes()
    for extra in ((), ("--force",)):
        with pytest.raises(SystemExit) as stopped:
            main(["provenance", "--teacher", str(models["teacher"]), "--student", str(models["student"]), "--data",
                  str(data), "--out", str(out), "--device", "cpu", "--no-progress", *extra])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and "holds lines that are no rsd provenance sentence lines" in err
        assert out.read_bytes() == before
    other = write_rows(tmp_path / "eval.jsonl", [dict(r, sample=0, correct=True) for r in RESPONSES])
    kept = other.read_bytes()
    with pytest.raises(SystemExit):
        main(["provenance", "--teacher", str(models["teacher"]), "--student", str(models["student"]), "--data",
              str(data), "--out", str(other), "--device", "cpu", "--no-progress", "--force"])
    assert "no rsd provenance sentence lines" in capsys.readouterr().err and other.read_bytes() == kept


def test_ranks_write_parts_that_merge_to_the_single_run(models, tmp_path, as_ranks):
    data = write_rows(tmp_path / "r.jsonl", RESPONSES)
    whole = provenance(models, data, tmp_path / "whole.jsonl")
    out = tmp_path / "s.jsonl"
    as_ranks(lambda: provenance(models, data, out))
    assert main(["merge", str(out)]) == 0
    assert_same_lines(read_records(out), whole)


def test_report_table_and_plot(models, tmp_path, capsys):
    data = write_rows(tmp_path / "r.jsonl", RESPONSES)
    provenance(models, data, tmp_path / "s.jsonl", "--distilled", str(models["student"]), "--plot",
               str(tmp_path / "p.png"))
    report = capsys.readouterr().out
    assert "response sentences  teacher  student   shared  boosted" in report
    assert "\np3 " in report and "\nall " in report
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_rows_are_skipped_and_counted(models, tmp_path, capsys):
    rows = [*RESPONSES, {"id": "e", "question": "Q?", "response": "  \n"}, {"id": "m", "response": "No question."},
            {"id": "long", "question": "Q?", "response": "The answer is 4. " * 40}]
    lines = provenance(models, write_rows(tmp_path / "r.jsonl", rows), tmp_path / "s.jsonl", "--max-seq-len", "150",
                       status=3)
    report = capsys.readouterr().out
    assert report.splitlines()[-1] == ("rsd provenance: 1 of 4 responses were skipped (too long for --max-seq-len, "
                                       "unreadable, non-finite log-probs, or no sentence): exit status 3")
    # Every reason is named (the first alone was before: row 4's missing question was nowhere).
    assert "skipped rows: 2 of 6 (row 3: empty response; row 4: no 'question' text)" in report
    assert "skipped responses: 1 (first: id long sample 0: " in report and "longer than max_seq_len 150" in report
    assert {s["id"] for s in lines} == {"p1", "p2", "p3"}


def test_no_usable_row_names_the_fields(models, tmp_path, capsys):
    data = write_rows(tmp_path / "r.jsonl", [{"prompt": "Q?", "completion": "A."}])
    argv = ["provenance", "--teacher", str(models["teacher"]), "--student", str(models["student"]), "--data",
            str(data), "--out", str(tmp_path / "s.jsonl"), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "none of the 1 rows is a usable response (no 'question' text)" in err and "['completion', 'prompt']" in err


@pytest.mark.parametrize("beta", ["0", "1", "-0.1", "1.5", "x"])
def test_beta_outside_open_interval_is_refused(models, tmp_path, capsys, beta):
    with pytest.raises(SystemExit) as exit_info:
        main(["provenance", "--teacher", str(models["teacher"]), "--student", str(models["student"]), "--data", "x",
              "--out", str(tmp_path / "s.jsonl"), "--beta", beta])
    assert exit_info.value.code == 2
    assert f"--beta: must be a number in (0, 1), got '{beta}'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--beta = 1.5: must be a number in \(0, 1\)"):
        check_beta(1.5)
    with pytest.raises(ValueError, match="--beta"):
        ProvenanceOptions("t", "s", "d", "o", beta=0.0)


def test_select_exits_3_when_candidates_are_skipped(models, tmp_path, capsys):
    rows = [*CANDIDATES[:3], {"id": "q3", "question": "Q?", "response": "The answer is 4. " * 40}]
    argv = ["select", "--teacher", str(models["teacher"]), "--student", str(models["student"]), "--data",
            str(write_rows(tmp_path / "c.jsonl", rows)), "--out", str(tmp_path / "sel.jsonl"), "--max-seq-len", "150",
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 3
    assert [r["id"] for r in read_records(tmp_path / "sel.jsonl")] == ["q1"]
    assert capsys.readouterr().out.splitlines()[-1] == (
        "rsd select: 1 candidates were skipped (too long for --max-seq-len, unreadable, non-finite log-probs, "
        "or no sentence): exit status 3")


def test_select_needs_ids(models, tmp_path, capsys):
    data = write_rows(tmp_path / "c.jsonl", [{k: v for k, v in c.items() if k != "id"} for c in CANDIDATES])
    with pytest.raises(SystemExit):
        main(["select", "--teacher", str(models["teacher"]), "--student", str(models["student"]), "--data", str(data),
              "--out", str(tmp_path / "sel.jsonl"), "--no-progress"])
    assert "no row has an 'id' field; rsd select keeps one candidate per id" in capsys.readouterr().err


@pytest.fixture(scope="module")
def unk_model(tmp_path_factory):
    """A model whose tokenizer has no byte fallback: characters outside its corpus become [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("unk")
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                                            show_progress=False))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="<|im_end|>",
                            pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE).save_pretrained(str(root / "tok"))
    return build_model(root / "model", "qwen3", tokenizer_dir=root / "tok", seed=4)


def test_unreadable_text_is_skipped_with_the_reason(models, unk_model, tmp_path, capsys):
    rows = [RESPONSES[2], {"id": "euro", "question": "What is 2 + 2?", "response": "It costs 4 € in total."}]
    lines = provenance({**models, "unk": unk_model}, write_rows(tmp_path / "r.jsonl", rows), tmp_path / "s.jsonl",
                       "--system-prompt", "", teacher="unk", status=3)
    report = capsys.readouterr().out
    assert ("skipped responses: 1 (first: id euro sample 0: the teacher's tokenizer cannot read the response: '€' at "
            "character 11 becomes the unknown token)") in report
    assert {s["id"] for s in lines} == {"p3"}


@pytest.fixture(scope="module")
def nan_student(tmp_path_factory, tiny_pair):
    """The student with a NaN embedding row for the last token of " apples": the log-probs of a response
    holding it are NaN from there on; other responses read as under the student."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("nan") / "student"
    shutil.copytree(tiny_pair[1], folder)
    token = AutoTokenizer.from_pretrained(str(folder))(" apples", add_special_tokens=False)["input_ids"][-1]
    weights = load_file(folder / "model.safetensors")
    [name] = [n for n in weights if "embed_tokens" in n]
    weights[name][token] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


NAN_ROWS = [{"id": "p", "question": "How many does Alice have?",
             "response": "She has 5 apples. The answer is \\boxed{5}."},
            {"id": "p", "question": "How many does Alice have?", "response": "The answer is \\boxed{5}."}]
NOT_FINITE = "log-probs not finite under the student (the model's logits are NaN/inf)"


def test_non_finite_log_probs_are_skipped_and_never_written(models, nan_student, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    lines = provenance({**models, "nan": nan_student}, write_rows(tmp_path / "r.jsonl", NAN_ROWS), out,
                       student="nan", status=3)
    assert f"skipped responses: 1 (first: id p sample 0: {NOT_FINITE})" in capsys.readouterr().out
    assert [(s["sample"], s["text"]) for s in lines] == [(1, NAN_ROWS[1]["response"])]
    assert "NaN" not in out.read_text() and all(math.isfinite(s["p_student"]) for s in lines)


@pytest.mark.parametrize("by", ["count", "student-likelihood"])
@pytest.mark.parametrize("budget", [[], ["--budget", "1"]])
@pytest.mark.parametrize("order", [1, -1])
def test_select_skips_non_finite_log_probs_in_any_input_order(models, nan_student, tmp_path, capsys, by, budget,
                                                               order):
    data = write_rows(tmp_path / "c.jsonl", NAN_ROWS[::order])
    out = tmp_path / "sel.jsonl"
    argv = ["select", "--teacher", str(models["teacher"]), "--student", str(nan_student), "--data", str(data),
            "--out", str(out), "--by", by, *budget, "--device", "cpu", "--no-progress"]
    assert main(argv) == 3
    assert f"skipped candidates: 1 (first: id p candidate {0 if order == 1 else 1}: {NOT_FINITE})" in \
        capsys.readouterr().out
    [kept] = read_records(out)
    assert kept["response"] == NAN_ROWS[1]["response"]
    assert "NaN" not in out.read_text()
    if budget:
        assert "NaN" not in scores_path(out).read_text() and len(read_records(scores_path(out))) == 1


@pytest.fixture(scope="module")
def marker_teacher(tmp_path_factory):
    """A teacher whose tokenizer has a marker "[S}": in "[S}." the student's token "}." starts inside the marker,
    so the sentence "." holds no student token and merge_empty leaves no sentence."""
    root = tmp_path_factory.mktemp("marker")
    tok = build_tokenizer(root / "tok", extra_special_tokens=("[S}",))
    return build_model(root / "teacher", "qwen3", tokenizer_dir=tok, hidden_size=64, num_layers=2, seed=5)


def test_a_candidate_without_a_sentence_is_skipped_by_select_as_by_provenance(models, marker_teacher, tmp_path,
                                                                               capsys):
    rows = [{"id": "p", "question": "What is 2 + 3?", "response": "[S}."},
            {"id": "p", "question": "What is 2 + 3?", "response": "The answer is \\boxed{5}."}]
    data = write_rows(tmp_path / "c.jsonl", rows)
    common = ["--teacher", str(marker_teacher), "--student", str(models["student"]), "--data", str(data),
              "--device", "cpu", "--no-progress"]
    why = "id p sample 0: no sentence holds a token under every model"
    assert main(["provenance", *common, "--out", str(tmp_path / "s.jsonl")]) == 3
    assert f"skipped responses: 1 (first: {why})" in capsys.readouterr().out
    for by, budget in (("count", []), ("share", []), ("count", ["--budget", "2"]), ("share", ["--budget", "2"])):
        out = tmp_path / f"sel-{by}-{len(budget)}.jsonl"
        assert main(["select", *common, "--by", by, *budget, "--out", str(out)]) == 3
        assert f"skipped candidates: 1 (first: {why.replace('sample', 'candidate')})" in capsys.readouterr().out
        assert [(r["response"], r["sentences"]) for r in read_records(out)] == [(rows[1]["response"], 1)]
        if budget:
            assert [s["sample"] for s in read_records(scores_path(out))] == [1]


def test_generate_select_provenance_keeps_what_rsd_select_keeps(models, tmp_path):
    from rsd_engine import Engine
    from rsd_engine.pipeline.data import Problem
    from rsd_engine.pipeline.select import provenance_chooser
    from rsd_engine.pipeline.traces import Attempt, select_trace
    from rsd_engine.results import GenerationResult

    teacher, student = models["student"], models["teacher"]  # swapped as in the selection test
    engine = Engine(teacher, student, device="cpu", max_batch_size=1, max_seq_len=256)
    rows = [c for c in CANDIDATES if c["id"] == "q1"]
    attempts = []
    for k, row in enumerate(rows):
        ids = engine.tokenizer.encode(row["response"], add_special_tokens=False)
        result = GenerationResult([1], token_ids=ids, text=row["response"], finish_reason="eos")
        attempts.append(Attempt(k, result, ids, "4", True, True, True, 0.0, True))
    problem = Problem("q1", rows[0]["question"], "4")
    prompt = build_prompt(engine.tokenizer, problem.question, DEFAULT_SYSTEM_PROMPT)
    choose = provenance_chooser(engine, DEFAULT_SYSTEM_PROMPT, rule=Rule("difference", float(TINY_BETA)))
    record = select_trace(problem, prompt, attempts, prefix_tokens=8, decode=engine.tokenizer.decode, choose=choose)

    data = write_rows(tmp_path / "c.jsonl", rows)
    argv = ["select", "--teacher", str(teacher), "--student", str(student), "--data", str(data), "--out",
            str(tmp_path / "sel.jsonl"), "--beta", TINY_BETA, "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    [kept] = read_records(tmp_path / "sel.jsonl")
    assert record["completion"] == kept["response"] and record["status"] == "solved"
    assert (record["teacher_sentences"], record["teacher_share"]) == (kept["teacher_sentences"], kept["teacher_share"])
    shortest = min(range(len(rows)), key=lambda k: len(attempts[k].token_ids))
    assert record["kept_attempt"] != shortest  # the rule, not length, decided here


def test_generate_select_provenance_breaks_ties_by_the_tokens_rsd_select_counts(models, tmp_path):
    """Two attempts tied on the score (no teacher sentence at beta 0.1): the one generated as a non-canonical
    tokenisation has more generated tokens but fewer when tokenised again, which is what rsd select counts."""
    from rsd_engine import Engine
    from rsd_engine.pipeline.data import Problem
    from rsd_engine.pipeline.select import provenance_chooser
    from rsd_engine.pipeline.traces import Attempt
    from rsd_engine.results import GenerationResult

    engine = Engine(models["teacher"], models["student"], device="cpu", max_batch_size=1, max_seq_len=256)
    tok = engine.tokenizer
    texts = ["The answer is 4.", "Do. Do."]
    attempts = []
    for k, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False)
        if k == 0:  # sampled character by character
            ids = [i for ch in text for i in tok.encode(ch, add_special_tokens=False)]
        assert tok.decode(ids) == text
        attempts.append(Attempt(k, GenerationResult([1], token_ids=ids, text=text, finish_reason="eos"), ids, "4",
                                True, True, True, 0.0, True))
    generated = [len(a.token_ids) for a in attempts]
    retokenised = [len(tok.encode(t, add_special_tokens=False)) for t in texts]
    assert generated[0] > generated[1] and retokenised[0] < retokenised[1]
    problem = Problem("q", "What is 2 + 2?", "4")
    kept, fields = provenance_chooser(engine, DEFAULT_SYSTEM_PROMPT)(problem, attempts)

    data = write_rows(tmp_path / "c.jsonl", [{"id": "q", "question": problem.question, "response": t} for t in texts])
    argv = ["select", "--teacher", str(models["teacher"]), "--student", str(models["student"]), "--data", str(data),
            "--out", str(tmp_path / "sel.jsonl"), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    [row] = read_records(tmp_path / "sel.jsonl")
    assert row["teacher_sentences"] == fields["teacher_sentences"] == 0  # tied: the token count decides
    assert kept.index == 0 and row["response"] == texts[0]


def test_rsd_generate_select_provenance(tmp_path_factory, tmp_path, capsys):
    from solver_pair import SYSTEM, solver_pair, write_problems

    teacher, student = solver_pair(tmp_path_factory.getbasetemp() / "solver_pair")
    argv = ["generate", "--teacher", str(teacher), "--student", str(student), "--data",
            str(write_problems(tmp_path / "p.jsonl")), "--out", str(tmp_path / "t.jsonl"), "--id-field", "id",
            "--system-prompt", SYSTEM, "--attempts", "2", "--max-new-tokens", "40", "--no-progress",
            "--select", "provenance"]
    assert main(argv) == 0
    records = {r["id"]: r for r in read_records(tmp_path / "t.jsonl")}
    assert records["add"]["status"] == "solved" and records["add"]["teacher_sentences"] >= 0
    assert 0.0 <= records["add"]["teacher_share"] <= 1.0
    assert "teacher_sentences" not in records["mul"]  # never solved: a prefix, nothing to choose
    with pytest.raises(SystemExit):
        main(argv[:-1] + ["sideways"])
    assert "--select: invalid choice: 'sideways'" in capsys.readouterr().err


def test_rerun_with_other_settings_is_refused_unless_forced(models, tmp_path, capsys):
    data = write_rows(tmp_path / "r.jsonl", RESPONSES)
    out = tmp_path / "s.jsonl"
    provenance(models, data, out, "--limit", "1")
    argv = ["provenance", "--teacher", str(models["teacher"]), "--student", str(models["student"]), "--data",
            str(data), "--out", str(out), "--device", "cpu", "--no-progress", "--beta", "0.2"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "holds records made with other settings" in err and "--beta" in err
    assert main(argv + ["--force"]) == 0
    assert {s["id"] for s in read_records(out)} == {"p1", "p2", "p3"}


def test_select_ranks_merge_to_the_single_run(models, tmp_path, as_ranks):
    data = write_rows(tmp_path / "c.jsonl", CANDIDATES)
    argv = ["select", "--teacher", str(models["teacher"]), "--student", str(models["student"]), "--data", str(data),
            "--beta", TINY_BETA, "--device", "cpu", "--no-progress", "--out"]
    assert main(argv + [str(tmp_path / "whole.jsonl")]) == 0
    assert as_ranks(lambda: main(argv + [str(tmp_path / "sel.jsonl")])) == [0, 0]
    assert main(["merge", str(tmp_path / "sel.jsonl")]) == 0
    merged, whole = read_records(tmp_path / "sel.jsonl"), read_records(tmp_path / "whole.jsonl")
    assert [(r["id"], r["response"], r["teacher_sentences"]) for r in merged] == [
        (r["id"], r["response"], r["teacher_sentences"]) for r in whole]


def test_rows_without_ids_are_keyed_by_their_question_not_their_row_number(tmp_path):
    from rsd_engine.pipeline.data import question_id
    from rsd_engine.pipeline.responses import load_responses

    rows = [{"question": f"what is {i} + {i}?", "response": f"It is {2 * i}."} for i in range(3)]
    rows.append({"messages": [{"role": "user", "content": "what is 0 + 0?"},
                              {"role": "assistant", "content": "Zero."}]})
    forward, backward = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    forward.write_text("".join(json.dumps(r) + "\n" for r in rows))
    backward.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))

    def keyed(path):
        return {r.key: r.text for r in load_responses(path).responses}

    assert keyed(forward)[(question_id("what is 2 + 2?"), 0)] == "It is 4."
    # The same question twice: two samples of one id, whichever file order.
    assert {keyed(forward)[(question_id("what is 0 + 0?"), s)] for s in (0, 1)} == {"It is 0.", "Zero."}
    assert set(keyed(forward)) == set(keyed(backward))


def test_sentences_an_older_rsd_made_are_not_resumed_beside_new_ones(models, tmp_path, capsys):
    """Sentences are cut otherwise now (punctuation alone joins the sentence before it): an output an older rsd
    wrote is refused rather than extended with sentences made another way (--force mixes them)."""
    data = write_rows(tmp_path / "r.jsonl", RESPONSES)
    out = tmp_path / "s.jsonl"
    provenance(models, data, out, "--limit", "1")
    manifest = Path(f"{out}.manifest.json")
    held = json.loads(manifest.read_text())
    assert held["settings"]["sentence reading"] == READING
    del held["settings"]["sentence reading"]  # as an older rsd wrote it
    manifest.write_text(json.dumps(held))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(["provenance", "--teacher", str(models["teacher"]), "--student", str(models["student"]), "--data",
              str(data), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert stopped.value.code == 2 and f"sentence reading: 1 in the output, {READING} now" in capsys.readouterr().err
