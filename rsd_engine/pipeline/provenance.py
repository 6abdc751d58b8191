"""`rsd provenance`: where each sentence of a response comes from — teacher, student, both, or
boosted by distillation (DESIGN §9; rules in categories.py).

Output is one JSON line per sentence; a response's lines are written together and fsynced, and
each line names how many sentences its response has, so a response cut short by a kill -9 is
recognised and dropped when the run resumes (rerun the same command to continue). Each line also
holds the hash of its response's text and the hash of its row (responses.Response.row_hash: the question
and system turn, the text, `correct` and `finish_reason`): a response whose text or row changed in the
input since it was traced (regraded, its question edited) is named and the run refused, and under --force
traced again, its new lines appended with the next version number; every reader of the output
(current_sentences, rsd merge) takes the newest complete version of a response. Lines of an older rsd
without a row hash are compared by their text alone (their row is left unchecked). Under torchrun each
rank takes every world_size-th response and writes its own part; rank 0 merges the parts (else `rsd merge
OUT`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

from rsd_engine.sizes import check_size

from .categories import DEFAULT_RULE, options_rule
from .distributed import Dist, init_process_group, log_report, merge_or_note, rank_device, rank_target
from .manifest import COMMAND, MODEL_DTYPE, SENTENCE_READING, input_identity, model_dtype, model_fingerprint
from .progress import describe_skipped
from .prompts import DEFAULT_SYSTEM_PROMPT
from .provenance_report import category_shares, format_shares, plot_shares
from .readers import Reader, other_prompts, other_prompts_warning
from .records import RecordWriter, read_records
from .parts import held_elsewhere
from .output_paths import check_not_input, check_output_name, check_writable, check_plot_format
from .reports import check_plot_out, plot_file
from .responses import check_one_question_per_id, load_responses
from .sentences import READING
from .tracing import Tracer

# Options that choose what runs or where, not what a record says: kept in the manifest, not compared.
# --include-truncated only chooses which responses run: a traced response's lines are the same either way.
# --out is where the manifest itself lives (a rerun may name it ./out.jsonl or by its absolute path).
RUNTIME_OPTIONS = ("out", "max_seq_len", "batch_size", "max_batch_size", "limit", "plot", "device", "dtype",
                   "sampler", "progress", "force", "include_truncated")


@dataclass
class ProvenanceOptions:
    teacher: str
    student: str
    data: str
    out: str
    distilled: str | None = None
    question_field: str = "question"
    response_field: str = "response"
    id_field: str = "id"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    rule: str = DEFAULT_RULE  # categories.py: difference (--beta) or ratio (--margin)
    beta: float | None = None
    margin: float | None = None
    max_seq_len: int | None = None  # None: the longest response, up to the models' context
    batch_size: int = 8  # responses per forward
    limit: int | None = None
    plot: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True
    include_truncated: bool = False  # keep responses cut off by the length limit (marked "truncated")
    force: bool = False  # append to an output made with other settings, trace changed responses again

    def __post_init__(self):
        self.category_rule = options_rule(self)
        self.batch_size = check_size("--batch-size", self.batch_size, 1)
        if self.max_seq_len is not None:
            self.max_seq_len = check_size("--max-seq-len", self.max_seq_len, 2)
        if self.limit is not None and (not isinstance(self.limit, int) or isinstance(self.limit, bool)
                                       or self.limit < 1):
            raise ValueError(f"--limit = {self.limit!r}: must be an integer >= 1")


def make_tracer(opts, dist: Dist, roles=("teacher", "student", "distilled")) -> Tracer:
    device = rank_device(opts.device, dist)
    readers = {role: Reader(role, getattr(opts, role), device=device, dtype=opts.dtype)
               for role in roles if getattr(opts, role, None) is not None}
    return Tracer(readers, rule=opts.category_rule, batch_size=opts.batch_size)


def run_provenance(opts: ProvenanceOptions, log=print) -> dict:
    dist = Dist.from_env()
    out = Path(opts.out)
    target = rank_target(out, dist)
    check_output_name(out)
    plot = plot_file(opts.plot)
    opts = replace(opts, plot=str(plot) if plot else None)
    check_not_input({"--data": opts.data}, {"--out": out, "--plot": opts.plot}, apart=("--out", "--plot"))
    check_plot_format(opts.plot)
    check_not_input({"--data": opts.data}, {"its part": target})
    check_writable(target)
    check_plot_out(opts.plot, "provenance")
    tracer = make_tracer(opts, dist)
    data = load_responses(opts.data, question_field=opts.question_field, response_field=opts.response_field,
                          id_field=opts.id_field, system_prompt=opts.system_prompt,
                          include_truncated=opts.include_truncated)
    check_one_question_per_id(data.responses, opts.data, "rsd provenance reads an id's rows as samples of one "
                                                         "problem (rsd provenance-report resamples problems by id), "
                                                         "so these problems would be mixed")
    responses = data.responses[: opts.limit] if opts.limit else data.responses
    mine = responses[dist.rank:: dist.world_size]
    moved = other_prompts(responses, tracer.readers["student"]) if dist.rank == 0 else []
    if moved:
        log(other_prompts_warning(moved))
    settings, about = output_settings(opts, ("teacher", "student", "distilled"), command="provenance")
    group = init_process_group(dist, log)
    try:
        with RecordWriter(target, settings, force=opts.force, about=about) as writer:
            # A torn version is no version: refusing leaves it for the run that traces it again to cut off.
            # Lines in OUT's other files (an earlier merge, every part of any world size) count too.
            elsewhere = held_elsewhere(out, target, settings, force=opts.force)
            lines = writer.existing + [r for records in elsewhere.values() for r in records]
            newest = _newest(lines)
            todo, changed = responses_to_trace(mine, held_versions(lines))
            if changed and not opts.force:
                them = "them" if len(changed) > 1 else "it"
                raise ChangedResponses(f"{opts.data}: {describe_changed(changed)} since {target} traced {them} (the "
                                       f"response's text, its question or system turn, its \"correct\" or "
                                       f"\"finish_reason\"); rerun with --force to trace {them} again (readers take a "
                                       f"response's newest lines), or give another --out")
            dropped = drop_incomplete(writer)
            usable, skipped = tracer.prepare(todo, opts.max_seq_len)
            tally = {"rows": data.num_rows, "skipped_rows": data.skipped if dist.rank == 0 else [],
                     "truncated": data.truncated if dist.rank == 0 else [],
                     "truncated_kept": sum(r.truncated for r in mine), "changed": [r.key for r in changed],
                     "responses": len(mine), "already_done": len(mine) - len(todo), "torn_dropped": dropped,
                     "skipped": [(r.key, why) for r, why in skipped], "traced": 0, "sentences": 0, "seconds": 0.0}
            if usable:
                numbers = {r.key: newest[r.key][1] + 1 for r in changed}
                _trace_all(tracer, usable, writer, tally, opts.progress and dist.rank == 0, dist, numbers)
        log_report(dist, _format_tally(tally, target), target, log)
        merge_or_note(dist, group, {out: elsewhere}, tally, log)
        if dist.rank == 0:
            shown = out if (group or dist.world_size == 1) and out.is_file() else target
            report = category_shares(current_sentences(read_records(shown)))
            log(format_shares(report, distilled=opts.distilled is not None) if report["responses"]
                else f"no sentences in {shown}")
            if opts.plot and report["responses"]:
                plot_shares(report, opts.plot, distilled=opts.distilled is not None)
                log(f"plot: {opts.plot}")
            tally["report"] = report
        return tally
    finally:
        if group:
            import torch.distributed

            torch.distributed.destroy_process_group()


def output_settings(opts, models, runtime=RUNTIME_OPTIONS, *, command: str) -> tuple[dict, dict]:
    """(settings that shape the records, other options for the reader): the output's manifest
    (manifest.py). Models count by content, the input by content or resolved path; options in
    `runtime` do not change a record; `command` names whose records they are."""
    settings, about = {COMMAND: command}, {}
    for f in fields(opts):
        value = getattr(opts, f.name)
        if f.name in models:
            settings[f"{f.name} model"] = model_fingerprint(value) if value is not None else None
            about[f"--{f.name}"] = str(Path(value).resolve()) if value is not None else None
        elif f.name == "data":
            settings["--data"] = input_identity(value)
        elif f.name == "params":
            settings.update({f"--{p.name.replace('_', '-')}": getattr(value, p.name) for p in fields(value)
                             if p.name != "seed"})
        elif f.name in runtime:
            if f.name not in ("progress", "force"):
                about[f"--{f.name.replace('_', '-')}"] = value
        else:
            settings[f"--{f.name.replace('_', '-')}"] = value
    if hasattr(opts, "dtype"):
        settings[MODEL_DTYPE] = model_dtype(opts.device, opts.dtype)  # compared (manifest.py)
    if command in ("provenance", "select"):
        settings[SENTENCE_READING] = READING  # their sentences and probabilities are made these ways
    return settings, about


def _trace_all(tracer: Tracer, usable, writer, tally, progress: bool, dist: Dist, numbers: dict):
    """Trace and write `usable`; numbers: {key: version number} of the responses traced again."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(usable), desc=f"{dist.tag}rsd provenance", unit="response", dynamic_ncols=True,
                   disable=None)
    tracer.load()
    start = time.perf_counter()
    try:
        for first in range(0, len(usable), tracer.batch_size):
            batch = tracer.trace_batch(usable[first: first + tracer.batch_size])
            for traced in batch:
                if traced.skipped:  # non-finite log-probs, or no sentence left: no line would mark it done
                    tally["skipped"].append((traced.response.key, traced.skipped))
                    continue
                lines = traced.records()
                if traced.response.key in numbers:
                    for line in lines:
                        line["version"] = numbers[traced.response.key]
                writer.write_many(lines)
                tally["traced"] += 1
                tally["sentences"] += len(traced.sentences)
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix({"sent/s": f"{tally['sentences'] / (time.perf_counter() - start):.1f}"},
                                refresh=False)
    finally:
        tally["seconds"] = time.perf_counter() - start
        if bar is not None:
            bar.close()


