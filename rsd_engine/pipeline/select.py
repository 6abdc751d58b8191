"""`rsd select`: teacher-guided selection — keep the candidate responses richest in
teacher-originated sentences (DESIGN §9; scored under teacher and original student only), or, as
baselines, random ones or the ones the student finds likeliest.

`--by` ranks candidates by the count or the share of teacher-originated sentences, the student's
mean log-probability per token, or at random (ranking.py, which says what each reads).

Candidates are the rows that share an id; an id whose rows hold different questions is refused
(naming them), since one of two problems would be dropped. Rows that say they are wrong
(`"correct": false`, as `rsd eval` writes it) are set aside unless --include-incorrect: teacher-
guided selection chooses among correct answers. A problem without a candidate left is named and
written nowhere. Responses cut off by the length limit are set aside as `rsd provenance` does, and
candidates it would skip (too long, unreadable, non-finite log-probs, no sentence) are skipped with
the reason and never compete.

Without `--budget` every problem (id) keeps its best candidate; `--by` defaults to count. A
problem's row is written (fsynced) once all its candidates are scored, so a rerun resumes after
the last problem written.

With `--budget N` the N best over the whole dataset are kept: N responses (`--budget-unit
responses`, the default: a problem may give several) or N problems, each with its best candidate
(`--budget-unit problems`); `--by` defaults to share, since a count favours long responses when
problems are compared with each other. The same N under `--by random` or `--by
student-likelihood` is the baseline to train against. Every candidate's score goes first to
OUT.scores.jsonl (resumable, one line per candidate, with the hash of its text and the hash of the question and
system turn it was read after); once all are scored the kept rows are written to OUT best first with their `rank`,
so a rerun resumes scoring or the writing. The scores file is a cache: a line counts for the text, question and
system turn it was read from, and a candidate of which one changed is scored again (a line an older rsd wrote, with
the text's hash alone, says nothing of what it was read after: scored again too, once). An OUT already written
that is not the selection the candidates now make (a kept row's question, system turn, text or grade edited, or a
candidate added, edited or regraded that ranks among the kept) is refused, naming what changed, --force or not:
rows of two selections would mix.

The kept rows are written as read, plus the score (`teacher_sentences`, `sentences`,
`teacher_share`; or `student_logprob`; or `random_key`), `tokens` and `candidates` (without --budget also
`candidates_hash`: a rerun whose candidates of a done problem changed since, added, edited or regraded, or
their question or system turn edited, is refused unless --force; a row an older rsd wrote, whose hash covers
the candidates' texts and grades alone, is compared that way, and its question and system turn as the kept row
holds them). Under torchrun
each rank takes every world_size-th problem and writes its own part; rank 0 merges them (else
`rsd merge OUT`, or, with --budget, `rsd merge OUT.scores.jsonl` and a rerun on one process).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from rsd_engine.sizes import check_size

from .categories import DEFAULT_RULE, Rule, options_rule
from .distributed import (Dist, barrier_and_merge, init_process_group, log_report, output_target, rank_device,
                          rank_target)
from .manifest import plain
from .progress import describe_skipped
from .prompts import DEFAULT_SYSTEM_PROMPT
from .provenance import RUNTIME_OPTIONS, output_settings
from .ranking import BUDGET_UNITS, RANKINGS, Candidate, Scorer, check_budget, check_by, pick, random_key, select_budget
from .readers import Reader, other_prompts, other_prompts_warning
from .records import RecordWriter, all_finite, read_records
from .output_paths import check_not_input
from .parts import held_elsewhere
from .responses import Response, check_one_question_per_id, load_responses, row_id, row_response

__all__ = ["RANKINGS", "BUDGET_UNITS", "Candidate", "Scorer", "SelectOptions", "check_by", "pick", "random_key",
           "select_budget", "provenance_chooser", "run_select", "scores_path"]

def provenance_chooser(engine, system_prompt: str, *, batch_size: int = 4, by: str = "count",
                       rule: Rule | None = None, seed: int = 0):
    """`rsd generate --select provenance`: among a problem's correct attempts, the one `pick` keeps,
    scored under the engine's own teacher and student (each through its own chat template, in caches
    of their own, so the generation in flight is untouched). Ties go to the fewer student tokens as
    `rsd select` counts them, the response text tokenised again (an attempt sampled as a non-canonical
    tokenisation has more generated tokens than that). Falls back to the shortest generated attempt
    when no attempt can be read or scored."""
    readers = {"teacher": Reader("teacher", engine.teacher_path, model=engine.teacher,
                                 tokenizer=engine.teacher_tokenizer),
               "student": Reader("student", engine.student_path, model=engine.student, tokenizer=engine.tokenizer)}
    scorer = Scorer(by, readers, rule=rule, batch_size=batch_size, seed=seed)
    # Another chat template can make the teacher's prompt a little longer than the student's.
    max_seq_len = engine.max_seq_len + 256

    def choose(problem, solved):
        responses = [Response(problem.id, a.index, problem.question, system_prompt, a.result.text, {}) for a in solved]
        usable, _ = scorer.prepare(responses, max_seq_len)
        if not usable:
            return min(solved, key=lambda a: (len(a.token_ids), a.index)), {}
        scorer.load()
        by_index = {a.index: a for a in solved}
        candidates, _ = scorer.score(usable)  # an attempt set aside (non-finite log-probs) does not compete
        if not candidates:
            return min(solved, key=lambda a: (len(a.token_ids), a.index)), {}
        best = pick(candidates, by)
        fields = best.fields()
        fields.pop("tokens", None)
        return by_index[usable[best.order].sample], fields

    return choose


@dataclass
class SelectOptions:
    teacher: str | None
    student: str | None
    data: str
    out: str
    by: str | None = None  # None: count, or share with a budget
    budget: int | None = None
    budget_unit: str = "responses"
    seed: int = 0  # --by random's draws
    question_field: str = "question"
    response_field: str = "response"
    id_field: str = "id"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    rule: str = DEFAULT_RULE  # categories.py: difference (--beta) or ratio (--margin)
    beta: float | None = None
    margin: float | None = None
    max_seq_len: int | None = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    include_incorrect: bool = False  # also rank candidates whose row says "correct": false
    include_truncated: bool = False
    progress: bool = True
    force: bool = False  # append to an output made with other settings

    def __post_init__(self):
        if self.budget is not None:
            check_budget(self.budget)
        if self.budget_unit not in BUDGET_UNITS:
            raise ValueError(f"--budget-unit = {self.budget_unit!r}: must be one of {', '.join(BUDGET_UNITS)}")
        if self.by is None:
            self.by = "count" if self.budget is None else "share"
        check_by(self.by)
        self.batch_size = check_size("--batch-size", self.batch_size, 1)
        if self.max_seq_len is not None:
            self.max_seq_len = check_size("--max-seq-len", self.max_seq_len, 2)
        self.category_rule = options_rule(self)
        needed = {"count": ("teacher", "student"), "share": ("teacher", "student"),
                  "student-likelihood": ("student",), "random": ()}[self.by]
        for role in needed:
            if not getattr(self, role):
                raise ValueError(f"--by {self.by} needs --{role} (the {role} model folder)")


def make_scorer(opts: SelectOptions, dist: Dist) -> Scorer:
    device = rank_device(opts.device, dist)
    roles = {"count": ("teacher", "student"), "share": ("teacher", "student"),
             "student-likelihood": ("student",), "random": ()}[opts.by]
    readers = {role: Reader(role, getattr(opts, role), device=device, dtype=opts.dtype) for role in roles}
    return Scorer(opts.by, readers, rule=opts.category_rule, batch_size=opts.batch_size, seed=opts.seed)


def run_select(opts: SelectOptions, log=print) -> dict:
    dist = Dist.from_env()
    out, target = output_target(opts.out, opts.data, dist)
    if opts.budget is not None:
        check_not_input({"--data": opts.data}, {"--budget's scores file": scores_path(out),
                                                "its part": rank_target(scores_path(out), dist)})
    scorer = make_scorer(opts, dist)
    data = load_responses(opts.data, question_field=opts.question_field, response_field=opts.response_field,
                          id_field=opts.id_field, system_prompt=opts.system_prompt,
                          include_truncated=opts.include_truncated)
    if not data.has_ids:
        raise ValueError(f"{opts.data}: no row has an {opts.id_field!r} field; rsd select keeps one candidate per "
                         f"id, so candidates of one problem must share an id (name it with --id-field)")
    problems = group_candidates(data.responses, opts.data)
    student = scorer.readers.get("student")  # (--by random reads no model)
    moved = other_prompts(data.responses, student) if dist.rank == 0 and student is not None else []
    if moved:
        log(other_prompts_warning(moved))
    incorrect = {pid: [r for r in rows if said_correct(r) is False] for pid, rows in problems.items()}
    ids = list(problems)[dist.rank:: dist.world_size]
    # Which candidates compete shapes the row kept: --include-truncated and --max-seq-len (a candidate longer
    # is skipped, and the best of the others kept for good) are compared here.
    runtime = tuple(o for o in RUNTIME_OPTIONS if o not in ("include_truncated", "max_seq_len"))
    settings, about = output_settings(opts, ("teacher", "student"), runtime, command="select")
    group = init_process_group(dist, log)
    try:
        tally = {"rows": data.num_rows, "skipped_rows": data.skipped if dist.rank == 0 else [],
                 "truncated": data.truncated if dist.rank == 0 else [],
                 "incorrect": 0 if opts.include_incorrect else sum(len(incorrect[i]) for i in ids),
                 "problems": len(ids), "skipped": [], "written": 0, "no_candidate": []}
        considered = {pid: [r for r in rows if opts.include_incorrect or said_correct(r) is not False]
                      for pid, rows in problems.items()}
        if opts.budget is None:
            _select_per_problem(opts, scorer, considered, problems, ids, target, settings, about, tally, dist)
        elif _score_all(opts, scorer, considered, ids, settings, about, tally, dist, group, log):
            _write_budget(opts, considered, problems, settings, about, tally)
        if opts.budget is not None:  # --budget writes OUT whole (one process, or rank 0 after the merge), else a part
            target = out if "kept" in tally else rank_target(scores_path(out), dist)  # of the scores file
        log_report(dist, _format(tally, target), target, log)
        if group and opts.budget is None:
            tally["not_merged"] = barrier_and_merge(dist, out, log, tally.setdefault("merge_reports", []))
        elif dist.world_size > 1 and opts.budget is None:
            log(f"{dist.tag}part written; when every rank is done: rsd merge {out}")
        return tally
    finally:
        if group:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _select_per_problem(opts, scorer, problems, every, ids, target, settings, about, tally, dist):
    """`problems`: the candidates that compete; `every`: all rows of each id."""
    with RecordWriter(target, settings, force=opts.force, about=about) as writer:
        # Rows in OUT's other files (an earlier merge, every part of any world size) are done too.
        elsewhere = held_elsewhere(opts.out, target, settings, force=opts.force)
        held = writer.existing + [r for records in elsewhere.values() for r in records]
        done = {kept_id(r, opts) for r in held}
        # A problem's row was chosen from its candidates as they were: rows appended since (rsd eval --samples 8
        # after 4), edited or regraded would leave it as it was, done.
        # So would a question or system turn edited around them (the scores are read after them).
        now = {pid: candidates_hash(every[pid]) for pid in ids}
        changed = sorted({pid for r in held if "candidates_hash" in r
                          for pid in [kept_id(r, opts)] if pid in now and changed_since(r, every[pid], now[pid], opts)})
        if changed and not opts.force:
            shown = ", ".join(changed[:5]) + (f", and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise ValueError(f"{opts.data}: the candidates of {len(changed)} problem{'s' * (len(changed) != 1)} changed "
                             f"(added, removed, edited or regraded, or their question or system turn edited) since "
                             f"their rows in {opts.out} were selected: {shown}; resuming would keep those rows. Give "
                             f"another --out, remove their rows, or pass --force to keep them")
        tally["changed_kept"] = changed
        todo = [i for i in ids if i not in done]
        usable, skipped = scorer.prepare([r for i in todo for r in problems[i]], opts.max_seq_len)
        usable_keys = {r.key for r in usable}
        tally.update(already_done=len(ids) - len(todo), skipped=[(r.key, why) for r, why in skipped])
        if usable:
            scorer.load()
        bar = _bar(len(todo), opts.progress and dist.rank == 0, dist, "problem")
        for pid in todo:
            mine = [r for r in problems[pid] if r.key in usable_keys]
            candidates, unscored = scorer.score(mine)
            tally["skipped"] += [(r.key, why) for r, why in unscored]
            if bar is not None:
                bar.update(1)
            if not candidates:
                tally["no_candidate"].append(pid)
                continue
            best = pick(candidates, opts.by)
            row = with_id(mine[best.order].row, pid)
            row.update(best.fields(), candidates=len(every[pid]), candidates_hash=now[pid])
            writer.write(row)
            tally["written"] += 1
        if bar is not None:
            bar.close()


def candidates_hash(rows: list[Response]) -> str:
    """What a problem's selection was made from: each candidate's question and system turn (what its score is read
    after), text hash, correct, finish_reason and its row's own sample (none where the row has no "sample": its
    place among its id's rows, which a reorder moves), as a set: the same candidates in another order are the
    same."""
    return _set_hash([r.question, r.system, r.row.get("sample"), r.text_hash, r.row.get("correct"),
                      r.row.get("finish_reason")] for r in rows)


def older_candidates_hash(rows: list[Response]) -> str:
    """The candidates_hash an older rsd wrote: without the question and system turn."""
    return _set_hash([r.row.get("sample"), r.text_hash, r.row.get("correct"), r.row.get("finish_reason")]
                     for r in rows)


def _set_hash(items) -> str:
    items = sorted(json.dumps(item) for item in items)
    return hashlib.blake2b("\n".join(items).encode(), digest_size=8).hexdigest()


def changed_since(kept: dict, rows: list[Response], now: str, opts) -> bool:
    """Whether the candidates of a problem whose row `kept` is in the output changed since it was selected (`now`:
    candidates_hash(rows)). A row an older rsd wrote holds older_candidates_hash: compared with it, and the
    question and system turn the kept row holds (it is the input row it was chosen as) with its candidates'
    now (the two hashes of the same candidates differ, so which one a row holds says which rsd wrote it)."""
    if kept["candidates_hash"] == now:
        return False
    if kept["candidates_hash"] != older_candidates_hash(rows):
        return True
    read = row_response(kept, question_field=opts.question_field, response_field=opts.response_field,
                        id_field=opts.id_field, system_prompt=opts.system_prompt)
    return read is None or (read.question, read.system) not in {(r.question, r.system) for r in rows}


def with_id(row: dict, pid: str) -> dict:
    """The kept row: the input row, with its problem id as "id" where it has none (--id-field names another
    column, or the id is the question's hash). An "id" of the row's own is kept as it is (it may name no problem,
    as a source name "gsm8k" shared by many): `rsd merge` knows a kept row by its problem id, read as kept_id
    reads it (records.record_id_reader, from the settings in the manifest), so each problem stays apart."""
    row = dict(row)
    if row.get("id") is None:
        row["id"] = pid
    return row


def kept_id(row: dict, opts) -> str:
    """The problem id of a row of the output, read as load_responses read it from the input (the kept row is
    the input row and a few fields), so a rerun resumes by the same id whatever --id-field names."""
    pid = row_id(row, question_field=opts.question_field, response_field=opts.response_field,
                 id_field=opts.id_field, system_prompt=opts.system_prompt)
    return pid if pid is not None else str(row.get("id"))


def _scored_key(line: dict) -> tuple:
    """(id, sample, hash of the text scored, hash of the question and system turn it was read after) of a scores
    line: a candidate's score is the line of its _candidate_key. Lines an older rsd wrote lack a hash (the context's,
    or both) and match no candidate: it is scored again (what they were read after cannot be told)."""
    return str(line.get("id")), line.get("sample"), line.get("response_hash"), line.get("context_hash")


def _candidate_key(r: Response) -> tuple:
    return (*r.key, r.text_hash, r.context_hash)


def _score_settings(settings: dict) -> dict:
    """The scores file's settings: the output's, less the budget (scores do not depend on it)."""
    return {k: v for k, v in settings.items() if k not in ("--budget", "--budget-unit")}


def scores_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.with_suffix("").name + ".scores.jsonl")


def _score_all(opts, scorer, problems, ids, settings, about, tally, dist, group, log) -> bool:
    """--budget, first step: every candidate's score into OUT.scores.jsonl (this rank's part under
    torchrun). True when this process goes on to write OUT."""
    path = scores_path(opts.out)
    target = rank_target(path, dist)
    score_settings = _score_settings(settings)
    with RecordWriter(target, score_settings, force=opts.force, about=about) as writer:
        # A score counts for the text it was computed from and the question and system turn it was read after: a
        # candidate edited, or its question or system turn, or rows without "sample" reordered within an id (their
        # sample is their place), is scored again.
        elsewhere = held_elsewhere(path, target, score_settings, force=opts.force)
        lines = [r for r in writer.existing + [r for records in elsewhere.values() for r in records] if all_finite(r)]
        done = {_scored_key(r) for r in lines}
        todo = [r for pid in ids for r in problems[pid] if _candidate_key(r) not in done]
        # Why a candidate with a line for its text is scored again: read after another question or system turn,
        # or by an older rsd, which did not record them.
        contexts = {}
        for line in lines:
            contexts.setdefault(_scored_key(line)[:3], set()).add(line.get("context_hash"))
        again = {"context": [], "older": []}
        for r in todo:
            seen = contexts.get((*r.key, r.text_hash), set())
            if seen - {None}:
                again["context"].append(r.key)
            elif seen:
                again["older"].append(r.key)
        usable, skipped = scorer.prepare(todo, opts.max_seq_len)
        tally.update(already_done=sum(len(problems[pid]) for pid in ids) - len(todo),
                     skipped=[(r.key, why) for r, why in skipped], scored=0, scored_again=again, scored_now=[])
        if usable:
            scorer.load()
        bar = _bar(len(usable), opts.progress and dist.rank == 0, dist, "candidate")
        for first in range(0, len(usable), scorer.batch_size):
            batch = usable[first: first + scorer.batch_size]
            candidates, unscored = scorer.score(batch)
            # One set aside has no line here: it never competes, and a rerun scores it again.
            writer.write_many([{"id": r.id, "sample": r.sample, "response_hash": r.text_hash,
                                "context_hash": r.context_hash, **c.fields()}
                               for c in candidates for r in [batch[c.order]]])
            tally["skipped"] += [(r.key, why) for r, why in unscored]
            tally["scored"] += len(candidates)
            tally["scored_now"] += [batch[c.order].key for c in candidates]
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
    if group:
        tally["not_merged"] = barrier_and_merge(dist, path, log, tally.setdefault("merge_reports", []))
        return dist.rank == 0 and not tally["not_merged"]
    if dist.world_size > 1:
        log(f"{dist.tag}scores part written; when every rank is done: rsd merge {path}, then rerun this command "
            f"on one process to write {opts.out}")
        return False
    return True


def _write_budget(opts, problems, every, settings, about, tally):
    """--budget, second step: the kept rows, best first, from the complete scores file (`problems`:
    the candidates that compete; `every`: all rows of each id)."""
    path = scores_path(opts.out)
    score_settings = _score_settings(settings)
    # The scores file, and any of its parts (_score_all resumed from them too).
    lines = read_records(path) + [r for records in held_elsewhere(path, path, score_settings, force=opts.force).values()
                                  for r in records]
    scores = {_scored_key(r): r for r in lines if all_finite(r)}  # an older rsd wrote NaN scores: scored again
    by_problem = {}
    for pid, responses in problems.items():
        scored = [r for r in responses if _candidate_key(r) in scores]
        by_problem[pid] = [Candidate.from_fields(k, scores[_candidate_key(r)]) for k, r in enumerate(scored)]
        problems[pid] = scored
        if not scored:
            tally["no_candidate"].append(pid)
    kept = select_budget(by_problem, opts.budget, opts.budget_unit, opts.by)
    rows, keys = [], [problems[pid][c.order].key for pid, c in kept]
    for rank, (pid, c) in enumerate(kept, 1):
        row = with_id(problems[pid][c.order].row, pid)
        row.update(c.fields(), candidates=len(every[pid]), rank=rank)
        rows.append(row)
    with RecordWriter(opts.out, settings, force=opts.force, about=about) as writer:
        held = writer.existing
        other = next((k for k, row in enumerate(held) if k >= len(rows) or row != plain(rows[k])), None)
        if other is not None:
            # Appending would mix two rankings (a row twice, or one of the N best missing): refused, --force or not.
            raise ValueError(_another_selection(opts, held, keys, other, every, set(tally.get("scored_now", [])),
                                                plain(rows[other]) if other < len(rows) else None))
        writer.write_many(rows[len(held):])
    tally.update(written=len(rows) - len(held), kept=len(rows), candidates=sum(map(len, by_problem.values())),
                 already_written=len(held))


# What a kept row of a --budget selection is given beside its input row's fields (Candidate.fields, with_id).
KEPT_FIELDS = ("teacher_sentences", "sentences", "teacher_share", "student_logprob", "random_key", "tokens",
               "candidates", "rank", "id")


def _another_selection(opts, held, keys, k, every, scored_now, row_now=None) -> str:
    """Why OUT (its rows `held`) is not this run's selection (the (id, sample) of its candidates: `keys`), whose
    first row that differs is `k` (`row_now`: this run's row k): the problems whose kept rows changed in --data
    since (question or system turn, text, or the row itself, as a regrade), else the candidate scored now that
    takes row k, else, where row k is the same candidate, the fields of it that differ (its count of candidates,
    when one was added or removed), else what is left (candidates regraded, added or removed, or the scores file
    edited); and what to do."""
    out = Path(opts.out)
    changed = {}
    for row in held:
        pid = kept_id(row, opts)
        how = _kept_row_change(row, every.get(pid, []), opts)
        if how:
            changed.setdefault(pid, how)
    now = (f"would now be id {keys[k][0]} candidate {keys[k][1]}" if k < len(keys)
           else f"is past the end of this selection (of {len(keys)} rows)")
    was = f"id {kept_id(held[k], opts)} candidate {held[k].get('sample', '(no sample)')}"
    if changed:
        shown = ", ".join(f"{pid} ({how})" for pid, how in list(changed.items())[:5])
        more = f", and {len(changed) - 5} more" if len(changed) > 5 else ""
        why = (f"{out} holds a selection made before --data changed: the kept rows of {len(changed)} "
               f"problem{'s' * (len(changed) != 1)} changed since they were selected: {shown}{more}")
    elif k < len(keys) and keys[k] in scored_now:
        why = (f"{out} holds a selection made before --data changed: its row {k} {now}, scored in this "
               f"run (a candidate added, edited or regraded since, or its question or system turn edited), not {was}")
    elif row_now is not None and (kept_id(held[k], opts), held[k].get("sample")) == tuple(keys[k]):
        fields = [name for name in dict.fromkeys([*held[k], *row_now]) if held[k].get(name) != row_now.get(name)]
        shown = ", ".join(f"{name} {held[k].get(name)!r} -> {row_now.get(name)!r}" for name in fields[:4])
        why = (f"{out} holds a selection made before --data changed: its row {k} ({was}) is this run's too, but "
               f"with {shown}" + (" (a candidate of its problem added or removed since)" if "candidates" in fields
                                  else ""))
    else:
        why = (f"{out} holds another selection: its row {k} ({was}) {now} (candidates of --data "
               f"regraded, added or removed since it was written, or the scores in {scores_path(out).name} edited)")
    return (f"{why}; writing this selection after its rows would mix two selections, so {out.name} is left as it "
            f"is (--force or not): give another --out, or remove {out} (and {out.name}.manifest.json) to write the "
            f"selection again (the scores in {scores_path(out).name} are reused)")


def _kept_row_change(row: dict, candidates: list[Response], opts) -> str | None:
    """How the input row a kept row was written from changed since, as far as `candidates` (its problem's rows now)
    say: None when one of them is that row as it was."""
    read = row_response(row, question_field=opts.question_field, response_field=opts.response_field,
                        id_field=opts.id_field, system_prompt=opts.system_prompt)
    if read is None:
        return "no longer read as a candidate"
    if not candidates:
        return ("removed from --data" if row.get(opts.id_field) is not None
                else "not in --data now: removed, or its question, which is its id, edited")
    same = [r for r in candidates if r.text == read.text and (read.sample < 0 or r.sample == read.sample)]
    if not same:
        return "response edited or removed"
    same = [r for r in same if (r.question, r.system) == (read.question, read.system)]
    if not same:
        return "question or system turn edited"

    def own(fields: dict) -> dict:  # the input row's fields, less those the kept row is given
        return {name: value for name, value in fields.items() if name not in KEPT_FIELDS}

    if any(own(row) == own(plain(r.row)) for r in same):
        return None
    return "row edited or regraded"


def group_candidates(responses: list[Response], source) -> dict[str, list[Response]]:
    """{id: its candidates, in input order}; refuses an id whose rows hold different questions."""
    check_one_question_per_id(responses, source, "rsd select keeps one candidate per id, so one of these problems "
                                                 "would be lost")
    problems: dict[str, list[Response]] = {}
    for r in responses:
        problems.setdefault(r.id, []).append(r)
    return problems


def said_correct(response: Response) -> bool | None:
    """The row's `correct` (true / false), or None when the row does not say (load_responses refuses others)."""
    return response.row.get("correct")


def _bar(total, enabled, dist, unit):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{dist.tag}rsd select", unit=unit, dynamic_ncols=True, disable=None)


def _format(t: dict, target) -> str:
    if "scored" in t:  # --budget
        lines = [f"problems: {t['problems']}; candidates: {t['already_done']} already in the scores file, "
                 f"{t['scored']} scored now"]
        again = t.get("scored_again", {})
        for kind, why in (("context", "whose question or system turn changed since they were scored"),
                          ("older", "whose scores an older rsd wrote, without the question and system turn they "
                                    "were read after")):
            if again.get(kind):
                rid, sample = again[kind][0]
                lines.append(f"scored again: {len(again[kind])} {why} (first: id {rid} candidate {sample})")
        if "kept" in t:
            lines.append(f"kept: {t['kept']} of {t['candidates']} scored candidates ({t['already_written']} already "
                         f"in the output, {t['written']} written now)")
    else:
        lines = [f"problems: {t['problems']} ({t['already_done']} already in the output, {t['written']} written "
                 f"now)"]
    if t["skipped_rows"]:
        lines.append(describe_skipped(t["skipped_rows"], t["rows"]))
    if t["truncated"]:
        rid, sample = t["truncated"][0]
        lines.append(f"cut off by the length limit, set aside: {len(t['truncated'])} (first: id {rid} candidate "
                     f"{sample}; --include-truncated ranks them)")
    if t["incorrect"]:
        lines.append(f"incorrect candidates set aside: {t['incorrect']} (--include-incorrect ranks them)")
    if t["skipped"]:
        (rid, sample), why = t["skipped"][0]
        lines.append(f"skipped candidates: {len(t['skipped'])} (first: id {rid} candidate {sample}: {why})")
    if t.get("changed_kept"):
        n = len(t["changed_kept"])
        lines.append(f"kept under --force: the rows of {n} problem{'s' * (n != 1)} whose candidates changed since "
                     f"they were selected ({', '.join(t['changed_kept'][:5])})")
    if t["no_candidate"]:
        lines.append(f"problems without a usable{'' if t['incorrect'] == 0 else ', correct'} candidate: "
                     f"{len(t['no_candidate'])} (first: {t['no_candidate'][0]})")
    lines.append(f"output: {target}" if "scored" not in t or "kept" in t else f"scores: {target}")
    return "\n".join(lines)
