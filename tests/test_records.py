"""Resumable JSONL output: torn tails, kill -9 at random moments, shard parts and merging."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsd_engine.cli import main
from rsd_engine.pipeline.manifest import manifest_path, read_manifest
from rsd_engine.pipeline.records import (OutputBusy, RecordConflict, RecordWriter, SettingsMismatch, all_finite,
                                         done_ids, part_path, read_records, same_record)
from rsd_engine.pipeline.parts import find_parts, held_elsewhere, merge_parts, others_state, recheck_elsewhere
from rsd_engine.pipeline.output_paths import check_writable

REPO = Path(__file__).resolve().parents[1]


def test_round_trip_keeps_unicode_and_order(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    records = [{"id": str(i), "text": f"réponse \\boxed{{{i}}} ✓", "tokens": list(range(i))} for i in range(5)]
    with RecordWriter(out) as writer:
        for record in records:
            writer.write(record)
    assert read_records(out) == records
    assert out.read_text(encoding="utf-8").count("\n") == 5
    assert done_ids(out, tmp_path / "missing.jsonl") == {"0", "1", "2", "3", "4"}


def test_torn_last_line_is_ignored_then_cut_away(tmp_path):
    out = tmp_path / "out.jsonl"
    with RecordWriter(out) as writer:
        writer.write({"id": "a"})
        writer.write({"id": "b"})
    with open(out, "ab") as f:
        f.write(b'{"id": "c", "text": "cut sh')
    assert [r["id"] for r in read_records(out)] == ["a", "b"]
    with RecordWriter(out) as writer:
        writer.write({"id": "c", "text": "whole"})
    assert read_records(out) == [{"id": "a"}, {"id": "b"}, {"id": "c", "text": "whole"}]


def test_complete_record_without_newline_is_kept(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a"}\n{"id": "b"}')
    assert [r["id"] for r in read_records(out)] == ["a", "b"]
    with RecordWriter(out) as writer:
        writer.write({"id": "c"})
    assert [r["id"] for r in read_records(out)] == ["a", "b", "c"]


def test_a_byte_order_mark_is_read_past(tmp_path):
    """A file saved by an editor that adds a byte order mark (rsd provenance-report's sentences, a merged output) read
    as "line 1: not a JSON object; the file was changed by something else", and the mark before a last line without
    its newline made the writer cut that record away."""
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'\xef\xbb\xbf{"id": "a"}\n{"id": "b"}\n')
    assert [r["id"] for r in read_records(out)] == ["a", "b"]
    out.write_bytes(b'\xef\xbb\xbf{"id": "a"}')
    with RecordWriter(out) as writer:
        writer.write({"id": "c"})
    assert [r["id"] for r in read_records(out)] == ["a", "c"]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_records(out)


WRITER_SCRIPT = """
import sys
from rsd_engine.pipeline.records import RecordWriter, done_ids
out, n = sys.argv[1], int(sys.argv[2])
done = done_ids(out)
with RecordWriter(out) as writer:
    for i in range(n):
        if str(i) not in done:
            writer.write({"id": str(i), "text": "x" * (50_000 + i)})
"""


def test_kill_9_loses_only_records_in_flight(tmp_path):
    """Kill a writer at random moments, resume each time: every id ends up written exactly once,
    and after every kill the file reads as a gap-free prefix."""
    out, n = tmp_path / "out.jsonl", 400
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(out), str(n)], env=env)
        time.sleep(rng.uniform(0.15, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ids = [int(r["id"]) for r in read_records(out)]
        assert ids == list(range(len(ids)))
        assert all(len(r["text"]) == 50_000 + int(r["id"]) for r in read_records(out))
    subprocess.run([sys.executable, "-c", WRITER_SCRIPT, str(out), str(n)], env=env, check=True)
    assert [int(r["id"]) for r in read_records(out)] == list(range(n))
    assert out.read_bytes().endswith(b"\n")


def test_part_names():
    assert part_path("runs/out.jsonl", 3, 4) == Path("runs/out.rank00003-of-00004.jsonl")
    assert part_path("out", 0, 2) == Path("out.rank00000-of-00002")
    with pytest.raises(ValueError, match="rank"):
        part_path("out.jsonl", 4, 4)


def test_merge_parts_in_id_order_without_duplicates(tmp_path):
    out = tmp_path / "out.jsonl"
    ids_by_rank = {0: ["0", "2", "10", "4"], 1: ["1", "3", "11", "2"]}  # "2" written twice
    for rank, ids in ids_by_rank.items():
        with RecordWriter(part_path(out, rank, 2)) as writer:
            for i in ids:  # the copies of "2" agree but for float rounding (stats of another batch)
                writer.write({"id": i, "text": f"t{i}", "stats": {"mean": 0.1 + rank * 1e-9}})
    report = merge_parts(out)
    assert (report.records, report.duplicates) == (7, {"2": 2})  # reported, the first copy kept
    merged = read_records(out)
    assert [r["id"] for r in merged] == ["0", "1", "2", "3", "4", "10", "11"]
    assert [r for r in merged if r["id"] == "2"] == [{"id": "2", "text": "t2", "stats": {"mean": 0.1}}]
    again = merge_parts(out)  # idempotent: out itself is one of the inputs, and not a source of duplicates
    assert (again.records, again.duplicates) == (7, {"2": 2})
    assert read_records(out) == merged
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out.jsonl", "out.rank00000-of-00002.jsonl", "out.rank00001-of-00002.jsonl"
    ]


def test_merge_refuses_incomplete_sets(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(FileNotFoundError, match="no part files"):
        merge_parts(out)
    RecordWriter(part_path(out, 0, 3)).close()
    RecordWriter(part_path(out, 2, 3)).close()
    with pytest.raises(FileNotFoundError, match=r"ranks \[1\] of 3"):
        find_parts(out)
    RecordWriter(part_path(out, 1, 3)).close()
    RecordWriter(part_path(out, 1, 2)).close()
    with pytest.raises(FileNotFoundError, match=r"ranks \[0\] of 2"):
        find_parts(out)


def test_merge_takes_every_set_of_parts(tmp_path):
    """A run resumed with another number of ranks leaves a second set of parts beside the first: both are
    the output's records (the resumed run wrote only what the first had not)."""
    out = tmp_path / "traces[v2].jsonl"  # glob characters in the name
    for (rank, world), ids in {(0, 3): ["0", "3"], (1, 3): ["1"], (2, 3): ["2"], (0, 2): ["4"], (1, 2): []}.items():
        with RecordWriter(part_path(out, rank, world)) as writer:
            for i in ids:
                writer.write({"id": i})
    assert [p.name for p in find_parts(out)] == [f"traces[v2].rank0000{r}-of-0000{w}.jsonl"
                                                 for w, r in [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]]
    report = merge_parts(out)
    assert (report.records, report.parts, report.duplicates) == (5, 5, {})
    assert [r["id"] for r in read_records(out)] == ["0", "1", "2", "3", "4"]


def test_merge_refuses_copies_that_differ(tmp_path):
    """Copies of one record that say different things (a part edited, or another run's records) are not
    duplicates to drop quietly: merge names them, and keeps the first only under force."""
    out = tmp_path / "out.jsonl"
    for rank, text in enumerate(["old", "new"]):
        with RecordWriter(part_path(out, rank, 2)) as writer:
            writer.write({"id": "7", "completion": text})
            writer.write({"id": str(rank), "completion": "same"})
    with pytest.raises(RecordConflict, match=r"1 records .* copies that differ \(7: out.rank00000-of-00002.jsonl vs "
                                             r"out.rank00001-of-00002.jsonl\).*--force"):
        merge_parts(out)
    assert read_records(out) == [] and read_manifest(out) is None  # nothing merged
    report = merge_parts(out, force=True)
    assert list(report.conflicts) == ["7"] and read_records(out)[2] == {"id": "7", "completion": "old"}
    # OUT's own copy against a part's: an earlier merge, edited since.
    records = read_records(out)
    records[2]["completion"] = "edited"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(RecordConflict, match=r"7: out.jsonl vs out.rank00000-of-00002.jsonl"):
        merge_parts(out)


def test_merge_keeps_a_finite_copy_over_a_nan_one(tmp_path):
    """An older rsd wrote NaN scores; a rerun scores the line again into a part. The merge keeps that copy,
    whichever comes first, and reports no conflict."""
    out = tmp_path / "sel.scores.jsonl"
    with RecordWriter(out) as writer:
        writer.write({"id": "2", "student_logprob": float("nan")})
    with RecordWriter(part_path(out, 0, 1)) as writer:
        writer.write({"id": "2", "student_logprob": -1.5})
    report = merge_parts(out)
    assert report.conflicts == {} and read_records(out) == [{"id": "2", "student_logprob": -1.5}]


def test_same_record_allows_float_rounding_only():
    assert same_record({"a": [1, 0.30000001], "b": "x"}, {"a": [1, 0.3], "b": "x"})
    assert not same_record({"a": [1, 0.31]}, {"a": [1, 0.3]})
    assert not same_record({"a": 1}, {"a": True}) and not same_record({"a": 1.0}, {"a": True})
    assert not same_record({"a": 1}, {"a": 1, "b": None}) and not same_record([1, 2], [1, 2, 3])
    assert same_record({"a": float("nan")}, {"a": float("nan")}) and not same_record("1", 1)


def test_check_writable(tmp_path):
    fresh = tmp_path / "new" / "out.jsonl"
    assert check_writable(fresh) == fresh and not fresh.exists()
    existing = tmp_path / "existing.jsonl"
    existing.write_text(json.dumps({"id": "0"}) + "\n")
    check_writable(existing)
    assert read_records(existing) == [{"id": "0"}]
    with pytest.raises(IsADirectoryError, match="is a directory"):
        check_writable(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable"):
        check_writable(blocker / "out.jsonl")


def test_check_writable_never_removes_the_output(tmp_path, monkeypatch):
    """Creating a fresh output to test it and removing it again raced with a run that created and locked it in
    between: that run's records went to a removed file. The test writes a file of its own beside it."""
    removed = []
    real_unlink = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p, *a, **k: (removed.append(Path(p)), real_unlink(p, *a, **k))[1])
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (removed.append(self), real_unlink(self))[1])
    fresh = tmp_path / "out.jsonl"
    assert check_writable(fresh) == fresh and not fresh.exists()
    assert fresh not in removed and removed and list(tmp_path.iterdir()) == []  # its own probe, removed
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # root writes anywhere
            with pytest.raises(PermissionError, match="not writable"):
                check_writable(tmp_path / "ro" / "out.jsonl")
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_merge_refuses_a_part_still_being_written(tmp_path):
    out = tmp_path / "out.jsonl"
    RecordWriter(part_path(out, 0, 2)).close()
    with RecordWriter(part_path(out, 1, 2)):
        with pytest.raises(OutputBusy, match=r"rank00001-of-00002.jsonl is still being written \(pid \d+\)"):
            merge_parts(out)
    assert merge_parts(out).records == 0


