"""Problems in: JSONL, JSON, Parquet or a `datasets` folder, into one Problem form.

Ids must survive a reordered or extended data file, since resuming skips the ids already
written: they come from the id field (`id` by default, when the rows have one), else from a
hash of the question text; never from the row number. A number id is spelled as the number is, an
integral float as an integer (a table's integer column with a missing value is read as floats: its
1.0 is the 1 of the column once filled), and records that an earlier version wrote under the float's
spelling ('1.0') are that problem's (id_spellings); text ids stay as they are. Rows without a usable
question (or id: none, or NaN, a table's missing value) are skipped and reported, not fatal; so is
a repeated question when ids are question hashes. A row without an answer becomes a problem with
answer None (its trace is 'unverified'). An unreadable file, a field that is no column, or a dataset
with no usable row is a clear error that names the command-line option to change.
"""

from __future__ import annotations

import decimal
import functools
import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

FORMATS = ".jsonl, .json, .parquet, or a folder written by datasets' save_to_disk"
QUESTION_HASH = "(hash of the question)"  # what ProblemSet.id_field says when ids are question hashes


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str | None
    # A numeric id as an earlier version spelled it read as a float ('1.0', '1e+16'), where that is not `id`: records
    # under it are this problem's on resume (id_spellings). Not part of the problem's identity.
    float_id: str | None = field(default=None, compare=False, repr=False)


@dataclass
class ProblemSet:
    problems: list[Problem]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row index, reason)
    num_rows: int = 0
    id_field: str = QUESTION_HASH  # where the ids came from
    repeated: list[tuple[str, str]] = field(default_factory=list)  # (id, earlier id): the same question, two ids

    @property
    def num_without_answer(self) -> int:
        return sum(p.answer is None for p in self.problems)


def question_id(question: str) -> str:
    """The id of a question without an id field: 16 hex digits of its text's hash."""
    return hashlib.blake2b(question.encode("utf-8"), digest_size=8).hexdigest()


def load_problems(path, *, question_field="question", answer_field="answer", id_field=None,
                  answers_needed: bool = False) -> ProblemSet:
    """Read problems from `path` (see the module docstring). id_field None: `id` when the rows have
    that column, else question hashes. answer_field None: no reference answers (not where
    answers_needed: `rsd eval` grades against them)."""
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: the dataset is empty (no rows)")
    columns = _columns(rows)
    if not columns:  # no row is an object with fields
        names = {"list": "lists", "str": "strings", "int": "numbers", "float": "numbers", "bool": "true/false",
                 "NoneType": "nulls", "dict": "empty objects"}
        kinds = sorted({names.get(type(r).__name__, type(r).__name__) for r in rows})
        raise ValueError(f"{path}: its rows are {' and '.join(kinds)}, not objects with fields; a problem is an object "
                         f"such as {{\"question\": ..., \"answer\": ...}}")
    if id_field is None and "id" in columns:
        id_field = "id"
    for option, name in (("--question-field", question_field), ("--answer-field", answer_field),
                         ("--id-field", id_field)):
        if name is not None and name not in columns:
            hint = ""
            if option == "--answer-field":
                hint = ("; name the column of reference answers, which rsd eval grades against" if answers_needed
                        else "; --answer-field '' for problems without reference answers")
            raise ValueError(f"{path}: {option} {name!r} is not a column; columns are {', '.join(columns) or '(none)'}"
                             f"{hint}")
    problems, skipped, seen, asked, repeated = [], [], {}, {}, []
    for index, row in enumerate(rows):
        problem, reason = _problem(row, question_field, answer_field, id_field)
        if problem is not None and problem.id in seen:
            if id_field is not None:
                raise ValueError(f"{path}: rows {seen[problem.id]} and {index} share the --id-field {id_field!r} "
                                 f"value {problem.id!r}; ids must be unique for resumable output")
            problem, reason = None, f"same question as row {seen[problem.id]}"
        if problem is None:
            skipped.append((index, reason))
            continue
        seen[problem.id] = index
        if problem.question in asked:  # ids of the data's own: kept, and named (question hashes make them one)
            repeated.append((problem.id, asked[problem.question]))
        asked.setdefault(problem.question, problem.id)
        problems.append(problem)
    if not problems:
        raise ValueError(f"{path}: none of the {len(rows)} rows is usable ({skipped[0][1]}); columns: "
                         f"{', '.join(columns)}. Name the fields with --question-field / --answer-field / --id-field.")
    return ProblemSet(problems, skipped, len(rows), id_field or QUESTION_HASH, repeated)


