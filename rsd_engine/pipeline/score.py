"""`rsd score`: how surprising are traces to the student (and the teacher)?

Each trace is a prompt and a completion; every completion token is scored teacher-forced (its
log-probability given the prompt and the tokens before it). Per trace and per file: the share of
tokens under 1% probability, the mean surprisal (nats) and the perplexity, for each model. The
paper's comparison is two files side by side: raw teacher traces (6.70% of tokens under 1% for
the student) against RSD traces (0.09%).

Traces are read from `rsd generate` records (prompt + token_ids, else prompt + completion text),
from chat `messages` records (--format sft), or, with completion_field, from any dataset: the
prompt is then the question through the student's chat template, as `rsd generate` builds it.
Ids held by more than one record in a file are reported (each copy is scored, as the file is).

The JSON report is written once, at the end, to a temporary name renamed over --out: a kill -9
leaves the previous report or the new one, whole, never a torn one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .data import not_unicode, read_rows
from .prompts import DEFAULT_SYSTEM_PROMPT, build_prompt
from .records import check_writable, describe_duplicates, duplicate_ids, read_records
from .score_report import file_report, format_table, plot_histogram
from ..models.loader import check_model_folder



@dataclass
class Trace:
    id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    row: int = -1  # its row in the file (for messages about it)


@dataclass
class TraceFile:
    path: str
    traces: list[Trace] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    duplicates: dict = field(default_factory=dict)  # {id: records}: an id written more than once
    scores: list[dict] = field(default_factory=list)  # per trace: {"student": [...], "teacher": [...]}


def read_traces(path, tokenizer, *, completion_field=None, question_field="question",
                system_prompt=DEFAULT_SYSTEM_PROMPT) -> TraceFile:
    """Traces of one file in the student's token space; unusable rows are skipped and listed."""
    path = Path(path)
    # A trace file still being written (or killed) may end in a torn line: read it as records.
    rows = read_records(path) if path.suffix == ".jsonl" and path.is_file() else read_rows(path)
    if not rows:
        raise ValueError(f"{path}: the file is empty (no traces)")
    out = TraceFile(str(path), duplicates=duplicate_ids(r for r in rows if isinstance(r, dict)))
    for index, row in enumerate(rows):
        trace, reason = _trace(index, row, tokenizer, completion_field, question_field, system_prompt)
        if trace is not None:
            trace.row = index
        if trace is None:
            out.skipped.append((index, reason))
        else:
            out.traces.append(trace)
    if not out.traces:
        raise ValueError(f"{path}: none of the {len(rows)} rows is a trace ({out.skipped[0][1]}); expected "
                         f"`rsd generate` records (prompt + completion), chat `messages`, or name the fields "
                         f"with --completion-field / --question-field")
    return out


def _trace(index, row, tokenizer, completion_field, question_field, system_prompt):
    if not isinstance(row, dict):
        return None, f"row is a {type(row).__name__}, not an object"
    reason = not_unicode(row)
    if reason:
        return None, reason
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    trace_id = str(row.get("id", index))
    if completion_field:
        question, completion = row.get(question_field), row.get(completion_field)
        if not isinstance(question, str) or not isinstance(completion, str):
            return None, f"no {question_field!r} or {completion_field!r} text"
        prompt = build_prompt(tokenizer, question, system_prompt)
        return Trace(trace_id, encode(prompt.text), encode(completion)), ""
    if isinstance(row.get("messages"), list):
        return _chat_trace(trace_id, row["messages"], tokenizer, encode)
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        return None, "no 'prompt' text (and no 'messages')"
    ids = row.get("token_ids")
    if isinstance(ids, list) and all(isinstance(t, int) for t in ids):
        return Trace(trace_id, encode(prompt), ids), ""
    if isinstance(row.get("completion"), str):
        return Trace(trace_id, encode(prompt), encode(row["completion"])), ""
    return None, "no 'token_ids' or 'completion'"


def _chat_trace(trace_id, messages, tokenizer, encode):
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        return None, "'messages' does not end with an assistant turn"
    if not all(isinstance(m, dict) for m in messages):
        return None, "'messages' holds an item that is not a {role, content} object"
    system = next((m.get("content") for m in messages if m.get("role") == "system"), None) or ""
    user = next((m.get("content") for m in messages if m.get("role") == "user"), None)
    if not isinstance(user, str):
        return None, "'messages' has no user turn"
    if not isinstance(system, str):
        return None, f"'messages' has a system turn whose content is not text ({type(system).__name__})"
    completion = messages[-1].get("content") or ""
    if not isinstance(completion, str):
        return None, f"'messages' ends with an assistant turn whose content is not text ({type(completion).__name__})"
    prompt = build_prompt(tokenizer, user, system)
    if prompt.think_prefix and completion.startswith(prompt.think_prefix):
        completion = completion[len(prompt.think_prefix):]  # the prompt already opened the block
    return Trace(trace_id, encode(prompt.text), encode(completion)), ""


SCORE_BATCH = 16  # traces per forward (cache slots)
GROUP = 8 * SCORE_BATCH  # traces per scoring call: the progress bar moves between calls


