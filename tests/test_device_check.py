"""bench/device_check.sh's plumbing on CPU: --cpu-dry-run runs every step of the CUDA check (environment,
the CUDA tests, the op benchmarks, both end-to-end runs, the profiler table) at toy sizes and writes the
same 8 files a lent CUDA machine would return; a spent time budget skips steps with their own exit code
and still writes every summary."""
import json
import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FILES = ["cuda_tests.json", "device_check.log", "e2e.json", "e2e_8b.json", "profile.json", "rsd_step.json",
         "rsd_verify.json", "summary.json"]
STEPS = ["environment", "cuda_tests", "rsd_step", "rsd_verify", "e2e", "profile", "e2e_8b"]


def dry_run(out: Path, budget: int):
    env = {**os.environ, "OUT": str(out), "DEVICE_CHECK_BUDGET": str(budget)}
    return subprocess.run(["bash", "bench/device_check.sh", "--cpu-dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_cpu_dry_run_writes_every_result(tmp_path):
    done = dry_run(tmp_path, budget=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == FILES  # a lent machine returns at most 8 files
    assert "device_check summary" in done.stdout and "0 step(s) failed" in done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "cpu" and summary["ok"]
    assert [s["step"] for s in summary["steps"]] == STEPS
    environment = summary["environment"]
    assert environment["torch"] == torch.__version__ and environment["omp_wait_policy"] == "PASSIVE"

    cuda_tests = json.loads((tmp_path / "cuda_tests.json").read_text())
    assert cuda_tests["counts"]["failed"] == 0 and len(cuda_tests["tests"]) >= 3
    assert cuda_tests["counts"]["not_run"] == 0 and not cuda_tests["timed_out"]
    if not torch.cuda.is_available():
        assert cuda_tests["counts"]["skipped"] == len(cuda_tests["tests"])

    step = json.loads((tmp_path / "rsd_step.json").read_text())
    assert step["meta"]["device"] == "cpu"
    assert [(r["op"], r["B"], r["V"], r["dtype"], r.get("shape", "lm")) for r in step["rows"]] == [
        ("rsd_sample", B, 1000, dtype, "lm") for dtype in ("float32", "bfloat16") for B in (1, 2)] + [
        ("rsd_sample", 2, 1000, "float32", "model")]  # rows shaped as a real model's logits
    assert all(r["round0_binned_ids"] >= 0 for r in step["rows"])
    verify = json.loads((tmp_path / "rsd_verify.json").read_text())
    assert [(r["op"], r["B"], r["G"], r.get("shape", "lm")) for r in verify["rows"]] == [
        ("rsd_verify", 1, 2, "lm"), ("rsd_verify", 2, 2, "lm"), ("sample_tokens", 2, 0, "lm"),
        ("rsd_verify", 2, 2, "model")]
    for r in step["rows"] + verify["rows"]:
        assert "error" not in r, r
        assert r["fused_us"] > 0 and r["reference_us"] > 0 and r["floor_us"] > 0
        assert r["over_floor"] == r["fused_us"] / r["floor_us"]

    e2e = json.loads((tmp_path / "e2e.json").read_text())
    rows = [r for run in e2e["runs"] for r in run["rows"]]
    assert [(r["batch"], r["draft_tokens"]) for r in rows] == [(1, 0), (2, 0)]
    assert all(r["engine_tok_s"] > 0 and r["naive_hf_tok_s"] > 0 and r["naive_new_tokens"] == 3 for r in rows)
    assert all(run["weight_bytes"] > 0 for run in e2e["runs"])
    speculative = [r for run in json.loads((tmp_path / "e2e_8b.json").read_text())["runs"] for r in run["rows"]]
    assert [(r["batch"], r["draft_tokens"]) for r in speculative] == [(1, 0), (2, 0), (1, 2), (2, 2)]
    assert all(r["engine_tok_s"] > 0 for r in speculative)
    assert [("naive_hf_tok_s" in r) for r in speculative] == [True, False, True, False]  # --naive-batches 1
    assert all(r["teacher_passes_per_token"] <= 1 and "vs_plain" in r for r in speculative)

    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["steps"] == 3 and profile["kernels_per_step"] > 0 and profile["wall_ms_per_step"] > 0
    assert profile["top_kernels"] and all(k["calls_per_step"] > 0 for k in profile["top_kernels"])


def test_a_spent_budget_skips_steps_and_still_reports(tmp_path):
    done = dry_run(tmp_path, budget=5)
    assert done.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["ok"] and [(s["step"], s["exit"]) for s in summary["steps"]] == [(s, 125) for s in STEPS]
    assert "error" in summary["environment"]  # the skipped environment step wrote nothing, and says so
    cuda_tests = json.loads((tmp_path / "cuda_tests.json").read_text())
    assert cuda_tests["exit"] == 125 and cuda_tests["tests"] == [] and cuda_tests["selected"] is None
    assert "7 step(s) failed" in done.stdout


def test_refuses_unknown_options():
    done = subprocess.run(["bash", "bench/device_check.sh", "--fast"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown option --fast" in done.stderr


def test_the_summary_holds_each_open_issue_target_against_its_row(tmp_path):
    """The targets of issues 14 and 15, each read from the row that measures it (met, MISSED, not measured):
    the rows a CUDA run writes, placed in $OUT here and left there by a run of the environment step alone."""
    def rows(*items):
        return json.dumps({"rows": list(items)})

    sample = dict(op="rsd_sample", V=151_936, dtype="float32", floor_us=0.6)
    (tmp_path / "rsd_step.json").write_text(rows(
        {**sample, "B": 1, "fused_us": 20.0, "reference_us": 100.0, "over_floor": 33},
        {**sample, "B": 16, "fused_us": 50.0, "reference_us": 40.0, "over_floor": 5},  # missed, and slower than torch
        {**sample, "B": 1, "fused_us": 90.0, "chunks": 2, "over_floor": 150},  # a sweep row: not the target's
        {**sample, "B": 256, "fused_us": 200.0, "reference_us": 900.0, "floor_us": 72.0, "over_floor": 2.78}))
    (tmp_path / "rsd_verify.json").write_text(rows(
        dict(op="rsd_verify", V=151_936, dtype="bfloat16", B=1, G=4, fused_us=39.0, reference_us=900.0, floor_us=1.4,
             over_floor=28)))
    runs = [{"teacher": "/x/qwen3-1.7b-v1", "student": "/x/qwen3-0.6b-v1", "progress": ["done"],
             "rows": [{"batch": 1, "draft_tokens": 0, "engine_ms_per_step": 2.4, "engine_tok_s": 416.7},
                      {"batch": 128, "draft_tokens": 0, "engine_ms_per_step": 10.7, "engine_tok_s": 12_000.0}]}]
    (tmp_path / "e2e.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "profile.json").write_text(json.dumps(dict(gpu="H200", kernels_per_step=350, memcpys_per_step=1,
                                                           syncs_per_step=1, wall_ms_per_step=2.0,
                                                           kernel_us_per_step=1.0, launches_per_step=1,
                                                           top_kernels=[])))
    env = {**os.environ, "OUT": str(tmp_path), "DEVICE_CHECK_ONLY": "environment"}
    done = subprocess.run(["bash", "bench/device_check.sh", "--cpu-dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout[-3000:]
    verdicts = {t["target"]: t for t in json.loads((tmp_path / "summary.json").read_text())["targets"]}
    said = {k: (v["measured"], v["met"]) for k, v in verdicts.items()}
    assert said["issue 14: rsd_sample fp32 B=1 µs"] == (20.0, True)
    assert said["issue 14: rsd_sample fp32 B=16 µs"] == (50.0, False)
    assert said["issue 14: rsd_sample fp32 B=64 µs"] == (None, None)
    assert said["issue 14: rsd_sample fp32 B>=256 over the read-once floor (x)"] == (2.78, True)
    assert said["issue 14: rsd_verify G=4 B=1 µs (every logit dtype)"] == (39.0, True)
    assert said["issue 14: fused / op-by-op reference, every row (x)"] == (1.25, False)
    assert said["issue 15: 1.7B/0.6B batch 1 ms per step"] == (2.4, False)
    assert said["issue 15: 1.7B/0.6B batch 128 tok/s"] == (12_000.0, True)
    assert said["issue 15: 8B/0.6B batch 1 draft_tokens=4 vs plain (x)"] == (None, None)
    assert said["issue 15: kernels per step (batch 1)"] == (350, True)
    assert said["issue 15: blocking syncs per step (batch 1)"] == (1, False)
    assert "issue 14: rsd_sample fp32 B=16 µs: 50.00 <= 35: MISSED" in done.stdout
