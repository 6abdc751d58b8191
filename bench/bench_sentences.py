"""Sentence splitting of long responses: pysbd 0.3.4 as it is against its linear-time steps
(rsd_engine/pipeline/pysbd_linear.py), on windows of the champ package's competition-maths text
(problems and model-written solutions) of growing size, side by side in one run, best of --repeats.
Both must give the same sentences (the run stops if not). Writes bench/results/sentences.json.

    python bench/bench_sentences.py [--sizes 8000 16000 32000 64000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_pysbd_linear import champ_text, linear_segment, reference_segment  # noqa: E402


def best_s(fn, text, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(text)
        times.append(time.perf_counter() - start)
    return min(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8000, 16000, 32000, 64000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "sentences.json")
    args = parser.parse_args()
    corpus = champ_text()
    rows = []
    print(f"{'chars':>7} {'sentences':>9} {'pysbd s':>8} {'linear s':>8} {'speed-up':>8}")
    for k, size in enumerate(args.sizes):
        start = (k + 1) * 1_000_000 % (len(corpus) - size)
        text = corpus[start:start + size]
        linear_segment("Warm up.")
        slow, expected = best_s(reference_segment, text, args.repeats)
        fast, got = best_s(linear_segment, text, args.repeats)
        if got != expected:
            raise SystemExit(f"the linear steps split the {size}-character window at {start} differently")
        rows.append(dict(chars=size, start=start, sentences=len(got), pysbd_s=slow, linear_s=fast))
        print(f"{size:7d} {len(got):9d} {slow:8.3f} {fast:8.3f} {slow / fast:7.1f}x", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