def test_merge_checks_the_parts_settings(tmp_path):
    out = tmp_path / "out.jsonl"
    for rank, seed in enumerate([0, 1]):
        with RecordWriter(part_path(out, rank, 2), {"--seed": seed, "--attempts": 4}) as writer:
            writer.write({"id": str(rank)})
    with pytest.raises(SettingsMismatch, match=r"rank00001-of-00002.jsonl vs .*: --seed: 0 in the output, 1 now"):
        merge_parts(out)
    assert not out.exists() or read_records(out) == []
    report = merge_parts(out, force=True)
    assert report.records == 2 and len(report.forced) == 1
    assert read_manifest(out)["settings"] == {"--seed": 0, "--attempts": 4} and read_manifest(out)["forced"]


def test_records_of_two_commands_never_share_a_file(tmp_path):
    """A manifest names the command whose records it describes: another command's output, or parts of two
    commands, are refused as such, --force or not (forced, eval records went into a generate output, and a merge
    joined generate and eval parts). Manifests of older rsd, which do not say, are compared as before."""
    from rsd_engine.pipeline.manifest import COMMAND

    out = tmp_path / "out.jsonl"
    with RecordWriter(out, {COMMAND: "generate", "--seed": 0}) as writer:
        writer.write({"id": "0"})
    for force in (False, True):
        with pytest.raises(SettingsMismatch, match="holds records of rsd generate, not of rsd eval"):
            RecordWriter(out, {COMMAND: "eval", "--seed": 0}, force=force)
    assert read_records(out) == [{"id": "0"}] and read_manifest(out)["settings"][COMMAND] == "generate"
    old = tmp_path / "old.jsonl"
    with RecordWriter(old, {"--seed": 0}) as writer:  # an older rsd's manifest: no command
        writer.write({"id": "0"})
    with RecordWriter(old, {COMMAND: "generate", "--seed": 0}) as writer:
        assert writer.forced == [] and len(writer.existing) == 1
    parts = tmp_path / "parts.jsonl"
    for rank, command in enumerate(["generate", "eval"]):
        with RecordWriter(part_path(parts, rank, 2), {COMMAND: command, "--seed": 0}) as writer:
            writer.write({"id": str(rank)})
    for force in (False, True):
        with pytest.raises(SettingsMismatch, match="holds records of rsd eval, .* of rsd generate: not parts of one"):
            merge_parts(parts, force=force)
    assert not parts.exists() or read_records(parts) == []


