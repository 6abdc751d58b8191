"""Resumable JSONL output: one complete record per line, durable after every record, one writer.

A kill -9 at any moment loses at most the records in flight: each record is one write of a
whole line, flushed and fsynced before the next. A torn last line (a write cut short) is
ignored by the reader and cut away by the next writer before it appends. The writer holds an
exclusive flock on the file for its whole life, so a second writer fails at once instead of
writing every id again; the kernel drops the lock when its holder dies, so a kill -9 leaves no
stale lock. Beside the file, OUT.manifest.json (manifest.py) holds the settings that made its
records, and a writer given other settings refuses to append. Under torchrun every rank writes
its own part (out.rank00003-of-00004.jsonl); merge_parts joins them into a file beside OUT and
renames it over OUT, so a merge killed midway leaves OUT as it was and the parts untouched. A writer
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
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .data import parse_json, special_file
from .manifest import (COMMAND, SettingsMismatch, check_settings, differences, manifest_path, other_command,
                       read_manifest, write_manifest)

__all__ = ["RecordWriter", "OutputBusy", "SettingsMismatch", "read_records", "duplicate_ids", "done_ids",
           "merge_parts", "part_path", "part_files", "find_parts", "held_elsewhere", "others_state",
           "recheck_elsewhere", "refuse_if_busy", "check_writable",
           "RecordConflict", "all_finite"]


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
    try:
        record = parse_json(raw.decode("utf-8"))
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


def find_parts(out, *, missing: list[str] | None = None) -> list[Path]:
    """The part files of `out`, by world size and rank: every set a run left (a run resumed with another
    number of ranks leaves a second set beside the first), each one complete; an error otherwise. Given a list as
    `missing` (rsd merge --force), a set without some ranks is taken as it is and the missing parts' names are
    appended to that list."""
    out = Path(out)
    found = part_files(out)
    if not found:
        raise FileNotFoundError(f"no part files {_stem(out)}.rank*-of-*{out.suffix} beside {out}")
    parts = []
    for world in sorted({world for _, world in found}):
        absent = [rank for rank in range(world) if (rank, world) not in found]
        if absent and missing is None:
            raise FileNotFoundError(
                f"parts of {out} for ranks {absent} of {world} are missing (on another host's disk? a rank that never "
                f"started?): bring them here, or run those ranks again (RANK=r WORLD_SIZE={world}: each resumes and "
                f"leaves its part), or run `rsd merge --force {out}` to merge the parts there are")
        if absent:
            missing += [part_path(out, rank, world).name for rank in absent]
        parts += [found[(rank, world)] for rank in range(world) if (rank, world) in found]
    return parts


def held_elsewhere(out, target, settings: dict, *, force: bool) -> dict[Path, list[dict]]:
    """{path: its records} of OUT's files other than `target`, the file this process appends to: OUT itself
    (an earlier merge) where `target` is a part, and every part of OUT but `target`, of any world size (another
    rank's, or those of a run with another number of ranks, merged or not). A record in any of them is done:
    resuming from `target` alone would write it again (a reordered input moves rows between ranks). Each file
    that holds records must have been made with `settings` (SettingsMismatch otherwise, unless `force`)."""
    out, target = Path(out), Path(target)
    parts = part_files(out)
    paths = ([out] if target != out else []) + [path for _, path in sorted(parts.items(), key=lambda item: item[0][::-1])]
    held = {}
    for path in paths:
        if path == target:
            continue
        if target == out or _part_world(path) != _part_world(target):  # a sibling rank writes its own part
            refuse_if_busy(path)
        records = read_records(path)
        if records:
            check_settings(path, settings, has_records=True, force=force, write=False)
            held[path] = records
    return held


def others_state(out, target) -> dict[Path, tuple[int, int, int]]:
    """(inode, size, mtime) of each of OUT's files that `held_elsewhere` reads: taken before it reads them, it tells
    `recheck_elsewhere` whether another run wrote them since."""
    out, target = Path(out), Path(target)
    state = {}
    for path in ([out] if target != out else []) + list(part_files(out).values()):
        if path != target:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            state[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return state


def recheck_elsewhere(out, target, settings: dict, *, force: bool, held: dict[Path, list[dict]],
                      state: dict) -> dict[Path, list[dict]]:
    """`held_elsewhere` again, once this process holds `target`'s lock: two runs started at once could both pass its
    busy check before either locked, and a run that ended in between wrote records that `held` lacks. Refuses while
    another run writes another file of OUT; reads them again only if they changed since `state` (others_state)."""
    if others_state(out, target) == state:
        for path in state:
            if Path(target) == Path(out) or _part_world(path) != _part_world(target):
                refuse_if_busy(path)
        return held
    return held_elsewhere(out, target, settings, force=force)


def refuse_if_busy(path: Path) -> None:
    """Another run writing another file of this output (a run on one process and a run of ranks at once, or runs
    of two numbers of ranks) would do the same problems twice: one run at a time."""
    try:
        _check_idle(path)
    except FileNotFoundError:
        return  # no such file (yet): nobody writes it
    except OutputBusy:
        raise OutputBusy(f"{path} is being written by another run{_holder(path)}: one run at a time on an output and "
                         f"its parts; wait for it to end, or give another --out") from None


def unmerged_parts(out, elsewhere: dict[Path, list[dict]]) -> dict[Path, list[dict]]:
    """Of `held_elsewhere`'s files, the parts holding a record OUT lacks (`rsd merge` leaves the parts it joined)."""
    parts = {path: records for path, records in elsewhere.items() if path != Path(out)}
    if parts:
        merged = {json.dumps(r, sort_keys=True) for r in read_records(out)}
        parts = {path: records for path, records in parts.items()
                 if any(json.dumps(r, sort_keys=True) not in merged for r in records)}
    return parts


def note_unmerged(out, elsewhere: dict[Path, list[dict]], log) -> None:
    """After a run of one process: say where the records resumed from part files are (`held_elsewhere`), which
    OUT lacks until they are merged (none once `rsd merge` has joined them: the parts stay beside OUT)."""
    parts = [path.name for path in unmerged_parts(out, elsewhere)]
    if parts:
        shown = ", ".join(parts[:3]) + (f", and {len(parts) - 3} more" if len(parts) > 3 else "")
        log(f"note: records of this output are also in its part files ({shown}), done and not written again; "
            f"rsd merge {out} joins them into it")


@dataclass
class MergeReport:
    records: int
    duplicates: dict = field(default_factory=dict)  # {id: copies seen}; the first copy is kept
    forced: list = field(default_factory=list)  # setting differences between the parts, merged under force
    forced_runs: list = field(default_factory=list)  # runs that appended to a part (or out) under --force
    conflicts: dict = field(default_factory=dict)  # {key: files whose copies differ}, merged under force
    parts: int = 0  # part files read
    unfinished: list = field(default_factory=list)  # parts whose run was stopped before its end (their manifests)
    missing: list = field(default_factory=list)  # parts of a set that were not there (merged without, under force)


MERGE_BLOCK = 4096  # records written (and fsynced) at once by merge_parts


def merge_parts(out, *, force: bool = False) -> MergeReport:
    """Join all parts of `out` (every set of them, and `out` itself, if it exists) into `out`, in id order,
    each record once (record_key; a kept row of `rsd select` by its problem id: record_id_reader): the first copy
    seen (out, then the parts by world size and rank), but a copy whose numbers are all finite over one holding a
    NaN or inf; duplicates are reported.
    Refuses parts still being written and lines that are no record (no id: _check_identified), and, unless
    `force`, parts made with other settings and copies of a record that differ (beyond float rounding: a file
    edited, or records of another run). The parts are left in place."""
    out = Path(out)
    missing = [] if force else None
    parts = find_parts(out, missing=missing)
    for part in parts:
        _check_idle(part)
    with RecordWriter(out) as guard:  # holds out's lock while it is rebuilt
        sources = ([out] if guard.existing else []) + parts
        # A part without a record (a rank stopped before its first, or killed in writing it) counts only for its set
        # being whole: the settings it was begun with are no records' (a later run's must not be refused for them).
        forced, forced_runs, manifest = _merged_manifest(
            out, [p for p in sources if p == out or first_record(p) is not None] or sources, force)
        command = ((manifest or {}).get("settings") or {}).get(COMMAND)
        records, seen_in, keys_in, conflicts = {}, {}, {"out": [], "parts": []}, {}
        for path in sources:
            # Each file's records are known as the run that made them knew its problems (its manifest's settings;
            # the merged manifest's for a file without one).
            problem_id = record_id_reader(((read_manifest(path) or manifest or {}).get("settings")))
            for number, record in _numbered_records(path):  # numbered to name a bad line (OUT's: guard.existing)
                pid = problem_id(record)
                _check_identified(record, path, number, command, pid)
                key = record_key(record, pid)
                keys_in["out" if path == out else "parts"].append(key)
                first = records.setdefault(key, record)
                seen_in.setdefault(key, path)
                if first is record or same_record(first, record):
                    continue
                if all_finite(record) and not all_finite(first):  # a NaN an older rsd wrote, computed again since
                    records[key], seen_in[key] = record, path
                elif all_finite(first) == all_finite(record):
                    conflicts.setdefault(key, [seen_in[key].name]).append(path.name)
        if conflicts and not force:
            shown = "; ".join(f"{key.replace(chr(0), '/')}: {' vs '.join(dict.fromkeys(files))}"
                              for key, files in list(conflicts.items())[:5])
            more = f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
            raise RecordConflict(
                f"{len(conflicts)} records of {out} have copies that differ ({shown}{more}): a file was edited, or "
                f"holds another run's records; keep the right files only, or pass --force to keep the first copy "
                f"of each ({out.name}, then the parts by world size and rank)")
        unfinished = _unfinished(parts)
        if manifest is not None:
            manifest["finished"] = not unfinished and not missing
            write_manifest(out, manifest)
        records = {key: records[key] for key in _newest(records)}
        tmp = out.with_name(f".{out.name}.merging")
        tmp.unlink(missing_ok=True)  # left by a merge that was killed
        keys = sorted(records, key=_natural_key)
        with RecordWriter(tmp) as writer:  # a temporary file renamed at the end: an fsync a block, not a record
            for at in range(0, len(keys), MERGE_BLOCK):
                writer.write_many([records[key] for key in keys[at:at + MERGE_BLOCK]])
        os.replace(tmp, out)
    # out is usually an earlier merge of these same parts: its copies of their ids are expected.
    return MergeReport(len(records), {**_repeated(keys_in["out"]), **_repeated(keys_in["parts"])}, forced,
                       forced_runs, conflicts, len(parts), unfinished, missing or [])


def _check_identified(record: dict, path: Path, number: int, command: str | None,
                      problem_id: str | None = None) -> None:
    """A record is identified by its id (record_key): a line without one (`{"x": 1}`, pasted in or left by another
    tool) would be carried into the merged file as if it were a record, and every such line folded into one.
    Refused before anything is written, --force or not. A kept row of `rsd select` is identified by its problem id
    (record_id_reader), whatever its own "id" holds (the input row's, as {"source": "gsm8k"}); it always has one."""
    rid = record.get("id")
    if problem_id is not None and rid is not None:
        return
    if isinstance(rid, bool) or not isinstance(rid, (str, int, float)):
        whose = f"rsd {command}" if command else "this output"
        raise ValueError(f"{path}, line {number}: not a record of {whose} (no string or number 'id', which identifies "
                         f"every record); remove or move that line, then merge again (nothing was changed)")


def _unfinished(parts: list[Path]) -> list[str]:
    """The parts whose last run was stopped before its end, unless the runs of every rank of some world size
    started after it and reached theirs (between them they did every problem left, that part's too)."""
    marks = {path: read_manifest(path) or {} for path in parts}
    worlds = {}
    for path in parts:
        worlds.setdefault(_part_world(path) or 0, []).append(marks[path])
    done_sets = [min(m.get("run_started") or 0 for m in ms) for world, ms in worlds.items()
                 if world and len(ms) == world and all(m.get("finished") is True for m in ms)]
    return [path.name for path in parts if _stopped(path, marks[path])
            and not any(start > (marks[path].get("run_started") or 0) for start in done_sets)]


def describe_unfinished(parts: list[str]) -> str:
    return (f"warning: the runs that wrote {len(parts)} of the parts were stopped before their end ({', '.join(parts[:4])}"
            f"{', ...' if len(parts) > 4 else ''}): the merged output lacks what they had still to do; rerun the "
            f"command (it resumes), then merge again")


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


def _merged_manifest(out: Path, sources: list[Path], force: bool) -> tuple[list[str], list[str], dict | None]:
    """Out's manifest from its sources' (all must agree, unless `force`): (the differences found, the runs that
    appended to a source under --force, which the merged manifest keeps listing, the manifest to write)."""
    manifests = [(path, read_manifest(path)) for path in sources]
    known = [(path, m) for path, m in manifests if m is not None]
    if not known:
        return [], [], None
    first_path, first = known[0]
    for path, m in known[1:]:
        if other_command(m["settings"], first["settings"]):
            raise SettingsMismatch(f"{path.name} holds records of rsd {m['settings'][COMMAND]}, {first_path.name} "
                                   f"of rsd {first['settings'][COMMAND]}: not parts of one output (never merged, "
                                   f"--force or not)")
    found = [f"{path.name}: no manifest" for path, m in manifests if m is None]
    for path, m in known[1:]:
        found += [f"{path.name} vs {first_path.name}: {line}"
                  for line in differences(first["settings"], m["settings"], first.get("about"))]
    if found and not force:
        raise SettingsMismatch(f"the parts of {out} were made with different settings:\n  " + "\n  ".join(found) +
                               "\nmerge only parts of one run, or pass --force to merge anyway")
    merged = dict(first)
    # Every source's own forced runs (records a part appended under other settings) stay on record.
    history = list({json.dumps(entry, sort_keys=True): entry
                    for _, m in known for entry in m.get("forced", [])}.values())
    if found:
        history.append({"merged": True, "differences": found})
    merged["forced"] = history
    earlier = {}  # each forced run once, named by the first source that lists it
    for path, m in known:
        for entry in m.get("forced", []):
            if not entry.get("merged"):
                earlier.setdefault(json.dumps(entry, sort_keys=True),
                                   f"{path.name}: {'; '.join(entry.get('differences', []))}")
    return found, list(earlier.values()), merged


def _newest(records: dict[str, dict]) -> list[str]:
    """The keys of `records` less those of a response's older versions (`rsd provenance` sentence lines of a
    text since changed: the newest has the highest "version", absent for the first; of equal numbers the last
    seen). The newest *complete* version wins (every one of its "sentences" lines present): a rank killed while
    it traced a changed text leaves a torn newer version, which must not replace the whole one before it.
    Other records with a text hash (`rsd select`'s scores lines) are all kept: a reader matches the hashes."""
    def traced(r):
        return "response_hash" in r and "index" in r

    lines: dict[tuple, dict[tuple, set]] = {}
    for record in records.values():
        if traced(record):
            response = (str(record.get("id")), record.get("sample"))
            version = (record.get("version", 1), record["response_hash"])
            lines.setdefault(response, {}).setdefault(version, set()).add(record.get("index"))
    sizes = {(str(r.get("id")), r.get("sample"), r.get("version", 1), r["response_hash"]): r.get("sentences")
             for r in records.values() if traced(r)}
    newest = {}
    for response, versions in lines.items():
        whole = [v for v, indices in versions.items()
                 if not isinstance(sizes[(*response, *v)], int) or len(indices) >= sizes[(*response, *v)]]
        best = None
        for v in whole or versions:  # in the order seen: of equal numbers, the last
            if best is None or v[0] >= best[0]:
                best = v
        newest[response] = best
    return [key for key, r in records.items() if not traced(r) or
            newest[(str(r.get("id")), r.get("sample"))] == (r.get("version", 1), r["response_hash"])]


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


def _natural_key(key: str):
    """The order of merged records: by id, '2' before '10' (digit runs compare as numbers), ids equal as
    numbers ('p01', 'p1') apart by their text, so each id's records stay together; then by the rest of the
    key (sample, response hash, version, index) the same way."""
    def natural(text):
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]

    rid, _, rest = key.partition("\0")
    return natural(rid), rid, natural(rest)


