"""`rsd score` against log-softmax computed here with HF transformers, in every input form."""
import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rsd_engine.cli import main
from rsd_engine.pipeline.prompts import build_prompt

SUB_1PCT = math.log(0.01)
QUESTIONS = ["What is 2+2?", "Alice has 5 apples and Bob gives her 8 more. How many?"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def traces(tiny_pair, tmp_path_factory):
    """Two trace files over the tiny pair: random token ids (one trace longer than a 512-token chunk),
    and text completions in three forms (rsd generate records, chat messages, a plain dataset)."""
    root = tmp_path_factory.mktemp("traces")
    tok = AutoTokenizer.from_pretrained(str(tiny_pair[1]))
    rng = random.Random(0)
    prompts = [build_prompt(tok, q, "Be brief.") for q in QUESTIONS]
    ids_rows = [{"id": "a", "prompt": prompts[0].text, "token_ids": [rng.randrange(450) for _ in range(600)]},
                {"id": "b", "prompt": prompts[1].text, "token_ids": [rng.randrange(450) for _ in range(40)]}]
    texts = ["Then 2x = 8, so x = 4.</think>\nThe answer is \\boxed{4}.", "She has 13 apples in total."]
    forms = {
        "records": [{"id": str(i), "prompt": p.text, "completion": t} for i, (p, t) in enumerate(zip(prompts, texts))],
        "messages": [{"id": str(i), "messages": p.messages(t)} for i, (p, t) in enumerate(zip(prompts, texts))],
        "plain": [{"question": q, "trace": t} for q, t in zip(QUESTIONS, texts)],
    }
    files = {"ids": root / "ids.jsonl"}
    files["ids"].write_text("".join(json.dumps(r) + "\n" for r in ids_rows))
    for name, rows in forms.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [(tok.encode(r["prompt"], add_special_tokens=False), r["token_ids"]) for r in ids_rows]
    text_pairs = [(tok.encode(p.text, add_special_tokens=False), tok.encode(t, add_special_tokens=False))
                  for p, t in zip(prompts, texts)]
    return files, {"ids": pairs, "text": text_pairs}


def hf_logprobs(folder, pairs):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt, completion in pairs:
            lp = torch.log_softmax(model(torch.tensor([prompt + completion])).logits[0].float(), -1)
            out.append([lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion)])
    return out


def expected(logprobs):
    n = len(logprobs)
    mean = -sum(logprobs) / n
    return {"tokens": n, "sub_1pct_share": sum(lp < SUB_1PCT for lp in logprobs) / n, "mean_surprisal": mean,
            "perplexity": math.exp(mean)}


def score(tmp_path, student, *data, teacher=None, extra=()):
    report = tmp_path / "report.json"
    argv = ["score", "--student", str(student), "--data", *map(str, data), "--out", str(report),
            "--system-prompt", "Be brief.", "--no-progress", *extra]
    if teacher is not None:
        argv += ["--teacher", str(teacher)]
    assert main(argv) == 0
    return json.loads(report.read_text())["files"]


def run(tmp_path, student, *data, teacher=None, **options):
    """run_score itself (the figures whatever the exit status): the JSON report's files and the lines printed."""
    from rsd_engine.pipeline.score import run_score

    lines, report = [], tmp_path / "run_report.json"
    run_score(list(map(str, data)), student=str(student), teacher=teacher and str(teacher), out=str(report),
              system_prompt="Be brief.", progress=False, log=lines.append, **options)
    return json.loads(report.read_text(), parse_constant=_no_constant)["files"], "\n".join(lines)


def _no_constant(name):
    raise AssertionError(f"the report holds {name}, which is not JSON")


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("with_teacher", [False, True], ids=["student-only", "with-teacher"])
def test_figures_match_hand_computed_log_softmax(tiny_pair, traces, tmp_path, capsys, with_teacher):
    files, pairs = traces
    teacher = tiny_pair[0] if with_teacher else None
    (report,) = score(tmp_path, tiny_pair[1], files["ids"], teacher=teacher)
    models = {"student": tiny_pair[1], **({"teacher": tiny_pair[0]} if with_teacher else {})}
    assert set(report) >= set(models) and ("teacher" in report) == with_teacher
    for name, folder in models.items():
        want = hf_logprobs(folder, pairs["ids"])
        assert 0.0 < expected(want[0])["sub_1pct_share"] < 1.0  # a case where the share means something
        for got, lp in zip(report["per_trace"], want):
            assert got[name] == pytest.approx(expected(lp), rel=1e-4, abs=1e-5)
        assert report[name] == pytest.approx(expected(want[0] + want[1]), rel=1e-4, abs=1e-5)  # pooled tokens
    table = capsys.readouterr().out
    assert "ids.jsonl" in table and f"{report['student']['sub_1pct_share']:.2%}" in table


