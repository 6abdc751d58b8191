"""`rsd provenance` throughput on the demo pair: sentences per second of sentence tracing (split,
each model's own tokens, teacher-forced scoring, geometric means, categories), at several batch
sizes in one run; the ratio against batch size 1 is the figure to quote.

Responses are the reference solutions of champ-dataset problems (maths prose with inline LaTeX),
read by the teacher (SmolLM2-135M-Instruct) and the 4-bit student, optionally a third model as
"distilled" (--distilled: the 4-bit student again). Model loading and a warm-up batch are not
timed. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rsd_engine.pipeline.readers import Reader  # noqa: E402
from rsd_engine.pipeline.responses import Response  # noqa: E402
from rsd_engine.pipeline.tracing import Tracer  # noqa: E402


def champ_solutions(n: int) -> list[Response]:
    from rsd_engine.pipeline.data import _champ_rows
    from rsd_engine.pipeline.prompts import DEFAULT_SYSTEM_PROMPT

    out = []
    for row in list(_champ_rows().values())[:n]:
        steps = " ".join(s["_raw_text"].replace("@@", "$") for s in row["solution"]["steps"])
        answer = row["_raw_answer"].replace("@@", "")
        out.append(Response(row["identifier"], 0, row["_raw_text"].replace("@@", ""), DEFAULT_SYSTEM_PROMPT,
                            f"{steps} The answer is $\\boxed{{{answer}}}$.", {}))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", type=int, default=16)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--distilled", action="store_true", help="score under a third model too")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "provenance.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from rsd_engine.pipeline.demo_models import demo_student_dir, demo_teacher_dir

    teacher, student = demo_teacher_dir(), demo_student_dir()
    readers = {"teacher": Reader("teacher", teacher, device="cpu"), "student": Reader("student", student, device="cpu")}
    if args.distilled:
        readers["distilled"] = Reader("distilled", student, device="cpu")
    responses = champ_solutions(args.responses)
    rows = []
    for batch_size in args.batch_sizes:
        tracer = Tracer(readers, batch_size=batch_size)
        usable, _ = tracer.prepare(responses)
        tracer.load()
        tracer.trace_batch(usable[:batch_size])  # warm-up
        start = time.perf_counter()
        sentences = sum(len(t.sentences) for a in range(0, len(usable), batch_size)
                        for t in tracer.trace_batch(usable[a: a + batch_size]))
        seconds = time.perf_counter() - start
        tokens = sum(len(r.read(x.question, x.text, x.system)) for r in readers.values() for x in usable)
        rows.append({"batch_size": batch_size, "responses": len(usable), "sentences": sentences,
                     "seconds": seconds, "sentences_per_s": sentences / seconds, "tokens_per_s": tokens / seconds})
    base = rows[0]["sentences_per_s"]
    print(f"rsd provenance on the demo pair ({len(readers)} models), CPU, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'batch':>5} {'responses':>9} {'sentences':>9} {'seconds':>8} {'sent/s':>7} {'tok/s':>7} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch_size']:>5} {r['responses']:>9} {r['sentences']:>9} {r['seconds']:>8.1f} "
              f"{r['sentences_per_s']:>7.2f} {r['tokens_per_s']:>7.0f} {r['sentences_per_s'] / base:>5.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"models": len(readers), "load_average": os.getloadavg(), "rows": rows},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