def _format_tally(t: dict, target) -> str:
    lines = [f"responses: {t['responses']} ({t['already_done']} already in the output, {t['traced']} traced now)"]
    if t["skipped_rows"]:
        lines.append(describe_skipped(t["skipped_rows"], t["rows"]))
    if t["skipped"]:
        (rid, sample), why = t["skipped"][0]
        lines.append(f"skipped responses: {len(t['skipped'])} (first: id {rid} sample {sample}: {why})")
    if t["truncated"]:
        rid, sample = t["truncated"][0]
        lines.append(f"cut off by the length limit, skipped: {len(t['truncated'])} (first: id {rid} sample {sample}; "
                     f"--include-truncated keeps them)")
    if t["truncated_kept"]:
        lines.append(f"cut off by the length limit, kept (--include-truncated): {t['truncated_kept']}, their lines "
                     f"marked \"truncated\"")
    if t["changed"]:
        lines.append(f"{describe_changed(t['changed'])} since the output had it: traced again (--force)")
    if t["torn_dropped"]:
        lines.append(f"dropped {t['torn_dropped']} sentences of a response cut short by the last run (traced again)")
    if t["traced"]:
        lines.append(f"sentences: {t['sentences']}  {t['sentences'] / max(t['seconds'], 1e-9):.1f} sentences/s")
    lines.append(f"output: {target}")
    return "\n".join(lines)