def test_every_input_form_scores_the_same(tiny_pair, traces, tmp_path):
    files, pairs = traces
    reports = score(tmp_path, tiny_pair[1], files["records"], files["messages"])
    plain = score(tmp_path, tiny_pair[1], files["plain"], extra=["--completion-field", "trace"])
    want = hf_logprobs(tiny_pair[1], pairs["text"])
    for report in [*reports, *plain]:
        assert len(report["per_trace"]) == len(want)
        for got, lp in zip(report["per_trace"], want):
            assert got["student"] == pytest.approx(expected(lp), rel=1e-4, abs=1e-5)


def test_trl_tokenised_rows_score_their_ids(tiny_pair, traces, tmp_path):
    """`rsd generate --format sft` records carry TRL's tokenised form: input_ids split by completion_mask into
    the prompt and the completion SFTTrainer trains on. Scored as those ids (the text beside them is not read:
    it may tokenise otherwise), as the records with token_ids are."""
    from rsd_engine.pipeline.score import read_traces
    from rsd_engine.tokens import load_tokenizer

    files, pairs = traces
    rows = [{"id": str(i), "input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)}
            for i, (p, c) in enumerate(pairs["ids"])]
    (report,) = score(tmp_path, tiny_pair[1], write_rows(tmp_path / "tokenised.jsonl", rows))
    for got, lp in zip(report["per_trace"], hf_logprobs(tiny_pair[1], pairs["ids"]), strict=True):
        assert got["student"] == pytest.approx(expected(lp), rel=1e-4, abs=1e-5)
    bad = [({"input_ids": [1, 2, 3], "completion_mask": [0, 1]}, "3 ids"),
           ({"input_ids": [1, 2, 3], "completion_mask": [0, 1, 0]}, "0s then 1s"),
           ({"input_ids": [1, 2, 3], "completion_mask": [0, 2, 1]}, "0s then 1s"),
           ({"input_ids": "1 2 3", "completion_mask": [0, 1, 1]}, "'input_ids' is a str"),
           ({"input_ids": [1, True, 3], "completion_mask": [0, 1, 1]}, "'input_ids' item 1 is True")]
    read = read_traces(write_rows(tmp_path / "bad.jsonl", [rows[1]] + [row for row, _ in bad]),
                       load_tokenizer(tiny_pair[1]))
    assert [t.id for t in read.traces] == ["1"] and [line for line, _ in read.skipped] == [1, 2, 3, 4, 5]
    for (_, why), (_, said) in zip(bad, read.skipped, strict=True):
        assert why in said


def test_ids_another_tokenizer_wrote_are_not_scored(tiny_pair, tmp_path):
    """A record's token ids are scored as they are, so ids another tokenizer wrote (traces scored under another
    student than the one that generated them) were scored as other tokens without a word: where the record has
    its text, the ids must spell it under this student's tokenizer, else the row is skipped, named."""
    from rsd_engine.pipeline.score import read_traces
    from rsd_engine.pipeline.traces import sft_completion
    from rsd_engine.tokens import load_tokenizer

    tokenizer = load_tokenizer(tiny_pair[1])
    prompt = build_prompt(tokenizer, QUESTIONS[0], "Be brief.").text
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    text = "Then x = 4.</think> The answer is \\boxed{4}."
    ids = tokenizer.encode(text, add_special_tokens=False)
    written = ids + [tokenizer.eos_token_id]
    shifted = [(t + 7) % 400 for t in ids]  # another tokenizer's numbering of the same text
    rows = [{"id": "ok", "prompt": prompt, "completion": text, "token_ids": ids},
            {"id": "other", "prompt": prompt, "completion": text, "token_ids": shifted},
            {"id": "sft", "prompt": prompt, "completion": sft_completion(tokenizer, prompt_ids, written),
             "input_ids": prompt_ids + written, "completion_mask": [0] * len(prompt_ids) + [1] * len(written)},
            {"id": "sft-other", "prompt": prompt, "completion": sft_completion(tokenizer, prompt_ids, written),
             "input_ids": prompt_ids + shifted + [tokenizer.eos_token_id],
             "completion_mask": [0] * len(prompt_ids) + [1] * (len(shifted) + 1)}]
    read = read_traces(write_rows(tmp_path / "t.jsonl", rows), tokenizer)
    assert [t.id for t in read.traces] == ["ok", "sft"]
    assert [line for line, _ in read.skipped] == [1, 3]
    assert all("do not decode to its 'completion' under the student's tokenizer" in why for _, why in read.skipped)


def test_files_side_by_side_with_histogram(tiny_pair, traces, tmp_path, capsys):
    import matplotlib.image

    files, _ = traces
    plot = tmp_path / "hist.png"
    reports = score(tmp_path, tiny_pair[1], files["ids"], files["records"], teacher=tiny_pair[0],
                    extra=["--plot", str(plot)])
    assert [r["path"] for r in reports] == [str(files["ids"]), str(files["records"])]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[3:5]] == ["ids.jsonl", "records.jsonl"]  # one table, a row each
    image = matplotlib.image.imread(str(plot))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_bad_trace_files_are_named(tiny_pair, tmp_path, capsys):
    no_traces = tmp_path / "no_traces.jsonl"
    no_traces.write_text(json.dumps({"question": "q"}) + "\n")
    for data, message in [(no_traces, "none of the 1 rows is a trace"),
                          (tmp_path / "missing.jsonl", "dataset not found")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["score", "--student", str(tiny_pair[1]), "--data", str(data), "--no-progress"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--out", "--plot"])
def test_report_over_a_data_file_is_refused(tiny_pair, traces, tmp_path, capsys, option):
    files, _ = traces
    data = tmp_path / "records.jsonl"
    data.write_bytes(files["records"].read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--student", str(tiny_pair[1]), "--data", str(files["ids"]), str(data), option, str(data),
              "--no-progress"])
    assert exit_info.value.code == 2
    assert f"{option} {data} is also a --data file" in capsys.readouterr().err
    assert data.read_bytes() == files["records"].read_bytes()


def test_out_and_plot_on_one_file_is_refused(tiny_pair, traces, tmp_path, capsys):
    files, _ = traces
    report = tmp_path / "report.png"  # (a --plot without extension is written with ".png": another file)
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--student", str(tiny_pair[1]), "--data", str(files["records"]), "--out", str(report),
              "--plot", str(report), "--no-progress"])
    assert exit_info.value.code == 2 and "--out and --plot are the same file" in capsys.readouterr().err
    assert not report.exists()


