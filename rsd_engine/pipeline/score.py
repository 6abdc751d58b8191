"""`rsd score`: how surprising are traces to the student (and the teacher)?

Each trace is a prompt and a completion; every completion token is scored teacher-forced (its
log-probability given the prompt and the tokens before it). Per trace and per file: the share of
tokens under 1% probability, the mean surprisal (nats) and the perplexity, for each model. The
paper's comparison is two files side by side: raw teacher traces (6.70% of tokens under 1% for
the student) against RSD traces (0.09%).

Traces are read from `rsd generate` records (prompt + token_ids; --format sft records as TRL reads them,
input_ids split by completion_mask, their EOS included; else prompt + completion text), from chat `messages`
records (the last assistant turn is scored after every turn before it, rendered as generation renders a chat
prompt), or, with completion_field, from any dataset: the prompt is then the question through the student's chat
template, as `rsd generate` builds it. A completion text is tokenised after its prompt, as one text split after
the prompt's tokens (_in_context).
Ids held by more than one record in a file are reported (each copy is scored, as the file is).

Inputs are read strictly (a bad line is an error, never a row dropped), but for a last line cut short
(no newline, not JSON: a run still writing the file, or killed), skipped and named. A row that is no trace, or a
trace the models cannot score (an empty prompt, an id outside the vocabulary or the token space, past
a model's context), is skipped and named; a trace whose log-probs are not finite is failed: named,
and left out of every figure. A figure of no tokens is null.

The JSON report is written once, at the end, to a temporary name renamed over --out: a kill -9
leaves the previous report or the new one, whole, never a torn one. A file at --out or --plot that is not
this command's own earlier report or plot is refused before any work (reports.py).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .data import not_unicode, read_growing_rows
from .prompts import DEFAULT_SYSTEM_PROMPT, build_prompt, render_folded
from .readers import strip_think_open
from .records import describe_duplicates, duplicate_ids
from .output_paths import check_not_input, check_plot_format
from .reports import check_plot_out, check_report_out, plot_file, write_report
from .traces import sft_completion
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
    failed: list[tuple[Trace, str]] = field(default_factory=list)  # scored, but a log-prob is not finite
    rows: int = 0
    models: tuple[str, ...] = ("student",)  # the models that scored it


def read_traces(path, tokenizer, *, completion_field=None, question_field="question",
                system_prompt=DEFAULT_SYSTEM_PROMPT) -> TraceFile:
    """Traces of one file in the student's token space; unusable rows are skipped and listed."""
    path = Path(path)
    # Strict, as every input (a bad line is an error, never a row dropped), but for the last line of a run that is
    # still writing the file (or was killed): skipped and named.
    rows, torn = read_growing_rows(path)
    if not rows and not torn:
        raise ValueError(f"{path}: the file is empty (no traces)")
    out = TraceFile(str(path), duplicates=duplicate_ids(r for r in rows if isinstance(r, dict)),
                    rows=len(rows) + torn)
    for index, row in enumerate(rows):
        trace, reason = _trace(index, row, tokenizer, completion_field, question_field, system_prompt)
        if trace is not None:
            trace.row = index
        if trace is None:
            out.skipped.append((index, reason))
        else:
            out.traces.append(trace)
    if torn:
        out.skipped.append((len(rows), "the last line is cut short (a run still writing the file, or killed)"))
    if not out.traces:
        raise ValueError(f"{path}: none of the {len(rows)} rows is a trace ({out.skipped[0][1]}); expected "
                         f"`rsd generate` records (prompt + completion; or TRL's input_ids + completion_mask), chat "
                         f"`messages`, or name the fields "
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
        prompt = build_prompt(tokenizer, question, system_prompt, row=trace_id)
        return Trace(trace_id, *_in_context(encode, prompt.text, _after_think(completion, prompt.think_prefix))), ""
    if isinstance(row.get("messages"), list):
        return _chat_trace(trace_id, row["messages"], tokenizer, encode)
    if "input_ids" in row and "completion_mask" in row:
        trace, reason = _tokenised_trace(trace_id, row["input_ids"], row["completion_mask"])
        if trace is not None and isinstance(row.get("completion"), str) and not _spelled(
                tokenizer, trace.prompt_ids, trace.completion_ids, row.get("prompt"), row["completion"]):
            return None, _OTHER_TOKENIZER.format(field="input_ids")
        return trace, reason
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        if row.get("messages") is not None:  # (token ids, where a row has them, are read above whatever this is)
            return None, f"'messages' is a {type(row['messages']).__name__}, not a list of chat messages"
        return None, "no 'prompt' text (and no 'messages' or 'input_ids')"
    ids = row.get("token_ids")
    if ids is not None:
        reason = _not_ids("token_ids", ids)
        if reason:
            return None, reason
        if isinstance(row.get("completion"), str) and not _spelled(tokenizer, [], ids, None, row["completion"]):
            return None, _OTHER_TOKENIZER.format(field="token_ids")
        return Trace(trace_id, encode(prompt), ids), ""
    if isinstance(row.get("completion"), str):
        return Trace(trace_id, *_in_context(encode, prompt, row["completion"])), ""
    return None, "no 'token_ids' or 'completion'"


_OTHER_TOKENIZER = ("its {field!r} do not decode to its 'completion' under the student's tokenizer: ids of another "
                    "tokenizer? (score traces with the student whose tokenizer wrote them, or without the ids, as "
                    "text)")


def _spelled(tokenizer, prompt_ids: list[int], ids: list[int], prompt: str | None, completion: str) -> bool:
    """Whether token ids spell a row's completion text under the student's tokenizer, as any writer would have
    decoded them: rsd's records (decode(ids); --format sft: sft_completion after the prompt's ids), others'
    (without special tokens, vLLM's default; the EOS they stopped on not in the text; TRL's own tokenised rows,
    whose completion_mask may start inside the prompt, where prompt + completion is the whole). Ids past the
    tokenizer spell nothing (a padding row of the student's embedding: Qwen3's </think> under a Qwen2.5 student);
    rows without completion ids are not compared."""
    if not ids:
        return True
    if not all(0 <= t < len(tokenizer) for t in [*prompt_ids, *ids]):
        return False
    decode = lambda ids, skip=False: tokenizer.decode(ids, skip_special_tokens=skip)  # noqa: E731
    if completion in (decode(ids), decode(ids, True), decode(ids[:-1])):
        return True
    if prompt_ids and sft_completion(tokenizer, prompt_ids, ids) == completion:
        return True
    return isinstance(prompt, str) and prompt_ids and decode(prompt_ids + ids) == prompt + completion


def _not_ids(field: str, ids) -> str:
    """Why `ids` is no list of token ids ("" if it is one)."""
    if not isinstance(ids, list):
        return f"{field!r} is a {type(ids).__name__}, not a list of token ids"
    # bool is an int subclass, but True is no token id
    bad = next((k for k, t in enumerate(ids) if not isinstance(t, int) or isinstance(t, bool)), None)
    return "" if bad is None else f"{field!r} item {bad} is {ids[bad]!r} ({type(ids[bad]).__name__}), not a token id"


def _tokenised_trace(trace_id: str, ids, mask):
    """TRL's tokenised prompt-completion (`rsd generate --format sft` records): the ids where completion_mask is 0
    are the prompt, those where it is 1 the completion, which is what SFTTrainer trains on."""
    reason = _not_ids("input_ids", ids) or _not_ids("completion_mask", mask)
    if reason:
        return None, reason
    start = mask.index(1) if 1 in mask else len(mask)
    if len(mask) != len(ids) or any(m != 0 for m in mask[:start]) or any(m != 1 for m in mask[start:]):
        return None, ("'completion_mask' is no prompt then completion: 0s then 1s, one per 'input_ids' item "
                      f"({len(mask)} items for {len(ids)} ids)")
    return Trace(trace_id, ids[:start], ids[start:]), ""


def _in_context(encode, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a completion text that continues its prompt's, tokenised as one text and
    split after the prompt's tokens (as TRL does): a tokenizer whose normalizer starts every text with a space
    reads a completion's leading space as a token of its own when encoding it alone (Llama-2's
    "▁", "▁The"). Where the prompt's tokens are no prefix of the whole, each is encoded alone."""
    head, whole = encode(prompt), encode(prompt + completion)
    if whole[:len(head)] == head:
        return head, whole[len(head):]
    return head, encode(completion)


def _chat_trace(trace_id, messages, tokenizer, encode):
    """The last assistant turn, scored after every turn before it."""
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        return None, "'messages' does not end with an assistant turn"
    if not all(isinstance(m, dict) for m in messages):
        return None, "'messages' holds an item that is not a {role, content} object"
    # Only "" is an empty completion: null, or no 'content' at all, is a turn not written (a row cut short, a failed
    # call), not one that wrote nothing.
    if messages[-1].get("content") is None:
        return None, ("'messages' ends with an assistant turn with no content ("
                      + ("null" if "content" in messages[-1] else "no 'content' key") + "): nothing to score")
    completion = messages[-1]["content"]
    if not isinstance(completion, str):
        return None, f"'messages' ends with an assistant turn whose content is not text ({type(completion).__name__})"
    context = messages[:-1]
    roles = [m.get("role") for m in context]
    if "user" not in roles:
        return None, "'messages' has no user turn"
    if roles in (["user"], ["system", "user"]):
        # One question: prompted as `rsd generate` prompts it (a template without a system role gets the system
        # prompt folded into the user turn, and a tokenizer without a template plain text).
        # A system turn of null content is no system prompt (as responses.py reads one); 0 or false is no text.
        system = context[0].get("content") if len(context) == 2 else ""
        system = "" if system is None else system
        user = context[-1].get("content")
        if not isinstance(user, str):
            return None, f"'messages' has a user turn whose content is not text ({type(user).__name__})"
        if not isinstance(system, str):
            return None, f"'messages' has a system turn whose content is not text ({type(system).__name__})"
        prompt = build_prompt(tokenizer, user, system, row=trace_id)
        text, think_prefix = prompt.text, prompt.think_prefix
    else:
        bad = next((j for j, m in enumerate(context)
                    if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)), None)
        if bad is not None:
            return None, f"'messages' item {bad} has no text 'role' and 'content'"
        if not getattr(tokenizer, "chat_template", None):
            return None, (f"'messages' has {len(context)} turns before the last assistant turn, and the student's "
                          f"tokenizer has no chat template to render them")
        try:
            # (a template that skips or refuses the system role gets it in the first user turn, as `rsd generate`
            # renders chat)
            text, think_prefix = render_folded(tokenizer, context)
        except Exception as err:  # jinja2's TemplateError: a template that refuses this order of roles
            return None, f"the student's chat template cannot render the turns before the last one ({err})"
    return Trace(trace_id, *_in_context(encode, text, _after_think(completion, think_prefix))), ""