class ChangedResponses(ValueError):
    """The input holds responses whose text differs from the version in the output."""


def _version(line: dict) -> tuple[str, int, str | None, int]:
    """(id, sample, hash of the response text, number): one traced version of a response. A response
    traced again is numbered one more than its newest version ("version", absent for the first),
    which orders versions across files (parts, a merged output); outputs of an older rsd have no hash."""
    return str(line.get("id")), line.get("sample", 0), line.get("response_hash"), line.get("version", 1)


def _complete(lines: list[dict]) -> dict[tuple, int]:
    """{version: position of its last line} for each version whose every sentence line is in `lines`."""
    seen: dict[tuple, set[int]] = {}
    total, last = {}, {}
    for position, line in enumerate(lines):
        version = _version(line)
        seen.setdefault(version, set()).add(line.get("index"))
        total[version], last[version] = line.get("sentences"), position
    return {v: last[v] for v, indices in seen.items() if len(indices) == total[v]}


def _newest(lines: list[dict]) -> dict[tuple[str, int], tuple[str | None, int]]:
    """{(id, sample): (text hash, number) of its newest complete version}."""
    complete = _complete(lines)
    return {v[:2]: v[2:] for v in sorted(complete, key=lambda v: (v[3], complete[v]))}


def complete_versions(lines: list[dict]) -> dict[tuple[str, int], str | None]:
    """{(id, sample): text hash of its newest complete version}."""
    return {key: text_hash for key, (text_hash, _) in _newest(lines).items()}


