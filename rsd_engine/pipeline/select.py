"""`rsd select`: teacher-guided selection — of the candidate responses to each problem, keep the
one richest in teacher-originated sentences (DESIGN §9; scored under teacher and original student
only).

Candidates are the rows that share an id; an id whose rows hold different questions is refused
(naming them), since one of two problems would be dropped. Rows that say they are wrong
(`"correct": false`, as `rsd eval` writes it) are set aside unless --include-incorrect: teacher-
guided selection chooses among correct answers. A problem without a candidate left is named and
written nowhere. Responses cut off by the length limit are set aside as `rsd provenance` does.

`--by count` (default) ranks by the number of teacher-originated sentences, `--by share` by their
share of the response's sentences; ties go to the shorter response (student tokens), then to the
earlier candidate. The kept row is written as it was read, plus `teacher_sentences`,
`teacher_share` and `candidates`. A problem's row is written (fsynced) once all its candidates are
scored, so a rerun resumes after the last problem written. Under torchrun each rank takes every
world_size-th problem and writes its own part; rank 0 merges them (else `rsd merge OUT`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .categories import DEFAULT_BETA
from .distributed import Dist, barrier_and_merge, init_process_group
from .prompts import DEFAULT_SYSTEM_PROMPT
from .provenance import RUNTIME_OPTIONS, make_tracer, output_settings
from .records import RecordWriter, check_writable, part_path, read_records
from .readers import Reader
from .responses import Response, load_responses
from .tracing import Tracer

RANKINGS = ("count", "share")


@dataclass(frozen=True)
class Candidate:
    order: int  # position among its problem's candidates
    teacher_sentences: int
    sentences: int
    tokens: int

    @property
    def teacher_share(self) -> float:
        return self.teacher_sentences / self.sentences if self.sentences else 0.0


def pick(candidates: list[Candidate], by: str = "count") -> Candidate:
    """The candidate teacher-guided selection keeps (see the module docstring)."""
    if by not in RANKINGS:
        raise ValueError(f"--by = {by!r}: must be one of {', '.join(RANKINGS)}")
    if not candidates:
        raise ValueError("no candidates to pick from")
    score = (lambda c: c.teacher_sentences) if by == "count" else (lambda c: c.teacher_share)
    return min(candidates, key=lambda c: (-score(c), c.tokens, c.order))


def provenance_chooser(engine, system_prompt: str, *, batch_size: int = 4, by: str = "count",
                       beta: float = DEFAULT_BETA):
    """`rsd generate --select provenance`: among a problem's correct attempts, the one `pick` keeps,
    scored under the engine's own teacher and student (each through its own chat template, in caches
    of their own, so the generation in flight is untouched). Falls back to the shortest when no
    attempt can be read."""
    readers = {"teacher": Reader("teacher", engine.teacher_path, model=engine.teacher,
                                 tokenizer=engine.teacher_tokenizer),
               "student": Reader("student", engine.student_path, model=engine.student, tokenizer=engine.tokenizer)}
    tracer = Tracer(readers, beta=beta, batch_size=batch_size)
    # Another chat template can make the teacher's prompt a little longer than the student's.
    max_seq_len = engine.max_seq_len + 256

    def choose(problem, solved):
        responses = [Response(problem.id, a.index, problem.question, system_prompt, a.result.text, {}) for a in solved]
        usable, _ = tracer.prepare(responses, max_seq_len)
        if not usable:
            return min(solved, key=lambda a: (len(a.token_ids), a.index)), {}
        tracer.load()
        by_index = {a.index: a for a in solved}
        traced = [t for k in range(0, len(usable), batch_size) for t in tracer.trace_batch(usable[k: k + batch_size])]
        candidates = [Candidate(k, t.teacher_sentences, len(t.sentences), len(by_index[t.response.sample].token_ids))
                      for k, t in enumerate(traced)]
        best = pick(candidates, by)
        kept = traced[best.order]
        return by_index[kept.response.sample], {"teacher_sentences": best.teacher_sentences,
                                                "teacher_share": best.teacher_share}

    return choose


@dataclass
class SelectOptions:
    teacher: str
    student: str
    data: str
    out: str
    by: str = "count"
    question_field: str = "question"
    response_field: str = "response"
    id_field: str = "id"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    beta: float = DEFAULT_BETA
    max_seq_len: int | None = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    include_incorrect: bool = False  # also rank candidates whose row says "correct": false
    include_truncated: bool = False
    progress: bool = True
    force: bool = False  # append to an output made with other settings

    def __post_init__(self):
        if self.by not in RANKINGS:
            raise ValueError(f"--by = {self.by!r}: must be one of {', '.join(RANKINGS)}")


def run_select(opts: SelectOptions, log=print) -> dict:
    dist = Dist.from_env()
    out = Path(opts.out)
    target = part_path(out, dist.rank, dist.world_size) if dist.world_size > 1 else out
    check_writable(target)
    tracer = make_tracer(opts, dist, roles=("teacher", "student"))
    data = load_responses(opts.data, question_field=opts.question_field, response_field=opts.response_field,
                          id_field=opts.id_field, system_prompt=opts.system_prompt,
                          include_truncated=opts.include_truncated)
    if not data.has_ids:
        raise ValueError(f"{opts.data}: no row has an {opts.id_field!r} field; rsd select keeps one candidate per "
                         f"id, so candidates of one problem must share an id (name it with --id-field)")
    problems = group_candidates(data.responses, opts.data)
    incorrect = {pid: [r for r in rows if said_correct(r, opts.data) is False] for pid, rows in problems.items()}
    ids = list(problems)[dist.rank:: dist.world_size]
    # Which candidates compete shapes the row kept: --include-truncated is compared here.
    settings, about = output_settings(opts, ("teacher", "student"),
                                      tuple(o for o in RUNTIME_OPTIONS if o != "include_truncated"))
    group = init_process_group(dist, log)
    try:
        with RecordWriter(target, settings, force=opts.force, about=about) as writer:
            held = writer.existing + (read_records(out) if dist.world_size > 1 else [])
            done = {str(r["id"]) for r in held if "id" in r}
            todo = [i for i in ids if i not in done]
            considered = [r for i in todo for r in problems[i]
                          if opts.include_incorrect or said_correct(r, opts.data) is not False]
            usable, skipped = tracer.prepare(considered, opts.max_seq_len)
            usable_keys = {r.key for r in usable}
            tally = {"rows": data.num_rows, "skipped_rows": data.skipped if dist.rank == 0 else [],
                     "truncated": data.truncated if dist.rank == 0 else [],
                     "incorrect": 0 if opts.include_incorrect else sum(len(incorrect[i]) for i in todo),
                     "problems": len(ids), "already_done": len(ids) - len(todo),
                     "skipped": [(r.key, why) for r, why in skipped], "written": 0, "no_candidate": []}
            if usable:
                tracer.load()
            bar = _bar(len(todo), opts.progress and dist.rank == 0, dist)
            for pid in todo:
                mine = [r for r in problems[pid] if r.key in usable_keys]
                traced = [t for a in range(0, len(mine), tracer.batch_size)
                          for t in tracer.trace_batch(mine[a: a + tracer.batch_size])]
                scored = list(zip(mine, traced))
                if bar is not None:
                    bar.update(1)
                if not scored:
                    tally["no_candidate"].append(pid)
                    continue
                candidates = [Candidate(k, t.teacher_sentences, len(t.sentences), t.tokens)
                              for k, (_, t) in enumerate(scored)]
                best = pick(candidates, opts.by)
                row = dict(scored[best.order][0].row)
                row.update(teacher_sentences=best.teacher_sentences, teacher_share=best.teacher_share,
                           candidates=len(problems[pid]))
                writer.write(row)
                tally["written"] += 1
            if bar is not None:
                bar.close()
        log("\n".join(dist.tag + line for line in _format(tally, target).splitlines()))
        if group:
            barrier_and_merge(dist, out, log)
        elif dist.world_size > 1:
            log(f"{dist.tag}part written; when every rank is done: rsd merge {out}")
        return tally
    finally:
        if group:
            import torch.distributed

            torch.distributed.destroy_process_group()


def group_candidates(responses: list[Response], source) -> dict[str, list[Response]]:
    """{id: its candidates, in input order}; refuses an id whose rows hold different questions."""
    problems: dict[str, list[Response]] = {}
    for r in responses:
        problems.setdefault(r.id, []).append(r)
    mixed = {pid: list(dict.fromkeys(r.question for r in rows)) for pid, rows in problems.items()}
    mixed = {pid: questions for pid, questions in mixed.items() if len(questions) > 1}
    if mixed:
        pid, questions = next(iter(mixed.items()))
        shown = "; ".join(repr(q if len(q) <= 80 else q[:77] + "...") for q in questions[:3])
        more = f" ({len(mixed) - 1} more ids like it)" if len(mixed) > 1 else ""
        raise ValueError(f"{source}: id {pid!r} holds {len(questions)} different questions: {shown}{more}. rsd select "
                         f"keeps one candidate per id, so one of these problems would be lost; give each problem its "
                         f"own id (or name another column with --id-field)")
    return problems


def said_correct(response: Response, source) -> bool | None:
    """The row's `correct` (true / false), or None when the row does not say."""
    value = response.row.get("correct")
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"{source}: id {response.id!r} sample {response.sample} has \"correct\": {value!r}; it must be "
                     f"true or false (or absent when ungraded)")