def check_output_name(path) -> Path:
    """An output of JSON lines is named *.jsonl: the readers of every command (score, provenance, select)
    know a file's format by its suffix."""
    if not str(path).strip():
        raise ValueError("--out is empty: give the output's file name, such as traces.jsonl")
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"--out {path}: the output is JSON lines, one record each; name it *.jsonl (e.g. "
                         f"{path.with_suffix('.jsonl').name}), the suffix the commands that read it expect")
    return path


def check_not_input(inputs: dict, outputs: dict, apart: tuple[str, str] | None = None) -> None:
    """No output of a command is one of its inputs (flag -> path, or a list of paths; None: not given): records
    appended to the data file they are made from, or a report renamed over it, mix or lose the data. `apart`: two
    output flags (--out, --plot) that must name two files."""
    for out_flag, out in outputs.items():
        for in_flag, sources in inputs.items():
            for source in sources if isinstance(sources, (list, tuple)) else [sources]:
                if out is not None and source is not None and _same_file(out, source):
                    raise ValueError(f"{out_flag} {out} is also {in_flag}: the output would be written into the file "
                                     f"it reads; give {out_flag} another name")
    if apart is not None:
        a, b = (outputs.get(flag) for flag in apart)
        if a is not None and b is not None and _same_file(a, b):
            raise ValueError(f"{apart[0]} and {apart[1]} are the same file ({a}); give each its own name")


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)  # links and other spellings of one file
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def plot_path(plot) -> Path | None:
    """The file a --plot option writes: matplotlib adds ".png" to a name without an extension (so that is the
    file to check and to name back)."""
    if not plot:
        return None
    path = Path(plot)
    return path.with_name(path.name + ".png") if not path.suffix else path