def test_merge_says_when_a_part_s_run_was_stopped(tmp_path, capsys):
    """A part whose run was killed midway merged as if its work were done ("merged 19 records", exit 0): a run's
    manifest says whether it reached its end, and a merge names the parts whose run did not."""
    out = tmp_path / "out.jsonl"
    with RecordWriter(part_path(out, 0, 2), {"--seed": 0}) as writer:
        writer.write({"id": "0"})
    assert read_manifest(part_path(out, 0, 2))["finished"] is True
    stopped = RecordWriter(part_path(out, 1, 2), {"--seed": 0})  # a run killed before its end: never left
    stopped.write({"id": "1"})
    stopped.close()
    assert read_manifest(part_path(out, 1, 2))["finished"] is False
    with pytest.raises(RuntimeError):  # a run that failed did not finish either
        with RecordWriter(tmp_path / "failed.jsonl", {"--seed": 0}) as writer:
            writer.write({"id": "0"})  # (one that failed before its first record leaves no file it made)
            raise RuntimeError("failed")
    assert read_manifest(tmp_path / "failed.jsonl")["finished"] is False
    report = merge_parts(out)
    assert report.records == 2 and report.unfinished == [part_path(out, 1, 2).name]
    assert read_manifest(out)["finished"] is False
    assert main(["merge", str(out)]) == 3  # merged, but short of records: a script can tell (it was 0)
    said = capsys.readouterr().out
    assert "were stopped before their end (out.rank00001-of-00002.jsonl)" in said
    assert said.splitlines()[-1] == "rsd merge: 1 of 2 parts from runs stopped before their end: exit status 3"
    with RecordWriter(part_path(out, 1, 2), {"--seed": 0}):  # rerun to its end
        pass
    assert merge_parts(out).unfinished == [] and read_manifest(out)["finished"] is True


KILLED_MERGE_SCRIPT = """
import os, signal, sys
from pathlib import Path
from rsd_engine.pipeline.parts import merge_parts
real_replace = os.replace
def replace(src, dst):
    if Path(src).name.endswith(".merging"):
        os.kill(os.getpid(), signal.SIGKILL)  # killed just before the merged records are renamed over OUT
    real_replace(src, dst)
os.replace = replace
merge_parts(sys.argv[1])
"""


def test_a_merge_killed_before_its_rename_leaves_out_said_unfinished(tmp_path):
    """A merge wrote OUT's new manifest ("finished": true) before renaming the merged records over OUT: killed in
    between, OUT (without the parts' records) sat beside a manifest saying the output was whole. It says
    unfinished until the records are in place, and the next merge makes it whole."""
    out = tmp_path / "out.jsonl"
    for rank in range(2):
        with RecordWriter(part_path(out, rank, 2), {"--seed": 0}) as writer:
            writer.write({"id": str(rank)})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", KILLED_MERGE_SCRIPT, str(out)], env=env, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    assert read_records(out) == [] and read_manifest(out)["finished"] is False
    report = merge_parts(out)
    assert report.unfinished == [] and not report.out_unfinished
    assert [r["id"] for r in read_records(out)] == ["0", "1"] and read_manifest(out)["finished"] is True