def _after_think(completion: str, think_prefix: str) -> str:
    """The completion without the thinking block its prompt already opened (scored once, as part of the prompt):
    as the prompt spelled it, or "<think>" with or without its newline (as rsd provenance reads it; a completion
    "<think>Okay" was scored after the prompt's "<think>\\n", with a second "<think>")."""
    if not think_prefix:
        return completion
    return completion[len(think_prefix):] if completion.startswith(think_prefix) else strip_think_open(completion)


SCORE_BATCH = 16  # traces per forward (cache slots)
GROUP = 8 * SCORE_BATCH  # traces per scoring call: the progress bar moves between calls


def score_files(files: list[TraceFile], *, student, teacher=None, device="auto", dtype="auto", sampler="auto",
                progress=False) -> None:
    """Fill each file's per-trace scores: student (and teacher) log-probs of every completion token,
    SCORE_BATCH traces per forward. A trace the models cannot score is skipped first, before any weights are read;
    one whose log-probs are not finite is moved to the file's `failed`."""
    longest = _set_aside_unscorable(files, student, teacher)
    traces = [t for f in files for t in f.traces]
    max_seq_len = max(longest, 2)  # lengths are exact in both spaces (mapped tokens counted as their teacher ids)
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

        with warnings.catch_warnings():
            # The engine's caches share one max_seq_len, which may pass the shorter context of the two; each
            # trace was checked against each model's own context above, so none runs past it.
            warnings.filterwarnings("ignore", message=r"max_seq_len = \d+ is past the")
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
        f.models = ("student",) if teacher is None else ("student", "teacher")
        scored = []
        for t, s in zip(f.traces, scores[at: at + len(f.traces)]):
            why = _not_finite(s)
            if why:
                f.failed.append((t, why))
            else:
                scored.append(t)
                f.scores.append(s)
        at += len(f.traces)
        f.traces = scored


