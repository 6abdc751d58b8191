"""Resumable JSONL output: one complete record per line, durable after every record, one writer.

A kill -9 at any moment loses at most the records in flight: each record is one write of a
whole line, flushed and fsynced before the next. A torn last line (a write cut short) is
ignored by the reader and cut away by the next writer before it appends. The writer holds an
exclusive flock on the file for its whole life, so a second writer fails at once instead of
writing every id again; the kernel drops the lock when its holder dies, so a kill -9 leaves no
stale lock. Beside the file, OUT.manifest.json (manifest.py) holds the settings that made its
records, and a writer given other settings refuses to append. Under torchrun every rank writes
its own part (out.rank00003-of-00004.jsonl), which parts.merge_parts joins into OUT. A writer
that created OUT and leaves by an exception before its first record removes OUT and the manifest it
made: a run that failed (an option refused once the output was open) leaves no output begun.

Writers of other commands use the same small API: RecordWriter(path, settings, force=...) checks
and locks, .existing holds the records already there, .write(record) / .write_many(records)
append, .drop_last(n) cuts a torn group of records off the end.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import time
import warnings
from collections import Counter
from pathlib import Path

from .data import parse_json, special_file
from .manifest import COMMAND, SettingsMismatch, check_settings, manifest_path, read_manifest, write_manifest

__all__ = ["RecordWriter", "OutputBusy", "SettingsMismatch", "RecordConflict", "read_records", "first_record",
           "duplicate_ids", "done_ids", "part_path", "part_files", "all_finite", "same_record", "record_key"]


class OutputBusy(RuntimeError):
    """Another process holds the output's lock."""


class RecordConflict(ValueError):
    """Copies of one record (the same record_key) that say different things."""


class RecordWriter:
    """The one appender of `path`: locks it, repairs a torn tail, checks the settings manifest
    (when `settings` is given) and appends records.

    .existing: the complete records already in the file when it was opened.
    .forced: the setting differences accepted under `force` (empty when the settings match).
    """

    def __init__(self, path, settings: dict | None = None, *, force: bool = False, about: dict | None = None):
        self.path = Path(path)
        _refuse_special(self.path, fifo=True)  # every file a run appends to (OUT, a part, select's scores)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd, self._created = _open_locked(self.path)
        self._had_manifest = manifest_path(self.path).exists()  # (before check_settings writes one)
        self.written = 0
        self._changed = False  # records written or cut by this run
        try:
            _repair_tail(self.path)
            self.existing = read_records(self.path)
            self.forced = [] if settings is None else check_settings(
                self.path, settings, has_records=bool(self.existing), force=force, about=about)
            # A command's run: its manifest says whether the run reached its end ("finished"; False from here
            # until then). A run refused before it wrote anything leaves the mark as it was (__exit__).
            self._run = settings is not None
            held = (read_manifest(self.path) or {}) if self._run else {}
            self._was = {key: held.get(key) for key in ("finished", "run_started")}
            self._started = time.time()
            if self._run:
                _mark_finished(self.path, False, self._started)
        except BaseException as err:
            self._remove_if_unused(type(err))
            self.close()
            raise

    def write(self, record: dict) -> None:
        self.write_many([record])

    def write_many(self, records: list[dict]) -> None:
        """Several records with one fsync (a killed write can still leave only some of them)."""
        line = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self.written += len(records)
        self._changed = True

    def drop_last(self, count: int) -> None:
        """Cut the last `count` records off the file: a group of records that a kill cut short
        (`rsd provenance` writes a response's sentences as one group). A truncation, so a crash
        during it leaves either the old file or the shorter one."""
        if count <= 0:
            return
        data = self.path.read_bytes()
        cut = len(data) - 1
        for _ in range(count):
            cut = data.rfind(b"\n", 0, cut)
        os.ftruncate(self._fd, cut + 1)
        os.fsync(self._fd)
        self._changed = True
        self.existing = self.existing[:-count]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # and with it the lock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        """Leaving the block without an exception is the run's end: its manifest says "finished" (a part whose run
        was stopped says it did not, which `rsd merge` reports). A run on OUT itself (one process) has done the
        work of every part beside it too: their marks say so. A refusal (a ValueError, or another run found busy)
        before anything was written leaves the mark as it was, and one that failed before its first record leaves
        no file it created (_remove_if_unused)."""
        try:
            if exc_type is not None and self._remove_if_unused(exc_type):
                return
            if self._fd is not None and self._run:
                if exc_type is None:
                    _mark_finished(self.path, True, self._started)
                    if not _is_part(self.path):
                        _mark_idle_parts_finished(self.path, self._started)
                elif issubclass(exc_type, (ValueError, OutputBusy)) and not self._changed:
                    _mark_finished(self.path, self._was["finished"], self._was["run_started"])
        finally:
            self.close()

    def _remove_if_unused(self, exc_type) -> bool:
        """Remove OUT (and its manifest) where this writer created them and wrote nothing: a run that fails before its
        first record (an option the engine refuses, a model that does not load) leaves no empty output behind that
        reads as one begun. Under the lock, the manifest first: no other run can have made either yet. A rank's part
        whose run was interrupted (Ctrl-C) stays, empty, as a killed rank's does: `rsd merge` joins whole sets of
        parts, and a run begun with valid settings was one of them."""
        if self._fd is None or not self._created or self._changed:
            return False
        if _is_part(self.path) and issubclass(exc_type, KeyboardInterrupt):
            return False
        try:
            held = os.fstat(self._fd)
            if held.st_size or not os.path.samestat(held, os.stat(self.path)):
                return False
            if not self._had_manifest:
                manifest_path(self.path).unlink(missing_ok=True)
            self.path.unlink()
        except OSError:
            return False
        return True


def _mark_finished(path: Path, finished: bool | None, started: float | None) -> None:
    """Set the manifest's marks of the last run (None: remove): whether it reached its end, and when it started."""
    manifest = read_manifest(path)
    if manifest is None:
        return
    marks = {"finished": finished, "run_started": started}
    if all(manifest.get(key) == value for key, value in marks.items()):
        return
    for key, value in marks.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    write_manifest(path, manifest)