def test_merge_says_when_out_s_own_run_was_stopped(tmp_path, capsys):
    """OUT's own run stopped before its end (a run on one process, resumed after a merge of ranks when the data
    gained rows, then killed): a merge into it said "finished" and exited 0 from the parts' marks alone. OUT's mark
    counts as a part's: named, exit 3, "finished" false, merge after merge; unless the runs of every rank of some
    world size started after it and reached their end, or a run on OUT reaches its own."""
    out, settings = tmp_path / "out.jsonl", {"--seed": 0}
    for rank in range(2):
        with RecordWriter(part_path(out, rank, 2), settings) as writer:
            writer.write({"id": str(rank)})
    assert merge_parts(out).unfinished == [] and read_manifest(out)["finished"] is True
    killed = RecordWriter(out, settings)  # a run on OUT killed before its end: never left
    killed.write({"id": "2"})
    killed.close()
    assert read_manifest(out)["finished"] is False
    for _ in range(2):  # the mark stays OUT's run's in the merged manifest: a second merge says it again
        assert main(["merge", str(out)]) == 3
        said = capsys.readouterr().out
        assert "the run that last wrote out.jsonl was stopped before its end" in said
        assert said.splitlines()[-1] == (
            "rsd merge: 1 output (out.jsonl) was last written by a run stopped before its end: exit status 3")
        assert read_manifest(out)["finished"] is False and [r["id"] for r in read_records(out)] == ["0", "1", "2"]
    for rank in range(3):  # every rank of a run of 3 started after it and reached its end: they did what it left
        with RecordWriter(part_path(out, rank, 3), settings):
            pass
    report = merge_parts(out)
    assert report.unfinished == [] and read_manifest(out)["finished"] is True
    killed = RecordWriter(out, settings)  # killed again, after every finished set
    killed.close()
    assert merge_parts(out).unfinished == [out.name] and read_manifest(out)["finished"] is False
    with RecordWriter(out, settings):  # a run on OUT to its end
        pass
    assert merge_parts(out).unfinished == [] and read_manifest(out)["finished"] is True


def test_a_set_without_some_ranks_merges_only_under_force(tmp_path, capsys):
    """A rank that never started (or a part on another host) leaves a set without its part: refused, saying how to
    get it; under --force the parts there are merge, the missing ones named and the exit status 3 (nothing could
    bring such records into OUT before: not a rerun on one process, not --force)."""
    out = tmp_path / "out.jsonl"
    with RecordWriter(part_path(out, 0, 3), {"--seed": 0}) as writer:
        writer.write({"id": "0"})
    with RecordWriter(part_path(out, 2, 3), {"--seed": 0}) as writer:
        writer.write({"id": "2"})
    with pytest.raises(FileNotFoundError, match=r"ranks \[1\] of 3 are missing .*RANK=r WORLD_SIZE=3.*--force"):
        merge_parts(out)
    assert not out.exists()
    assert main(["merge", str(out), "--force"]) == 3
    said = capsys.readouterr().out
    assert "without the parts out.rank00001-of-00003.jsonl" in said and said.splitlines()[-1] == (
        "rsd merge: 1 parts missing: exit status 3")
    assert [r["id"] for r in read_records(out)] == ["0", "2"]


def test_parts_without_a_record_count_for_their_set_not_for_its_settings(tmp_path):
    """Parts a stopped run of other settings left without a record (2 ranks, --max-new-tokens 40: one interrupted
    before its first record, one killed while writing it) beside a whole later set that wrote every record (3 ranks,
    30): the merge takes the settings of the records (it refused them as different, and under --force wrote the
    empty parts' settings into OUT's manifest). A set with a rank missing stays refused whatever ran after it (a
    finished run that read the part before it went missing did not redo its work)."""
    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        with RecordWriter(part_path(out, 0, 2), {"--max-new-tokens": 40}):
            raise KeyboardInterrupt
    killed = RecordWriter(part_path(out, 1, 2), {"--max-new-tokens": 40})
    os.write(killed._fd, b'{"id": "')  # a torn first line
    killed.close()
    for rank in range(3):
        with RecordWriter(part_path(out, rank, 3), {"--max-new-tokens": 30}) as writer:
            writer.write({"id": str(rank)})
    report = merge_parts(out)
    assert report.records == 3 and report.missing == [] and report.unfinished == []  # (the later set did their work)
    assert read_manifest(out)["settings"] == {"--max-new-tokens": 30}
    part_path(out, 2, 3).unlink()  # lost after the merge
    with RecordWriter(out, {"--max-new-tokens": 30}) as writer:  # a finished one-process run: still refused
        writer.write({"id": "3"})
    with pytest.raises(FileNotFoundError, match=r"ranks \[2\] of 3 are missing"):
        merge_parts(out)


def test_a_part_that_got_no_record_stays(tmp_path):
    """A rank interrupted before its first record keeps its empty part and manifest, so its set stays whole (as a
    killed rank's); OUT of one process that got none is removed as before, and so is a part whose run failed (an
    option refused, a model that does not load)."""
    out = tmp_path / "out.jsonl"
    for path in (part_path(out, 1, 2), out):
        with pytest.raises(KeyboardInterrupt):
            with RecordWriter(path, {"--seed": 0}):
                raise KeyboardInterrupt
    assert part_path(out, 1, 2).exists() and read_manifest(part_path(out, 1, 2)) is not None
    assert not out.exists() and not manifest_path(out).exists()
    with pytest.raises(ValueError):
        with RecordWriter(part_path(out, 0, 2), {"--seed": 0}):
            raise ValueError("refused")
    assert not part_path(out, 0, 2).exists() and not manifest_path(part_path(out, 0, 2)).exists()
    # A Ctrl-C after the part was made and before its run was marked begun: no end mark, no record; a stopped run.
    with RecordWriter(part_path(out, 0, 2), {"--seed": 0}) as writer:
        writer.write({"id": "0"})
    manifest = read_manifest(part_path(out, 1, 2))
    del manifest["finished"], manifest["run_started"]
    manifest_path(part_path(out, 1, 2)).write_text(json.dumps(manifest))
    assert merge_parts(out).unfinished == [part_path(out, 1, 2).name]
    with RecordWriter(out, {"--seed": 0}):  # a one-process run to its end did that part's work
        pass
    assert merge_parts(out).unfinished == []