def check_plot_format(path) -> None:
    """Before any work: an extension matplotlib cannot write is an error naming --plot (it failed after all the
    models' work, in matplotlib's words)."""
    if path is None:
        return
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix
    if suffix[1:].lower() not in formats:
        raise ValueError(f"--plot {path}: matplotlib writes {', '.join('.' + f for f in sorted(formats))} files, "
                         f"not {suffix}; give one of these extensions")
    if suffix and suffix.lower() not in (".png", ".pdf", ".svg"):
        # Only these carry the title by which a rerun knows its own plot (reports.py): a .jpg was written once and
        # then refused by every rerun, a resume of rsd provenance included.
        raise ValueError(f"--plot {path}: rsd writes .png, .pdf or .svg plots (they carry the title a rerun knows "
                         f"its own plot by), not {suffix}")


def _refuse_special(path: Path, *, fifo: bool) -> None:
    """Refuse `path` where it is a device or a socket (read back, /dev/zero or /dev/full never ends), or, with
    `fifo`, a FIFO (an output is appended to and read back: a pipe with no writer blocks the run)."""
    kind = special_file(path)
    if kind and (fifo or not kind.startswith("a FIFO")):
        raise ValueError(f"{path} is {kind}, not a regular file: rsd reads its records back; give a file name")


def check_writable(path) -> Path:
    """Fail before any generation if `path` cannot be written; creates missing parent folders
    but leaves no file behind. An existing path that is no regular file (a device such as /dev/full, a FIFO) is
    refused: an output is read back (to resume it, or to know it for this command's own), and a device reads without
    end."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output path {path} is a directory; give a file name such as {path / 'traces.jsonl'}")
    if kind := special_file(path):
        raise ValueError(f"output path {path} is {kind}, not a regular file: rsd reads an existing output back (to "
                         f"resume it, or to know it for its own) before writing it; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "ab"):  # never created here, so never removed here
                pass
        else:
            # A file of our own beside it, not `path`: creating `path` and removing it again would remove the
            # output of a run that created and locked it in between (that run's records then went nowhere).
            fd, probe = tempfile.mkstemp(prefix=".rsd", dir=path.parent)  # short: any legal name of path fits
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"output path {path} is not writable: {exc.strerror or exc}") from None
    return path
