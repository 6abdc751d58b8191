"""`rsd generate`: problems in, one verified RSD trace per problem out (resumable, shardable).

Every attempt of every problem goes through one Engine.generate_iter stream, so the batch is
refilled across problems; a problem's record is written (and fsynced) as soon as its last attempt
finishes, so a kill -9 loses at most the problems in flight. The seed of an attempt is a hash of
(--seed, problem id, attempt index): reruns, resumes and any number of ranks give the same traces.
Under torchrun each rank takes its shard of the problems and writes its own part; rank 0 merges
the parts when every rank is done and the parts are in one folder (else `rsd merge OUT`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rsd_engine.params import SamplingParams

from .data import Problem, load_problems, shard_problems
from .distributed import Dist, barrier_and_merge, init_process_group
from .prompts import DEFAULT_SYSTEM_PROMPT, build_prompt
from .records import RecordWriter, check_writable, done_ids, part_path, read_records
from .traces import SUB_1PCT_LOGPROB, check_attempt, select_trace, to_sft
from ..models.loader import check_model_folder

FORMATS = ("jsonl", "sft")


@dataclass
class GenerateOptions:
    teacher: str
    student: str
    data: str
    out: str
    params: SamplingParams = field(default_factory=SamplingParams)  # its seed is ignored: see attempt_seed
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    attempts: int = 16
    max_fallback: float = 0.5
    prefix_tokens: int = 128
    format: str = "jsonl"
    seed: int = 0
    limit: int | None = None
    max_batch_size: int = 32
    max_seq_len: int | None = None  # None: fits the longest prompt and max_new_tokens
    device: str = "auto"
    dtype: str = "auto"
    sampler: str = "auto"
    draft_tokens: int = 0  # speculative rounds of this many student drafts (0: plain RSD)
    progress: bool = True

    def __post_init__(self):
        _check("attempts", self.attempts, 1)
        _check("prefix_tokens", self.prefix_tokens, 1)
        _check("max_batch_size", self.max_batch_size, 1)
        _check("draft_tokens", self.draft_tokens, 0)
        if self.max_seq_len is not None:
            _check("max_seq_len", self.max_seq_len, 2)
        if self.limit is not None:
            _check("limit", self.limit, 1)
        if not 0.0 <= self.max_fallback <= 1.0:
            raise ValueError(f"--max-fallback = {self.max_fallback}: must be in [0, 1] "
                             "(the largest share of student-written tokens)")
        if self.format not in FORMATS:
            raise ValueError(f"--format = {self.format!r}: must be one of {', '.join(FORMATS)}")


def _check(name, value, lo):
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"--{name.replace('_', '-')} = {value!r}: must be an integer >= {lo}")


def attempt_seed(seed: int, problem_id: str, attempt: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{problem_id}\0{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def run_generate(opts: GenerateOptions, log=print) -> dict:
    """Generate the traces `opts` asks for; returns the run's summary (see Tally.summary)."""
    dist = Dist.from_env()
    out = Path(opts.out)
    target = part_path(out, dist.rank, dist.world_size) if dist.world_size > 1 else out
    check_writable(target)  # before anything slow
    for model in (opts.teacher, opts.student):
        check_model_folder(model)
    problem_set = load_problems(opts.data, question_field=opts.question_field, answer_field=opts.answer_field,
                                id_field=opts.id_field)
    problems = problem_set.problems[: opts.limit] if opts.limit else problem_set.problems
    mine = shard_problems(problems, dist.rank, dist.world_size)
    _check_format(target, opts.format)
    done = done_ids(target, out) if dist.world_size > 1 else done_ids(target)
    todo = [p for p in mine if p.id not in done]
    # Every rank reads the whole dataset: rank 0 alone reports its skipped rows.
    tally = Tally(rows=problem_set.num_rows, skipped=problem_set.skipped if dist.rank == 0 else [],
                  problems=len(mine), resumed=len(mine) - len(todo), out=str(target))
    group = init_process_group(dist, log)
    try:
        if todo:
            _generate(opts, todo, target, dist, tally, log)
        summary = tally.summary()
        log("\n".join(dist.tag + line for line in format_summary(summary).splitlines()))
        if group:
            barrier_and_merge(dist, out, log)
        elif dist.world_size > 1:
            log(f"{dist.tag}part written; when every rank is done: rsd merge {out}")
        return summary
    finally:
        if group:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _check_format(path: Path, fmt: str):
    """Resuming into a file of the other format would mix record shapes in one file."""
    records = read_records(path)
    if records and ("messages" in records[0]) != (fmt == "sft"):
        held = "sft" if "messages" in records[0] else "jsonl"
        raise ValueError(f"{path} already holds --format {held} records; rerun with --format {held} to resume it, "
                         f"or write --format {fmt} to another --out")