def test_the_finished_mark_follows_the_work_not_the_last_attempt(tmp_path):
    """A part's run killed, then the work done by a resume elsewhere: on one process (on OUT, which did every
    part's work too) or under another number of ranks (all of whose runs finished). Neither leaves a warning. A
    rerun refused before it wrote anything leaves the mark as it was."""
    out = tmp_path / "out.jsonl"
    settings = {"--seed": 0}
    for rank in (0, 1):
        with RecordWriter(part_path(out, rank, 2), settings) as writer:
            writer.write({"id": str(rank)})
    killed = RecordWriter(part_path(out, 2, 3), settings)  # a later run of 3 ranks: rank 2 killed
    killed.write({"id": "2"})
    killed.close()
    for rank in (0, 1):
        with RecordWriter(part_path(out, rank, 3), settings):
            pass
    # The 2-rank set finished, but before the 3-rank run came for more: rank 2's are not done.
    assert merge_parts(out).unfinished == [part_path(out, 2, 3).name]
    for rank in (0, 1):  # a 2-rank run again, after it: every problem left is done
        with RecordWriter(part_path(out, rank, 2), settings):
            pass
    assert merge_parts(out).unfinished == []
    killed = RecordWriter(part_path(out, 1, 3), settings)  # killed again, after every finished set
    killed.write({"id": "3"})
    killed.close()
    assert merge_parts(out).unfinished == [part_path(out, 1, 3).name]
    with pytest.raises(ValueError):  # refused before writing: the mark stays as it was
        with RecordWriter(part_path(out, 0, 2), settings):
            raise ValueError("refused")
    assert read_manifest(part_path(out, 0, 2))["finished"] is True
    with RecordWriter(out, settings):  # one process on OUT: does what any part had left
        pass
    assert read_manifest(part_path(out, 1, 3))["finished"] is True
    assert merge_parts(out).unfinished == []


def test_a_run_on_an_output_refuses_while_another_run_writes_another_of_its_files(tmp_path):
    """A one-process run on OUT and a run of ranks on its parts at once each locked only its own file: both did
    the same problems. A run refuses while another run writes OUT or a part of another number of ranks; the
    sibling ranks of its own run write their parts beside it."""
    out = tmp_path / "out.jsonl"
    settings = {"--seed": 0}
    with RecordWriter(out, settings):  # a one-process run writing OUT
        with pytest.raises(OutputBusy, match="is being written by another run"):
            held_elsewhere(out, part_path(out, 0, 2), settings, force=False)
    with RecordWriter(part_path(out, 1, 2), settings) as sibling:  # a rank of a 2-rank run
        sibling.write({"id": "1"})
        assert list(held_elsewhere(out, part_path(out, 0, 2), settings, force=False)) == [part_path(out, 1, 2)]
        for target in (out, part_path(out, 0, 3)):  # one process, or another number of ranks
            with pytest.raises(OutputBusy, match=r"rank00001-of-00002.jsonl is being written by another run"):
                held_elsewhere(out, target, settings, force=False)
    assert list(held_elsewhere(out, out, settings, force=False)) == [part_path(out, 1, 2)]  # idle: read


@pytest.mark.usefixtures("python_recursion_limit")
def test_writer_settings_and_a_corrupt_manifest(tmp_path):
    out = tmp_path / "out.jsonl"
    with RecordWriter(out, {"--seed": 0}) as writer:
        assert writer.forced == []
    with RecordWriter(out, {"--seed": 1}):  # no records yet: nothing to mix, the manifest is rewritten
        pass
    assert read_manifest(out)["settings"] == {"--seed": 1}
    with RecordWriter(out, {"--seed": 1}) as writer:
        writer.write({"id": "a"})
    with pytest.raises(SettingsMismatch, match="--seed: 1 in the output, 2 now"):
        RecordWriter(out, {"--seed": 2})
    with RecordWriter(out, {"--seed": 2}, force=True) as writer:
        assert writer.forced == ["--seed: 1 in the output, 2 now"] and [r["id"] for r in writer.existing] == ["a"]
    for corrupt in ("{torn", '{"settings": ' + "[" * 1200 + "]" * 1200 + "}"):  # nested past Python's parser too
        manifest_path(out).write_text(corrupt)
        with pytest.raises(ValueError, match="is not a JSON manifest"):
            RecordWriter(out, {"--seed": 1})


@pytest.mark.usefixtures("python_recursion_limit")
def test_an_out_nested_too_deeply_is_no_report(tmp_path):
    """--out over a file that opens as an unmarked rsd score report but nests past Python's parser: a RecursionError,
    now no report of rsd score, as any other file that does not parse."""
    from rsd_engine.pipeline.reports import check_report_out

    out = tmp_path / "report.json"
    out.write_text('{\n "student": ' + "[" * 1200 + "]" * 1200 + "}")
    with pytest.raises(FileExistsError, match="exists and is no report of rsd score"):
        check_report_out(out, "score")


def test_a_filesystem_without_locks_warns_and_writes(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match=r"cannot lock .*out.jsonl \(No locks available\)"):
        with RecordWriter(tmp_path / "out.jsonl") as writer:
            writer.write({"id": "a"})
    assert read_records(tmp_path / "out.jsonl") == [{"id": "a"}]