def _set_aside_unscorable(files, student, teacher) -> int:
    """Skip (and name) each trace the models cannot score; the longest sequence left, in either token space.
    An error for a file none of whose traces is left."""
    from rsd_engine.models.loader import load_config
    from rsd_engine.tokens import align_token_spaces, load_tokenizer

    student_config = load_config(student)
    student_tokens = len(load_tokenizer(student))
    teacher_config = space = None
    if teacher is not None:
        teacher_config = load_config(teacher)
        with warnings.catch_warnings():  # what the space lacks is said once, by the engine that scores
            warnings.simplefilter("ignore")
            space = align_token_spaces(load_tokenizer(teacher), load_tokenizer(student),
                                       teacher_rows=teacher_config.vocab_size, student_rows=student_config.vocab_size)
    longest = 0
    for f in files:
        fits, unscorable = [], []
        for t in f.traces:
            length, why = _scorable_length(t, student_config, teacher_config, space, student_tokens)
            if why:
                unscorable.append((t.row, why))
            else:
                fits.append(t)
                longest = max(longest, length)
        if not fits:
            row, why = unscorable[0]
            raise ValueError(f"{f.path}: none of its {len(f.traces)} traces can be scored (first: row {row}, {why})")
        f.skipped = sorted(f.skipped + unscorable, key=lambda item: item[0])
        f.traces = fits
    return longest


