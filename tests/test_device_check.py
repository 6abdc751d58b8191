"""bench/device_check.sh's CPU-side parts: its --cpu-dry-run runs every step (environment, the CUDA-only
tests, both benchmarks) at toy sizes on CPU and writes each result as JSON, as a lent CUDA machine would."""
import json
import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_dry_run_writes_every_result(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", "bench/device_check.sh", "--cpu-dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "cpu" and summary["ok"]
    assert [s["step"] for s in summary["steps"]] == ["environment", "cuda_tests", "rsd_step", "e2e", "speculative"]

    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["torch"] == torch.__version__ and environment["omp_wait_policy"] == "PASSIVE"
    cuda_tests = json.loads((tmp_path / "cuda_tests.json").read_text())
    assert cuda_tests["counts"]["failed"] == 0 and len(cuda_tests["tests"]) >= 3
    if not torch.cuda.is_available():
        assert cuda_tests["counts"]["skipped"] == len(cuda_tests["tests"])
    step = json.loads((tmp_path / "rsd_step.json").read_text())
    assert step["meta"]["device"] == "cpu" and [(r["B"], r["V"]) for r in step["rows"]] == [(1, 1000), (2, 1000)]
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    rows = [r for run in e2e["runs"] for r in run["rows"]]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["engine_tok_s"] > 0 and r["naive_hf_tok_s"] > 0 and r["engine_peak_rss_gb"] > 0 for r in rows)
    speculative = json.loads((tmp_path / "speculative.json").read_text())["pairs"]["random"]["rows"]
    assert [(r["batch"], r["draft_tokens"]) for r in speculative] == [(1, 0), (2, 0), (1, 2), (2, 2)]
    assert all(r["tok_s"] > 0 and r["teacher_passes"] <= r["tokens"] for r in speculative)


def test_refuses_unknown_options():
    done = subprocess.run(["bash", "bench/device_check.sh", "--fast"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown option --fast" in done.stderr