def test_merge_keeps_every_parts_forced_runs(tmp_path, capsys):
    """A part that took records under --force with other settings says so in its manifest; the merged
    manifest keeps saying so (once per run, however often it is merged) and the report lists the run."""
    from rsd_engine.cli import main

    out = tmp_path / "out.jsonl"
    for rank in range(2):
        with RecordWriter(part_path(out, rank, 2), {"--seed": 0}) as writer:
            writer.write({"id": str(rank)})
    with RecordWriter(part_path(out, 1, 2), {"--seed": 1}, force=True) as writer:
        writer.write({"id": "3"})
    (entry,) = read_manifest(part_path(out, 1, 2))["forced"]
    assert entry["differences"] == ["--seed: 0 in the output, 1 now"]
    report = merge_parts(out)
    assert report.records == 3 and report.forced == []
    assert report.forced_runs == ["out.rank00001-of-00002.jsonl: --seed: 0 in the output, 1 now"]
    assert read_manifest(out)["settings"] == {"--seed": 0} and read_manifest(out)["forced"] == [entry]
    assert main(["merge", str(out)]) == 0  # out is now a source too: the run is still listed once
    assert read_manifest(out)["forced"] == [entry]
    assert ("note: records in the merged output were appended under --force with other settings (listed in its "
            "manifest): ") in capsys.readouterr().out


def test_a_resumed_older_output_merges_with_its_new_parts(tmp_path):
    """An output whose manifest an earlier version wrote (--out compared, --max-seq-len kept under "about"),
    resumed under torchrun: the parts' manifests take this version's settings, and the merge accepts them."""
    from rsd_engine.pipeline.manifest import new_manifest, write_manifest

    out = tmp_path / "evals.jsonl"
    old = {"--data": "d", "--out": "evals.jsonl", "--max-batch-size": 32, "--temperature": 0.6}
    for path, ids in ((out, ["1", "2"]), (part_path(out, 0, 2), ["1", "3"]), (part_path(out, 1, 2), ["2"])):
        path.write_text("".join(json.dumps({"id": i, "sample": 0}) + "\n" for i in ids))
        write_manifest(path, new_manifest(old, {"--max-seq-len": None}))
    for rank in range(2):  # each rank resumes its part under this version's settings
        with RecordWriter(part_path(out, rank, 2), {"--data": "d", "--temperature": 0.6, "--max-seq-len": None}):
            pass
    report = merge_parts(out)
    assert report.records == 3 and report.forced == []


def test_merge_keeps_each_scored_text_and_the_newest_traced_version(tmp_path):
    """`rsd select --budget` scores lines of one candidate under two texts are both kept (a reader matches the
    hash); `rsd provenance` lines of one response under two texts with the same version number: the last seen."""
    out = tmp_path / "s.scores.jsonl"
    out.write_text(json.dumps({"id": "a", "sample": 0, "response_hash": "h1", "tokens": 1}) + "\n")
    with RecordWriter(part_path(out, 0, 2)) as writer:
        writer.write({"id": "a", "sample": 0, "response_hash": "h2", "tokens": 7})
    with RecordWriter(part_path(out, 1, 2)) as writer:
        writer.write({"id": "b", "sample": 0, "response_hash": "k1", "tokens": 2})
    merge_parts(out)
    assert sorted((r["id"], r["response_hash"]) for r in read_records(out)) == [("a", "h1"), ("a", "h2"), ("b", "k1")]

    lines = tmp_path / "p.jsonl"
    def traced(text_hash, n):
        return [{"id": "a", "sample": 0, "response_hash": text_hash, "index": i, "sentences": n} for i in range(n)]
    lines.write_text("".join(json.dumps(line) + "\n" for line in traced("h1", 2)))
    with RecordWriter(part_path(lines, 0, 1)) as writer:
        writer.write_many(traced("h2", 3))
    merge_parts(lines)
    assert {r["response_hash"] for r in read_records(lines)} == {"h2"}


@pytest.mark.parametrize("content", [b"", b"\n\n", b'{"a": 1}\n{"b": 2}\n', b'\n{"a": 1}\n{"b"', b'{"a"', b'{"a": 1}',
                                     b"[1, 2]\n", b'nope\n{"a": 1}\n'])
def test_first_record_reads_the_first_as_read_records_does(tmp_path, content):
    """generate's format check reads an output's first record only (it parsed the whole output a second time)."""
    from rsd_engine.pipeline.records import first_record

    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    try:
        expected = (read_records(path) or [None])[0]
    except ValueError as err:
        with pytest.raises(ValueError, match="line 1: not a JSON object"):
            first_record(path)
        assert "line 1" in str(err)
        return
    assert first_record(path) == expected


