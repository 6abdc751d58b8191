"""`rsd eval`: how often does a model solve the problems? N samples per problem from the model
alone, each final answer checked with math-verify as `rsd generate` checks them.

Accuracy is the mean over problems of each problem's mean over its samples (avg@N); its 95%
interval is a percentile bootstrap over problems (problems resampled with replacement, 10,000
times, fixed seed), which treats a problem's samples as the correlated unit they are. Where no
problem is solved (or every one) the bootstrap has no width: the exact binomial bound over
problems is given instead (0 of 8 solved: 0% to 36.9%).

Every generation is written (and fsynced) as it finishes, one line with id, sample, question,
answer, response, final_answer and correct, so the file feeds `rsd provenance`, and a kill -9
loses only the generations in flight: a rerun skips the (id, sample) pairs already written. The
seed of a sample is a hash of (--seed, problem id, sample index), so reruns and any number of
ranks give the same generations. Under torchrun each rank takes every world_size-th problem and
writes its own part; rank 0 merges them (else `rsd merge OUT`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from rsd_engine.params import SamplingParams
from rsd_engine.sizes import MAX_SAMPLES, check_size

from .answers import ANSWER_CHECK as ANSWER_CHECK_VERSION
from .answers import check_answer, check_available
from .data import ChangedProblems, check_held, id_spellings, load_problems, record_id, repeated_warning, shard_problems
from .distributed import Dist, init_process_group, log_report, merge_or_note, output_target, rank_device
from .generate import attempt_seed, default_max_seq_len, unreadable_answers
from .manifest import ANSWER_CHECK
from .progress import context_limit, describe_skipped, names, unreadable_warning
from .prompts import (DEFAULT_SYSTEM_PROMPT, build_prompt, changed_prompts, control_text, control_text_warning,
                      plain_prompt_note)
from .provenance import RUNTIME_OPTIONS, output_settings
from .records import RecordWriter, read_records
from .parts import held_elsewhere, others_state, recheck_elsewhere, unmerged_parts
from .traces import final_answer
from ..models.loader import check_model_folder

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP = "percentile bootstrap"
EXACT_BINOMIAL = "exact binomial"  # none solved or all solved: the bootstrap has no width there


@dataclass
class EvalOptions:
    model: str
    data: str
    out: str
    samples: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)  # temperature, top_p, top_k, max_new_tokens
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    seed: int = 0
    limit: int | None = None
    max_batch_size: int = 32
    max_seq_len: int | None = None  # None: the longest prompt + max_new_tokens
    device: str = "auto"
    dtype: str = "auto"
    sampler: str = "auto"
    progress: bool = True
    force: bool = False  # append to an output made with other settings

    def __post_init__(self):
        for name, lo in (("samples", 1), ("max_batch_size", 1), ("limit", 1), ("max_seq_len", 2)):
            value = getattr(self, name)
            if value is None and name in ("limit", "max_seq_len"):
                continue
            if name in ("max_batch_size", "max_seq_len"):
                setattr(self, name, check_size(f"--{name.replace('_', '-')}", value, lo))
            elif not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ValueError(f"--{name.replace('_', '-')} = {value!r}: must be an integer >= {lo}")
            elif name == "samples" and value > MAX_SAMPLES:  # each a request made up front
                raise ValueError(f"--samples = {value!r}: must be an integer in [1, {MAX_SAMPLES}]")


def generate_samples(opts: EvalOptions, prompts: list[list[int]], params: list[SamplingParams], device,
                     max_seq_len: int):
    """(index, GenerationResult) for each prompt as it finishes: the model alone (Generator)."""
    from rsd_engine.generator import Generator

    generator = Generator(opts.model, device=device, dtype=opts.dtype, max_batch_size=opts.max_batch_size,
                          max_seq_len=max_seq_len, sampler=opts.sampler)
    yield from generator.generate_iter(prompts, params)


def run_eval(opts: EvalOptions, log=print) -> dict:
    """Generate and grade what `opts` asks for; returns the summary (see accuracy_summary)."""
    from rsd_engine.tokens import load_tokenizer

    dist = Dist.from_env()
    out, target = output_target(opts.out, opts.data, dist)
    opts = replace(opts, model=str(check_model_folder(opts.model)))  # a Hub id: its snapshot folder
    problem_set = load_problems(opts.data, question_field=opts.question_field, answer_field=opts.answer_field or None,
                                id_field=opts.id_field, answers_needed=True)
    problems = problem_set.problems[: opts.limit] if opts.limit else problem_set.problems
    kept = {p.id for p in problems}
    repeated = [pair for pair in problem_set.repeated if pair[0] in kept]
    if repeated and dist.rank == 0:
        log(repeated_warning(repeated))
    graded = [p for p in problems if p.answer is not None]
    if not graded:
        raise ValueError(f"{opts.data}: none of the {len(problems)} problems has a reference answer "
                         f"(field {opts.answer_field!r}); rsd eval needs answers to check against")
    check_available()  # math-verify: else every answer would read as wrong, silently
    mine = shard_problems(graded, dist.rank, dist.world_size)
    # --samples only says how many records to make; sample k's record is the same whatever it is. --max-seq-len
    # cuts a generation short where it is shorter than prompt + --max-new-tokens: a setting of the records.
    settings, about = output_settings(opts, ("model",),
                                      tuple(o for o in RUNTIME_OPTIONS if o != "max_seq_len") + ("samples",),
                                      command="eval")
    settings["--id-field"] = problem_set.id_field
    settings[ANSWER_CHECK] = ANSWER_CHECK_VERSION  # "correct" is a verdict of these rules
    # Records in OUT's other files (an earlier merge, every part of any world size) are done too: read here to refuse
    # other settings before any file of ours is made, checked again under our lock (recheck_elsewhere).
    state = others_state(out, target)
    elsewhere = held_elsewhere(out, target, settings, force=opts.force)
    group = init_process_group(dist, log)
    try:
        with RecordWriter(target, settings, force=opts.force, about=about) as writer:
            elsewhere = recheck_elsewhere(out, target, settings, force=opts.force, held=elsewhere, state=state)
            held = writer.existing + [r for records in elsewhere.values() for r in records]
            changed = check_held(held, problems, force=opts.force, out=out, data=opts.data)
            spellings = id_spellings(problem_set.problems)  # '1.0' of an earlier version is problem 1's
            done = {(record_id(r, spellings), r["sample"]) for r in held if is_eval_record(r)}
            todo = [(p, s) for p in mine for s in range(opts.samples) if (p.id, s) not in done]
            # Every rank decides alike (a rank whose shard is done would wait for the others at the barrier).
            moved = (changed_prompts(held, opts.model, opts.system_prompt)
                     if any((p.id, s) not in done for p in graded for s in range(opts.samples)) else [])
            if moved and not opts.force:
                raise ChangedProblems(
                    f"{out}: the samples of {len(moved)} problems were written after another prompt than this run "
                    f"builds for them ({names(moved)}): another chat template or an earlier rsd's prompt rules (the "
                    f"reasoning block, a template's system turn or date); resuming would mix the two. Give another "
                    f"--out, or pass --force to keep them")
            # A problem an earlier version wrote under the float spelling ('1.0') gets its new samples under that id
            # too: one id per problem in the file, as rsd select and rsd provenance group it.
            written_as = {record_id(r, spellings): str(r["id"]) for r in held if is_eval_record(r)}
            todo = [(replace(p, id=written_as[p.id]) if written_as.get(p.id, p.id) != p.id else p, s) for p, s in todo]
            tally = {"rows": problem_set.num_rows, "skipped_rows": problem_set.skipped if dist.rank == 0 else [],
                     "no_answer": [p.id for p in problems if p.answer is None] if dist.rank == 0 else [],
                     "problems": len(mine),
                     "already_done": len(mine) * opts.samples - len(todo), "written": 0, "too_long": [],
                     "failed": 0, "cut_short": 0, "changed_kept": changed, "prompt_changed_kept": moved,
                     # Of every problem the accuracy counts, not only those sampled now: a resumed run's accuracy
                     # held them too, without the warning.
                     "unreadable_answers": unreadable_answers(mine), "tokens": 0, "seconds": 0.0}
            if todo:
                if tally["unreadable_answers"]:  # before the long part; the report says it again
                    log(dist.tag + unreadable_warning(tally["unreadable_answers"]))
                tokenizer = load_tokenizer(opts.model)
                note = plain_prompt_note(tokenizer, "model")
                if note:
                    log(dist.tag + note)
                spelled = control_text(tokenizer, {p.id: p.question for p, _ in todo})
                if spelled:
                    log(dist.tag + control_text_warning(spelled, "model"))
                _eval(opts, todo, tokenizer, writer, tally, dist)
        log_report(dist, _format_tally(tally, target), target, log)
        merge_or_note(dist, group, {out: elsewhere}, tally, log)
        if dist.rank != 0:
            return tally
        shown = out if (group or dist.world_size == 1) and out.is_file() else target
        lines = read_records(shown)
        unmerged = unmerged_parts(out, elsewhere) if dist.world_size == 1 else {}
        if unmerged:  # the records resumed from unmerged parts count too
            lines += [r for part in unmerged.values() for r in part]
            shown = f"{shown} and its part files"
        # One record per (id, sample), the first; lines that are no eval record go to the summary as they are.
        records, others, repeated = {}, [r for r in lines if not is_eval_record(r)], 0
        for r in lines:
            if is_eval_record(r):
                key = (record_id(r, spellings), r["sample"])
                repeated += key in records and records[key] != r  # a copy (a part rsd merge left) is no other
                records.setdefault(key, r)
        # The accuracy is of what this run asks for: the first --samples samples of the (--limit) problems of
        # --data. The file may hold more (an earlier run without --limit, or with more samples): counted apart.
        # (Each graded as its problem's, under the id the data gives it now.)
        wanted = {(p.id, s) for p in graded for s in range(opts.samples)}
        graded_now = [{**r, "id": key[0]} for key, r in records.items() if key in wanted]
        summary = accuracy_summary(graded_now + others, opts.params.max_new_tokens)
        summary["outside_this_run"] = len(records) - len(graded_now)
        summary["repeated_in_output"] = repeated  # by hand or another tool: rsd eval writes an (id, sample) once
        log(format_accuracy(summary, shown))
        return {**tally, **summary}
    finally:
        if group:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _eval(opts: EvalOptions, todo, tokenizer, writer, tally, dist):
    prompts = {p.id: build_prompt(tokenizer, p.question, opts.system_prompt, row=p.id) for p, _ in todo}
    prompt_ids = {pid: tokenizer.encode(c.text, add_special_tokens=False) for pid, c in prompts.items()}
    max_seq_len, tally["context"] = default_max_seq_len(opts.max_seq_len, [len(ids) for ids in prompt_ids.values()],
                                                        opts.params.max_new_tokens, opts.model)
    tally["default_max_seq_len"] = None if opts.max_seq_len else max_seq_len  # what cut a sequence (progress)
    fits = [(p, s) for p, s in todo if len(prompt_ids[p.id]) < max_seq_len]
    tally["too_long"] = sorted({p.id for p, s in todo if len(prompt_ids[p.id]) >= max_seq_len})
    if not fits:
        return
    params = [_sample_params(opts.params, attempt_seed(opts.seed, p.id, s)) for p, s in fits]
    bar = None
    if opts.progress and dist.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(fits), desc=f"{dist.tag}rsd eval", unit="sample", dynamic_ncols=True, disable=None)
    start = time.perf_counter()
    try:
        for index, result in generate_samples(opts, [prompt_ids[p.id] for p, _ in fits], params,
                                              rank_device(opts.device, dist), max_seq_len):
            problem, sample = fits[index]
            answer = final_answer(result.text, prompts[problem.id].thinking)
            verdict = check_answer(answer, problem.answer)
            record = {"id": problem.id, "sample": sample, "question": problem.question,
                      "prompt": prompts[problem.id].text, "answer": problem.answer,
                      "response": result.text, "final_answer": answer, "correct": bool(verdict),
                      "finish_reason": result.finish_reason, "tokens": len(result.token_ids), "seed": result.seed}
            if verdict is None:  # graded wrong, and said so: math-verify did not finish comparing
                record["grading"] = "timed out"
            if getattr(result, "error", None):
                record["error"] = result.error
            writer.write(record)
            tally["written"] += 1
            if result.finish_reason == "error":
                tally["failed"] += 1
            elif result.finish_reason == "length" and len(result.token_ids) < opts.params.max_new_tokens:
                tally["cut_short"] += 1  # by --max-seq-len, not --max-new-tokens
            tally["tokens"] += len(result.token_ids)
            if bar is not None:
                bar.update(1)
    finally:
        tally["seconds"] = time.perf_counter() - start
        if bar is not None:
            bar.close()


def _sample_params(base: SamplingParams, seed: int) -> SamplingParams:
    """The fields a single model uses (the RSD-only ones stay at their defaults)."""
    return SamplingParams(max_new_tokens=base.max_new_tokens, temperature=base.temperature, top_p=base.top_p,
                          top_k=base.top_k, seed=seed)


def is_eval_record(r: dict) -> bool:
    """A line rsd eval wrote: an id, an integer sample and a true/false correct."""
    sample = r.get("sample")
    return (r.get("id") is not None and not isinstance(sample, bool) and isinstance(sample, int)
            and isinstance(r.get("correct"), bool))


def accuracy_summary(records: list[dict], max_new_tokens: int | None = None) -> dict:
    """avg@N accuracy (mean over problems of the mean over samples) with a 95% bootstrap interval. A failed
    generation (finish_reason "error": non-finite logits) has no answer to grade: it is counted apart, never
    as a wrong answer; one cut short by --max-seq-len (fewer than max_new_tokens tokens at a length stop) is
    graded as it stopped and counted, as is one that --max-new-tokens stopped (a budget too small for the model's
    reasoning reads as a weak model otherwise). Lines that are no eval record (no id, integer sample and boolean correct:
    another tool's, appended under --force) are counted apart, not graded. Problems are resampled in id order,
    so the interval does not depend on the order of the file's lines (one process, merged ranks, a resume); one
    problem has no interval over problems, and none solved (or all) has the exact binomial one ("interval_method")."""
    import numpy as np

    per_problem: dict[str, list[bool]] = {}
    failed = cut_short = at_limit = timed_out = foreign = 0
    for r in records:
        if not is_eval_record(r):
            foreign += 1
            continue
        if r.get("finish_reason") == "error":
            failed += 1
            continue
        if (max_new_tokens is not None and r.get("finish_reason") == "length"
                and isinstance(r.get("tokens"), int)):
            if r["tokens"] < max_new_tokens:
                cut_short += 1
            else:
                at_limit += 1
        timed_out += r.get("grading") == "timed out"
        per_problem.setdefault(str(r["id"]), []).append(bool(r.get("correct")))
    means = np.array([sum(v) / len(v) for _, v in sorted(per_problem.items())], dtype=np.float64)
    if len(means) == 0:
        return {"problems_graded": 0, "samples": 0, "accuracy": None, "interval": None, "failed_in_output": failed,
                "cut_short_in_output": cut_short, "at_max_new_tokens_in_output": at_limit,
                "grading_timed_out_in_output": timed_out, "not_eval_records": foreign}
    rng = np.random.default_rng(0)
    # The resamples in chunks of about 2**22 draws (the same draws as one call: the generator's stream is
    # consumed row by row), so memory stays flat however many problems there are.
    rows = max(1, (1 << 22) // len(means))
    boot = np.concatenate([means[rng.integers(0, len(means), size=(min(rows, BOOTSTRAP_RESAMPLES - at), len(means)))]
                           .mean(axis=1) for at in range(0, BOOTSTRAP_RESAMPLES, rows)])
    low, high = np.percentile(boot, [2.5, 97.5])
    method = BOOTSTRAP
    if len(means) > 1 and means.min() == means.max() and means[0] in (0.0, 1.0):
        # No problem solved (or every one): every resample is that one value, a zero-width "interval" that says
        # nothing of how many problems were seen. Each problem's mean lies in [0, 1], so P(all n read 0) <=
        # (1 - accuracy)^n: the exact binomial (Clopper-Pearson) bound holds for avg@N too.
        low, high = (0.0, 1.0 - 0.025 ** (1 / len(means))) if means[0] == 0 else (0.025 ** (1 / len(means)), 1.0)
        method = EXACT_BINOMIAL
    counts = sorted({len(v) for v in per_problem.values()})
    return {"problems_graded": len(means), "samples": sum(map(len, per_problem.values())),
            "samples_per_problem": counts, "accuracy": float(means.mean()),
            "interval": [float(low), float(high)] if len(means) > 1 else None,
            "interval_method": method if len(means) > 1 else None,
            "failed_in_output": failed, "cut_short_in_output": cut_short, "at_max_new_tokens_in_output": at_limit,
            "grading_timed_out_in_output": timed_out, "not_eval_records": foreign}


def format_accuracy(s: dict, path) -> str:
    failed = s.get("failed_in_output", 0)
    not_graded = f"; {failed} failed generations (finish_reason 'error') not graded" if failed else ""
    cut = s.get("cut_short_in_output", 0)
    cut = f"; {cut} cut short by --max-seq-len, graded as they stopped" if cut else ""
    timed_out = s.get("grading_timed_out_in_output", 0)
    if timed_out:
        cut += f"; {timed_out} answers math-verify could not compare in time (\"grading\": \"timed out\"), graded wrong"
    limit = s.get("at_max_new_tokens_in_output", 0)
    if limit:  # graded as they stopped (most without an answer): a budget too small reads as a weak model
        cut += (f"; {limit} of {s['samples']} graded generations stopped at --max-new-tokens, graded as they stopped"
                if s["accuracy"] is not None else f"; {limit} stopped at --max-new-tokens")
    foreign = s.get("not_eval_records", 0)
    not_graded += (f"; {foreign} lines that are no eval record (no id, integer sample and true/false correct) not "
                   f"graded") if foreign else ""
    repeated = s.get("repeated_in_output", 0)
    not_graded += (f"; {repeated} other records of an (id, sample) already read not graded (its first record "
                   f"counts)") if repeated else ""
    outside = s.get("outside_this_run", 0)
    not_graded += (f"; {outside} generations of other problems or samples than this run's (--data, --limit, "
                   f"--samples) not graded") if outside else ""
    if s["accuracy"] is None:
        return f"no graded generations in {path}{not_graded}"
    per = s["samples_per_problem"]
    per = str(per[0]) if len(per) == 1 else f"{per[0]}-{per[-1]}"
    if s["interval"] is None:
        interval = "one problem: no interval over problems"
    elif s.get("interval_method") == EXACT_BINOMIAL:
        solved = "no problem" if s["accuracy"] == 0 else "every problem"
        interval = "{} solved: 95% exact binomial interval over problems {:.2%} to {:.2%}".format(
            solved, *s["interval"])
    else:
        interval = "95% bootstrap interval over problems: {:.2%} to {:.2%}".format(*s["interval"])
    return (f"accuracy: {s['accuracy']:.2%}  ({interval}; "
            f"{s['problems_graded']} problems x {per} samples, {path}{not_graded}{cut})")


def _format_tally(t: dict, target) -> str:
    lines = [f"problems: {t['problems']} ({t['already_done']} samples already in the output, {t['written']} "
             f"written now)"]
    if t["skipped_rows"]:
        lines.append(describe_skipped(t["skipped_rows"], t["rows"]))
    if t["no_answer"]:
        lines.append(f"skipped problems without a reference answer: {len(t['no_answer'])} ({names(t['no_answer'])})")
    limit = context_limit(t.get("context"), t.get("default_max_seq_len"), "the model's")
    if t["too_long"]:
        lines.append(f"skipped (prompt leaves no room for a new token within {limit}): {len(t['too_long'])} problems")
    if t["failed"]:
        lines.append(f"failed (error, written with it): {t['failed']} generations")
    if t["cut_short"]:
        lines.append(f"cut short by {limit} (written as they stopped): {t['cut_short']} "
                     f"generations")
    if t["unreadable_answers"]:
        lines.append(unreadable_warning(t["unreadable_answers"]))
    if t["changed_kept"]:
        lines.append(f"kept under --force: the records of {len(t['changed_kept'])} problems changed since they were "
                     f"made ({', '.join(t['changed_kept'][:5])})")
    if t["prompt_changed_kept"]:
        lines.append(f"kept under --force: the samples of {len(t['prompt_changed_kept'])} problems written after "
                     f"another prompt ({names(t['prompt_changed_kept'])})")
    if t["written"]:
        lines.append(f"tokens: {t['tokens']}  {t['tokens'] / max(t['seconds'], 1e-9):.1f} tokens/s")
    lines.append(f"output: {target}")
    return "\n".join(lines)
