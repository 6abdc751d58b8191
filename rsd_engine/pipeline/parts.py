"""Rank parts of an output and their merge (records.py writes each file; this joins and reads across them).

Under torchrun every rank appends to its own part (out.rank00003-of-00004.jsonl). A run resumes from every file of
OUT (OUT itself and every part of any world size: held_elsewhere), so a reordered input or another number of ranks
never writes a record twice. merge_parts joins every part into a file beside OUT and renames it over OUT, so a merge
killed midway leaves OUT's records as they were and the parts untouched (its manifest says unfinished until the
merged records are in place); a set with a rank's part missing, parts of other settings
and copies of a record that differ are refused unless --force, and parts whose run was stopped are reported, as is
OUT where its own last run was (a merge's manifest says which of its marks are a run's: MERGED).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import (COMMAND, SettingsMismatch, check_settings, differences, other_command, read_manifest,
                       write_manifest)
from .records import (OutputBusy, RecordConflict, RecordWriter, _check_idle, _holder, _numbered_records, _part_world,
                      _repeated, _stem, _stopped, all_finite, first_record, part_files, part_path, read_records,
                      record_id_reader, record_key, same_record)

__all__ = ["MergeReport", "merge_parts", "find_parts", "held_elsewhere", "others_state", "recheck_elsewhere",
           "refuse_if_busy", "unmerged_parts", "note_unmerged", "describe_unfinished", "describe_forced_runs"]


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
    out_unfinished: bool = False  # OUT's own last run was stopped before its end too (its name first in unfinished)


MERGE_BLOCK = 4096  # records written (and fsynced) at once by merge_parts
# In a merged manifest, the "run_started" it was written with: its "finished" is then the merge's verdict on the files
# it joined, not how a run on OUT ended (a run on OUT since gave it another "run_started").
MERGED = "merged_marks"


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
        own = None if guard._created else _run_marks(out)  # (read before this merge writes OUT's manifest)
        unfinished = _unfinished(parts, (out, own) if own is not None else None)
        out_unfinished = out.name in unfinished
        finished = not unfinished and not missing
        if manifest is not None:
            # Until the merged records are renamed over OUT its manifest says unfinished: a merge killed in between
            # leaves OUT's old records beside it, which lack what the parts hold (the next merge weighs it again).
            manifest["finished"] = False
            if out_unfinished:  # stays OUT's stopped run's mark, for the next merge to weigh again
                manifest["run_started"] = own.get("run_started")
                manifest.pop(MERGED, None)
            else:
                manifest[MERGED] = manifest.get("run_started")
            write_manifest(out, manifest)
        records = {key: records[key] for key in _newest(records)}
        tmp = out.with_name(f".{out.name}.merging")
        tmp.unlink(missing_ok=True)  # left by a merge that was killed
        keys = sorted(records, key=_natural_key)
        with RecordWriter(tmp) as writer:  # a temporary file renamed at the end: an fsync a block, not a record
            for at in range(0, len(keys), MERGE_BLOCK):
                writer.write_many([records[key] for key in keys[at:at + MERGE_BLOCK]])
        os.replace(tmp, out)
        if manifest is not None and finished:
            manifest["finished"] = True
            write_manifest(out, manifest)
    # out is usually an earlier merge of these same parts: its copies of their ids are expected.
    return MergeReport(len(records), {**_repeated(keys_in["out"]), **_repeated(keys_in["parts"])}, forced,
                       forced_runs, conflicts, len(parts), unfinished, missing or [], out_unfinished)


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


def _unfinished(parts: list[Path], out: tuple[Path, dict] | None = None) -> list[str]:
    """The parts whose last run was stopped before its end, and OUT where its own was (`out`: its path and the marks
    of its last run, _run_marks), unless the runs of every rank of some world size started after it and reached
    theirs (between them they did every problem left, that file's too)."""
    marks = {path: read_manifest(path) or {} for path in parts}
    worlds = {}
    for path in parts:
        worlds.setdefault(_part_world(path) or 0, []).append(marks[path])
    done_sets = [min(m.get("run_started") or 0 for m in ms) for world, ms in worlds.items()
                 if world and len(ms) == world and all(m.get("finished") is True for m in ms)]
    if out is not None:
        marks = {out[0]: out[1], **marks}
    return [path.name for path in marks if _stopped(path, marks[path])
            and not any(start > (marks[path].get("run_started") or 0) for start in done_sets)]


def _run_marks(out: Path) -> dict | None:
    """OUT's manifest where its marks ("finished", "run_started") are those of the last run on OUT; None where it has
    no manifest, or where a merge wrote them (MERGED) and no run on OUT came since."""
    held = read_manifest(out)
    if held is None or (MERGED in held and held[MERGED] == held.get("run_started")):
        return None
    return held


def describe_forced_runs(report: MergeReport) -> str:
    """The note of a merge that joined records appended under --force with other settings (report.forced_runs)."""
    return ("note: records in the merged output were appended under --force with other settings (listed in its "
            "manifest): " + " | ".join(report.forced_runs))


def describe_unfinished(report: MergeReport) -> str:
    """The warning of a merge that joined files whose run was stopped before its end (report.unfinished)."""
    names = report.unfinished
    parts = names[1:] if report.out_unfinished else names
    said = [f"the run that last wrote {names[0]} was stopped before its end"] if report.out_unfinished else []
    if parts:
        said.append(f"the runs that wrote {len(parts)} of the parts were stopped before their end "
                    f"({', '.join(parts[:4])}{', ...' if len(parts) > 4 else ''})")
    they = "it" if report.out_unfinished and not parts else "they"
    return (f"warning: {'; '.join(said)}: the merged output lacks what {they} had still to do; rerun the command "
            f"(it resumes), then merge again")


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


def _natural_key(key: str):
    """The order of merged records: by id, '2' before '10' (digit runs compare as numbers), ids equal as
    numbers ('p01', 'p1') apart by their text, so each id's records stay together; then by the rest of the
    key (sample, response hash, version, index) the same way."""
    def natural(text):
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]

    rid, _, rest = key.partition("\0")
    return natural(rid), rid, natural(rest)