@pytest.mark.parametrize("content, expected", [
    (b'{"a": 1}\n\n{"b": 2}\n', [{"a": 1}, {"b": 2}]),
    (b'{"a": 1}\n{"b": ' + b"[" * 1200 + b"]" * 1200 + b'}\n', ValueError),  # nested past Python's parser
    (b'{"a": 1}\n{"b": 2}', [{"a": 1}, {"b": 2}]),  # a whole last record without its newline
    (b'{"a": 1}\n{"b": ', [{"a": 1}]),  # torn: the record in flight when a run was killed
    (b'{"a": 1}\n[2]\n', ValueError),  # a whole line that is no record
    (b'{"a": 1}\n{"b": \n\n', ValueError),  # cut, then written past: not a kill's tear
])
@pytest.mark.usefixtures("python_recursion_limit")
def test_read_records_reads_line_by_line_as_it_read_the_whole_file(tmp_path, content, expected):
    """read_records streams its file (it held the bytes, and their lines, beside the records: 420 -> 315 MB peak
    reading a 113 MB output of 45k records); what it accepts and refuses is unchanged."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    if expected is ValueError:
        with pytest.raises(ValueError, match="line 2: not a JSON object"):
            read_records(path)
    else:
        assert read_records(path) == expected


@pytest.mark.parametrize("where", ["out", "part"])
def test_merge_refuses_a_line_that_is_no_record(tmp_path, where):
    """A line of OUT or of a part without an id ({"x": 1}) was carried into the merged file as if it were a record
    (and every such line folded into one). Refused now, naming the file and line, --force or not; nothing changes."""
    from rsd_engine.pipeline.manifest import COMMAND

    out = tmp_path / "out.jsonl"
    for rank in range(2):
        with RecordWriter(part_path(out, rank, 2), {COMMAND: "generate"}) as writer:
            writer.write({"id": str(rank)})
    merge_parts(out)
    bad = out if where == "out" else part_path(out, 1, 2)
    bad.write_text(bad.read_text() + '{"x": 1}\n')
    line = len(bad.read_text().splitlines())
    files = sorted(tmp_path.iterdir())
    before = [p.read_bytes() for p in files]
    for force in (False, True):
        with pytest.raises(ValueError, match=rf"{bad.name}, line {line}: not a record of rsd generate \(no string or "
                                             r"number 'id'"):
            merge_parts(out, force=force)
        assert sorted(tmp_path.iterdir()) == files and [p.read_bytes() for p in files] == before


def test_a_run_that_fails_before_its_first_record_leaves_no_file_it_created(tmp_path):
    """An option refused once the output was open (a --draft-tokens the engine refuses) left an empty OUT and its
    manifest behind, read as an output begun. The writer removes what it created; an OUT that was there stays."""
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="refused"):
        with RecordWriter(out, {"--seed": 0}):
            raise ValueError("refused")
    assert sorted(tmp_path.iterdir()) == []
    with RecordWriter(out, {"--seed": 0}):
        pass  # a run that reached its end with nothing to write keeps its (empty) output
    with pytest.raises(KeyboardInterrupt):
        with RecordWriter(out, {"--seed": 0}):
            raise KeyboardInterrupt
    assert out.read_bytes() == b"" and json.loads(manifest_path(out).read_bytes())["settings"] == {"--seed": 0}
    with pytest.raises(ValueError, match="refused"):
        with RecordWriter(tmp_path / "written.jsonl") as writer:
            writer.write({"id": "0"})
            raise ValueError("refused")
    assert read_records(tmp_path / "written.jsonl") == [{"id": "0"}]


def test_drop_last_keeps_existing_in_step_with_the_file(tmp_path):
    """drop_last cuts a torn group off the file and off .existing alike; drop_last(0) changes neither (rsd provenance
    calls it with 0 when nothing was torn, then reads .existing as the file's records)."""
    out = tmp_path / "out.jsonl"
    with RecordWriter(out) as writer:
        writer.write_many([{"id": str(i)} for i in range(4)])
    with RecordWriter(out) as writer:
        writer.drop_last(0)
        assert [r["id"] for r in writer.existing] == ["0", "1", "2", "3"] == [r["id"] for r in read_records(out)]
        writer.drop_last(2)
        assert [r["id"] for r in writer.existing] == ["0", "1"] == [r["id"] for r in read_records(out)]


def test_a_run_refused_after_it_wrote_records_stays_unfinished(tmp_path):
    """A run that wrote records and then stopped on a ValueError (a refusal found midway) did not reach its end: its
    mark says so, whatever the earlier run's said. Only a refusal before anything was written leaves the mark as it
    was (a merge would otherwise join the part as whole)."""
    part = part_path(tmp_path / "out.jsonl", 0, 2)
    with RecordWriter(part, {"--seed": 0}) as writer:
        writer.write({"id": "0"})
    assert read_manifest(part)["finished"] is True
    with pytest.raises(ValueError, match="midway"):
        with RecordWriter(part, {"--seed": 0}) as writer:
            writer.write({"id": "2"})
            raise ValueError("refused midway")
    assert read_manifest(part)["finished"] is False and [r["id"] for r in read_records(part)] == ["0", "2"]


def test_a_writer_locks_the_file_its_path_names_now(tmp_path, monkeypatch):
    """A merge renames its merged records over OUT: a writer that opened the old file just before and locked it
    after would append to a file no path names any more, its records lost. It opens the path again."""
    import fcntl

    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "0"}) + "\n")
    real_flock, replaced = fcntl.flock, []

    def flock(fd, operation):
        if not replaced:  # between this writer's open and its lock, a merge renames its file over OUT
            replaced.append(True)
            merged = tmp_path / ".out.jsonl.merging"
            merged.write_text(json.dumps({"id": "0"}) + "\n" + json.dumps({"id": "1"}) + "\n")
            os.replace(merged, out)
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with RecordWriter(out) as writer:
        assert [r["id"] for r in writer.existing] == ["0", "1"]
        writer.write({"id": "2"})
    assert [r["id"] for r in read_records(out)] == ["0", "1", "2"]


def test_a_nan_anywhere_in_a_record_is_not_finite(tmp_path):
    """A score of an older rsd with a NaN in a list (a sentence's log-prob) is computed again: the merge keeps the
    finite copy over it, no conflict, whichever file holds which."""
    assert not all_finite({"scores": [0.5, float("nan")]}) and not all_finite([{"a": float("inf")}])
    assert all_finite({"scores": [0.5, 1], "id": "x", "ok": None})
    out = tmp_path / "sel.scores.jsonl"
    with RecordWriter(out) as writer:
        writer.write({"id": "2", "sentence_logprobs": [-0.5, float("nan")]})
    with RecordWriter(part_path(out, 0, 1)) as writer:
        writer.write({"id": "2", "sentence_logprobs": [-0.5, -1.5]})
    report = merge_parts(out)
    assert report.conflicts == {} and read_records(out) == [{"id": "2", "sentence_logprobs": [-0.5, -1.5]}]


