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
    report = tmp_path / "report"
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--student", str(tiny_pair[1]), "--data", str(files["records"]), "--out", str(report),
              "--plot", str(report), "--no-progress"])
    assert exit_info.value.code == 2 and "--out and --plot are the same file" in capsys.readouterr().err
    assert not report.exists()


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
]


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
    reports = score(tmp_path, student, files["ids"])
    out = capsys.readouterr().out
    assert "skipped 1 rows (first: row 0, " in out and "longer than the models' context (300 positions" in out
    assert reports[0]["traces"] == 1
    only = tmp_path / "only_a.jsonl"
    only.write_text(files["ids"].read_text().splitlines()[0] + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--student", str(student), "--data", str(only), "--no-progress"])
    assert exit_info.value.code == 2 and "every trace is longer than the models' context" in capsys.readouterr().err