def _scorable_length(trace, student_config, teacher_config, space, student_tokens: int) -> tuple[int, str]:
    """(its length in the teacher's token space, else the student's; "") or (0, why the models cannot score it).
    `student_tokens`: the student tokenizer's size (ids past it, below the embedding's rows, are padding rows)."""
    if not trace.prompt_ids:
        return 0, "the prompt is empty: scoring needs at least one prompt token (the first scored token's context)"
    vocab = min(student_config.vocab_size, student_tokens)
    for part, ids in (("prompt", trace.prompt_ids), ("completion", trace.completion_ids)):
        for k, tok in enumerate(ids):
            if not 0 <= tok < vocab:
                return 0, (f"{part} token {k} (id {tok}) is not a token of the student's tokenizer: ids must be in "
                           f"[0, {vocab}) (ids of another tokenizer? a padding row of the embedding scores nothing)")
            if space is not None and tok not in space.teacher_pieces and not space.is_shared(tok):
                why = space.unmapped.get(tok, "it is neither shared by both tokenizers nor a mapped student-only token")
                return 0, f"{part} token {k} (id {tok}) has no equivalent in the teacher's token space: {why}"
    # A model scores nothing meaningful past its context (its positions were never trained there).
    length = len(trace.prompt_ids) + len(trace.completion_ids)
    context = student_config.max_position_embeddings
    if length > context:
        return 0, f"{length} tokens, longer than the student's context ({context} positions, max_position_embeddings)"
    if space is None:
        return length, ""
    # A mapped student token is several teacher tokens.
    teacher_length = sum(len(space.teacher_pieces.get(tok, (tok,))) for tok in trace.prompt_ids + trace.completion_ids)
    context = teacher_config.max_position_embeddings
    if teacher_length > context:
        return 0, (f"{teacher_length} tokens in the teacher's space ({length} in the student's), longer than the "
                   f"teacher's context ({context} positions, max_position_embeddings)")
    return teacher_length, ""


def _not_finite(scores: dict) -> str:
    """Why a trace's log-probs cannot enter a figure (a NaN or infinite one), or ''."""
    for model, logprobs in scores.items():
        bad = next((k for k, lp in enumerate(logprobs) if not math.isfinite(lp)), None)
        if bad is not None:
            return f"the {model}'s log-prob of completion token {bad} is {logprobs[bad]}"
    return ""


def _bar(total, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="rsd score", unit="trace", dynamic_ncols=True, disable=None)  # None: terminals only


def run_score(data: list[str], *, student, teacher=None, out=None, plot=None, completion_field=None,
              question_field="question", system_prompt=DEFAULT_SYSTEM_PROMPT, device="auto", dtype="auto",
              sampler="auto", progress=True, log=print) -> list[dict]:
    """Score every file, print the side-by-side table, write the JSON report and the plot; returns the reports
    (`shortfalls` of them says what a run that leaves rows out should exit with)."""
    from rsd_engine.tokens import load_tokenizer

    plot = plot_file(plot)
    check_not_input({"a --data file": list(data)}, {"--out": out, "--plot": plot}, apart=("--out", "--plot"))
    check_plot_format(plot)
    check_report_out(out, "score")
    check_plot_out(plot, "score")
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
        if f.failed:
            t, why = f.failed[0]
            log(f"{f.path}: {len(f.failed)} traces failed, left out of every figure (first: row {t.row}, id {t.id}: "
                f"{why})")
    if out is not None:
        from rsd_engine.runtime import resolve_device, resolve_dtype

        # The precision the figures were computed in (--dtype auto is bfloat16 on a GPU, float32 on a CPU: up to a few
        # tenths of a nat a token apart on a small model).
        resolved = resolve_device(device)
        write_report(out, "score", {"student": str(student), "teacher": teacher and str(teacher),
                                    "device": str(resolved), "dtype": str(resolve_dtype(dtype, resolved)).replace(
                                        "torch.", ""), "files": reports}, allow_nan=False)
        log(f"report: {out}")
    if plot is not None:
        plot_histogram(files, plot)
        log(f"histogram: {plot}")
    return reports


def shortfalls(reports: list[dict]) -> list[tuple[int, int, str, str]]:
    """The rows a run left out, as cli._exit_status takes them: skipped (no trace, or one the models cannot
    score) and failed (log-probs not finite)."""
    rows = sum(r["rows"] for r in reports)
    return [(sum(r["skipped_rows"] for r in reports), rows, "rows",
             "were skipped (not a trace, or one the models cannot score; the summary names the first)"),
            (sum(len(r["failed_traces"]) for r in reports), rows, "rows", "failed (log-probs not finite)")]
