"""`rsd generate`: problems in, one verified RSD trace per problem out (resumable, shardable).

Every attempt of every problem goes through one Engine.generate_iter stream, so the batch is
refilled across problems; a problem's record is written (and fsynced) as soon as its last attempt
finishes, so a kill -9 loses at most the problems in flight. Only finished problems are written:
one whose attempt failed (non-finite logits) or was cut short by --max-seq-len is named in the
summary instead, so a rerun redoes it. The seed of an attempt is a hash of (--seed, problem id,
attempt index), and ids do not depend on row order (data.py): reruns, resumes and any number of
ranks give the same traces. The output is locked while a run writes it, and a rerun under other
settings is refused (records.py, manifest.py). Under torchrun each rank takes its shard of the
problems and writes its own part; rank 0 merges the parts when every rank is done and the parts
are in one folder (parts.py; else `rsd merge OUT`).

--format sft writes TRL's standard prompt-completion records, the text as the student read and wrote it,
ended with the tokenizer's EOS token, and the same as the exact token ids (`input_ids`, `completion_mask`:
TRL trains on these, traces.to_sft): a finished answer. A record that is
not one (a prefix: never solved, the first --prefix-tokens tokens, for UPFT; or an unverified problem none
of whose attempts passed the checks) goes in full to OUT.unfinished.jsonl beside OUT (unfinished_path),
locked, resumed and merged as OUT is, never into the SFT file.
"""

from __future__ import annotations

import hashlib
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from rsd_engine.params import SamplingParams
from rsd_engine.sizes import MAX_SAMPLES, MAX_SIZE, check_size

from . import answers
from .answers import check_available
from .data import (QUESTION_HASH, ChangedProblems, Problem, check_held, id_spellings, load_problems, record_id,
                   repeated_warning, shard_problems)
from .distributed import Dist, init_process_group, log_report, merge_or_note, output_target, rank_target
from .manifest import (ANSWER_CHECK, COMMAND, MODEL_DTYPE, TOKEN_SPACE, check_settings, input_identity, model_dtype,
                       model_fingerprint)
from .progress import ProgressBar, Tally, format_summary, names, unreadable_warning
from .prompts import (DEFAULT_SYSTEM_PROMPT, build_prompt, changed_prompts, control_text, control_text_warning,
                      plain_prompt_note)
from .records import RecordWriter, duplicate_ids, first_record, read_records
from .parts import held_elsewhere, others_state, recheck_elsewhere, refuse_if_busy
from .output_paths import check_not_input, check_output_name, check_writable
from .categories import DEFAULT_RULE, options_rule
from .ranking import check_by
from .traces import STATUSES, check_attempt, select_trace, to_sft
from ..models.loader import check_model_folder

FORMATS = ("jsonl", "sft")
SELECTIONS = ("shortest", "provenance")
PROVENANCE_OPTIONS = ("by", "rule", "beta", "margin")
# Options that choose which problems run, or what they run on; a finished record is the same
# whatever they are, so the manifest notes them without comparing them (see manifest.py). A resumed
# record's problem is checked against the data file's (data.check_held), whichever file that is.
RUNTIME_OPTIONS = ("teacher", "student", "data", "out", "limit", "max_batch_size", "max_seq_len", "device",
                   "dtype", "sampler", "progress", "force")