def _generate(opts: GenerateOptions, todo: list[Problem], target: Path, dist: Dist, tally, log):
    engine, prompts, prompt_ids = _prepare(opts, todo, dist)
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
    bar = ProgressBar(len(todo), opts.progress and dist.rank == 0, dist)
    decode = lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    tally.start()
    with RecordWriter(target) as writer:
        try:
            for index, result in engine.generate_iter(requests, params):
                i, a = divmod(index, opts.attempts)
                problem, prompt = todo[i], prompts[todo[i].id]
                pending[i][a] = check_attempt(a, result, reference=problem.answer, thinking=prompt.thinking,
                                              max_fallback=opts.max_fallback)
                tally.add_attempt(result)
                if all(pending[i]):
                    record = select_trace(problem, prompt, pending.pop(i), prefix_tokens=opts.prefix_tokens,
                                          decode=decode)
                    writer.write(to_sft(record, prompt) if opts.format == "sft" else record)
                    tally.add_record(record)
                bar.show(tally)
        except KeyboardInterrupt:
            log(f"{dist.tag}interrupted: {tally.written} records are safely in {target}; rerun to resume")
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
    prompts = {p.id: build_prompt(tokenizer, p.question, opts.system_prompt) for p in todo}
    prompt_ids = {pid: tokenizer.encode(c.text, add_special_tokens=False) for pid, c in prompts.items()}
    # Mapped special tokens can make a prompt a little longer in the teacher's space: leave room.
    max_seq_len = opts.max_seq_len or max(map(len, prompt_ids.values())) + opts.params.max_new_tokens + 16
    device = opts.device
    if device == "auto" and dist.world_size > 1 and torch.cuda.is_available():
        device = f"cuda:{dist.local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    engine = Engine(opts.teacher, opts.student, device=device, dtype=opts.dtype, max_batch_size=opts.max_batch_size,
                    max_seq_len=max_seq_len, sampler=opts.sampler, draft_tokens=opts.draft_tokens)
    return engine, prompts, prompt_ids


def _fits(engine, ids: list[int], problem_id: str) -> bool:
    teacher_ids = engine.space.to_teacher(ids, what=f"problem {problem_id}: prompt")
    return max(len(ids), len(teacher_ids)) < engine.max_seq_len


class ProgressBar:
    """tqdm over problems, with solved / tokens/s / acceptance refreshed as attempts finish
    (at most once a second: all attempts of a problem often finish together, long after they start)."""

    def __init__(self, total: int, enabled: bool, dist: Dist):
        self.bar, self.last = None, 0.0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"{dist.tag}rsd generate", unit="problem", dynamic_ncols=True)

    def show(self, tally):
        if self.bar is None:
            return
        self.bar.set_postfix(tally.postfix(), refresh=False)
        if tally.written > self.bar.n:
            self.bar.update(tally.written - self.bar.n)
        elif time.perf_counter() - self.last > 1.0:
            self.bar.refresh()
            self.last = time.perf_counter()

    def close(self):
        if self.bar is not None:
            self.bar.close()


@dataclass
class Tally:
    """Counts for the progress bar and the end-of-run summary."""

    rows: int
    skipped: list
    problems: int
    resumed: int
    out: str
    too_long: list = field(default_factory=list)
    statuses: dict = field(default_factory=lambda: {"solved": 0, "prefix": 0, "unverified": 0})
    attempts: int = 0
    tokens: int = 0
    accepted: int = 0
    sub_1pct: int = 0
    seconds: float = 0.0
    _t0: float | None = None

    @property
    def written(self) -> int:
        return sum(self.statuses.values())

    def start(self):
        self._t0 = time.perf_counter()

    def stop(self):
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    def elapsed(self) -> float:
        return self.seconds + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def add_attempt(self, result):
        self.attempts += 1
        self.tokens += len(result.token_ids)
        self.accepted += sum(result.accepted)
        self.sub_1pct += sum(lp < SUB_1PCT_LOGPROB for lp in result.student_logprobs)

    def add_record(self, record: dict):
        self.statuses[record["status"]] += 1

    def postfix(self) -> dict:
        return {"solved": self.statuses["solved"], "tok/s": f"{self.tokens / max(self.elapsed(), 1e-9):.1f}",
                "accept": f"{self.accepted / max(self.tokens, 1):.1%}"}

    def summary(self) -> dict:
        return {
            "rows": self.rows, "skipped_rows": len(self.skipped), "skipped_examples": self.skipped[:3],
            "problems": self.problems, "already_done": self.resumed, "prompt_too_long": list(self.too_long),
            "written": self.written, **self.statuses, "attempts": self.attempts, "tokens": self.tokens,
            "acceptance_rate": self.accepted / self.tokens if self.tokens else 0.0,
            "sub_1pct_share": self.sub_1pct / self.tokens if self.tokens else 0.0,
            "seconds": self.elapsed(), "tokens_per_second": self.tokens / self.elapsed() if self.tokens else 0.0,
            "out": self.out,
        }


def format_summary(s: dict) -> str:
    lines = [f"problems: {s['problems']} ({s['already_done']} already in the output, {s['written']} written now)"]
    if s["skipped_rows"]:
        examples = "; ".join(f"row {i}: {why}" for i, why in s["skipped_examples"])
        lines.append(f"skipped rows: {s['skipped_rows']} of {s['rows']} ({examples})")
    if s["prompt_too_long"]:
        lines.append(f"skipped (prompt longer than --max-seq-len): {len(s['prompt_too_long'])}")
    if s["written"]:
        lines.append(f"solved: {s['solved']}  prefix: {s['prefix']}  unverified: {s['unverified']}")
        lines.append(f"attempts: {s['attempts']}  tokens: {s['tokens']}  {s['tokens_per_second']:.1f} tokens/s  "
                     f"acceptance: {s['acceptance_rate']:.1%}  student prob < 1%: {s['sub_1pct_share']:.2%}")
    lines.append(f"output: {s['out']}")
    return "\n".join(lines)