def score_files(files: list[TraceFile], *, student, teacher=None, device="auto", dtype="auto", sampler="auto",
                progress=False) -> None:
    """Fill each file's per-trace scores: student (and teacher) log-probs of every completion token,
    SCORE_BATCH traces per forward."""
    traces = [t for f in files for t in f.traces]
    for f in files:
        for t in f.traces:
            if not t.prompt_ids:
                raise ValueError(f"{f.path}: trace {t.id} has an empty prompt; scoring needs at least one prompt token")
    # A model scores nothing meaningful past its context (its positions were never trained there): such a trace
    # is skipped and named, as a row that is not a trace.
    from rsd_engine.models.loader import load_config

    context = min(load_config(m).max_position_embeddings for m in (student, teacher) if m is not None)
    for f in files:
        fits = [t for t in f.traces if len(t.prompt_ids) + len(t.completion_ids) <= context]
        f.skipped.extend((t.row, f"{len(t.prompt_ids) + len(t.completion_ids)} tokens, longer than the models' "
                                 f"context ({context} positions, max_position_embeddings)")
                         for t in f.traces if len(t.prompt_ids) + len(t.completion_ids) > context)
        f.skipped.sort(key=lambda item: item[0])
        if not fits:
            raise ValueError(f"{f.path}: every trace is longer than the models' context ({context} positions)")
        f.traces = fits
    traces = [t for f in files for t in f.traces]
    longest = max(len(t.prompt_ids) + len(t.completion_ids) for t in traces)
    # Mapped special tokens take several teacher ids: leave room for them.
    max_seq_len = longest + 64 + longest // 8
    if teacher is None:
        from rsd_engine.models import load_model
        from rsd_engine.runtime import resolve_device, resolve_dtype
        from rsd_engine.scoring import score_sequences

        device = resolve_device(device)
        model = load_model(student, dtype=resolve_dtype(dtype, device), device=device)
        cache = model.new_cache(SCORE_BATCH, max_seq_len)

        def score(group):
            lps = score_sequences(model, cache, [t.prompt_ids + t.completion_ids for t in group],
                                  [len(t.prompt_ids) for t in group])
            return [{"student": lp} for lp in lps]
    else:
        from rsd_engine.engine import Engine

        engine = Engine(teacher, student, device=device, dtype=dtype, max_batch_size=SCORE_BATCH,
                        max_seq_len=max_seq_len, sampler=sampler)

        def score(group):
            scores = engine.score_batch([t.prompt_ids for t in group], [t.completion_ids for t in group])
            return [{"student": s.student_logprobs, "teacher": s.teacher_logprobs} for s in scores]
    scores = []
    bar = _bar(len(traces), progress)
    for first in range(0, len(traces), GROUP):
        group = traces[first: first + GROUP]
        scores.extend(score(group))
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    at = 0
    for f in files:
        f.scores.extend(scores[at: at + len(f.traces)])
        at += len(f.traces)


def _bar(total, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="rsd score", unit="trace", dynamic_ncols=True, disable=None)  # None: terminals only


def run_score(data: list[str], *, student, teacher=None, out=None, plot=None, completion_field=None,
              question_field="question", system_prompt=DEFAULT_SYSTEM_PROMPT, device="auto", dtype="auto",
              sampler="auto", progress=True, log=print) -> list[dict]:
    """Score every file, print the side-by-side table, write the JSON report and the plot; returns the reports."""
    from rsd_engine.tokens import load_tokenizer

    for option, path in (("--out", out), ("--plot", plot)):
        if path is not None:
            for source in data:
                if Path(path).resolve() == Path(source).resolve():
                    raise ValueError(f"{option} {path} is also a --data file: the report would overwrite the traces; "
                                     f"give another {option} name")
            check_writable(path)
    if out is not None and plot is not None and Path(out).resolve() == Path(plot).resolve():
        raise ValueError(f"--out and --plot are the same file ({out}); give each its own name")
    for model in (student, teacher):
        if model is not None:
            check_model_folder(model)
    tokenizer = load_tokenizer(student)
    files = [read_traces(p, tokenizer, completion_field=completion_field, question_field=question_field,
                         system_prompt=system_prompt) for p in data]
    score_files(files, student=student, teacher=teacher, device=device, dtype=dtype, sampler=sampler,
                progress=progress)
    reports = [file_report(f) for f in files]
    log(format_table(reports))
    for f in files:
        if f.duplicates:
            log(f"{f.path}: warning: {describe_duplicates(f.duplicates)}; each copy is scored")
        if f.skipped:
            log(f"{f.path}: skipped {len(f.skipped)} rows (first: row {f.skipped[0][0]}, {f.skipped[0][1]})")
    if out is not None:
        tmp = Path(out).with_name(f".{Path(out).name}.tmp")
        tmp.write_text(json.dumps({"student": str(student), "teacher": teacher and str(teacher),
                                   "files": reports}, indent=1) + "\n")
        os.replace(tmp, out)
        log(f"report: {out}")
    if plot is not None:
        plot_histogram(files, plot)
        log(f"histogram: {plot}")
    return reports
