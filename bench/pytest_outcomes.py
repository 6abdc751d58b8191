"""The CUDA tests' outcomes for bench/device_check.sh, exactly and as they happen.

A pytest plugin (``PYTHONPATH=bench python -m pytest -p pytest_outcomes --outcomes FILE ...``) appends one JSON line
per event to FILE and flushes it: what was selected (after -k), each collection error, each test's start
and outcome. A run killed by its time limit keeps every line written before the kill, so the tests it
finished are known, and the one it was in. Reading the log instead breaks on test ids with spaces and on
the "collected N items / K errors / D deselected" line; this reads pytest's own reports.

``python bench/pytest_outcomes.py FILE LOG OUT "STEP EXIT SECONDS LIMIT"`` reads FILE back into OUT
(cuda_tests.json): counts, the collection errors, every test with its message, and LOG's tail.
"""
from __future__ import annotations

import json
import os
import sys

OUTCOMES = ("passed", "failed", "skipped", "error")


def pytest_addoption(parser):
    parser.addoption("--outcomes", metavar="FILE", help="append each test's outcome to FILE as a JSON line")


def pytest_configure(config):
    path = config.getoption("outcomes")
    if path:
        config.pluginmanager.register(Recorder(path), "outcomes_recorder")


def _message(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (file, line, reason)
        return str(longrepr[2])
    crash = getattr(longrepr, "reprcrash", None)
    return str(getattr(crash, "message", None) or longrepr or "")


class Recorder:
    def __init__(self, path: str):
        self.file = open(path, "a", encoding="utf-8")
        self.deselected = 0

    def write(self, **event):
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()

    def pytest_deselected(self, items):
        self.deselected += len(items)

    def pytest_collectreport(self, report):
        if report.failed:  # an import error in a test file: none of its tests ran
            self.write(event="collection_error", name=report.nodeid, message=str(report.longrepr)[-1500:])

    def pytest_collection_finish(self, session):
        self.write(event="selected", count=len(session.items), deselected=self.deselected)

    def pytest_runtest_logstart(self, nodeid, location):
        self.write(event="start", name=nodeid)

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            outcome = report.outcome
            if hasattr(report, "wasxfail"):  # an expected failure counts as skipped, an unexpected pass as passed
                outcome = "skipped" if report.skipped else "passed"
        elif report.failed:  # set-up or tear-down
            outcome = "error"
        elif report.skipped:  # skipped in set-up (skip marks, missing CUDA)
            outcome = "skipped"
        else:
            return
        self.write(event="test", name=report.nodeid, when=report.when, outcome=outcome,
                   message=_message(report)[:500] if outcome != "passed" else "", seconds=round(report.duration, 3))

    def pytest_sessionfinish(self, session, exitstatus):
        self.write(event="finished", exitstatus=int(exitstatus))
        self.file.close()


def read(path: str) -> dict:
    """The outcomes file as the report's fields: selected and deselected (None if collection never finished),
    collection errors, tests by id (an error in set-up or tear-down outranks the call's outcome), and the
    test that had started but not finished (where a run cut short stopped)."""
    events = []
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except ValueError:  # a line cut by the kill
                    pass
    selected = deselected = exitstatus = None
    errors, tests, running = [], {}, None
    for e in events:
        if e["event"] == "selected":
            selected, deselected = e["count"], e["deselected"]
        elif e["event"] == "collection_error":
            errors.append(dict(name=e["name"], message=e["message"]))
        elif e["event"] == "start":
            running = e["name"]
        elif e["event"] == "test":
            test = tests.setdefault(e["name"], dict(name=e["name"], outcome=e["outcome"], message=e["message"]))
            if e["outcome"] == "error" or (e["outcome"] == "failed" and test["outcome"] != "error"):
                test.update(outcome=e["outcome"], message=e["message"])
            running = None if running == e["name"] else running
        elif e["event"] == "finished":
            exitstatus, running = e["exitstatus"], None
    counts = {k: sum(t["outcome"] == k for t in tests.values()) for k in OUTCOMES}
    counts["not_run"] = selected - len(tests) if selected is not None else None
    counts["collection_errors"] = len(errors)
    return dict(selected=selected, deselected=deselected, pytest_exit=exitstatus, counts=counts,
                collection_errors=errors, cut_at=running, tests=list(tests.values()))


def main(outcomes: str, log: str, out: str, step: str):
    from atomic_json import dump  # beside this file (bench/), which runs as a script here

    _, rc, seconds, _ = step.split()
    # 125: the step never ran (the budget was spent, or DEVICE_CHECK_ONLY left it out): no counts to read as zeros
    report = dict(exit=int(rc), seconds=int(seconds), timed_out=int(rc) in (124, 137), not_run=int(rc) == 125,
                  **read(outcomes))
    report["log_tail"] = open(log, errors="replace").read()[-4000:] if os.path.exists(log) else ""
    dump(report, out)
    if report["not_run"]:
        print("cuda_tests: not run (step skipped)")
        return
    print("cuda_tests:", report["counts"] | ({"cut_at": report["cut_at"]} if report["cut_at"] else {}))
    for e in report["collection_errors"]:
        print(f"  COLLECTION ERROR {e['name']}: {e['message'].strip().splitlines()[-1][:200] if e['message'] else ''}")


if __name__ == "__main__":
    main(*sys.argv[1:])
