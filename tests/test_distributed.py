"""`rsd generate` under torchrun: 2 CPU processes (gloo), one shard and one part each, merged at the end;
the merged file equals a one-process run, record for record."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rsd_engine.cli import main
from rsd_engine.pipeline.data import load_problems, shard_problems
from rsd_engine.pipeline.records import part_path, read_records
from solver_pair import SYSTEM, solver_pair, write_problems

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_ranks_shard_merge_and_match_one_process(tmp_path_factory, tmp_path):
    pair = solver_pair(tmp_path_factory.getbasetemp() / "solver_pair")
    extra = [{"id": f"x{i}", "question": f"What is {i}*{i}?", "answer": str(i * i)} for i in range(4)]
    data = write_problems(tmp_path / "p.jsonl", extra)
    options = ["generate", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(data),
               "--id-field", "id", "--system-prompt", SYSTEM, "--attempts", "2", "--max-new-tokens", "24",
               "--max-batch-size", "4", "--no-progress"]
    out = tmp_path / "dist" / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
                          "-m", "rsd_engine.cli", *options, "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"merged {WORLD} parts: 8 records" in run.stdout

    problems = load_problems(data, id_field="id").problems
    for rank in range(WORLD):
        part = read_records(part_path(out, rank, WORLD))
        assert sorted(r["id"] for r in part) == sorted(p.id for p in shard_problems(problems, rank, WORLD))

    assert main([*options, "--out", str(tmp_path / "single.jsonl")]) == 0
    single = {r["id"]: r for r in read_records(tmp_path / "single.jsonl")}
    merged = read_records(out)
    assert [r["id"] for r in merged] == sorted(single)  # merged in id order
    assert {r["id"]: (r["status"], r["token_ids"]) for r in merged} == \
        {i: (r["status"], r["token_ids"]) for i, r in single.items()}

    # `rsd merge` rebuilds the same file from the parts alone.
    out.unlink()
    assert main(["merge", str(out)]) == 0
    assert [json.dumps(r) for r in read_records(out)] == [json.dumps(r) for r in merged]


def test_rerun_of_a_merged_run_resumes_without_false_duplicates(tmp_path_factory, tmp_path, monkeypatch, capsys):
    pair = solver_pair(tmp_path_factory.getbasetemp() / "solver_pair")
    data, out = write_problems(tmp_path / "p.jsonl"), tmp_path / "out.jsonl"
    options = ["generate", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(data), "--out", str(out),
               "--system-prompt", SYSTEM, "--attempts", "1", "--max-new-tokens", "24", "--no-progress"]
    for rank in range(WORLD):  # ranks without a rendezvous: each writes its part, merged by hand
        monkeypatch.setenv("WORLD_SIZE", str(WORLD))
        monkeypatch.setenv("RANK", str(rank))
        assert main(options) == 0
    assert main(["merge", str(out)]) == 0
    capsys.readouterr()
    assert main(options) == 0  # rank 1 again: its part and the merged output hold its ids
    report = capsys.readouterr().out
    assert "problems: 2 (2 already in the output, 0 written now)" in report and "duplicate" not in report


def test_a_rank_gone_at_the_barrier_is_not_merged_said(tmp_path, monkeypatch):
    """A rank killed before the end broke the final barrier: rank 0 exited 1 with gloo's traceback. Now the run ends
    as any unmerged one (its part kept; why, and how to merge, said)."""
    import torch.distributed as td

    from rsd_engine.pipeline.distributed import Dist, barrier_and_merge

    def gone():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    monkeypatch.setattr(td, "barrier", gone)
    said = []
    out = tmp_path / "out.jsonl"
    assert barrier_and_merge(Dist(0, 2, 0), out, said.append) == "a rank left before the end"
    assert len(said) == 1 and "not merged: a rank left before the end (" in said[0] and f"rsd merge {out}" in said[0]


def test_an_interrupted_run_names_what_it_wrote_beside_out(tmp_path, monkeypatch):
    """Ctrl-C said "nothing was written" when the run had written only beside OUT: a rank's part, the unfinished
    records of --format sft, rsd select --budget's scores (or a rank's part of either)."""
    from rsd_engine.cli import _wrote_beside

    out = tmp_path / "t.jsonl"
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not _wrote_beside("generate", out)
    (tmp_path / "t.unfinished.jsonl").write_text('{"id": 1}\n')
    assert _wrote_beside("generate", out) and not _wrote_beside("eval", out)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not _wrote_beside("generate", out)  # a rank writes its own parts, not the files of one process
    part_path(tmp_path / "t.scores.jsonl", 1, 2).write_text('{"id": 1}\n')
    assert _wrote_beside("select", out) and not _wrote_beside("generate", out)
    part_path(out, 1, 2).write_text("")
    assert not _wrote_beside("eval", out)  # an empty part holds nothing
    part_path(out, 1, 2).write_text('{"id": 1}\n')
    assert _wrote_beside("eval", out)


def test_budget_under_torchrun_names_the_selection_rank_0_wrote(tmp_path):
    """Rank 0 merges --budget's scores and writes OUT itself, but its last line named its own part of OUT
    (sel.rank00000-of-00002.jsonl), a file no rank writes."""
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "sample": s, "question": f"What is {i} + 1?",
                                        "response": f"It is {i + s}."}) + "\n" for i in range(3) for s in range(2)))
    out = tmp_path / "sel.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
                          "-m", "rsd_engine.cli", "select", "--by", "random", "--budget", "3", "--data", str(data),
                          "--out", str(out), "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"[rank 0/{WORLD}] output: {out}\n" in run.stdout and len(read_records(out)) == 3


def test_rank_0_s_merge_of_a_stopped_run_s_part_exits_as_rsd_merge_does(tmp_path_factory, tmp_path, monkeypatch,
                                                                        capsys):
    """Rank 0's merge at the end of a run under torchrun warned of a part whose run was stopped before its end and
    exited 0; `rsd merge` of the same files exits 3. Both now say it alike: the warning, then the exit status 3."""
    import torch.distributed as td

    from rsd_engine.pipeline import generate
    from rsd_engine.pipeline.manifest import read_manifest
    from rsd_engine.pipeline.records import RecordWriter

    pair = solver_pair(tmp_path_factory.getbasetemp() / "solver_pair")
    data, out = write_problems(tmp_path / "p.jsonl"), tmp_path / "out.jsonl"
    options = ["generate", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(data), "--out", str(out),
               "--system-prompt", SYSTEM, "--attempts", "1", "--max-new-tokens", "24", "--no-progress"]
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(WORLD))
    monkeypatch.setenv("RANK", "1")
    assert main(options) == 0  # rank 1 of 2 writes its part
    settings = read_manifest(part_path(out, 1, WORLD))["settings"]
    for rank in range(2):  # then a run of 3 ranks, whose rank 2 was killed before its end (never left its writer)
        with RecordWriter(part_path(out, rank, 3), settings):
            pass
    RecordWriter(part_path(out, 2, 3), settings).close()
    # Rank 0 of 2 in a process group (one process here): the barrier passes, then it merges.
    monkeypatch.setattr(generate, "init_process_group", lambda dist, log: True)
    monkeypatch.setattr(td, "barrier", lambda: None)
    monkeypatch.setattr(td, "destroy_process_group", lambda: None)
    monkeypatch.setenv("RANK", "0")
    capsys.readouterr()
    code = main(options)
    said = capsys.readouterr().out.splitlines()
    warning = next(line for line in said if "were stopped before their end" in line)
    assert "(out.rank00002-of-00003.jsonl)" in warning and "merged 5 parts: 4 records" in "\n".join(said)
    assert (code, said[-1]) == (3, "rsd generate: 1 of 5 parts from runs stopped before their end: exit status 3")
    assert main(["merge", str(out)]) == 3  # by hand, the same files
    said = capsys.readouterr().out.splitlines()
    assert warning in said and said[-1] == "rsd merge: 1 of 5 parts from runs stopped before their end: exit status 3"


def test_rank_0_s_merge_notes_runs_appended_under_force_as_rsd_merge_does(tmp_path, monkeypatch):
    """rsd merge notes records an earlier run appended to a part under --force with other settings; rank 0's
    merge at the end of a run under torchrun joined the same files without a word."""
    import torch.distributed as td

    from rsd_engine.pipeline.distributed import Dist, barrier_and_merge
    from rsd_engine.pipeline.records import RecordWriter

    out = tmp_path / "out.jsonl"
    for rank in range(WORLD):
        with RecordWriter(part_path(out, rank, WORLD), {"--seed": 0}) as writer:
            writer.write({"id": str(rank)})
    with RecordWriter(part_path(out, 1, WORLD), {"--seed": 1}, force=True) as writer:
        writer.write({"id": "3"})
    monkeypatch.setattr(td, "barrier", lambda: None)
    said = []
    assert barrier_and_merge(Dist(0, WORLD, 0), out, said.append) is None
    assert ("note: records in the merged output were appended under --force with other settings (listed in its "
            "manifest): out.rank00001-of-00002.jsonl: --seed: 0 in the output, 1 now") in said