def _part_world(path: Path) -> int | None:
    """The world size of the run that writes a part file (None for a file that is no part)."""
    match = re.search(r"\.rank\d{5}-of-(\d{5})\.[^.]+$", Path(path).name)
    return int(match[1]) if match else None


def _is_part(path: Path) -> bool:
    return _part_world(path) is not None


def _mark_idle_parts_finished(out: Path, started: float) -> None:
    """A run on OUT that reached its end did what every part's earlier run had left: marked finished."""
    for part in part_files(out).values():
        held = read_manifest(part) or {}
        if not held or not _stopped(part, held) or (held.get("run_started") or 0) > started:
            continue
        try:
            _check_idle(part)
        except (OutputBusy, OSError):
            continue  # a rank still writing it says so itself when it ends
        _mark_finished(part, True, held.get("run_started"))


def _stopped(part: Path, manifest: dict) -> bool:
    """Whether a part's last run was stopped before its end: its manifest says so, or it holds no record and no end
    mark (Ctrl-C between making the part and marking its run begun: its problems are still to do)."""
    finished = manifest.get("finished")
    return finished is False or (finished is not True and first_record(part) is None)


def _open_locked(path: Path) -> tuple[int, bool]:
    """(fd, whether this call created the file): `path` opened for appending (created if missing) under an
    exclusive flock; fails at once when another process holds it."""
    while True:
        fd, created = _open_or_create(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusy(f"{path} is being written by another process{_holder(path)}; wait for it to "
                             f"finish, or give another --out") from None
        except OSError as err:  # a filesystem without locks (some network mounts): say so, go on
            warnings.warn(f"cannot lock {path} ({err.strerror or err}); make sure no other run writes to it",
                          stacklevel=3)
            return fd, created
        # Between open and lock the previous holder may have replaced (rsd merge) or removed the
        # file: the lock is only worth anything on the file the path names now.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)


def _open_or_create(path: Path) -> tuple[int, bool]:
    """(fd, created): O_EXCL tells whether this process made the file (a link to a missing file is created through,
    and counts as not made here: never removed here)."""
    flags = os.O_WRONLY | os.O_APPEND
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        return os.open(path, flags | os.O_CREAT, 0o644), False


def _holder(path: Path) -> str:
    """' (pid N)' for the process holding the flock on `path`, from /proc/locks where it exists."""
    try:
        st = os.stat(path)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and key in fields:
                    return f" (pid {fields[fields.index(key) - 1]})"
    except OSError:
        pass
    return ""


def _repair_tail(path: Path) -> None:
    """Make the file end at a line boundary: drop a torn last line, or end a complete one."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        if not tail:
            return
        if _parse_record(tail) is not None:
            f.write(b"\n")  # a whole record that only lacks its newline
        else:
            f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


def _parse_record(raw: bytes) -> dict | None:
    try:  # (after a byte order mark, an editor's save, as --data is read)
        record = parse_json(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def first_record(path) -> dict | None:
    """The first complete record of `path` as read_records reads it (None for no record), reading no further: a
    format check of a large output need not parse it all."""
    return next(_records(path), None)


def read_records(path) -> list[dict]:
    """All complete records of `path` (none if it does not exist); a torn last line is ignored,
    a bad line elsewhere is an error."""
    return list(_records(path))


def _records(path):
    return (record for _, record in _numbered_records(path))


def _numbered_records(path):
    """(line number, record) of each complete record of `path`, as read_records reads them."""
    path = Path(path)
    if not path.exists():
        return
    _refuse_special(path, fifo=False)  # a pipe given as input is read to its end; a device never ends
    with open(path, "rb") as f:  # line by line: the file is never held whole beside its records
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            record = _parse_record(raw)
            if record is None:
                if not raw.endswith(b"\n"):
                    return  # torn last line: the record in flight when a run was killed
                raise ValueError(f"{path}, line {number}: not a JSON object; the file was changed by something else")
            yield number, record


def done_ids(*paths) -> set[str]:
    """Ids of the records already written to any of `paths` (for resuming)."""
    return {str(r["id"]) for path in paths for r in read_records(path) if "id" in r}


def duplicate_ids(records) -> dict[str, int]:
    """{key: number of records} for every record key (record_key: the id, with its sample and index
    where records have them) held by more than one record."""
    return _repeated(record_key(r) for r in records if isinstance(r, dict) and "id" in r)


def _repeated(keys) -> dict[str, int]:
    counts = Counter(keys)
    return {key: n for key, n in counts.items() if n > 1}


def describe_duplicates(duplicates: dict[str, int], limit: int = 5) -> str:
    """'3 ids occur more than once (a ×2, b ×3, c ×2)'."""
    shown = ", ".join(f"{key.replace(chr(0), '/')} ×{n}" for key, n in list(duplicates.items())[:limit])
    more = f", and {len(duplicates) - limit} more" if len(duplicates) > limit else ""
    return f"{len(duplicates)} ids occur more than once ({shown}{more})"


def part_path(out, rank: int, world_size: int) -> Path:
    """out.jsonl -> out.rank00003-of-00004.jsonl: the part rank `rank` writes."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    out = Path(out)
    return out.with_name(f"{_stem(out)}.rank{rank:05d}-of-{world_size:05d}{out.suffix}")


def _stem(out: Path) -> str:
    return out.name[: -len(out.suffix)] if out.suffix else out.name


def part_files(out) -> dict[tuple[int, int], Path]:
    """{(rank, world size): path} of every part file of `out` beside it, whatever the world size of the run that
    wrote it."""
    out = Path(out)
    pattern = re.compile(re.escape(_stem(out)) + r"\.rank(\d{5})-of-(\d{5})" + re.escape(out.suffix) + "$")
    found = {}
    if out.parent.is_dir():
        for path in out.parent.iterdir():  # not a glob: OUT's name may hold glob characters ("traces[v2]")
            match = pattern.match(path.name)
            if match:
                found[(int(match[1]), int(match[2]))] = path
    return found


def all_finite(value) -> bool:
    """Whether every number in a record is finite (older versions wrote NaN for non-finite log-probs)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(map(all_finite, value.values()))
    if isinstance(value, list):
        return all(map(all_finite, value))
    return True


def same_record(a, b) -> bool:
    """Whether two copies of a record say the same: equal, but for floats equal to rounding (a record's stats
    are means over float32 log-probs, whose last bits follow the batch it was decoded in)."""
    if isinstance(a, float) or isinstance(b, float):
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
        if not numbers:
            return False
        return a == b or (a != a and b != b) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_record(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same_record, a, b))
    return type(a) is type(b) and a == b


def _check_idle(part: Path) -> None:
    fd = os.open(part, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputBusy(f"{part} is still being written{_holder(part)}; merge once every rank is done") from None
    finally:
        os.close(fd)


def record_key(record: dict, problem_id: str | None = None) -> str:
    """What identifies a record: its id (`problem_id` where given: record_id_reader), then its sample (`rsd eval`:
    several generations per id), the hash of its response's text, the hash of what it was read after (`rsd select
    --budget`'s scores lines: a score of a response under its old and its edited question are two records), its
    version and its index (`rsd provenance`: several versions of a response, several sentences each), when it has
    them."""
    key = str(record.get("id")) if problem_id is None else problem_id
    for name in ("sample", "response_hash", "context_hash", "version", "index"):
        if name in record:
            key += f"\0{record[name]}"
    return key


def record_id_reader(settings: dict | None):
    """record -> the id of its problem (None: its own "id" says it), for the records of an output made with
    `settings` (its manifest's). Every command writes the problem's id as a record's "id" but `rsd select`, whose
    kept rows are the input rows plus a few fields: a row keeps the "id" it has (the problem id is added only where
    it has none), and where --id-field names another column that "id" is the user's, such as a source name
    ("gsm8k") shared by many problems. A kept row is known by the problem id its run read it by, as a rerun reads
    it (select.kept_id: by the --id-field, question, response and system prompt its settings name); a line that
    reads as no response (a --budget scores line: its "id" is the problem id) by its own "id"."""
    if not isinstance(settings, dict) or settings.get(COMMAND) != "select":
        return lambda record: None
    from .prompts import DEFAULT_SYSTEM_PROMPT
    from .responses import row_id

    fields = {"id_field": settings.get("--id-field", "id"),
              "question_field": settings.get("--question-field", "question"),
              "response_field": settings.get("--response-field", "response"),
              "system_prompt": settings.get("--system-prompt", DEFAULT_SYSTEM_PROMPT)}
    if not all(isinstance(value, str) for value in fields.values()):
        return lambda record: None
    return lambda record: row_id(record, **fields)


def _refuse_special(path: Path, *, fifo: bool) -> None:
    """Refuse `path` where it is a device or a socket (read back, /dev/zero or /dev/full never ends), or, with
    `fifo`, a FIFO (an output is appended to and read back: a pipe with no writer blocks the run)."""
    kind = special_file(path)
    if kind and (fifo or not kind.startswith("a FIFO")):
        raise ValueError(f"{path} is {kind}, not a regular file: rsd reads its records back; give a file name")
