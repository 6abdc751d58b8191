"""The command line explains itself: every option's help gives its default, `rsd --version`, help text
printed as written, and a progress bar that counts attempts on a terminal and stays out of logs."""
import io
import re

import pytest

from rsd_engine import __version__
from rsd_engine.cli import main
from rsd_engine.pipeline.progress import ProgressBar, Tally

COMMANDS = ("generate", "score", "eval", "provenance", "select", "merge", "demo")


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> dict[str, str]:
    """{'--attempts': 'tries per problem (default: 16)', ...}: each option's help, lines joined."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (-[-\w]+|[A-Z]+)(?:[ ,].*?)?(?:  +(.*))?$", line)
        if match:
            current = match[1]
            entries[current] = match[2] or ""
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_states_its_default(capsys, command):
    text = help_text(capsys, command)
    entries = option_entries(text)
    assert "--no-progress" in entries or command == "merge"
    for option, helptext in entries.items():
        if option in ("-h", "--help"):
            continue
        assert helptext, f"rsd {command} {option} has no help"
        required = ("--teacher", "--student", "--model", "--data", "--out", "OUT")
        assert "default" in helptext or option in required and command != "demo", \
            f"rsd {command} {option}: {helptext!r} does not say its default"


def test_the_system_prompt_default_reads_as_it_is_typed(capsys, monkeypatch):
    """One spelling in every command's help, the one a shell takes in single quotes: repr doubled the backslash of
    \\boxed{} in generate, eval and score (a copied default asked for a literal double backslash)."""
    from rsd_engine.pipeline.prompts import DEFAULT_SYSTEM_PROMPT

    monkeypatch.setenv("COLUMNS", "400")
    for command in ("generate", "eval", "score", "provenance", "select"):
        helptext = option_entries(help_text(capsys, command))["--system-prompt"]
        assert helptext.endswith(f"(default: '{DEFAULT_SYSTEM_PROMPT}')"), (command, helptext)
        assert "\\\\" not in helptext


@pytest.mark.parametrize("command", ("", *COMMANDS))
def test_help_has_no_doubled_percent(capsys, command):
    text = help_text(capsys, *([command] if command else []))
    assert "%%" not in text and "%(" not in text
    if command == "score":
        assert "under 1% probability" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"rsd-engine {__version__}"


class Terminal(io.StringIO):
    def isatty(self):
        return True


class _Result:
    token_ids, accepted, student_logprobs = [1, 2], [True, False], [-0.1, -9.0]


def test_progress_counts_attempts_on_a_terminal_only():
    tally = Tally(rows=2, skipped=[], problems=2, resumed=0, out="o")
    screen = Terminal()
    bar = ProgressBar(4, True, file=screen)
    for _ in range(3):
        tally.add_attempt(_Result())
        bar.attempt_done(tally)
    bar.close()
    assert "3/4" in screen.getvalue() and "attempt" in screen.getvalue()

    log = io.StringIO()  # a file, a pipe, CI: not a terminal
    bar = ProgressBar(4, True, file=log)
    bar.attempt_done(tally)
    bar.close()
    assert log.getvalue() == ""


@pytest.mark.parametrize("command", ("generate", "eval", "provenance", "select"))
def test_exit_statuses_are_documented(capsys, command):
    text = " ".join(help_text(capsys, command).split())
    assert "Exit status: 0 every" in text and "2 bad usage or input" in text
    assert "3 some" in text and "said on the last line" in text and "130 interrupted" in text


@pytest.mark.parametrize("command, options", [
    ("generate", ("--teacher-revision", "--student-revision")), ("score", ("--teacher-revision", "--student-revision")),
    ("eval", ("--revision",)), ("provenance", ("--teacher-revision", "--student-revision", "--distilled-revision")),
    ("select", ("--teacher-revision", "--student-revision"))])
def test_models_take_hub_ids_and_revisions(capsys, command, options):
    entries = option_entries(help_text(capsys, command))
    for option in options:
        assert "branch, tag or commit of a Hub id" in entries[option]
    model = options[0].removesuffix("-revision") if options[0] != "--revision" else "--model"
    assert "Hugging Face Hub id such as Qwen/Qwen3-0.6B" in entries[model]


def test_demo_out_that_is_a_file_is_named_as_such(tmp_path, capsys):
    """rsd demo writes a folder: a file named as --out said "not writable: File exists"."""
    afile = tmp_path / "afile"
    afile.write_text("kept\n")
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--out", str(afile)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and f"--out {afile} is a file: rsd demo writes a folder" in err
    assert afile.read_text() == "kept\n"


def test_an_interrupted_resumable_command_says_where_its_output_stays(monkeypatch, capsys, tmp_path):
    # rsd eval printed "rsd: interrupted" alone where generate named its output and the rerun; where the run was
    # stopped before its first record, its output is removed (records.RecordWriter): nothing is left to resume.
    import rsd_engine.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "eval", interrupted)
    monkeypatch.setattr(cli, "_resolve_models", lambda args: None)
    out = tmp_path / "o.jsonl"
    for said in ("; nothing was written\n", f"; what it wrote stays in {out} (and the files beside it), and the same "
                                           "command resumes it\n"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["eval", "--model", "m", "--data", "d.jsonl", "--out", str(out)])
        assert exit_info.value.code == 130 and capsys.readouterr().err == "rsd eval: interrupted" + said
        out.write_text('{"id": "a", "sample": 0}\n')


def test_select_help_says_rows_without_ids_are_refused(capsys):
    """select's --id-field help said rows without one get a hash of their question, as provenance's does; select
    refuses such data (test_provenance.py::test_select_needs_ids)."""
    assert option_entries(help_text(capsys, "select"))["--id-field"].endswith("data where no row has one is refused)")
    assert option_entries(help_text(capsys, "provenance"))["--id-field"].endswith(
        "a hash of the question when rows have none)")


def test_help_names_the_files_beside_out_as_they_are_written(capsys):
    """generate's --format and merge's description named OUT.unfinished.jsonl and OUT.rank*-of-*.jsonl, read as
    traces.jsonl.unfinished.jsonl beside OUT.manifest.json's traces.jsonl.manifest.json; the files are named after
    OUT's stem (unfinished_path, part_path), as the README says."""
    from pathlib import Path

    from rsd_engine.pipeline.generate import unfinished_path
    from rsd_engine.pipeline.records import part_path

    out = Path("traces.jsonl")
    fmt = option_entries(help_text(capsys, "generate"))["--format"]
    assert f"beside OUT: {unfinished_path(out).name} for {out}" in fmt
    parts = re.sub(r"\d+", "*", part_path(out, 0, 2).name)  # traces.rank*-of-*.jsonl
    assert f"Join the parts of OUT ({parts} for {out}:" in " ".join(help_text(capsys, "merge").split())