def repeated_warning(repeated) -> str:
    shown = ", ".join(f"{pid} = {first}" for pid, first in repeated[:5])
    more = f", and {len(repeated) - 5} more" if len(repeated) > 5 else ""
    return (f"warning: problems asking an earlier problem's question under another id: {len(repeated)} "
            f"({shown}{more}); each is run and written, so that question counts (and trains) more than once")


def _columns(rows) -> list[str]:
    """Every field name of the dict rows, in order of first appearance."""
    return list(dict.fromkeys(key for row in rows if isinstance(row, dict) for key in row))


def _problem(row, question_field, answer_field, id_field) -> tuple[Problem | None, str]:
    if not isinstance(row, dict):
        return None, f"row is a {type(row).__name__}, not an object"
    used = {name: row.get(name) for name in (question_field, answer_field, id_field) if name is not None}
    reason = not_unicode(used)  # no tokenizer or JSON writer takes a lone surrogate
    if reason:
        return None, reason
    question = row.get(question_field)
    if not isinstance(question, str) or not question.strip():
        return None, f"no {question_field!r} text"
    float_id = None
    if id_field is None:
        problem_id = question_id(question)
    elif _missing_id(row.get(id_field)):
        return None, f"no {id_field!r} id"
    elif isinstance(row[id_field], float) and math.isinf(row[id_field]):  # (1e400 reads as inf): every one "inf"
        return None, f"{id_field!r} is {row[id_field]}, not an id"
    else:
        problem_id, float_id = _id_text(row[id_field])
    answer = row.get(answer_field) if answer_field is not None else None
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, type(None))):
        return None, f"{answer_field!r} is a {type(answer).__name__}, not text or a number"
    missing = answer is None or (isinstance(answer, float) and math.isnan(answer))  # NaN: a table's missing value
    answer = None if missing or str(answer).strip() == "" else _answer_text(answer)
    return Problem(problem_id, question, answer, float_id), ""


def _missing_id(value) -> bool:
    """No id: none, an object or list, or NaN (a table's missing value, as for answers)."""
    return value is None or isinstance(value, (dict, list)) or (isinstance(value, float) and math.isnan(value))


def _id_text(value) -> tuple[str, str | None]:
    """(a row's id as text, the float spelling an earlier version wrote for it where that differs). A table's integer
    id column with a missing value is read as floats: the id 1.0 is the integer 1's, as a filled column reads it
    (Python's '1.0', '1e+16' made them other problems). Text stays as it is ("1.0" is not 1); so does a float that is
    no integer."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value), None
    if isinstance(value, float) and not value.is_integer():  # (inf and a non-integer float: Python's spelling)
        return str(value), None
    text = str(int(value))
    try:
        old = str(float(value))  # what an earlier version wrote for this id read as a float
    except OverflowError:  # an integer no float holds: never read as one
        return text, None
    return text, (old if old != text else None)


def _answer_text(answer: str | int | float) -> str:
    """A reference answer as text. A float is written as a number is: an integral one as an integer (a table's
    integer column with a missing value is read as floats: 10**16 would be '1e+16', 12 '12.0'), any other
    without an exponent."""
    if not isinstance(answer, float):
        return str(answer)
    if math.isinf(answer):
        return str(answer)
    if answer.is_integer():
        return str(int(answer))
    return format(decimal.Decimal(repr(answer)), "f")


def not_unicode(value, where: str = "") -> str:
    """Why some text in `value` (a row) cannot be encoded, as no tokenizer or JSON writer can (a
    lone surrogate from a JSON escape such as \\ud800), or ''."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return (f"{where or 'text'} is not valid Unicode: {value[err.start]!r} at character {err.start} is a "
                    f"lone surrogate")
        return ""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(item, (str, dict, list)):  # not a call per token id of a long token_ids list
            reason = not_unicode(item, f"{where}[{key!r}]" if where else repr(key))
            if reason:
                return reason
    return ""


_SPECIAL_FILES = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISFIFO, "a FIFO (a named pipe)"), (stat.S_ISSOCK, "a socket"))