def test_a_run_rereads_what_another_run_wrote_before_it_locked(tmp_path):
    """Two runs started at once both read OUT's other files before either locked its own: once it holds its lock, a
    run reads again every file written since (recheck_elsewhere), or it would do those problems a second time."""
    out, settings = tmp_path / "out.jsonl", {"--seed": 0}
    with RecordWriter(part_path(out, 0, 2), settings) as writer:
        writer.write({"id": "0"})
    target = part_path(out, 0, 3)
    state = others_state(out, target)
    held = held_elsewhere(out, target, settings, force=False)
    with RecordWriter(part_path(out, 1, 2), settings) as writer:  # another run, in between
        writer.write({"id": "1"})
    again = recheck_elsewhere(out, target, settings, force=False, held=held, state=state)
    assert {path.name: [r["id"] for r in records] for path, records in again.items()} == {
        part_path(out, 0, 2).name: ["0"], part_path(out, 1, 2).name: ["1"]}
    assert recheck_elsewhere(out, target, settings, force=False, held=again, state=others_state(out, target)) is again


def test_a_merge_under_force_without_some_ranks_says_unfinished(tmp_path):
    """--force merges the parts there are of a set without some ranks: OUT lacks their records, so its manifest says
    unfinished (as a merge of a stopped run's parts does), and no later set with a rank missing counts as having
    done a stopped part's work."""
    out, settings = tmp_path / "out.jsonl", {"--seed": 0}
    stopped = RecordWriter(part_path(out, 1, 2), settings)  # a 2-rank run, rank 1 killed
    stopped.write({"id": "1"})
    stopped.close()
    with RecordWriter(part_path(out, 0, 2), settings) as writer:
        writer.write({"id": "0"})
    for rank in (0, 2):  # a later 3-rank run whose rank 1's part is not here
        with RecordWriter(part_path(out, rank, 3), settings) as writer:
            writer.write({"id": str(rank + 3)})
    report = merge_parts(out, force=True)
    assert report.missing == [part_path(out, 1, 3).name] and report.unfinished == [part_path(out, 1, 2).name]
    assert read_manifest(out)["finished"] is False
    whole = tmp_path / "whole.jsonl"  # every part there finished: still short of the missing one's records
    for rank in (0, 2):
        with RecordWriter(part_path(whole, rank, 3), settings) as writer:
            writer.write({"id": str(rank)})
    report = merge_parts(whole, force=True)
    assert report.missing == [part_path(whole, 1, 3).name] and report.unfinished == []
    assert read_manifest(whole)["finished"] is False


def test_merge_writes_every_record_across_its_blocks(tmp_path, monkeypatch):
    """merge_parts writes (and fsyncs) its records MERGE_BLOCK at a time: none lost or doubled at a block's edge."""
    from rsd_engine.pipeline import parts

    monkeypatch.setattr(parts, "MERGE_BLOCK", 2)
    out = tmp_path / "out.jsonl"
    for rank in range(2):
        with RecordWriter(part_path(out, rank, 2)) as writer:
            writer.write_many([{"id": str(i)} for i in range(rank, 7, 2)])
    assert merge_parts(out).records == 7
    assert [r["id"] for r in read_records(out)] == [str(i) for i in range(7)]


def test_merge_refuses_a_part_without_a_manifest(tmp_path):
    """A part with records and no manifest (an older rsd's, another tool's) may hold records of other settings: it
    is named as a difference, merged only under --force."""
    out = tmp_path / "out.jsonl"
    with RecordWriter(part_path(out, 0, 2), {"--seed": 0}) as writer:
        writer.write({"id": "0"})
    part_path(out, 1, 2).write_text(json.dumps({"id": "1"}) + "\n")
    with pytest.raises(SettingsMismatch, match=r"out.rank00001-of-00002.jsonl: no manifest"):
        merge_parts(out)
    assert not out.exists()
    report = merge_parts(out, force=True)
    assert report.records == 2 and report.forced == ["out.rank00001-of-00002.jsonl: no manifest"]


def test_an_input_is_the_same_by_its_path_or_its_content_not_by_both_being_unknown():
    """Two --data inputs whose content cannot be hashed (no such file here) are one input only where their paths
    are: resuming with another one would mix two datasets in one output."""
    from rsd_engine.pipeline.manifest import differences

    held = {"--data": {"file": "/data/a.jsonl", "content": None}}
    assert differences(held, {"--data": {"file": "/data/a.jsonl", "content": None}}) == []
    assert differences(held, {"--data": {"file": "/data/b.jsonl", "content": None}}) == [
        "--data: /data/a.jsonl in the output, /data/b.jsonl now (another file, with other content)"]
    assert differences({"--data": {"file": "/data/a.jsonl", "content": "3:h"}},
                       {"--data": {"file": "/data/copy.jsonl", "content": "3:h"}}) == []


def test_merge_tells_a_part_of_another_token_space_whichever_comes_first(tmp_path):
    """A pair's token space is recorded only where it is not version 1: a part that records version 2 and one of an
    older rsd that records none are two laws of traces, refused whichever part is read first."""
    from rsd_engine.pipeline.manifest import TOKEN_SPACE

    for first, second in (({TOKEN_SPACE: 2}, {}), ({}, {TOKEN_SPACE: 2})):
        out = tmp_path / f"out{len(first)}.jsonl"
        for rank, extra in enumerate((first, second)):
            with RecordWriter(part_path(out, rank, 2), {"--seed": 0, **extra}) as writer:
                writer.write({"id": str(rank)})
        with pytest.raises(SettingsMismatch, match="token space: 2 in the output, 1 now|token space: .*2 now"):
            merge_parts(out)


def test_an_output_that_is_a_hard_link_to_an_input_is_refused(tmp_path):
    """Another name of the data file (a hard link: no symlink to resolve) is the data file: records appended to it
    mix with the data they are made from."""
    from rsd_engine.pipeline.output_paths import check_not_input

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "0", "question": "q"}) + "\n")
    os.link(data, tmp_path / "out.jsonl")
    with pytest.raises(ValueError, match=r"--out .*out.jsonl is also --data"):
        check_not_input({"--data": data}, {"--out": tmp_path / "out.jsonl"})
    check_not_input({"--data": data}, {"--out": tmp_path / "other.jsonl"})
