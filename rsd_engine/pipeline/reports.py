"""Files a command writes whole at its end: the JSON report (`rsd score --out`, `rsd provenance-report --out`) and
the plot (`--plot` of those and of `rsd provenance`).

A rerun replaces the command's own earlier file, and nothing else: a report names its command in its first field
("rsd command": "score"), a plot in its title metadata (so --plot is a .png, .pdf or .svg, the formats that carry
one; an untitled matplotlib plot of one, as older rsd wrote them, is replaced too), and any other file at that name
(a dataset, another command's output, a picture of yours) is refused before any work, naming it. An empty file holds
nothing and is written over; a report of an older rsd, which had no mark, is known by its fields. A folder is
refused (a --plot without extension gained ".png" and went beside it). A report is written to a temporary name
renamed over --out: a kill -9 leaves the old report or the new one, whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .data import parse_json
from .manifest import COMMAND
from .output_paths import check_writable, plot_path

# The fields a report of an older rsd (no mark) opened with, and those it always held.
UNMARKED_REPORTS = {"score": ("student", "teacher", "files"),
                    "provenance-report": ("source", "rule", "shares", "per_response")}
MARKED_FORMATS = (".png", ".pdf", ".svg")  # matplotlib writes a title into these
PEEK_BYTES = 64 << 10  # a plot's title sits in its first (PNG, SVG) or last (PDF) bytes


def check_report_out(out, command: str) -> Path | None:
    """Before any work: --out is new, empty, or `command`'s own report (module docstring); else an error naming it."""
    if out is None:
        return None
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give the report's file name, such as {out / 'report.json'}")
    if out.is_file() and out.stat().st_size and not _own_report(out, command):
        raise FileExistsError(f"--out {out} exists and is no report of rsd {command} (one opens with \"{COMMAND}\": "
                              f"\"{command}\"), so it is not written over; give another --out, or remove it first")
    return check_writable(out)


def write_report(out, command: str, report: dict, **dumps) -> None:
    """`report`, marked as `command`'s, over --out (checked again: a file may have appeared there since)."""
    out = check_report_out(out, command)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps({COMMAND: command, **report}, indent=1, **dumps) + "\n", encoding="utf-8")
    os.replace(tmp, out)


def _own_report(path: Path, command: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(f'{{\n "{COMMAND}": {json.dumps(command)},'.encode()):
        return True
    fields = UNMARKED_REPORTS.get(command)
    if not fields or not head.startswith(f'{{\n "{fields[0]}": '.encode()):
        return False
    try:
        report = parse_json(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(report, dict) and all(name in report for name in fields)


def plot_file(plot) -> Path | None:
    """The file --plot writes (output_paths.plot_path: matplotlib adds ".png" to a name without an extension); a folder
    is refused, not written beside as FOLDER.png."""
    if not plot:
        return None
    path = plot_path(plot)
    for folder in dict.fromkeys((Path(plot), path)):
        if folder.is_dir():
            raise IsADirectoryError(f"--plot {folder} is a folder; give the plot's file name, such as "
                                    f"{folder / 'plot.png'}")
    return path


def check_plot_out(path, command: str) -> Path | None:
    """Before any work: the plot file (plot_file) is new, empty or `command`'s own plot; else an error naming it."""
    if path is None:
        return None
    path = plot_file(path)
    if path.is_file() and path.stat().st_size and not _own_plot(path, command):
        raise FileExistsError(f"--plot {path} exists and is no plot of rsd {command} (its PNG, PDF and SVG plots carry "
                              f"the title {plot_title(command)!r}), so it is not written over; give another --plot, or "
                              f"remove it first")
    return check_writable(path)


def plot_title(command: str) -> str:
    return f"rsd {command} --plot"


def save_plot(fig, path, command: str) -> None:
    """fig into --plot (checked again), its title metadata naming `command` where the format carries one."""
    path = check_plot_out(path, command)
    marked = path.suffix.lower() in MARKED_FORMATS
    # Into a file beside it, renamed over --plot once whole: a kill in the write left a torn plot in place of the
    # old one, without its title yet (written last in a PDF), so every rerun refused it as no plot of rsd's.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format=path.suffix[1:].lower(), dpi=120,
                    metadata={"Title": plot_title(command)} if marked else None)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _own_plot(path: Path, command: str) -> bool:
    if path.suffix.lower() not in MARKED_FORMATS:
        return False
    size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read(PEEK_BYTES)
        if size > PEEK_BYTES:
            f.seek(max(PEEK_BYTES, size - PEEK_BYTES))
            data += f.read()
    title = plot_title(command).encode()
    # As PNG (a tEXt chunk), PDF (the info dictionary) and SVG (<title>) write it.
    if any(form in data for form in (b"tEXtTitle\0" + title, b"/Title (" + title + b")",
                                     b"<title>" + title + b"</title>")):
        return True
    # A plot of an older rsd: made by matplotlib and untitled (matplotlib's own name where the title would be). A
    # titled picture of yours is not.
    made = (b"tEXtSoftware\0Matplotlib", b"/Creator (Matplotlib", b"<dc:title>Matplotlib v")
    titled = (b"tEXtTitle\0", b"/Title (", b"<title>")
    return any(form in data for form in made) and not any(form in data for form in titled)
