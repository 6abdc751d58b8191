"""Resumable JSONL output: one complete record per line, durable after every record.

A kill -9 at any moment loses at most the records in flight: each record is one write of a
whole line, flushed and fsynced before the next. A torn last line (a write cut short) is
ignored by the reader and cut away by the next writer before it appends. Under torchrun every
rank writes its own part (out.rank00003-of-00004.jsonl); merge_parts joins them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path


class RecordWriter:
    """Append records (JSON objects) to `path`, repairing a torn tail first."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        self.write_many([record])

    def write_many(self, records: list[dict]) -> None:
        """Several records with one fsync (a killed write can still leave only some of them)."""
        line = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def read_records(path) -> list[dict]:
    """All complete records of `path` (none if it does not exist); a torn last line is ignored,
    a bad line elsewhere is an error."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        record = _parse_record(raw)
        if record is None:
            if number == len(lines):
                break  # torn last line: the record in flight when a run was killed
            raise ValueError(f"{path}, line {number}: not a JSON object; the file was changed by something else")
        records.append(record)
    return records


def done_ids(*paths) -> set[str]:
    """Ids of the records already written to any of `paths` (for resuming)."""
    return {str(r["id"]) for path in paths for r in read_records(path) if "id" in r}


def part_path(out, rank: int, world_size: int) -> Path:
    """out.jsonl -> out.rank00003-of-00004.jsonl: the part rank `rank` writes."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    out = Path(out)
    return out.with_name(f"{_stem(out)}.rank{rank:05d}-of-{world_size:05d}{out.suffix}")


def _stem(out: Path) -> str:
    return out.name[: -len(out.suffix)] if out.suffix else out.name


def find_parts(out) -> list[Path]:
    """The part files of `out`, by rank; an error when they are not one complete set."""
    out = Path(out)
    pattern = re.compile(re.escape(_stem(out)) + r"\.rank(\d{5})-of-(\d{5})" + re.escape(out.suffix) + "$")
    found = {}
    for path in out.parent.glob(f"{_stem(out)}.rank*-of-*{out.suffix}"):
        match = pattern.match(path.name)
        if match:
            found[(int(match[1]), int(match[2]))] = path
    if not found:
        raise FileNotFoundError(f"no part files {_stem(out)}.rank*-of-*{out.suffix} beside {out}")
    sizes = {world for _, world in found}
    if len(sizes) > 1:
        raise ValueError(f"parts of {out} come from runs with different world sizes {sorted(sizes)}; merge one set")
    world = sizes.pop()
    missing = [rank for rank in range(world) if (rank, world) not in found]
    if missing:
        raise FileNotFoundError(f"parts of {out} for ranks {missing} of {world} are missing")
    return [found[(rank, world)] for rank in range(world)]


def merge_parts(out) -> int:
    """Join all parts of `out` (and `out` itself, if it exists) into `out`, in key order, each key
    once (see record_key); returns the number of records. The parts are left in place."""
    out = Path(out)
    records = {}
    for path in [out, *find_parts(out)]:
        for record in read_records(path):
            records.setdefault(record_key(record), record)
    tmp = out.with_name(f".{out.name}.merging")
    tmp.unlink(missing_ok=True)  # left by a merge that was killed
    with RecordWriter(tmp) as writer:
        for key in sorted(records, key=_natural_key):
            writer.write(records[key])
    os.replace(tmp, out)
    return len(records)


def record_key(record: dict) -> str:
    """What identifies a record: its id, then its sample (`rsd eval`: several generations per id)
    and its index (`rsd provenance`: several sentences per response), when it has them."""
    key = str(record.get("id"))
    for name in ("sample", "index"):
        if name in record:
            key += f"\0{record[name]}"
    return key


def _natural_key(text: str):
    """'2' before '10': digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def check_writable(path) -> Path:
    """Fail before any generation if `path` cannot be written; creates missing parent folders
    but leaves no file behind."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output path {path} is a directory; give a file name such as {path / 'traces.jsonl'}")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise PermissionError(f"output path {path} is not writable: {exc.strerror or exc}") from None
    if not existed:
        path.unlink()
    return path
