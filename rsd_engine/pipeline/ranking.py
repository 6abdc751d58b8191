"""What a candidate response is ranked by in teacher-guided selection (DESIGN §9), and the
budget over a whole dataset: `rsd select` and `rsd generate --select provenance` rank through here.

    count               teacher-originated sentences (categories.py's rule)
    share               their share of the response's sentences
    student-likelihood  the student's mean log-probability per token of the response
    random              a uniform draw fixed by (seed, id, sample)

Larger is better; ties go to the shorter response (student tokens), then to the earlier
candidate. A Scorer reads only the models its ranking needs, and sets aside with the reason, as
`rsd provenance` does, a response whose log-probs are not finite (a NaN never compares less, so it
would be kept or not by its place in the input) or, for count and share, one with no sentence left.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from rsd_engine.sizes import check_size

from .categories import Rule
from .readers import Reader, Unreadable
from .responses import Response
from .sentences import has_sentence
from .tracing import NO_SENTENCE, Tracer, not_finite

RANKINGS = ("count", "share", "student-likelihood", "random")
BUDGET_UNITS = ("responses", "problems")


@dataclass(frozen=True)
class Candidate:
    order: int  # position among its problem's candidates
    teacher_sentences: int = 0
    sentences: int = 0
    tokens: int = 0
    student_logprob: float | None = None  # mean log p per student token
    random_key: float | None = None

    @property
    def teacher_share(self) -> float:
        return self.teacher_sentences / self.sentences if self.sentences else 0.0

    def value(self, by: str) -> float:
        """Larger is better."""
        if by == "count":
            return self.teacher_sentences
        if by == "share":
            return self.teacher_share
        if by == "student-likelihood":
            return self.student_logprob
        return -self.random_key

    def fields(self) -> dict:
        """What goes into the kept row and the scores file."""
        if self.random_key is not None:
            return {"random_key": self.random_key}  # no model read it: no token count
        out = {"tokens": self.tokens}
        if self.student_logprob is not None:
            out["student_logprob"] = self.student_logprob
        else:
            out.update(teacher_sentences=self.teacher_sentences, sentences=self.sentences,
                       teacher_share=self.teacher_share)
        return out

    @classmethod
    def from_fields(cls, order: int, fields: dict) -> "Candidate":
        return cls(order, fields.get("teacher_sentences", 0), fields.get("sentences", 0), fields.get("tokens", 0),
                   fields.get("student_logprob"), fields.get("random_key"))


def check_by(by: str) -> str:
    if by not in RANKINGS:
        raise ValueError(f"--by = {by!r}: must be one of {', '.join(RANKINGS)}")
    return by


def pick(candidates: list[Candidate], by: str = "count") -> Candidate:
    """The candidate a problem keeps (see the module docstring)."""
    check_by(by)
    if not candidates:
        raise ValueError("no candidates to pick from")
    return min(candidates, key=lambda c: (-c.value(by), c.tokens, c.order))


def select_budget(problems: dict[str, list[Candidate]], budget: int, unit: str = "responses",
                  by: str = "share") -> list[tuple[str, Candidate]]:
    """The `budget` best (id, candidate) pairs of the whole dataset, best first: responses, or
    problems each with its best candidate (`unit`). `problems` is in dataset order, which breaks
    the last ties."""
    check_by(by)
    check_budget(budget)
    if unit not in BUDGET_UNITS:
        raise ValueError(f"--budget-unit = {unit!r}: must be one of {', '.join(BUDGET_UNITS)}")
    place = {pid: k for k, pid in enumerate(problems)}
    if unit == "responses":
        pool = [(pid, c) for pid, cands in problems.items() for c in cands]
    else:
        pool = [(pid, pick(cands, by)) for pid, cands in problems.items() if cands]
    pool.sort(key=lambda pc: (-pc[1].value(by), pc[1].tokens, place[pc[0]], pc[1].order))
    return pool[:budget]


def check_budget(budget) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"--budget = {budget!r}: must be an integer >= 1 (responses or problems to keep)")
    return budget


def random_key(seed: int, rid: str, sample: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, id, sample): the same draw on any rank, in any order."""
    digest = hashlib.blake2b(f"{seed}\0{rid}\0{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


class Scorer:
    """Computes what `by` ranks by and reads no more models than that needs: teacher and student
    trace sentences for count and share, the student alone reads the response for
    student-likelihood, random reads none."""

    def __init__(self, by: str, readers: dict[str, Reader], *, rule: Rule | None = None, batch_size: int = 8,
                 seed: int = 0):
        self.by, self.seed, self.batch_size = check_by(by), seed, check_size("--batch-size", batch_size, 1)
        self.readers = readers
        self.tracer = Tracer(readers, rule=rule, batch_size=batch_size) if by in ("count", "share") else None
        self.max_seq_len = None

    def prepare(self, responses: list[Response], max_seq_len: int | None = None):
        """(usable, skipped as (response, reason)), before any model is loaded."""
        if self.tracer is not None:
            return self.tracer.prepare(responses, max_seq_len)
        if self.by == "random":
            return list(responses), []
        reader, lengths, skipped, usable = self.readers["student"], {}, [], []
        for r in responses:
            if not has_sentence(r.text, reader.markers):
                skipped.append((r, NO_SENTENCE))
                continue
            try:
                lengths[r.key] = len(reader.read(r.question, r.text, r.system, r.id))
            except Unreadable as err:
                skipped.append((r, str(err)))
        if max_seq_len is None:
            max_seq_len = min(max(lengths.values(), default=2), reader.context)
        for r in responses:
            n = lengths.get(r.key)
            if n is not None and n > max_seq_len:
                skipped.append((r, f"{n} tokens with its prompt, longer than max_seq_len {max_seq_len}"))
            elif n is not None:
                usable.append(r)
        self.max_seq_len = max(max_seq_len, 2)
        return usable, skipped

    def load(self):
        if self.tracer is not None:
            self.tracer.load()
        elif self.by == "student-likelihood":
            self.readers["student"].allocate(self.max_seq_len, self.batch_size)

    def score(self, responses: list[Response]) -> tuple[list[Candidate], list[tuple[Response, str]]]:
        """(candidates, in the order of `responses` with order = their index there; the responses set
        aside, as (response, reason), which have no candidate)."""
        out, skipped = [], []
        for first in range(0, len(responses), self.batch_size):
            batch = responses[first: first + self.batch_size]
            if self.tracer is not None:
                scored = [(t.skipped, Candidate(0, t.teacher_sentences, len(t.sentences), t.tokens))
                          for t in self.tracer.trace_batch(batch)]
            elif self.by == "student-likelihood":
                reader = self.readers["student"]
                readings = [reader.read(r.question, r.text, r.system, r.id) for r in batch]
                scored = [(None if all(map(math.isfinite, lp)) else not_finite(["student"]),
                           Candidate(0, tokens=len(lp), student_logprob=sum(lp) / len(lp)))
                          for lp in reader.logprobs(readings)]
            else:
                scored = [(None, Candidate(0, random_key=random_key(self.seed, r.id, r.sample))) for r in batch]
            for k, (why, c) in enumerate(scored, first):
                if why:
                    skipped.append((responses[k], why))
                else:
                    out.append(Candidate.from_fields(k, c.fields()))
        return out, skipped
