"""Thread defaults: passive OpenMP waiting is asked for before torch loads, and one call sets the count
for torch and OpenMP together. (Timings under load are in bench/bench_e2e.py, not here.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsd_engine.threads import default_threads, set_threads, usable_cpus

ROOT = Path(__file__).resolve().parent.parent


def policy_after(code: str, **env) -> str:
    """OMP_WAIT_POLICY as a fresh interpreter sees it after running ``code``."""
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    out = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                         cwd=ROOT, env=environ, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_asks_for_passive_waiting_before_torch_loads():
    assert policy_after("import rsd_engine") == "PASSIVE"
    assert policy_after("import rsd_engine.cli") == "PASSIVE"


def test_a_users_policy_is_kept():
    assert policy_after("import rsd_engine", OMP_WAIT_POLICY="active") == "active"


def test_too_late_once_torch_is_loaded():
    """OpenMP read its environment when torch loaded it: setting the variable then would claim an effect
    that did not happen."""
    assert policy_after("import torch, rsd_engine") == "None"


def test_set_threads_sets_torch_and_openmp_together(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert 1 <= default_threads() <= usable_cpus()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match=r"threads = .*must be an integer >= 1"):
        set_threads(bad)


def test_more_threads_than_cpus_is_refused_naming_the_count(capsys):
    # --threads 10000 ran at 0.4 tok/s where the default ran 150: threads past the CPUs only take turns.
    from rsd_engine.cli import main

    too_many = usable_cpus() + 1
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "m", "--data", "d.jsonl", "--out", "o.jsonl", "--threads", str(too_many)])
    assert exit_info.value.code == 2
    assert (f"argument --threads: {too_many} threads, but this process may use {usable_cpus()} CPUs: pass at most "
            f"{usable_cpus()}") in capsys.readouterr().err