@dataclass
class GenerateOptions:
    teacher: str
    student: str
    data: str
    out: str
    params: SamplingParams = field(default_factory=SamplingParams)  # its seed is ignored: see attempt_seed
    question_field: str = "question"
    answer_field: str | None = "answer"  # None: no reference answers
    id_field: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    attempts: int = 16
    max_fallback: float = 0.5
    prefix_tokens: int = 128
    format: str = "jsonl"
    select: str = "shortest"  # among correct attempts: the shortest, or the most teacher-originated sentences
    by: str | None = None  # --select provenance: ranked as rsd select ranks (select.py; None: count)
    rule: str | None = None  # --select provenance: the category rule (categories.py; None: difference)
    beta: float | None = None
    margin: float | None = None
    seed: int = 0
    limit: int | None = None
    max_batch_size: int = 32
    max_seq_len: int | None = None  # None: fits the longest prompt and max_new_tokens
    device: str = "auto"
    dtype: str = "auto"
    sampler: str = "auto"
    draft_tokens: int = 0  # speculative rounds of this many student drafts (0: plain RSD)
    progress: bool = True
    force: bool = False  # append to an output made with other settings

    def __post_init__(self):
        _check("attempts", self.attempts, 1, MAX_SAMPLES)
        _check("prefix_tokens", self.prefix_tokens, 1)
        self.max_batch_size = check_size("--max-batch-size", self.max_batch_size, 1)
        _check("draft_tokens", self.draft_tokens, 0)
        if self.max_seq_len is not None:
            self.max_seq_len = check_size("--max-seq-len", self.max_seq_len, 2)
        if self.limit is not None:
            _check("limit", self.limit, 1)
        if not 0.0 <= self.max_fallback <= 1.0:
            raise ValueError(f"--max-fallback = {self.max_fallback}: must be in [0, 1] "
                             "(the largest share of student-written tokens)")
        if self.select not in SELECTIONS:
            raise ValueError(f"--select = {self.select!r}: must be one of {', '.join(SELECTIONS)}")
        if self.select == "provenance":
            self.by = check_by(self.by or "count")
            self.rule = self.rule or DEFAULT_RULE
            self.category_rule = options_rule(self)
        elif given := [f"--{n}" for n in PROVENANCE_OPTIONS if getattr(self, n) is not None]:
            raise ValueError(f"{', '.join(given)}: only with --select provenance (they choose among correct attempts "
                             f"by their sentences)")
        if self.format not in FORMATS:
            raise ValueError(f"--format = {self.format!r}: must be one of {', '.join(FORMATS)}")


def _check(name, value, lo, hi=None):
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        allowed = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"--{name.replace('_', '-')} = {value!r}: must be an integer {allowed}")