def _bar(total, enabled, dist):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{dist.tag}rsd select", unit="problem", dynamic_ncols=True)


def _format(t: dict, target) -> str:
    lines = [f"problems: {t['problems']} ({t['already_done']} already in the output, {t['written']} written now)"]
    if t["skipped_rows"]:
        number, why = t["skipped_rows"][0]
        lines.append(f"skipped rows: {len(t['skipped_rows'])} of {t['rows']} (first: row {number}, {why})")
    if t["truncated"]:
        rid, sample = t["truncated"][0]
        lines.append(f"cut off by the length limit, set aside: {len(t['truncated'])} (first: id {rid} candidate "
                     f"{sample}; --include-truncated ranks them)")
    if t["incorrect"]:
        lines.append(f"incorrect candidates set aside: {t['incorrect']} (--include-incorrect ranks them)")
    if t["skipped"]:
        (rid, sample), why = t["skipped"][0]
        lines.append(f"skipped candidates: {len(t['skipped'])} (first: id {rid} candidate {sample}: {why})")
    if t["no_candidate"]:
        lines.append(f"problems without a usable{'' if t['incorrect'] == 0 else ', correct'} candidate: "
                     f"{len(t['no_candidate'])} "
                     f"(first: {t['no_candidate'][0]})")
    lines.append(f"output: {target}")
    return "\n".join(lines)
