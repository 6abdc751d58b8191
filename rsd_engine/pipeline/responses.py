"""Responses in: rows with a question and a response (`rsd generate` records and its --format sft records
with --response-field completion), or chat `messages` records (one question: a user turn, and a system turn
before it), as read by `rsd provenance` and `rsd select`.

Every response has a key (id, sample): the id from --id-field when the row has one (else a hash of
the question text, as `rsd generate` does: a reordered file resumes correctly), the sample from the
row's `sample` field (`rsd eval` output), else the count of earlier rows with the same id, so
several candidates per problem stay apart; an id names one problem, so one whose rows hold different
questions is refused by both commands (check_one_question_per_id). Unusable rows (missing fields, empty
responses, text that is not valid Unicode such as a lone surrogate, generations that failed: `finish_reason` "error")
are skipped and listed; a `sample` that is no integer >= 0, a `correct` that is not true or false and
a `finish_reason` that is not a string are errors (_malformed); no usable row at all is an error. A
response cut off by the length limit (`finish_reason` "length", as `rsd eval` writes it) is not a
whole answer: it is set apart and counted unless include_truncated, and then kept with the mark.

A response's text has a hash (text_hash): outputs keep it with their records, so a rerun sees a
response whose text changed since it was traced. Its row has one too (row_hash): the question and system
turn the response is read after, its text, and the fields carried into the outputs (CARRIED), so a rerun also
sees a row regraded, or its question or system turn edited, around a response left as it was. What a response
is read after, its question and system turn, has a hash of its own (context_hash): a score of the response (`rsd
select --budget`'s scores file) is kept with its text hash and this one, and counts for that reading only (a
regrade changes no score, so it is not covered).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .data import _columns, not_unicode, question_id, read_rows
from .readers import strip_think_open

CARRIED = ("correct", "finish_reason")  # from the input row (`rsd eval` output), for the analysis by correctness


@dataclass(frozen=True)
class Response:
    id: str
    sample: int
    question: str
    system: str
    text: str
    row: dict = field(repr=False, compare=False)

    @property
    def key(self) -> tuple[str, int]:
        return self.id, self.sample

    @property
    def text_hash(self) -> str:
        return text_hash(self.text)

    @property
    def row_hash(self) -> str:
        """A hash of what a record of this response is made from: the question and system turn it is read after,
        its text, and the row's CARRIED fields (a field absent and one set to null differ: the records carry it
        as it is). Other fields of the row are not read and not covered."""
        carried = {name: self.row[name] for name in CARRIED if name in self.row}
        return text_hash(json.dumps([self.question, self.system, self.text, carried], sort_keys=True))

    @property
    def context_hash(self) -> str:
        """A hash of what the response is read after: its question and system turn (each model reads them through
        its own chat template). With text_hash, it says what a score of the response was read from."""
        return text_hash(json.dumps([self.question, self.system]))

    @property
    def truncated(self) -> bool:
        return self.row.get("finish_reason") == "length"


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


@dataclass
class ResponseSet:
    responses: list[Response]
    skipped: list[tuple[int, str]]  # (row number, reason)
    num_rows: int
    has_ids: bool  # some row had the id field
    truncated: list[tuple[str, int]] = field(default_factory=list)  # keys set apart: cut off by the length limit


def load_responses(path, *, question_field="question", response_field="response", id_field="id",
                   system_prompt: str = "", include_truncated: bool = False) -> ResponseSet:
    path = Path(path)
    rows = read_rows(path)  # strict: a torn or bad line of an input is an error, never a row dropped
    if not rows:
        raise ValueError(f"{path}: the file is empty (no responses)")
    responses, skipped, truncated, seen, per_id = [], [], [], {}, {}
    has_ids = any(isinstance(r, dict) and r.get(id_field) is not None for r in rows)
    if not has_ids and id_field != "id":  # named, not the default: a column that is not there is a typo
        columns = _columns(rows)
        raise ValueError(f"{path}: --id-field {id_field!r} is in no row; fields: {', '.join(columns) or '(none)'} "
                         f"(without --id-field, rows with no 'id' are known by a hash of their question)")
    for number, row in enumerate(rows):
        malformed = _malformed(row)
        if malformed:
            raise ValueError(f"{path}: row {number}, id {row.get(id_field)!r}, has {malformed}")
        response, reason = _response(number, row, question_field, response_field, id_field, system_prompt)
        if response is None:
            skipped.append((number, reason))
            continue
        if response.sample < 0:
            response = Response(response.id, per_id.get(response.id, 0), response.question, response.system,
                                response.text, response.row)
        per_id[response.id] = max(per_id.get(response.id, 0), response.sample + 1)
        if response.key in seen:
            raise ValueError(f"{path}: rows {seen[response.key]} and {number} are both id {response.id!r} sample "
                             f"{response.sample}; each (id, sample) must be one response")
        seen[response.key] = number
        if response.truncated and not include_truncated:
            truncated.append(response.key)
        else:
            responses.append(response)
    if not responses and truncated:
        raise ValueError(f"{path}: all {len(truncated)} usable responses were cut off by the length limit "
                         f"(finish_reason 'length'); pass --include-truncated to use them anyway")
    if not responses:
        first = sorted(rows[0]) if isinstance(rows[0], dict) else type(rows[0]).__name__
        raise ValueError(f"{path}: none of the {len(rows)} rows is a usable response ({skipped[0][1]}); fields of "
                         f"the first row: {first}. Expected --question-field {question_field!r} and --response-field "
                         f"{response_field!r}, or chat 'messages'.")
    return ResponseSet(responses, skipped, len(rows), has_ids, truncated)


def check_one_question_per_id(responses: list[Response], source, why: str) -> None:
    """Refuses an id whose responses hold different questions (ids 1 and "1" are one id, "1"): an id names one
    problem, whose rows are its samples or candidates, so two problems under one id would be read as one. `why`:
    what the command would do with them."""
    questions: dict[str, list[str]] = {}
    for r in responses:
        questions.setdefault(r.id, [])
        if r.question not in questions[r.id]:
            questions[r.id].append(r.question)
    mixed = {pid: held for pid, held in questions.items() if len(held) > 1}
    if mixed:
        pid, held = next(iter(mixed.items()))
        shown = "; ".join(repr(q if len(q) <= 80 else q[:77] + "...") for q in held[:3])
        more = f" ({len(mixed) - 1} more ids like it)" if len(mixed) > 1 else ""
        raise ValueError(f"{source}: id {pid!r} holds {len(held)} different questions: {shown}{more}. {why}; give "
                         f"each problem its own id (or name another column with --id-field)")


def row_id(row, *, question_field="question", response_field="response", id_field="id",
           system_prompt: str = "") -> str | None:
    """The id load_responses gives `row` (its --id-field value, else its question's hash); None for a row
    it would skip."""
    response = row_response(row, question_field=question_field, response_field=response_field, id_field=id_field,
                            system_prompt=system_prompt)
    return None if response is None else response.id


def row_response(row, *, question_field="question", response_field="response", id_field="id",
                 system_prompt: str = "") -> Response | None:
    """`row` read alone as load_responses reads it (its question, system turn and text; a row without "sample"
    has sample -1, its place among its id's rows being unknown); None for a row it would skip."""
    response, _ = _response(0, row, question_field, response_field, id_field, system_prompt)
    return response


def _malformed(row) -> str | None:
    """What is wrong with a row's `sample`, `correct` or `finish_reason` (rsd eval's fields), if anything. They
    are read as keys and carried into the outputs for the analyses by correctness: renumbering a bad sample
    could make two candidates one, and a "correct" of "yes" would be carried as it is and read as ungraded,
    so a file holding them is refused, not read otherwise than it says."""
    if not isinstance(row, dict):
        return None
    sample, correct, finish = row.get("sample"), row.get("correct"), row.get("finish_reason")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 0):
        return f"\"sample\": {sample!r} is no sample number; it must be an integer >= 0 (or absent)"
    if correct is not None and not isinstance(correct, bool):
        return f"\"correct\": {correct!r}; it must be true or false (or absent when ungraded)"
    if finish is not None and not isinstance(finish, str):
        return f"\"finish_reason\": {finish!r}; it must be a string such as \"stop\" or \"length\" (or absent)"
    return None


def _response(number, row, question_field, response_field, id_field, system_prompt):
    if not isinstance(row, dict):
        return None, f"row is a {type(row).__name__}, not an object"
    rid = row.get(id_field)
    if isinstance(rid, (dict, list)):
        return None, f"{id_field!r} is a {type(rid).__name__}, not an id"
    if isinstance(rid, float) and not math.isfinite(rid):  # (NaN: a table's missing value; every one would be "nan")
        return None, f"{id_field!r} is {rid}, not an id"
    rid = None if rid is None else str(rid)
    sample = row.get("sample")
    sample = -1 if sample is None else sample  # -1: numbered by its place among the id's rows
    reason = not_unicode(row)
    if reason:
        return None, reason
    if row.get("finish_reason") == "error":  # `rsd eval`: non-finite logits cut the generation short
        return None, f"the generation failed (finish_reason 'error'{': ' + str(row['error']) if row.get('error') else ''})"
    if response_field not in row and isinstance(row.get("messages"), list):
        return _chat(rid, sample, row)
    return _plain(rid, sample, row, question_field, response_field, system_prompt)


def _plain(rid, sample, row, question_field, response_field, system_prompt):
    question, text = row.get(question_field), row.get(response_field)
    if not isinstance(question, str) or not question.strip():
        return None, f"no {question_field!r} text"
    if not isinstance(text, str):
        return None, f"no {response_field!r} text"
    if not text.strip():
        return None, "empty response"
    return Response(rid or question_id(question), sample, question, system_prompt, text, row), ""


def _chat(rid, sample, row):
    messages = row["messages"]
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        return None, "'messages' does not end with an assistant turn"
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages[:-1]]
    if "user" not in roles:
        return None, "'messages' has no user turn"
    if roles not in (["user"], ["system", "user"]):
        # Each model reads the question through its own chat template (build_prompt): one question, and its
        # system prompt. The turns of a longer conversation would be dropped, not read.
        return None, (f"'messages' has {len(roles)} turns before the last assistant turn "
                      f"({', '.join(map(str, roles))}); a response is read after one question (a user turn, a system "
                      "turn before it)")
    user = messages[-2].get("content")
    if not isinstance(user, str) or not user.strip():
        return None, "'messages' has no user turn"
    system = messages[0].get("content") if roles[0] == "system" else ""
    if system is not None and not isinstance(system, str):
        return None, f"'messages' has a system turn whose content is not text ({type(system).__name__})"
    text = messages[-1].get("content")
    if not isinstance(text, str) or not strip_think_open(text).strip():
        return None, "empty response"
    return Response(rid or question_id(user), sample, user, system or "", strip_think_open(text), row), ""