def special_file(path) -> str:
    """What an existing `path` is (through its links) where it is neither a regular file nor a folder: "a character
    device (/dev/zero)", "a FIFO (a named pipe)"...; "" for a file, a folder or nothing there. A device reads without
    end (/dev/zero, /dev/full) or never (a terminal): read as a dataset or an earlier output, it grew until memory
    ran out."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # nothing there, a link loop (named where the path is used), a NUL in the name
        return ""
    what = next((what for test, what in _SPECIAL_FILES if test(mode)), "")
    real = os.path.realpath(path)
    return f"{what} ({real})" if what and real != os.path.abspath(path) else what


def read_rows(path: Path) -> list:
    """All rows of the dataset at `path` as Python objects (dicts for well-formed data). A pipe is read to its end
    (a named FIFO whose writer ends); a device or a socket is refused (special_file)."""
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if (kind := special_file(path)) and not kind.startswith("a FIFO"):
        raise ValueError(f"dataset {path} is {kind}, not a file: valid: {FORMATS}")
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise ValueError(f"{path}: unknown dataset format {suffix or '(no extension)'!r}; valid: {FORMATS}")


def read_growing_rows(path: Path) -> tuple[list, bool]:
    """read_rows, for a file a run may still be appending to (an `rsd generate` output read while it runs, or
    after a kill): (the rows, whether a last line cut short was left out). Only a last line with no newline that
    is not JSON (maybe cut inside a character's bytes) counts as cut short; a bad line anywhere else is an
    error, as for read_rows."""
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return read_rows(path), False
    data = path.read_bytes()
    head, newline, tail = data.rpartition(b"\n")
    try:
        parse_json(tail.decode("utf-8"))
        cut_short = False
    except (UnicodeDecodeError, json.JSONDecodeError):
        cut_short = bool(tail.strip())
    if not cut_short:
        return read_rows(path), False
    return _read_jsonl(path, _decode(path, head + newline)), True


def parse_json(text):
    """json.loads, where a value nested deeper than Python's parser recurses (a RecursionError at about a thousand
    levels) is invalid JSON like any other: a JSONDecodeError, which every reader reports as the file's bad line."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to read", text if isinstance(text, str) else "", 0) from None


def _read_text(path: Path) -> str:
    return _decode(path, path.read_bytes())


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark is not part of the first row
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from None


