"""The settings manifest beside an output: OUT.manifest.json says what made OUT's records.

A record is only as good as the settings that made it, and resuming under other settings would mix
two datasets in one file. So the command that writes OUT states its settings once, as a flat
dict keyed by what the user would change (`--seed`, `--temperature`, `teacher model`), and a
rerun compares: with records in OUT and any difference, it refuses, naming each difference,
unless forced (the manifest then keeps a list of the forced runs and their differences).

Settings are what shape a finished record. Options that only choose which problems run
(--limit), where the output is (--out) or what resources they run on (batch size, device, sampler
backend; --max-seq-len where what it cuts off is redone or skipped, never written) are kept under
"about" for the reader and not compared: a finished record is the same whatever they were, up to float
rounding. The dtype the models run in is compared ("model dtype", --dtype resolved on the device:
auto is bfloat16 on CUDA, float32 on CPU): bfloat16 weights are another model to sample from and score
with, not a rounding, so a run started on a CPU and resumed on a GPU with the same command line is
refused rather than mixed (an older manifest kept --dtype and --device under "about": the dtype they
resolve to is compared, and not at all where they say auto for both).
`rsd eval` and `rsd select` compare --max-seq-len (a generation it cuts short is written as it
stopped; a candidate it skips does not compete).

Models are fingerprinted by content, not by path (a copied folder is the same model): small
files are hashed whole, weight files by their size and 16 evenly spaced 64 KiB windows, which
reads 1 MiB of a multi-GB file and still tells two checkpoints apart. An input dataset (--data) is
held as its resolved path and its content hash, and is the same input when either matches: named
`gens.jsonl` or `./gens.jsonl`, or copied elsewhere. A file edited in place stays the same input;
the commands that read it see which of its rows changed (`rsd provenance` keeps a hash of each
response's text).

The manifest is written to a temporary name, fsynced and renamed over the old one, under the
output's lock: after a kill -9 it is the old manifest or the new one, never a torn one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

from .data import parse_json

MODEL_FILES = ("*.safetensors", "*.json", "*.jinja", "*.model", "*.txt")
WHOLE_HASH_BYTES = 4 << 20
WINDOWS, WINDOW_BYTES = 16, 64 << 10


class SettingsMismatch(ValueError):
    """OUT holds records made with other settings."""


def manifest_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".manifest.json")


def read_manifest(out) -> dict | None:
    path = manifest_path(out)
    if not path.is_file():
        return None
    try:
        manifest = parse_json(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a JSON manifest; it was changed by something else. Remove it and "
                         f"rerun with --force to adopt the records in {Path(out).name}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
        raise ValueError(f"{path} has no 'settings'; it was not written by rsd")
    return manifest


def write_manifest(out, manifest: dict) -> None:
    path = manifest_path(out)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_manifest(settings: dict, about: dict | None = None) -> dict:
    from rsd_engine import __version__

    return {"written_by": f"rsd-engine {__version__}", "created": _now(), "settings": plain(settings),
            "about": plain(about or {})}


def plain(value):
    """`value` as it reads back from JSON (tuples become lists), so that comparisons are exact."""
    return json.loads(json.dumps(value))


def input_identity(path) -> dict:
    """{"file": resolved path, "content": hash} of a dataset file or folder (content None when missing)."""
    path = Path(path)
    if path.is_file():
        content = _file_hash(path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        digest = hashlib.blake2b(digest_size=16)
        for p in files:
            digest.update(f"{p.relative_to(path)}\0{_file_hash(p)}\0".encode())
        content = f"{len(files)} files:{digest.hexdigest()}"
    else:
        content = None
    return {"file": str(path.resolve()), "content": content}


def _same_input(held, now) -> bool:
    """An input named either way (see the module docstring); a manifest of an older rsd holds the
    path as typed, taken from the current folder."""
    if not (isinstance(now, dict) and set(now) == {"file", "content"}):
        return False
    if isinstance(held, str):
        return str(Path(held).resolve()) == now["file"]
    return isinstance(held, dict) and set(held) == {"file", "content"} and (
        held["file"] == now["file"] or (held["content"] is not None and held["content"] == now["content"]))


MODEL_DTYPE = "model dtype"
ANSWER_CHECK = "answer check"  # the version of the rules that judged the answers (answers.ANSWER_CHECK)
SENTENCE_READING = "sentence reading"  # the version of how sentences are cut and read (sentences.READING)
# The version of which ids the teacher proposes (tokens.PROPOSAL_RULES), recorded for a pair where it matters.
TOKEN_SPACE = "token space"
# Versions of rules an older manifest did not record: what it held was version 1.
_VERSIONED = (ANSWER_CHECK, SENTENCE_READING, TOKEN_SPACE)
COMMAND = "rsd command"  # the command whose records these are: never two commands' records in one file


def other_command(held: dict, now: dict) -> str | None:
    """The command a manifest's records are of, where it is not `now`'s (manifests of older rsd do not say)."""
    a, b = held.get(COMMAND), now.get(COMMAND)
    return a if a and b and a != b else None


def model_dtype(device, dtype) -> str:
    """The dtype the models run in on `device` (--dtype and --device as given; runtime.py's resolution)."""
    from rsd_engine.runtime import resolve_device, resolve_dtype

    return str(resolve_dtype(dtype, resolve_device(device))).removeprefix("torch.")


def _held_model_dtype(held_about: dict) -> str | None:
    """The model dtype of an older manifest, which kept --dtype and --device under "about"; None where they do
    not say (auto on an unknown device)."""
    dtype, device = held_about.get("--dtype"), held_about.get("--device")
    if dtype in ("float32", "bfloat16", "float16"):
        return dtype
    if dtype == "auto" and isinstance(device, str) and device.split(":")[0] in ("cpu", "cuda"):
        return "bfloat16" if device.startswith("cuda") else "float32"
    return None


def differences(held: dict, now: dict, held_about: dict | None = None) -> list[str]:
    """One line per setting that differs, in the user's words. Only what is compared now counts: a key the
    held manifest compared but this version keeps under "about" (--out, batch size) is not a difference,
    and a key this version compares that an older manifest kept under "about" (--max-seq-len of rsd eval
    and rsd select) is compared with the value held there."""
    held, now, held_about = plain(held), plain(now), plain(held_about or {})
    lines = []
    for key in now:
        if key == COMMAND and key not in held:  # an older manifest: other_command cannot tell
            continue
        if key == MODEL_DTYPE and key not in held:
            a = _held_model_dtype(held_about)
            if a is None:
                continue
        elif key in _VERSIONED and key not in held:
            a = 1  # an older rsd's rules
        else:
            a = held.get(key, held_about.get(key, "(not set)"))
        b = now[key]
        if a == b or _same_input(a, b):
            continue
        if isinstance(b, dict) and set(b) == {"file", "content"}:
            a_file = a.get("file") if isinstance(a, dict) else a
            lines.append(f"{key}: {a_file} in the output, {b['file']} now (another file, with other content)")
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changed = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
            lines.append(f"{key}: {', '.join(changed)} differ")
        else:
            lines.append(f"{key}: {json.dumps(a)} in the output, {json.dumps(b)} now")
    # A rule recorded only where it matters (a pair's token space) is version 1 where not recorded, either side:
    # so an older file is told apart whichever of two files (rsd merge's) comes first.
    if TOKEN_SPACE in held and TOKEN_SPACE not in now and held[TOKEN_SPACE] != 1:
        lines.append(f"{TOKEN_SPACE}: {json.dumps(held[TOKEN_SPACE])} in the output, 1 now")
    return lines


def forced_runs_note(out) -> str | None:
    """A warning line when OUT's manifest lists runs that appended under --force with other settings (its records
    do not say which settings made them), else None."""
    held = read_manifest(out)
    runs = [r for r in (held or {}).get("forced", []) if isinstance(r, dict)]
    if not runs:
        return None
    shown = " | ".join("; ".join(map(str, r.get("differences", [])[:3])) for r in runs[-2:])
    return (f"warning: {out} mixes settings: {len(runs)} run{'s' if len(runs) > 1 else ''} appended records under "
            f"--force with other settings [{shown}] (all in {manifest_path(out).name}, 'forced'); its records do not "
            f"say which settings made them")


def check_settings(out, settings: dict, *, has_records: bool, force: bool, about: dict | None = None,
                   write: bool = True) -> list[str]:
    """Compare `settings` with OUT's manifest and (re)write it (unless not `write`); returns the
    differences accepted under `force`. Refuses (SettingsMismatch) when OUT has records made
    otherwise and not `force`."""
    out = Path(out)
    if not has_records:  # a new output, or one killed before its first record
        if write:
            write_manifest(out, new_manifest(settings, about))
        return []
    held = read_manifest(out)
    if held is not None and other_command(held["settings"], settings):
        raise SettingsMismatch(
            f"{out} holds records of rsd {held['settings'][COMMAND]}, not of rsd {settings[COMMAND]} (its manifest, "
            f"{manifest_path(out).name}, says so): give another --out (never forced: a file of both is neither "
            f"command's output)")
    found = (differences(held["settings"], settings, held.get("about")) if held is not None
             else [f"no {manifest_path(out).name} beside it: its records were made by an older rsd or another tool"])
    if not found:
        if write and held is not None and held["settings"] != plain(settings):
            held["settings"] = plain(settings)  # the same input under another name, or edited: as it is now
            write_manifest(out, held)
        return []
    if not force:
        if held is not None:
            unknown = [k for k in settings if k not in held["settings"] and k not in held.get("about", {})]
            if 2 * len(unknown) > len(settings):  # not one version's settings beside another's: another command's
                raise SettingsMismatch(
                    f"{out} holds records another command wrote: its manifest ({manifest_path(out).name}) has none "
                    f"of this command's settings {', '.join(unknown[:4])}{', ...' if len(unknown) > 4 else ''}; "
                    "give another --out (or pass --force to append anyway)")
        mixed = forced_runs_note(out)
        raise SettingsMismatch(
            f"{out} holds records made with other settings:\n  " + "\n  ".join(found) +
            (f"\n(and {mixed.removeprefix('warning: ')})" if mixed else "") +
            "\nRerun with the same settings to resume it, give another --out, or pass --force to append anyway "
            "(the manifest then lists the mixed settings)")
    if write:
        manifest = held or new_manifest(settings, about)  # adopting an output that had none
        manifest.setdefault("forced", []).append({"at": _now(), "differences": found, "settings": plain(settings)})
        write_manifest(out, manifest)
    return found


def model_fingerprint(folder) -> dict:
    """{file name: content hash} of a model folder's weights, config and tokenizer files."""
    folder = Path(folder)
    files = sorted({p for pattern in MODEL_FILES for p in folder.glob(pattern) if p.is_file()})
    return {p.name: _file_hash(p) for p in files}


def _file_hash(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        if size <= WHOLE_HASH_BYTES:
            digest.update(f.read())
        else:
            for i in range(WINDOWS):
                f.seek((size - WINDOW_BYTES) * i // (WINDOWS - 1))
                digest.update(f.read(WINDOW_BYTES))
    return f"{size}:{digest.hexdigest()}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