def complete_keys(lines: list[dict]) -> set[tuple[str, int]]:
    """(id, sample) of the responses with every sentence line of some version in `lines`."""
    return set(complete_versions(lines))


def current_sentences(lines: list[dict]) -> list[dict]:
    """The lines of each response's newest complete version, in file order: what every reader of
    an `rsd provenance` output should use (older versions and torn ones are left out)."""
    newest = _newest(lines)
    return [line for line in lines if newest.get(_version(line)[:2]) == _version(line)[2:]]


def held_versions(lines: list[dict]) -> dict[tuple[str, int], tuple[str | None, frozenset[str]]]:
    """{(id, sample): (text hash, row hashes) of its newest complete version}: the row hashes its lines hold
    (Response.row_hash; none on lines of an older rsd, which wrote none)."""
    newest = _newest(lines)
    rows: dict[tuple[str, int], set[str]] = {}
    for line in lines:
        version = _version(line)
        if newest.get(version[:2]) == version[2:] and line.get("row_hash") is not None:
            rows.setdefault(version[:2], set()).add(line["row_hash"])
    return {key: (text_hash, frozenset(rows.get(key, ()))) for key, (text_hash, _) in newest.items()}


def responses_to_trace(responses, held: dict) -> tuple[list, list]:
    """(what to trace: responses not in the output, then those changed since; the changed ones), `held` being
    held_versions of the output. A response changed when its text hash or its row hash (the question, system
    turn, text, correct and finish_reason: Response.row_hash) differs from its newest version's. Lines of an
    older rsd are compared as far as they can be: without a row hash by their text alone (a row regraded or a
    question edited since goes unnoticed), without a text hash not at all (they count as the response's)."""
    todo, changed = [], []
    for r in responses:
        if r.key not in held:
            todo.append(r)
            continue
        text, rows = held[r.key]
        if (text is not None and text != r.text_hash) or any(h != r.row_hash for h in rows):
            changed.append(r)
    return todo + changed, changed


def describe_changed(changed: list) -> str:
    keys = [r.key if hasattr(r, "key") else r for r in changed]
    shown = ", ".join(f"id {rid} sample {sample}" for rid, sample in keys[:3])
    return f"{len(keys)} response{'s' * (len(keys) != 1)} changed ({shown}{', ...' if len(keys) > 3 else ''})"


def is_sentence_line(line) -> bool:
    """Whether `line` is a sentence line of rsd provenance (tracing.Traced.records): its response's id, its index
    among the response's sentences and their number."""
    def count(value):
        return isinstance(value, int) and not isinstance(value, bool)

    return (isinstance(line, dict) and count(line.get("index")) and count(line.get("sentences"))
            and 0 <= line["index"] < line["sentences"] and "id" in line)


def drop_incomplete(writer: RecordWriter) -> int:
    """Cut off the lines of responses cut short by a kill (only the last group written can be, or the last groups
    of a merge of parts killed so: sentence lines); returns how many lines went. Lines of anything else are never
    cut: an output that ends with them (another command's records, lines appended by hand) is refused, --force or
    not."""
    done = _complete(writer.existing)
    torn = 0
    for line in reversed(writer.existing):
        if is_sentence_line(line) and _version(line) in done:
            break
        torn += 1
    tail = writer.existing[len(writer.existing) - torn:]
    foreign = next((k for k, line in enumerate(tail) if not is_sentence_line(line)), None)
    if foreign is not None:
        line = tail[foreign]
        keys = ", ".join(map(repr, list(line)[:5])) if isinstance(line, dict) else type(line).__name__
        raise ValueError(f"{writer.path} holds lines that are no rsd provenance sentence lines (line "
                         f"{len(writer.existing) - torn + foreign}: {keys}): another command's output, or lines "
                         f"added to it; rsd provenance cuts only its own sentences of a response a kill cut short, "
                         f"and leaves these alone: give another --out")
    if any(_version(line) not in done for line in writer.existing[:-torn or None]):
        raise ValueError(f"{writer.path} has incomplete responses before its last one: the file was changed by "
                         f"something else; give another --out")
    writer.drop_last(torn)
    return torn
