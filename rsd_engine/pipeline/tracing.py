"""Sentence provenance of one response under several models (DESIGN §9).

Each model reads the response in its own context (readers.py); a sentence's probability under a
model is the geometric mean of its tokens' probabilities, exp(mean log p), over the tokens that
belong to it (sentences.py); its category follows categories.py. Responses a model cannot read
(unknown tokens), or longer than max_seq_len under any model, are skipped with the reason before any
model is loaded; once traced, a response is skipped (Traced.skipped says why) where a model's
log-probs are not finite (a NaN compares false with every margin, so it would pass as "shared" and
rank anywhere) or where no sentence holds a token under every model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rsd_engine.sizes import check_size

from .categories import DEFAULT_BETA, Rule, check_beta
from .readers import Reader, Unreadable
from .responses import CARRIED, Response
from .sentences import Sentence, has_sentence, merge_empty, sentence_spans, split_sentences, token_sentences

ROLES = ("teacher", "student", "distilled")


# Why a response with no text outside its template markers (say "<think>\n\n</think>") is skipped: it has
# no sentence to trace or rank, and 0 lines written would never count as done.
NO_SENTENCE = "no text outside the template markers (no sentence)"
# Every sentence merged away (merge_empty): its tokens all start in markers under some model.
NO_TOKEN_SENTENCE = "no sentence holds a token under every model"


def not_finite(roles) -> str:
    return f"log-probs not finite under the {' and '.join(roles)} (the model's logits are NaN/inf)"


@dataclass
class Traced:
    response: Response
    sentences: list[Sentence]
    probs: dict[str, list[float]]  # role -> per-sentence probability
    categories: list[str]
    tokens: int  # the response's length in the student's tokens
    skipped: str | None = None  # why it is not to be written or ranked (then it has no sentences)

    @property
    def teacher_sentences(self) -> int:
        return self.categories.count("teacher")

    @property
    def teacher_share(self) -> float:
        return self.teacher_sentences / len(self.sentences)

    def records(self) -> list[dict]:
        """One JSON line per sentence, each with its response's text hash and row hash (Response.row_hash: a
        rerun compares both with the input's, provenance.responses_to_trace)."""
        r, n = self.response, len(self.sentences)
        out = []
        for i, (sentence, category) in enumerate(zip(self.sentences, self.categories)):
            line = {"id": r.id, "sample": r.sample, "response_hash": r.text_hash, "row_hash": r.row_hash, "index": i,
                    "sentences": n, "text": sentence.text}
            line.update({name: r.row[name] for name in CARRIED if name in r.row})
            if r.truncated:
                line["truncated"] = True
            line.update({f"p_{role}": p[i] for role, p in self.probs.items()})
            line["category"] = category
            out.append(line)
        return out


class Tracer:
    """Readers for teacher, student and (optionally) distilled model, and the category rule
    (default: the difference rule at `beta`)."""

    def __init__(self, readers: dict[str, Reader], *, beta: float = DEFAULT_BETA, rule: Rule | None = None,
                 batch_size: int = 8):
        if set(readers) - set(ROLES) or not {"teacher", "student"} <= set(readers):
            raise ValueError(f"readers must be teacher, student and optionally distilled, got {sorted(readers)}")
        batch_size = check_size("--batch-size", batch_size, 1)
        self.readers, self.batch_size = readers, batch_size
        self.rule = rule if rule is not None else Rule("difference", check_beta(beta))
        self.max_seq_len = None
        # Every model's markers: a marker one tokenizer lacks is still no sentence for the others.
        self.markers = sorted({m for reader in readers.values() for m in reader.markers})

    def prepare(self, responses: list[Response], max_seq_len: int | None = None):
        """Check every response before any model is loaded: (usable, skipped as (response, reason)).
        max_seq_len None fits the longest usable response, up to the smallest model context."""
        lengths, skipped = {}, []
        for r in responses:
            if not has_sentence(r.text, self.markers):
                skipped.append((r, NO_SENTENCE))
                continue
            try:
                lengths[r.key] = max(len(reader.read(r.question, r.text, r.system, r.id)) for reader in
                                     self.readers.values())
            except Unreadable as err:
                skipped.append((r, str(err)))
        if max_seq_len is None:
            context = min(reader.context for reader in self.readers.values())
            max_seq_len = min(max(lengths.values(), default=2), context)
        usable = []
        for r in responses:
            n = lengths.get(r.key)
            if n is not None and n > max_seq_len:
                skipped.append((r, f"{n} tokens with its prompt, longer than max_seq_len {max_seq_len}"))
            elif n is not None:
                usable.append(r)
        self.max_seq_len = max(max_seq_len, 2)
        return usable, skipped

    def load(self):
        for reader in self.readers.values():
            reader.allocate(self.max_seq_len, self.batch_size)

    def trace(self, response: Response) -> Traced:
        return self.trace_batch([response])[0]

    def trace_batch(self, responses: list[Response]) -> list[Traced]:
        """Responses scored together (up to batch_size sequences per forward under each model)."""
        readings = {role: [reader.read(r.question, r.text, r.system, r.id) for r in responses]
                    for role, reader in self.readers.items()}
        logprobs = {role: self.readers[role].logprobs(readings[role]) for role in readings}
        return [self._sentences(r, {role: readings[role][k] for role in readings},
                                {role: logprobs[role][k] for role in readings}) for k, r in enumerate(responses)]

    def _sentences(self, response: Response, readings: dict, logprobs: dict) -> Traced:
        tokens = len(readings["student"].response_ids)
        broken = [role for role, lps in logprobs.items() if not all(map(math.isfinite, lps))]
        if broken:
            return Traced(response, [], {}, [], tokens, not_finite(broken))
        text = response.text
        spans = sentence_spans(text, self.markers)
        while True:
            owners = {role: token_sentences(text, r.offsets, spans) for role, r in readings.items()}
            counts = [_counts(o, len(spans)) for o in owners.values()]
            merged = merge_empty(spans, counts)
            if merged == spans:
                break
            spans = merged
        probs = {role: _geometric_means(logprobs[role], owners[role], len(spans)) for role in readings}
        categories = [self.rule.categorize(probs["teacher"][i], probs["student"][i],
                                           probs["distilled"][i] if "distilled" in probs else None)
                      for i in range(len(spans))]
        return Traced(response, split_sentences(text, spans), probs, categories, tokens,
                      None if spans else NO_TOKEN_SENTENCE)


def _counts(owners: list[int], n: int) -> list[int]:
    """Tokens per sentence (a marker's, -1, in none): one pass, where a count per sentence took tokens x sentences."""
    counts = [0] * n
    for i in owners:
        if i >= 0:
            counts[i] += 1
    return counts


def _geometric_means(logprobs: list[float], owners: list[int], n: int) -> list[float]:
    sums, counts = [0.0] * n, [0] * n
    for lp, i in zip(logprobs, owners):
        if i < 0:  # a template marker: in no sentence
            continue
        sums[i] += lp
        counts[i] += 1
    return [math.exp(s / c) for s, c in zip(sums, counts)]