def attempt_seed(seed: int, problem_id: str, attempt: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{problem_id}\0{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def run_generate(opts: GenerateOptions, log=print) -> dict:
    """Generate the traces `opts` asks for; returns the run's summary (see Tally.summary)."""
    dist = Dist.from_env()
    out, target = output_target(opts.out, opts.data, dist)  # before anything slow
    # Hub ids become their snapshot folders here, so the manifest fingerprints the files themselves.
    opts = replace(opts, teacher=str(check_model_folder(opts.teacher)), student=str(check_model_folder(opts.student)))
    problem_set = load_problems(opts.data, question_field=opts.question_field, answer_field=opts.answer_field,
                                id_field=opts.id_field)
    problems = problem_set.problems[: opts.limit] if opts.limit else problem_set.problems
    kept = {p.id for p in problems}
    repeated = [pair for pair in problem_set.repeated if pair[0] in kept]
    if repeated and dist.rank == 0:
        log(repeated_warning(repeated))
    if any(p.answer is not None for p in problems):
        check_available()  # math-verify: else every attempt would read as wrong, silently
    mine = shard_problems(problems, dist.rank, dist.world_size)
    _check_format(target, opts.format)
    settings, about = record_settings(opts, problem_set.id_field)
    if all(p.answer is None for p in problem_set.problems):
        del settings[ANSWER_CHECK]  # nothing is judged: outputs of any version resume
    # Records in OUT's other files (an earlier merge, every part of any world size) are done too: read here to refuse
    # other settings before any file of ours is made, checked again under our lock (recheck_elsewhere).
    state = others_state(out, target)
    elsewhere = held_elsewhere(out, target, settings, force=opts.force)
    # --format sft: unfinished records go to their own file (module docstring), checked as OUT is.
    prefixes = unfinished_path(out) if opts.format == "sft" else None
    prefix_target, prefixes_elsewhere, prefixes_state = None, {}, {}
    if prefixes is not None:
        prefix_target = rank_target(prefixes, dist)
        check_writable(prefix_target)
        check_not_input({"--data": opts.data}, {"--format sft's file of unfinished records": prefixes,
                                                "its part": prefix_target})
        _check_format(prefix_target, "jsonl")
        prefixes_state = others_state(prefixes, prefix_target)
        prefixes_elsewhere = held_elsewhere(prefixes, prefix_target, settings, force=opts.force)
    for path in elsewhere:
        _check_format(path, opts.format)
    for path in prefixes_elsewhere:
        _check_format(path, "jsonl")
    if prefix_target is not None:
        # Two files, each with its writer: both are checked before either opens (a writer rewrites the manifest of a
        # file without records), so that a rerun one of them refuses leaves the other's manifest as it was.
        for path in (target, prefix_target):
            check_settings(path, settings, has_records=first_record(path) is not None, force=opts.force, about=about,
                           write=False)
    group = init_process_group(dist, log)
    try:
        with ExitStack() as stack:
            writer = stack.enter_context(RecordWriter(target, settings, force=opts.force, about=about))
            prefix_writer = None
            if prefix_target is not None:
                prefix_writer = stack.enter_context(RecordWriter(prefix_target, settings, force=opts.force,
                                                                 about=about))
                prefixes_elsewhere = recheck_elsewhere(prefixes, prefix_target, settings, force=opts.force,
                                                       held=prefixes_elsewhere, state=prefixes_state)
            elsewhere = recheck_elsewhere(out, target, settings, force=opts.force, held=elsewhere, state=state)
            for path in [*elsewhere, *prefixes_elsewhere]:  # (files another run made in between are checked too)
                _check_format(path, opts.format if path in elsewhere else "jsonl")
            files = [writer.existing, *elsewhere.values(), *prefixes_elsewhere.values()]
            files += [prefix_writer.existing] if prefix_writer else []
            held = [r for records in files for r in records]
            changed = check_held(held, problems, force=opts.force, out=out, data=opts.data)
            # (a line of another tool, kept under --force, does not make its id's problem done; a record under the
            # float spelling an earlier version gave a numeric id, '1.0', is the problem's: data.id_spellings)
            spellings = id_spellings(problem_set.problems)
            done = {record_id(r, spellings) for r in held if "id" in r and r.get("status") in STATUSES}
            todo = [p for p in mine if p.id not in done]
            # Every rank reads the whole dataset: rank 0 alone reports its skipped rows.
            tally = Tally(rows=problem_set.num_rows, skipped=problem_set.skipped if dist.rank == 0 else [],
                          problems=len(mine), resumed=len(mine) - len(todo), out=str(target),
                          # the merged output holds the parts' ids again: only copies within one file count
                          # ('1.0' beside '1': an earlier version's record of the problem beside this version's)
                          duplicates={key: n for records in files
                                      for key, n in duplicate_ids(_as_problems(records, spellings)).items()},
                          forced=writer.forced + ([f"records of {len(changed)} problems changed since kept "
                                                   f"({names(changed)})"] if changed else []))
            if dist.rank == 0:  # every rank reads every file: rank 0 alone reports them
                known = {p.id for p in problem_set.problems}
                tally.not_in_data = list(dict.fromkeys(str(r["id"]) for r in held if "id" in r and
                                                       r.get("status") in STATUSES and
                                                       record_id(r, spellings) not in known))
                tally.hashed_ids = problem_set.id_field == QUESTION_HASH
            # Every rank decides alike (a rank whose shard is done would wait for the others at the barrier).
            moved = (changed_prompts(held, opts.student, opts.system_prompt)
                     if any(p.id not in done for p in problems) else [])
            if moved and not opts.force:
                raise ChangedProblems(
                    f"{out}: the records of {len(moved)} problems were written after another prompt than this run "
                    f"builds for them ({names(moved)}): an earlier rsd's prompt rules (the reasoning block, a "
                    f"template's system turn or date); resuming would mix the two. Give another --out, or pass "
                    f"--force to keep them")
            if moved:
                tally.forced.append(f"records of {len(moved)} problems written after another prompt "
                                    f"({names(moved)})")
            if todo:
                tally.no_answer = [p.id for p in todo if p.answer is None]
                tally.unreadable_answers = unreadable_answers(todo)
                if tally.unreadable_answers:
                    log(dist.tag + unreadable_warning(tally.unreadable_answers))
                _generate(opts, todo, writer, prefix_writer, dist, tally, log)
            held_prefixes = len(prefix_writer.existing) + prefix_writer.written if prefix_writer else 0
            held_sft = len(writer.existing) + writer.written
        summary = {**tally.summary(), "unfinished_out": str(prefix_target) if prefix_target else None}
        report = format_summary(summary)
        if opts.format == "sft":
            # An SFT file of no records is a valid output (nothing solved yet) that readers such as datasets
            # fail on without saying why: say it here.
            report += (f"\n--format sft: {target} holds {held_sft} SFT records (finished answers)"
                       + ("; none yet: no problem has a finished answer" if not held_sft else ""))
        if held_prefixes:
            report += (f"\n--format sft: the {held_prefixes} records that are not finished answers (UPFT prefixes of "
                       f"problems never solved, unverified attempts none of which passed the checks) are in "
                       f"{prefix_target}, not in the SFT file, whose completions end with EOS as finished answers")
        log_report(dist, report, target, log)
        outputs = {out: elsewhere, prefixes: prefixes_elsewhere} if prefixes else {out: elsewhere}
        merge_or_note(dist, group, outputs, summary, log)
        return summary
    finally:
        if group:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _as_problems(records: list, spellings: dict[str, str]) -> list:
    """`records` under the ids of the problems they are of (data.record_id), to count copies of one problem."""
    return [{**r, "id": record_id(r, spellings)} if isinstance(r, dict) and "id" in r else r for r in records]


def check_output(opts: GenerateOptions, problems: list[Problem], id_field: str = "id") -> None:
    """What run_generate would refuse OUT for, found without writing a file (`rsd demo` asks before it writes the
    problems file it runs): lines that are no rsd generate record, another run writing OUT or a file of it, records
    made with other settings or from other problems (each unless --force). One process."""
    out = Path(opts.out)
    check_output_name(out)
    check_writable(out)
    refuse_if_busy(out)
    settings, _ = record_settings(opts, id_field)
    if all(p.answer is None for p in problems):
        del settings[ANSWER_CHECK]  # as run_generate: nothing is judged
    held = {out: read_records(out), **held_elsewhere(out, out, settings, force=opts.force)}
    for path in held:
        _check_format(path, opts.format)
    if held[out]:
        check_settings(out, settings, has_records=True, force=opts.force, write=False)
    check_held([r for records in held.values() for r in records], problems, force=opts.force, out=out,
               data=opts.data)


def unreadable_answers(problems: list[Problem]) -> list[str]:
    """Ids of the problems whose reference answer math-verify does not read whole (answers.reference_readable)."""
    from .answers import reference_readable

    return [p.id for p in problems if p.answer is not None and not reference_readable(p.answer)]


def record_settings(opts: GenerateOptions, id_field: str) -> tuple[dict, dict]:
    """(settings that shape the records, other options for the reader): the output's manifest."""
    settings = {COMMAND: "generate", "teacher model": model_fingerprint(opts.teacher),
                "student model": model_fingerprint(opts.student)}
    for f in fields(opts):
        if f.name == "params":
            settings.update({_flag(p.name): getattr(opts.params, p.name) for p in fields(opts.params)
                             if p.name != "seed"})  # attempt seeds derive from --seed (attempt_seed)
        elif f.name in PROVENANCE_OPTIONS and opts.select != "provenance":
            continue  # unused: kept out so that outputs of --select shortest resume as before
        elif f.name not in RUNTIME_OPTIONS:
            settings[_flag(f.name)] = getattr(opts, f.name)
    settings["--id-field"] = id_field
    settings[MODEL_DTYPE] = model_dtype(opts.device, opts.dtype)  # compared (manifest.py)
    settings[ANSWER_CHECK] = answers.ANSWER_CHECK  # the statuses are verdicts of these rules
    from rsd_engine.tokens import proposal_rules

    rules = proposal_rules(opts.teacher, opts.student)
    if rules is not None:  # a pair whose traces' law the rule changed (tokens.PROPOSAL_RULES): never two in one file
        settings[TOKEN_SPACE] = rules
    about = {_flag(name): getattr(opts, name) for name in RUNTIME_OPTIONS if name not in ("progress", "force")}
    about.update({"--teacher": str(Path(opts.teacher).resolve()), "--student": str(Path(opts.student).resolve()),
                  "--data": input_identity(opts.data)})
    return settings, about


def unfinished_path(out) -> Path:
    """traces.jsonl -> traces.unfinished.jsonl: where --format sft writes the records that are not finished
    answers (jsonl records; see is_unfinished)."""
    out = Path(out)
    return out.with_name(f"{out.name[: -len(out.suffix)]}.unfinished{out.suffix}")


def is_unfinished(record: dict) -> bool:
    """Not a finished answer: a UPFT prefix, or an unverified problem's attempt 0 when none passed the checks
    (ended with EOS, closed its reasoning, within --max-fallback)."""
    return record["status"] == "prefix" or (record["status"] == "unverified" and record["num_valid"] == 0)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_format(path: Path, fmt: str):
    """Resuming into a file of the other format would mix record shapes in one file (never forced)."""
    first = first_record(path)
    if first is None:
        return
    if "messages" in first and "token_ids" not in first:
        raise ValueError(f"{path} holds SFT records of an earlier rsd, as chat messages, which a reasoning model's "
                         "chat template renders other than the student wrote them (Qwen3's re-spaces the reasoning "
                         "block, DeepSeek-R1-Distill's drops it); --format sft now writes prompt-completion records of "
                         "the exact text: write them to another --out (or convert these by hand)")
    held = "jsonl" if "token_ids" in first else "sft" if {"prompt", "completion"} <= set(first) else None
    if held is None:
        keys = ", ".join(map(repr, list(first)[:6]))
        raise ValueError(f"{path} holds lines that are no rsd generate record (the first has {keys}; a record has "
                         f"'token_ids', or with --format sft 'prompt' and 'completion'): give another --out")
    if held == "sft" == fmt and "input_ids" not in first:
        raise ValueError(f"{path} holds SFT records of an earlier rsd, text without token ids, which TRL tokenises "
                         "again (not always into the tokens the student wrote: to_sft); records of this rsd carry "
                         "'input_ids', and one file of both would be read by TRL as neither: write them to another "
                         "--out")
    if held != fmt:
        raise ValueError(f"{path} already holds --format {held} records; rerun with --format {held} to resume it, "
                         f"or write --format {fmt} to another --out")


def _generate(opts: GenerateOptions, todo: list[Problem], writer: RecordWriter, prefix_writer: RecordWriter | None,
              dist: Dist, tally: Tally, log):
    engine, prompts, prompt_ids, tally.context = _prepare(opts, todo, dist)
    tally.default_max_seq_len = None if opts.max_seq_len else engine.max_seq_len  # what cut a sequence (progress)
    note = plain_prompt_note(engine.tokenizer)
    if note:
        log(dist.tag + note)
    spelled = control_text(engine.tokenizer, {p.id: p.question for p in todo})
    if spelled:
        log(dist.tag + control_text_warning(spelled))
    fits = {p.id: _fits(engine, prompt_ids[p.id], p.id) for p in todo}
    tally.too_long.extend(pid for pid, ok in fits.items() if not ok)
    todo = [p for p in todo if fits[p.id]]
    if not todo:
        return

    requests, params = [], []
    for p in todo:
        for a in range(opts.attempts):
            requests.append(prompt_ids[p.id])
            params.append(replace(opts.params, seed=attempt_seed(opts.seed, p.id, a)))
    pending = {i: [None] * opts.attempts for i in range(len(todo))}
    unfinished = {}  # problem index -> why it gets no record
    bar = ProgressBar(len(requests), opts.progress and dist.rank == 0, dist.tag)
    decode = lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    choose = None
    if opts.select == "provenance":
        from .select import provenance_chooser

        choose = provenance_chooser(engine, opts.system_prompt, batch_size=min(opts.attempts, 4), by=opts.by,
                                    rule=opts.category_rule, seed=opts.seed)
    tally.start()
    try:
        for index, result in engine.generate_iter(requests, params):
            i, a = divmod(index, opts.attempts)
            problem, prompt = todo[i], prompts[todo[i].id]
            tally.add_attempt(result)
            if result.finish_reason == "error":
                unfinished.setdefault(i, ("failed", f"attempt {a}: {result.error or 'failed'}"))
            elif result.finish_reason == "length" and len(result.token_ids) < opts.params.max_new_tokens:
                unfinished.setdefault(i, ("cut", ""))  # stopped by --max-seq-len, not by --max-new-tokens
            pending[i][a] = check_attempt(a, result, reference=problem.answer, thinking=prompt.thinking,
                                          max_fallback=opts.max_fallback)
            if all(pending[i]):
                attempts = pending.pop(i)
                kind, why = unfinished.pop(i, (None, ""))
                if kind == "failed":
                    tally.failed[problem.id] = why
                elif kind == "cut":
                    tally.cut_short.append(problem.id)
                else:
                    record = select_trace(problem, prompt, attempts, prefix_tokens=opts.prefix_tokens, decode=decode,
                                          choose=choose)
                    if opts.format != "sft":
                        writer.write(record)
                    elif is_unfinished(record):  # not an SFT turn (module docstring)
                        prefix_writer.write(record)
                    else:  # a finished answer: its kept attempt ended with EOS
                        ended = attempts[record["kept_attempt"]].result.token_ids
                        writer.write(to_sft(record, prompt, engine.tokenizer, prompt_ids[problem.id], ended))
                    tally.add_record(record)
            bar.attempt_done(tally)
    except KeyboardInterrupt:
        if tally.written:  # (none: the CLI says what is left; an OUT begun by this run is removed, a rank's part kept)
            where = " and ".join(str(w.path) for w in (writer, prefix_writer) if w is not None and w.written)
            log(f"{dist.tag}interrupted: the {tally.written} records written now are safely in {where}, beside the "
                f"{tally.resumed} problems done before; rerun to resume")
        raise
    finally:
        tally.stop()
        bar.close()


def _prepare(opts: GenerateOptions, todo: list[Problem], dist: Dist):
    """The engine, each problem's chat prompt and its token ids."""
    import torch

    from rsd_engine.engine import Engine
    from rsd_engine.tokens import load_tokenizer

    tokenizer = load_tokenizer(opts.student)
    prompts = {p.id: build_prompt(tokenizer, p.question, opts.system_prompt, row=p.id) for p in todo}
    prompt_ids = {pid: tokenizer.encode(c.text, add_special_tokens=False) for pid, c in prompts.items()}
    # Mapped special tokens can make a prompt a little longer in the teacher's space: leave room.
    max_seq_len, context = default_max_seq_len(opts.max_seq_len, [len(ids) for ids in prompt_ids.values()],
                                               opts.params.max_new_tokens + 16, opts.teacher, opts.student)
    device = opts.device
    if device == "auto" and dist.world_size > 1 and torch.cuda.is_available():
        device = f"cuda:{dist.local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    engine = Engine(opts.teacher, opts.student, device=device, dtype=opts.dtype, max_batch_size=opts.max_batch_size,
                    max_seq_len=max_seq_len, sampler=opts.sampler, draft_tokens=opts.draft_tokens)
    return engine, prompts, prompt_ids, context


def default_max_seq_len(given: int | None, prompts: list[int], extra: int, *models) -> tuple[int, int | None]:
    """(max_seq_len, the models' context where it limited it or left a prompt out): --max-seq-len where given (past
    a model's context the engine warns), else the longest of the `prompts` (lengths) that fit the smaller context of
    `models` (max_position_embeddings, where their config.json gives one) plus `extra` (--max-new-tokens), up to
    that context. A default past it ran a longer prompt at positions the models were never trained at and wrote
    what came of it; a prompt that does not fit is skipped, and does not size every row's cache to the whole
    context."""
    from rsd_engine.models.hub import read_json_object, resolve_model
    from rsd_engine.models.loader import load_config

    if given:
        return given, None
    contexts = []
    for model in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a config's warnings: said when the engine loads it
            config = load_config(model)  # (a config refused names its field here as the engine would)
        if read_json_object(resolve_model(model) / "config.json").get("max_position_embeddings") is not None:
            contexts.append(config.max_position_embeddings)  # (absent or null: a value of rsd's own, not the model's)
    context = min(contexts, default=None)
    fitting = [n for n in prompts if context is None or n < context]
    needed = min(MAX_SIZE, max(fitting, default=1) + extra)
    if context is None or (needed <= context and len(fitting) == len(prompts)):
        return needed, None
    return min(needed, context), context


def _fits(engine, ids: list[int], problem_id: str) -> bool:
    teacher_ids = engine.space.to_teacher(ids, what=f"problem {problem_id}: prompt")
    return max(len(ids), len(teacher_ids)) < engine.max_seq_len
