"""What `rsd generate` tells the user: the progress bar while it runs, the summary at the end.

Problems that end without a record are named, not only counted: rows skipped as unusable,
prompts too long, problems cut short by --max-seq-len and problems whose generation failed. The
last two are retried by a rerun, so the summary says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .traces import SUB_1PCT_LOGPROB


class ProgressBar:
    """tqdm over attempts (a problem's attempts often finish together, long after they start, so a
    bar over problems stands still for minutes); quiet when `file` (stderr) is not a terminal."""

    def __init__(self, total_attempts: int, enabled: bool, tag: str = "", file=None):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            # disable=None: tqdm's own "only on a terminal" test, so logs and CI output stay clean.
            self.bar = tqdm(total=total_attempts, desc=f"{tag}rsd generate", unit="attempt", dynamic_ncols=True,
                            disable=None, file=file)

    def attempt_done(self, tally):
        if self.bar is not None:
            self.bar.set_postfix(tally.postfix(), refresh=False)
            self.bar.update(1)

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
    cut_short: list = field(default_factory=list)  # ids: an attempt hit --max-seq-len
    context: int | None = None  # the models' context, where it capped --max-seq-len's default or left a prompt out
    default_max_seq_len: int | None = None  # --max-seq-len's default, where it was not given
    failed: dict = field(default_factory=dict)  # id -> the engine's error message
    duplicates: dict = field(default_factory=dict)  # ids already in the output more than once
    forced: list = field(default_factory=list)  # setting differences appended under --force
    unreadable_answers: list = field(default_factory=list)  # ids: math-verify does not read the reference whole
    not_in_data: list = field(default_factory=list)  # ids of records in the output that no row of --data has
    grading_timed_out: list = field(default_factory=list)  # ids: math-verify ran out of time comparing an answer
    no_answer: list = field(default_factory=list)  # ids of the problems run without a reference answer
    hashed_ids: bool = False  # ids are hashes of the questions (the data has no id column)
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
        if record.get("grading_timed_out"):
            self.grading_timed_out.append(record["id"])

    def postfix(self) -> dict:
        return {"written": self.written, "solved": self.statuses["solved"],
                "tok/s": f"{self.tokens / max(self.elapsed(), 1e-9):.1f}",
                "accept": f"{self.accepted / max(self.tokens, 1):.1%}"}

    def summary(self) -> dict:
        return {
            "rows": self.rows, "skipped_rows": len(self.skipped), "skipped": list(self.skipped),
            "problems": self.problems, "already_done": self.resumed, "prompt_too_long": list(self.too_long),
            "cut_short": list(self.cut_short), "context": self.context,
            "default_max_seq_len": self.default_max_seq_len, "failed": dict(self.failed),
            "duplicate_ids": dict(self.duplicates),
            "forced": list(self.forced), "unreadable_answers": list(self.unreadable_answers),
            "not_in_data": list(self.not_in_data), "hashed_ids": self.hashed_ids,
            "grading_timed_out": list(self.grading_timed_out), "no_answer": list(self.no_answer),
            "written": self.written, **self.statuses, "attempts": self.attempts, "tokens": self.tokens,
            "acceptance_rate": self.accepted / self.tokens if self.tokens else 0.0,
            "sub_1pct_share": self.sub_1pct / self.tokens if self.tokens else 0.0,
            "seconds": self.elapsed(), "tokens_per_second": self.tokens / self.elapsed() if self.tokens else 0.0,
            "out": self.out,
        }


def names(ids, limit: int = 10) -> str:
    ids = list(ids)
    more = f", and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(map(str, ids[:limit])) + more


def describe_skipped(skipped, rows: int, row_limit: int = 5, reason_limit: int = 6) -> str:
    """"skipped rows: N of M (rows 1, 4: no 'question' text; row 6: no 'id' id)": the skipped rows grouped by
    reason, every reason named up to reason_limit (the first five rows alone hid a sixth row's reason)."""
    groups: dict[str, list[int]] = {}
    for number, why in skipped:
        groups.setdefault(why, []).append(number)
    parts = []
    for why, numbers in list(groups.items())[:reason_limit]:
        shown = ", ".join(map(str, numbers[:row_limit]))
        more = f" and {len(numbers) - row_limit} more" if len(numbers) > row_limit else ""
        parts.append(f"{'row' if len(numbers) == 1 else 'rows'} {shown}{more}: {why}")
    others = list(groups.values())[reason_limit:]
    if others:
        parts.append(f"{sum(map(len, others))} more rows for {len(others)} other reasons")
    return f"skipped rows: {len(skipped)} of {rows} ({'; '.join(parts)})"


def unreadable_warning(ids) -> str:
    return (f"warning: {len(ids)} reference answers are not math that math-verify reads whole (a plain-text formula "
            f"such as 2^floor(n/2) reads as its first number) nor words that state one value (\"Always greater than "
            f"20\" is not 20), so no attempt at them is judged correct: {names(ids)}; write them as LaTeX "
            f"(2^{{\\lfloor n/2 \\rfloor}}) or as the value")


def context_limit(context: int | None, default: int | None = None, whose: str = "the models'") -> str:
    """What stopped a sequence: --max-seq-len where given, else its `default` (generate.default_max_seq_len), which
    is the models' `context` only where it reached it: below it (a longer prompt skipped, or none needing it), a
    sequence cut there was not cut by the context."""
    if default is None:
        return "--max-seq-len"
    if default == context:
        return f"{whose} context ({context} positions, --max-seq-len's default)"
    prompts = f"the prompts that fit {whose} context ({context})" if context else "the longest prompt"
    return f"--max-seq-len's default ({default} positions, sized by {prompts} and --max-new-tokens)"


def format_summary(s: dict) -> str:
    lines = [f"problems: {s['problems']} ({s['already_done']} already in the output, {s['written']} written now)"]
    if s["forced"]:
        lines.append(f"appended under --force despite other settings: {'; '.join(s['forced'])}")
    if s["duplicate_ids"]:
        from .records import describe_duplicates

        lines.append(f"warning: the output already held duplicates: {describe_duplicates(s['duplicate_ids'])}")
    if s.get("unreadable_answers"):
        lines.append(unreadable_warning(s["unreadable_answers"]))
    if s.get("not_in_data"):
        n = len(s["not_in_data"])
        why = (" (the data has no id column, so an id is a hash of its question: a question edited since its "
               "record was made is another problem, whose record is written beside the old one; remove the old "
               "records, or give the data ids)" if s.get("hashed_ids") else
               " (problems removed from the data, or another data file)")
        lines.append(f"warning: {n} records in the output are of no problem in --data{why}: {names(s['not_in_data'])}")
    if s["skipped_rows"]:
        lines.append(describe_skipped(s["skipped"], s["rows"]))
    limit = context_limit(s.get("context"), s.get("default_max_seq_len"))
    if s["prompt_too_long"]:
        lines.append(f"skipped (prompt leaves no room for a new token within {limit}): {len(s['prompt_too_long'])} "
                     f"({names(s['prompt_too_long'])})")
    if s["cut_short"]:
        redo = ("a --max-seq-len past it runs them on, at positions the models were never trained at"
                if s.get("context") and s.get("context") == s.get("default_max_seq_len") else
                "raise --max-seq-len and rerun to redo them")
        lines.append(f"not written, cut short by {limit}: {len(s['cut_short'])} ({names(s['cut_short'])}); {redo}")
    if s["failed"]:
        shown = "; ".join(f"{pid}: {why}" for pid, why in list(s["failed"].items())[:5])
        more = f"; and {len(s['failed']) - 5} more" if len(s["failed"]) > 5 else ""
        lines.append(f"failed, not written: {len(s['failed'])} ({shown}{more}); a rerun retries them")
    if s["written"]:
        lines.append(f"solved: {s['solved']}  prefix: {s['prefix']}  unverified: {s['unverified']}")
    if s.get("no_answer"):
        lines.append(f"problems without a reference answer: {len(s['no_answer'])} ({names(s['no_answer'])}): their "
                     f"traces are kept on the format checks alone (status \"unverified\"; --format sft puts one that "
                     f"passed them beside the solved ones)")
    if s.get("grading_timed_out"):
        lines.append(f"warning: math-verify could not compare an answer in time (5 s) for {len(s['grading_timed_out'])} "
                     f"problems, whose attempts count as not correct (records say \"grading_timed_out\"): "
                     f"{names(s['grading_timed_out'])}")
    if s["attempts"]:
        lines.append(f"attempts: {s['attempts']}  tokens: {s['tokens']}  {s['tokens_per_second']:.1f} tokens/s  "
                     f"acceptance: {s['acceptance_rate']:.1%}  student prob < 1%: {s['sub_1pct_share']:.2%}")
    lines.append(f"output: {s['out']}")
    return "\n".join(lines)