def test_out_and_plot_replace_only_rsd_score_s_own_report_and_plot(tiny_pair, traces, tmp_path, capsys):
    """--out over a generate output (records and manifest) made it an indented JSON report, and a --plot folder got
    FOLDER.png beside it. Now only an earlier report or plot of rsd score is replaced (a rerun), before any work."""
    files, _ = traces
    plot = tmp_path / "hist.png"
    for _ in range(2):
        score(tmp_path, tiny_pair[1], files["records"], extra=["--plot", str(plot)])
    assert json.loads((tmp_path / "report.json").read_text())["rsd command"] == "score"
    output = tmp_path / "traces.jsonl"
    output.write_bytes(files["records"].read_bytes())
    manifest = tmp_path / "traces.jsonl.manifest.json"
    manifest.write_text(json.dumps({"settings": {"rsd command": "generate"}}))
    before = output.read_bytes(), manifest.read_bytes()
    (tmp_path / "plots").mkdir()
    for flag, path, message in [("--out", output, f"--out {output} exists and is no report of rsd score"),
                                ("--plot", tmp_path / "plots", f"--plot {tmp_path / 'plots'} is a folder")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["score", "--student", str(tiny_pair[1]), "--data", str(files["ids"]), flag, str(path),
                  "--no-progress"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert (output.read_bytes(), manifest.read_bytes()) == before and not (tmp_path / "plots.png").exists()


BAD_CHAT_ROWS = [
    ({"id": "m", "messages": ["hello", {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "'messages' holds an item that is not a {role, content} object"),
    ({"id": "m", "messages": [{"role": "user", "content": "q"},
                              {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]},
     "'messages' ends with an assistant turn whose content is not text (list)"),
    ({"id": "m", "messages": [{"role": "user", "content": "q \ud800"}, {"role": "assistant", "content": "a"}]},
     "'messages'[0]['content'] is not valid Unicode: '\\ud800' at character 2 is a lone surrogate"),
    ({"id": "s", "prompt": "hi", "completion": "\ud800 x"},
     "'completion' is not valid Unicode: '\\ud800' at character 0 is a lone surrogate"),
    ({"id": "t", "messages": "hi"}, "'messages' is a str, not a list of chat messages"),  # was: "no 'messages'"
    # An assistant turn of null content, or none, was scored as an empty completion (0 tokens, exit 0); 0 and false
    # too, and a system turn of 0 was no system prompt.
    ({"id": "n", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     "'messages' ends with an assistant turn with no content (null): nothing to score"),
    ({"id": "k", "messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
     "'messages' ends with an assistant turn with no content (no 'content' key): nothing to score"),
    ({"id": "z", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 0}]},
     "'messages' ends with an assistant turn whose content is not text (int)"),
    ({"id": "f", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": False}]},
     "'messages' ends with an assistant turn whose content is not text (bool)"),
    ({"id": "y", "messages": [{"role": "system", "content": 0}, {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a"}]},
     "'messages' has a system turn whose content is not text (int)"),
]


def test_a_system_turn_of_null_content_is_no_system_prompt(tiny_pair, tmp_path):
    """As responses.py reads one; an empty assistant turn ("") is an empty completion, scored as one."""
    from rsd_engine.pipeline.score import read_traces
    from rsd_engine.tokens import load_tokenizer

    user, assistant = {"role": "user", "content": "q"}, {"role": "assistant", "content": ""}
    data = write_rows(tmp_path / "system.jsonl", [{"id": "a", "messages": [user, assistant]},
                                                  {"id": "b", "messages": [{"role": "system", "content": None}, user,
                                                                           assistant]}])
    read = read_traces(data, load_tokenizer(tiny_pair[1]))
    assert not read.skipped and read.traces[0].prompt_ids == read.traces[1].prompt_ids
    assert read.traces[0].completion_ids == read.traces[1].completion_ids == []


def test_a_chat_row_with_no_assistant_content_is_skipped_and_the_run_falls_short(tiny_pair, traces, tmp_path,
                                                                                  capsys):
    files, _ = traces
    good = json.loads(files["messages"].read_text().splitlines()[0])
    data = write_rows(tmp_path / "null.jsonl", [good, BAD_CHAT_ROWS[-5][0]])
    assert main(["score", "--student", str(tiny_pair[1]), "--data", str(data), "--no-progress"]) == 3
    out = capsys.readouterr()
    assert "skipped 1 rows (first: row 1, 'messages' ends with an assistant turn with " \
        "no content (null)" in out.out + out.err


def test_token_ids_are_read_whatever_messages_holds(tiny_pair, traces, tmp_path):
    # A tokenised row whose 'messages' is a JSON string (as parquet files often store it) was skipped once the
    # string was named: its ids are what is scored.
    from rsd_engine.pipeline.score import read_traces
    from rsd_engine.tokens import load_tokenizer

    tokenizer = load_tokenizer(tiny_pair[1])
    ids = tokenizer.encode("What is 2 + 2? The answer is 4.", add_special_tokens=False)
    row = {"id": "t", "input_ids": ids, "completion_mask": [0] * 5 + [1] * (len(ids) - 5)}
    data = tmp_path / "ids.jsonl"
    data.write_text(json.dumps({**row, "messages": json.dumps([{"role": "user", "content": "q"}])}) + "\n")
    read = read_traces(data, tokenizer)
    assert [t.id for t in read.traces] == ["t"] and not read.skipped


def test_bad_chat_rows_are_skipped_with_the_reason(tiny_pair, traces, tmp_path, capsys):
    from rsd_engine.pipeline.score import read_traces
    from rsd_engine.tokens import load_tokenizer

    files, _ = traces
    good = [json.loads(line) for line in files["messages"].read_text().splitlines()]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in [good[0], *(row for row, _ in BAD_CHAT_ROWS)]))
    read = read_traces(mixed, load_tokenizer(tiny_pair[1]))
    assert [t.id for t in read.traces] == ["0"] and read.skipped == [(i + 1, why) for i, (_, why) in
                                                                     enumerate(BAD_CHAT_ROWS)]
    for index, (row, why) in enumerate(BAD_CHAT_ROWS):  # a file of that row alone: a one-line error
        data = tmp_path / f"bad{index}.jsonl"
        data.write_text(json.dumps(row) + "\n")
        with pytest.raises(SystemExit) as exit_info:
            main(["score", "--student", str(tiny_pair[1]), "--data", str(data), "--no-progress"])
        assert exit_info.value.code == 2 and f"none of the 1 rows is a trace ({why})" in capsys.readouterr().err


def test_traces_past_the_models_context_are_skipped_and_named(tiny_pair, traces, tmp_path, capsys):
    import shutil

    files, _ = traces
    student = tmp_path / "student-300"
    shutil.copytree(tiny_pair[1], student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 300}))
    # trace "a" is 600 completion tokens after its prompt, "b" 40: only "b" fits 300 positions
    (report,), out = run(tmp_path, student, files["ids"])
    assert "skipped 1 rows (first: row 0, " in out and "longer than the student's context (300 positions" in out
    assert report["traces"] == 1
    only = tmp_path / "only_a.jsonl"
    only.write_text(files["ids"].read_text().splitlines()[0] + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--student", str(student), "--data", str(only), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "none of its 1 traces can be scored (first: row 0, " in err
    assert "longer than the student's context" in err


@pytest.mark.parametrize("with_teacher", [False, True], ids=["student-only", "with-teacher"])
def test_rows_with_ids_the_models_cannot_read_are_skipped_with_the_reason(tiny_pair, traces, tmp_path, with_teacher):
    """True is no token id (bool is an int subclass); an id past the student's embedding, or past its tokenizer (a
    padding row of the embedding, which student-only scoring used to score: Qwen3's </think> under a Qwen2.5
    student), is a skipped row naming the id, not an error that stops every file."""
    files, pairs = traces
    rows = [json.loads(line) for line in files["ids"].read_text().splitlines()][1:]  # "b", 40 tokens
    prompt = rows[0]["prompt"]
    bad = [{"id": "bool", "prompt": prompt, "token_ids": [True, 5, 6]},
           {"id": "big", "prompt": prompt, "token_ids": [5, 99999]},
           {"id": "padding", "prompt": prompt, "token_ids": [5, 460]}]  # an embedding row past the tokenizer's 455
    data = write_rows(tmp_path / "bad_ids.jsonl", rows + bad)
    (report,), out = run(tmp_path, tiny_pair[1], data, teacher=tiny_pair[0] if with_teacher else None)
    skipped = {1: "'token_ids' item 0 is True (bool), not a token id",
               2: "completion token 1 (id 99999) is not a token of the student's tokenizer: ids must be in [0, 455)",
               3: "completion token 1 (id 460) is not a token of the student's tokenizer: ids must be in [0, 455)"}
    assert [s["row"] for s in report["skipped"]] == list(skipped) and report["skipped_rows"] == len(skipped)
    for got, want in zip(report["skipped"], skipped.values()):
        assert got["why"].startswith(want)
    assert [t["id"] for t in report["per_trace"]] == ["b"]
    assert report["per_trace"][0]["student"] == pytest.approx(expected(hf_logprobs(tiny_pair[1], pairs["ids"][1:])[0]),
                                                              rel=1e-4, abs=1e-5)
    assert f"skipped {len(skipped)} rows (first: row 1, 'token_ids' item 0 is True (bool)" in out


def test_inputs_are_read_strictly(tiny_pair, traces, tmp_path, capsys):
    """A bad line is an error naming it, never a row dropped; the last line of a file a run is still writing (no
    newline, not JSON) is a skipped row, named, and the exit status says so; a byte-order mark is no part of the
    first row; a row that is no object is skipped with the reason, in .jsonl as in .json."""
    files, _ = traces
    good = files["records"].read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good[0] + "\n" + good[1][:40] + "\n" + good[1] + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--student", str(tiny_pair[1]), "--data", str(bad), "--no-progress"])
    assert exit_info.value.code == 2 and f"{bad}, line 2: not valid JSON" in capsys.readouterr().err
    torn = tmp_path / "torn.jsonl"
    torn.write_text(good[0] + "\n" + good[1] + "\n" + good[1][:40])
    assert main(["score", "--student", str(tiny_pair[1]), "--data", str(torn), "--no-progress"]) == 3
    said = capsys.readouterr().out
    assert "skipped 1 rows (first: row 2, the last line is cut short (a run still writing the file" in said
    assert "rsd score: 1 of 3 rows were skipped" in said and "exit status 3" in said
    bom = tmp_path / "bom.jsonl"
    bom.write_text("\ufeff" + good[0] + "\n" + good[1] + "\n", encoding="utf-8")
    listed = tmp_path / "listed.jsonl"
    listed.write_text(good[0] + "\n[1, 2]\n" + good[1] + "\n")
    as_json = tmp_path / "listed.json"
    as_json.write_text("[" + good[0] + ", [1, 2], " + good[1] + "]")
    reports, _ = run(tmp_path, tiny_pair[1], bom, listed, as_json)
    list_row = [{"row": 1, "why": "row is a list, not an object"}]
    assert [(r["rows"], r["skipped"]) for r in reports] == [(2, []), (3, list_row), (3, list_row)]
    want = score(tmp_path, tiny_pair[1], files["records"])[0]["per_trace"]
    assert [r["per_trace"] for r in reports] == [want] * 3


def nan_student(tiny_pair, folder, token=100):
    """The tiny student with a NaN embedding row: every trace that reads `token` gets NaN log-probs."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_pair[1], folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.embed_tokens.weight"][token] = float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("with_teacher", [False, True], ids=["student-only", "with-teacher"])
def test_traces_with_non_finite_log_probs_fail_apart_from_the_figures(tiny_pair, traces, tmp_path, with_teacher):
    from rsd_engine.pipeline.score import shortfalls

    files, pairs = traces
    prompt = json.loads(files["ids"].read_text().splitlines()[1])["prompt"]
    rows = [{"id": "ok", "prompt": prompt, "token_ids": pairs["ids"][1][1]},
            {"id": "nan", "prompt": prompt, "token_ids": [5, 100, 7, 8]}]
    data = write_rows(tmp_path / "nan.jsonl", rows)
    student = nan_student(tiny_pair, tmp_path / "nan-student")
    reports, out = run(tmp_path, student, data, teacher=tiny_pair[0] if with_teacher else None)
    (report,) = reports  # the JSON parsed without a NaN (see run)
    assert report["traces"] == 1 and [t["id"] for t in report["per_trace"]] == ["ok"]
    (failed,) = report["failed_traces"]
    assert failed["row"] == 1 and failed["id"] == "nan" and failed["why"].startswith("the student's log-prob of ")
    want = expected(hf_logprobs(tiny_pair[1], pairs["ids"][1:])[0])
    assert report["student"] == pytest.approx(want, rel=1e-4, abs=1e-5)  # the failed trace is in no figure
    assert "nan.jsonl: 1 traces failed, left out of every figure (first: row 1, id nan: the student's" in out
    assert [count for count, *_ in shortfalls(reports)] == [0, 1]


def test_a_non_finite_teacher_log_prob_fails_the_trace_as_a_students_does():
    from rsd_engine.pipeline.score import _not_finite

    assert _not_finite({"student": [-1.0, -2.0], "teacher": [-1.0, -0.5]}) == ""
    for bad in (float("nan"), float("-inf")):
        assert _not_finite({"student": [-1.0, -2.0], "teacher": [-1.0, bad]}) == (
            f"the teacher's log-prob of completion token 1 is {bad}")


def test_surprisal_figures_of_a_trace():
    """Under 1% is strictly under (a token at exactly 1% is not), surprisal in nats, perplexity its exp."""
    from rsd_engine.pipeline.score_report import surprisal_stats

    logprobs = [math.log(0.01), math.log(0.0099), math.log(0.5), 0.0]
    mean = -sum(logprobs) / 4
    assert surprisal_stats(logprobs) == pytest.approx({"tokens": 4, "sub_1pct_share": 0.25, "mean_surprisal": mean,
                                                       "perplexity": math.exp(mean)})
    assert surprisal_stats([-800.0])["perplexity"] is None  # e^800 is past the largest float


def test_multi_turn_messages_score_the_last_turn_after_every_turn_before_it(tiny_pair, tmp_path):
    from rsd_engine.pipeline.prompts import render_chat

    tok = AutoTokenizer.from_pretrained(str(tiny_pair[1]))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "<think>\n</think>4"}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "<think>\nSix.</think>6"}]
    data = write_rows(tmp_path / "turns.jsonl", [{"id": "m", "messages": messages}])
    (report,), _ = run(tmp_path, tiny_pair[1], data)
    text, think_prefix = render_chat(tok, messages[:-1])
    assert "And 3+3?" in text and think_prefix == "<think>\n"  # the opened block is the prompt's, not scored
    pair = (tok.encode(text, add_special_tokens=False), tok.encode("Six.</think>6", add_special_tokens=False))
    assert report["per_trace"][0]["student"] == pytest.approx(expected(hf_logprobs(tiny_pair[1], [pair])[0]),
                                                              rel=1e-4, abs=1e-5)


def test_completion_field_scores_the_opened_think_block_once(tiny_pair, traces, tmp_path):
    """A dataset's trace that writes out the `<think>\\n` the chat template's prompt already opened scores as the
    text after it (as the messages form does)."""
    files, pairs = traces
    completions = [json.loads(line)["completion"] for line in files["records"].read_text().splitlines()]
    # "<think>" without its newline too, as rsd provenance reads it (it was scored after the prompt's "<think>\n")
    for opened in ("<think>\n", "<think>"):
        plain = write_rows(tmp_path / "plain.jsonl", [{"question": q, "trace": opened + c}
                                                       for q, c in zip(QUESTIONS, completions)])
        (report,), _ = run(tmp_path, tiny_pair[1], plain, completion_field="trace")
        for got, lp in zip(report["per_trace"], hf_logprobs(tiny_pair[1], pairs["text"])):
            assert got["student"] == pytest.approx(expected(lp), rel=1e-4, abs=1e-5)


def test_an_empty_prompt_is_skipped_and_an_empty_completion_has_no_figures(tiny_pair, traces, tmp_path):
    files, pairs = traces
    rows = [json.loads(line) for line in files["records"].read_text().splitlines()]
    data = write_rows(tmp_path / "empty.jsonl", [rows[0], {"id": "e", "prompt": "", "completion": "hello"},
                                                 {**rows[1], "id": "none", "completion": ""}])
    (report,), _ = run(tmp_path, tiny_pair[1], data)
    assert report["skipped"] == [{"row": 1, "why": "the prompt is empty: scoring needs at least one prompt token "
                                                   "(the first scored token's context)"}]
    assert report["per_trace"][1] == {"id": "none", "student": {"tokens": 0, "sub_1pct_share": None,
                                                               "mean_surprisal": None, "perplexity": None}}
    assert report["student"] == pytest.approx(expected(hf_logprobs(tiny_pair[1], pairs["text"][:1])[0]),
                                              rel=1e-4, abs=1e-5)


def test_lengths_count_mapped_tokens_in_the_teachers_space(mapped_pair, tmp_path):
    """A student token mapped to several teacher ids lengthens the teacher's sequence: the engine's max_seq_len
    and the teacher's context are measured there."""
    import shutil

    from rsd_engine.tokens import align_token_spaces

    teacher, student = mapped_pair
    stok, ttok = (AutoTokenizer.from_pretrained(str(d)) for d in (student, teacher))
    extra = stok.convert_tokens_to_ids("<extra>")
    space = align_token_spaces(ttok, stok, teacher_rows=512, student_rows=512)
    assert len(space.teacher_pieces[extra]) > 1
    rows = [{"id": "long", "prompt": "Q: what?", "token_ids": [extra] * 100},
            {"id": "short", "prompt": "Q: what?", "token_ids": [extra, 5, extra]}]
    data = write_rows(tmp_path / "mapped.jsonl", rows)
    (report,), _ = run(tmp_path, student, data, teacher=teacher)
    hf = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    for row, got in zip(rows, report["per_trace"]):
        p = stok.encode(row["prompt"], add_special_tokens=False)
        seq, want = space.to_teacher(p), []
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([space.to_teacher(p + row["token_ids"])])).logits[0], -1)
        for tok in row["token_ids"]:
            pieces = space.to_teacher([tok])
            want.append(sum(lp[len(seq) - 1 + k, t].item() for k, t in enumerate(pieces)))
            seq = seq + pieces
        assert got["teacher"] == pytest.approx(expected(want), rel=1e-4, abs=1e-5)
    # A teacher context the long trace fits in the student's space but not in the teacher's.
    short_teacher = tmp_path / "teacher-300"
    shutil.copytree(teacher, short_teacher)
    config = json.loads((short_teacher / "config.json").read_text())
    (short_teacher / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 300}))
    (report,), _ = run(tmp_path, student, data, teacher=short_teacher)
    length = len(space.to_teacher(stok.encode("Q: what?", add_special_tokens=False) + rows[0]["token_ids"]))
    assert [t["id"] for t in report["per_trace"]] == ["short"]
    assert report["skipped"] == [{"row": 0, "why": f"{length} tokens in the teacher's space (106 in the student's), "
                                                   f"longer than the teacher's context (300 positions, "
                                                   f"max_position_embeddings)"}]


def _prepend_space_tokenizer():
    """A tokenizer whose normalizer starts every text with "▁", as Llama-2's tokenizer.json does; no chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny import _corpus_lines

    model = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    model.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    model.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    model.train_from_iterator([line.replace(" ", "\u2581") for line in _corpus_lines()], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=list("[]/\u2581"),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_a_completion_is_tokenised_in_context_as_the_student_wrote_it():
    """A tokenizer whose normalizer starts every text with "▁" (Llama-2's tokenizer.json) reads a completion's
    leading space as a token of its own when it encodes the completion alone (rsd generate --format sft writes the
    completion as it continues the prompt): prompt + completion are tokenised as one text, split after the prompt."""
    from rsd_engine.pipeline.score import _in_context

    tok = _prepend_space_tokenizer()
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    prompt = "[INST] What is two and two? [/INST]"
    full = encode(prompt + " The answer is 4.</s>")
    written = full[len(encode(prompt)):]
    assert encode(" The answer is 4.</s>") != written  # alone, the leading space is a token of its own
    assert _in_context(encode, prompt, " The answer is 4.</s>") == (encode(prompt), written)


def test_completion_field_and_chat_rows_are_tokenised_in_context():
    """--completion-field rows and `messages` rows: the completion continues its rendered prompt, so it is
    tokenised in context as prompt + completion rows are (alone, this tokenizer read "The" after the prompt's
    blank line as "▁The", a token the model would never have written there)."""
    from rsd_engine.pipeline.prompts import build_prompt
    from rsd_engine.pipeline.score import _trace

    tok = _prepend_space_tokenizer()
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    question, completion = "What is two and two?", "The answer is 4."
    prompt = build_prompt(tok, question, "").text
    whole = encode(prompt + completion)
    assert whole[:len(encode(prompt))] == encode(prompt) and encode(completion) != whole[len(encode(prompt)):]
    expected = (encode(prompt), whole[len(encode(prompt)):])
    field_trace, why = _trace(0, {"problem": question, "solution": completion}, tok, "solution", "problem", "")
    assert why == "" and (field_trace.prompt_ids, field_trace.completion_ids) == expected
    chat_trace, why = _trace(0, {"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": completion}]}, tok, None, "question", "")
    assert why == "" and (chat_trace.prompt_ids, chat_trace.completion_ids) == expected


def test_ids_other_writers_decoded_their_way_are_scored(tiny_pair, tmp_path):
    """The check that ids spell the completion accepts the ways other writers decode the student's own ids: the
    EOS they stopped on left out of the text (vLLM), special tokens skipped, and TRL's own tokenised rows, whose
    completion_mask starts inside the prompt where a token merged across the boundary."""
    from rsd_engine.pipeline.score import read_traces
    from rsd_engine.tokens import load_tokenizer

    tokenizer = load_tokenizer(tiny_pair[1])
    prompt = build_prompt(tokenizer, QUESTIONS[0], "Be brief.").text
    text = "Then x = 4.</think> The answer is \\boxed{4}."
    ids = tokenizer.encode(text, add_special_tokens=False)
    whole = tokenizer.encode(prompt + text, add_special_tokens=False)
    start = len(tokenizer.encode(prompt, add_special_tokens=False)) - 1  # as if the last prompt token merged
    rows = [{"id": "eos", "prompt": prompt, "completion": text, "token_ids": ids + [tokenizer.eos_token_id]},
            {"id": "trl", "prompt": prompt, "completion": text, "input_ids": whole,
             "completion_mask": [0] * start + [1] * (len(whole) - start)}]
    read = read_traces(write_rows(tmp_path / "t.jsonl", rows), tokenizer)
    assert [t.id for t in read.traces] == ["eos", "trl"] and read.skipped == []


def test_ids_past_the_student_tokenizer_spell_no_completion(tiny_pair, traces, tmp_path):
    """A row whose ids hold one past the student's tokenizer (another tokenizer's added token, on a padding row of
    the student's embedding) was taken as spelling its completion, and scored: it is skipped as another
    tokenizer's ids."""
    files, _ = traces
    row = json.loads(files["ids"].read_text().splitlines()[1])
    completion = AutoTokenizer.from_pretrained(str(tiny_pair[1])).decode(row["token_ids"])
    row.update(id="other", completion=completion, token_ids=row["token_ids"][:3] + [460] + row["token_ids"][3:])
    data = write_rows(tmp_path / "other.jsonl", [json.loads(files["ids"].read_text().splitlines()[1]), row])
    (report,), _ = run(tmp_path, tiny_pair[1], data)
    assert [t["id"] for t in report["per_trace"]] == ["b"]
    assert report["skipped"][0]["why"].startswith("its 'token_ids' do not decode to its 'completion'")


def test_engine_score_batch_tokenises_a_text_completion_in_context(tmp_path):
    """Engine.score_batch encoded a text completion alone, where `rsd score` tokenises it after its prompt: under a
    tokenizer that starts every text with "▁" (Llama-2) its leading space became a token of its own, one the model
    would not have written there (found by the scoring review)."""
    from rsd_engine import Engine
    from tiny import build_model

    tok = _prepend_space_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    model = build_model(tmp_path / "model", "llama", tokenizer_dir=tmp_path / "tok")
    engine = Engine(model, model, device="cpu", max_batch_size=2, max_seq_len=128)
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    prompt, completion = "[INST] What is two and two? [/INST]", " The answer is 4."
    written = encode(prompt + completion)[len(encode(prompt)):]
    assert encode(completion) != written
    as_text, as_ids = engine.score_batch([prompt, prompt], [completion, written])
    assert len(as_text.student_logprobs) == len(written)
    assert as_text.student_logprobs == pytest.approx(as_ids.student_logprobs, abs=1e-6)


def test_the_report_says_the_precision_its_figures_were_computed_in(tiny_pair, traces, tmp_path):
    """--dtype auto is bfloat16 on a GPU and float32 on a CPU (up to a few tenths of a nat a token apart on a small
    model): the report names the device and dtype it ran in."""
    files, _ = traces
    run(tmp_path, tiny_pair[1], files["ids"], dtype="float32")
    report = json.loads((tmp_path / "run_report.json").read_text())
    assert (report["device"], report["dtype"]) == ("cpu", "float32")


def test_multi_turn_messages_under_a_template_that_skips_the_system_role_keep_the_system_turn(tiny_pair):
    """A chat template that skips a system turn without raising: `rsd generate` (chat_prompt_text) puts the system
    turn first in the user turn, and so does `rsd score` for a one-question row; a multi-turn row dropped it, so its
    last turn was scored after another prompt than generation read."""
    from rsd_engine.pipeline.prompts import chat_prompt_text
    from rsd_engine.pipeline.score import _trace

    tok = AutoTokenizer.from_pretrained(str(tiny_pair[1]))
    tok.chat_template = ("{%- for message in messages %}{%- if message['role'] != 'system' %}"
                         "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
                         "{%- endif %}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "It is 6."}]
    for turns in (messages, messages[:2] + messages[-1:]):
        trace, why = _trace(0, {"messages": turns}, tok, None, "question", "")
        prompt = chat_prompt_text(tok, turns[:-1])
        assert why == "" and "Be brief." in prompt
        assert trace.prompt_ids == tok.encode(prompt, add_special_tokens=False)


def test_chat_turns_under_a_template_that_refuses_the_system_role_fold_it_as_generate_does(tiny_pair):
    """A chat template that raises on a system turn (as Gemma 2's does): `rsd generate` puts its system prompt first
    in the user turn (build_prompt), but chat messages with a system turn failed in the Python API, and `rsd score`
    skipped every multi-turn row that had one. Both now fold it the same way; the prompt equals build_prompt's."""
    from rsd_engine.pipeline.prompts import build_prompt, chat_prompt_text
    from rsd_engine.pipeline.score import _trace

    tok = AutoTokenizer.from_pretrained(str(tiny_pair[1]))
    tok.chat_template = ("{%- for message in messages %}{%- if message['role'] == 'system' %}"
                         "{{- raise_exception('System role not supported') }}{%- endif %}"
                         "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
                         "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    assert chat_prompt_text(tok, first) == build_prompt(tok, "What is 2+2?", "Be brief.").text
    messages = [*first, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "It is 6."}]
    trace, why = _trace(0, {"messages": messages}, tok, None, "question", "")
    prompt = chat_prompt_text(tok, messages[:-1])
    assert why == "" and prompt.startswith("<|im_start|>user\nBe brief.\n\nWhat is 2+2?")
    assert trace.prompt_ids == tok.encode(prompt, add_special_tokens=False)
    tok.chat_template = tok.chat_template.replace("message['role'] == 'system'", "message['content'] == 'boom'"
                                                  ).replace("System role not supported", "boom")
    with pytest.raises(ValueError, match="fails on prompt: boom"):  # renders a system turn: not folded, its failure
        chat_prompt_text(tok, [{"role": "system", "content": "x"}, {"role": "user", "content": "boom"}])