def _read_jsonl(path: Path, text: str | None = None) -> list:
    rows = []
    # Lines end at "\n" only: str.splitlines would also split at U+2028 and the other separators that JSON
    # writers leave raw inside strings (json.dumps with ensure_ascii=False).
    for number, line in enumerate((text if text is not None else _read_text(path)).split("\n"), 1):
        if line.strip():
            try:
                rows.append(parse_json(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
    return rows


def _read_json(path: Path) -> list:
    text = _read_text(path)
    try:
        data = parse_json(text)
    except json.JSONDecodeError:
        return _read_jsonl(path, text)  # JSON Lines saved under a .json name
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return data["data"]
    if isinstance(data, list):
        return data
    raise ValueError(f"{path}: JSON must be a list of objects or {{\"data\": [...]}}, got a {type(data).__name__}")


def _read_parquet(path: Path) -> list:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError variants
        raise ValueError(f"{path} is not a readable Parquet file: {exc}") from None


def _read_saved_dataset(path: Path) -> list:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as exc:  # FileNotFoundError or assorted errors on folders it did not write
        raise ValueError(f"{path}: not a dataset folder written by save_to_disk ({exc}); valid: {FORMATS}") from None
    if isinstance(data, DatasetDict):
        splits = list(data)
        if len(splits) != 1 and "train" not in splits:
            raise ValueError(f"{path} holds splits {splits}; save the one to use on its own or name one 'train'")
        data = data[splits[0] if len(splits) == 1 else "train"]
    return data.to_list()


class ChangedProblems(ValueError):
    """An output holds records of problems whose question or reference answer has changed since."""


def check_held(held: list[dict], problems: list[Problem], *, force: bool, out, data) -> list[str]:
    """The ids of `problems` whose records in `held` (an output being resumed) were made from another question or
    reference answer: the data file was edited, or is another file with the same ids. Resuming would keep those
    records as they are (done), beside records of the problems as they are now; refused (ChangedProblems) unless
    `force`, which keeps them. A record names its question in "question" (or its user turn: SFT records of
    earlier versions, chat messages without the answer) and its reference answer in "answer"."""
    now = {p.id: p for p in problems}
    spellings = id_spellings(problems)
    changed = {}
    for record in held:
        problem = now.get(record_id(record, spellings))
        if problem is None:
            continue
        question = record.get("question")
        asked = question is None or question == problem.question
        if question is None and isinstance(record.get("messages"), list):
            user = next((m.get("content") for m in record["messages"]
                         if isinstance(m, dict) and m.get("role") == "user"), None)
            # A template without a system role gets the system prompt in the user turn (prompts.build_prompt).
            asked = not isinstance(user, str) or user == problem.question or user.endswith("\n\n" + problem.question)
        if not asked or ("answer" in record and not _same_answer(record["answer"], problem.answer)):
            changed[problem.id] = None
    if changed and not force:
        shown = ", ".join(list(changed)[:5]) + (f", and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise ChangedProblems(
            f"{data}: {len(changed)} problems differ (question or reference answer) from their records in {out}: "
            f"{shown}; resuming would keep those records, made from the problems as they were. Give another --out, "
            f"remove their records, or pass --force to keep them")
    return list(changed)


def id_spellings(problems: list[Problem]) -> dict[str, str]:
    """{an id as a held record may spell it: the problem's id}: each problem's id, and its float_id (the spelling an
    earlier version wrote for a numeric id read as a float: '1.0' for 1), unless that is another problem's id or the
    float_id of another problem too (two integers past 2**53 that are one float): then it is no problem's."""
    old: dict[str, str | None] = {}
    for p in problems:
        if p.float_id is not None:
            old[p.float_id] = p.id if p.float_id not in old else None
    spellings = {spelling: pid for spelling, pid in old.items() if pid is not None}
    spellings.update((p.id, p.id) for p in problems)
    return spellings


def record_id(record: dict, spellings: dict[str, str]) -> str:
    """The id of the problem a held record is of (id_spellings): its "id" as text, or the problem's id where the
    record spells it as an earlier version did."""
    held = str(record.get("id"))
    return spellings.get(held, held)


def _same_answer(held, now: str | None) -> bool:
    """Whether a record's reference answer is the problem's: the same text, or the float an earlier version
    spelled as Python prints it ('12.0', '1e+16') where it now writes _answer_text's spelling ('12',
    '10000000000000000'). Nothing else is compared as numbers: two long integers that are one float differ."""
    if held == now:
        return True
    if not isinstance(held, str) or now is None or not re.fullmatch(r"-?\d+(\.\d+)?(e[-+]\d+)?|-?inf", held) \
            or not re.search(r"[.e]", held):
        return False
    return _answer_text(float(held)) == now


def shard_problems(problems: list[Problem], rank: int, world_size: int) -> list[Problem]:
    """The problems rank `rank` of `world_size` takes: every world_size-th, starting at rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return problems[rank::world_size]


def champ_problems(limit: int | None = None, *, numeric_only: bool = False) -> list[Problem]:
    """Problems of the bundled champ-dataset (270 competition problems), read from the package's
    JSON file without importing it. numeric_only keeps the 79 whose answer is one number, which
    math-verify checks unambiguously."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of problems or None, got {limit}")
    problems = []
    for key, row in _champ_rows().items():
        # champ marks math spans with @@ ... @@; the plain text drops the markers
        answer = row["_raw_answer"].replace("@@", "").strip()
        if numeric_only and not re.fullmatch(r"-?\d+(\.\d+)?", answer):
            continue
        problems.append(Problem(row.get("identifier", key), row["_raw_text"].replace("@@", ""), answer))
    return problems[:limit] if limit is not None else problems


@functools.lru_cache(maxsize=1)
def _champ_rows() -> dict:
    spec = find_spec("champ_dataset")
    if spec is None:
        raise FileNotFoundError("champ problems need the champ-dataset package: `pip install champ-dataset`")
    files = [Path(p) / "dataset_files" / "v0.json" for p in spec.submodule_search_locations or []]
    files = [f for f in files if f.is_file()]
    if not files:
        raise FileNotFoundError("champ-dataset is installed but its dataset_files/v0.json is missing")
    return json.loads(files[0].read_text(encoding="utf-8"))["problems"]
