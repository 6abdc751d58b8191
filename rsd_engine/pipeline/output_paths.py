"""Checks of the files a command will write, made before any model runs: the output's name, that no output is one
of the command's inputs, that it can be written, and a --plot's format."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .data import special_file
from .manifest import manifest_path

__all__ = ["check_output_name", "check_not_input", "check_writable", "check_plot_format", "plot_path"]


def check_output_name(path) -> Path:
    """An output of JSON lines is named *.jsonl: the readers of every command (score, provenance, select)
    know a file's format by its suffix."""
    if not str(path).strip():
        raise ValueError("--out is empty: give the output's file name, such as traces.jsonl")
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"--out {path}: the output is JSON lines, one record each; name it *.jsonl (e.g. "
                         f"{path.with_suffix('.jsonl').name}), the suffix the commands that read it expect")
    return path


def check_not_input(inputs: dict, outputs: dict, apart: tuple[str, str] | None = None) -> None:
    """No output of a command is one of its inputs (flag -> path, or a list of paths; None: not given): records
    appended to the data file they are made from, or a report renamed over it, mix or lose the data. `apart`: two
    output flags (--out, --plot) that must name two files. An output of records (*.jsonl) brings its manifest, written
    beside it (a dataset named traces.jsonl.manifest.json was written over by --out traces.jsonl's)."""
    def given(sources):
        return [x for x in (sources if isinstance(sources, (list, tuple)) else [sources]) if x is not None]

    for in_flag, sources in inputs.items():
        for source in given(sources):
            for out_flag, out in outputs.items():
                if out is None:
                    continue
                named = out_flag if out_flag.startswith("--") and " " not in out_flag else "--out"  # (a file beside)
                if _same_file(out, source):
                    raise ValueError(f"{out_flag} {out} is also {in_flag}: the output would be written into the file "
                                     f"it reads; give {named} another name")
                if Path(out).suffix == ".jsonl" and _same_file(manifest_path(out), source):
                    raise ValueError(f"{in_flag} {source} is the manifest written beside {out_flag} {out}: it would "
                                     f"be written over; rename that file, or give {named} another name")
    if apart is not None:
        a, b = (outputs.get(flag) for flag in apart)
        if a is not None and b is not None and _same_file(a, b):
            raise ValueError(f"{apart[0]} and {apart[1]} are the same file ({a}); give each its own name")


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)  # links and other spellings of one file
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def plot_path(plot) -> Path | None:
    """The file a --plot option writes: matplotlib adds ".png" to a name without an extension (so that is the
    file to check and to name back)."""
    if not plot:
        return None
    path = Path(plot)
    return path.with_name(path.name + ".png") if not path.suffix else path


def check_plot_format(path) -> None:
    """Before any work: an extension matplotlib cannot write is an error naming --plot (it failed after all the
    models' work, in matplotlib's words)."""
    if path is None:
        return
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix
    if suffix[1:].lower() not in formats:
        raise ValueError(f"--plot {path}: matplotlib writes {', '.join('.' + f for f in sorted(formats))} files, "
                         f"not {suffix}; give one of these extensions")
    if suffix and suffix.lower() not in (".png", ".pdf", ".svg"):
        # Only these carry the title by which a rerun knows its own plot (reports.py): a .jpg was written once and
        # then refused by every rerun, a resume of rsd provenance included.
        raise ValueError(f"--plot {path}: rsd writes .png, .pdf or .svg plots (they carry the title a rerun knows "
                         f"its own plot by), not {suffix}")


def check_writable(path) -> Path:
    """Fail before any generation if `path` cannot be written; creates missing parent folders
    but leaves no file behind. An existing path that is no regular file (a device such as /dev/full, a FIFO) is
    refused: an output is read back (to resume it, or to know it for this command's own), and a device reads without
    end."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output path {path} is a directory; give a file name such as {path / 'traces.jsonl'}")
    if kind := special_file(path):
        raise ValueError(f"output path {path} is {kind}, not a regular file: rsd reads an existing output back (to "
                         f"resume it, or to know it for its own) before writing it; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "ab"):  # never created here, so never removed here
                pass
        else:
            # A file of our own beside it, not `path`: creating `path` and removing it again would remove the
            # output of a run that created and locked it in between (that run's records then went nowhere).
            fd, probe = tempfile.mkstemp(prefix=".rsd", dir=path.parent)  # short: any legal name of path fits
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"output path {path} is not writable: {exc.strerror or exc}") from None
    return path
