"""The verify step of a speculative round: the fused op against the PyTorch reference (issue 8).

One call of ``rsd_verify`` over a round of G drafts: teacher and student logits [B, G+1, V], drafts sampled
from the student's rows with ``sample_tokens`` (as the engine drafts), every row verifying all G. CPU: the
C++ op (``backend="cpp"``) against ``rsd_verify_reference``, wall-clock median after warm-up. CUDA
(wherever one exists): the Triton op against the same reference, each as CUDA-graph replays. Beside them
the time to read both logit tensors once (the memory floor of any verifier), measured in the same run,
and the mean tokens a row emits (the fused op stops reading a row at its first rejection; the reference
computes every position). The ratio measured side by side is the figure to quote.
Prints one table and writes JSON (bench/results/rsd_verify.json unless --out says otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_rsd_step import PARAMS, cuda_copy_bandwidth, make_step, median_graph_ms, median_wall_ms  # noqa: E402
from rsd_engine.randomness import DRAFT_DRAW, round_uniforms  # noqa: E402
from rsd_engine.sampling import rsd_verify, rsd_verify_reference, sample_tokens  # noqa: E402

SHAPES = [(B, G, V) for V in (32_000, 151_936) for G in (1, 4) for B in (1, 8, 16)]
QUICK = [(1, 4, 151_936), (8, 4, 32_000), (16, 1, 151_936)]
LOGITS = ("LM-like rows as bench_rsd_step (2*randn plus 6 peaked ids; student = 0.8*teacher + 2*randn), "
          "independent per position")


def make_round(B, G, V, device):
    teacher, student, _, params, mask, _ = make_step(B * (G + 1), V, "cpu")
    params = type(params)(*(p[:B] for p in params))
    teacher, student = teacher.view(B, G + 1, V), student.view(B, G + 1, V)
    uniforms = round_uniforms(torch.arange(B), torch.zeros(B, dtype=torch.int64), G + 1)
    draft = torch.stack([sample_tokens(student[:, i].contiguous(), uniforms[:, i, DRAFT_DRAW].contiguous(),
                                       params.student_temperature, params.student_top_k, params.student_top_p, mask)
                         for i in range(G)], dim=1)
    num_draft = torch.full((B,), G, dtype=torch.int32)
    to = lambda t: t.to(device)  # noqa: E731
    return (to(teacher), to(student), to(draft), to(num_draft), to(uniforms), type(params)(*map(to, params)),
            to(mask), to(mask))


def bench(B, G, V, args, device, bandwidth):
    backend = "triton" if device == "cuda" else "cpp"
    inputs = make_round(B, G, V, device)
    fused = lambda: rsd_verify(*inputs, backend=backend)  # noqa: E731
    reference = lambda: rsd_verify_reference(*inputs)  # noqa: E731
    out, ref = fused(), reference()
    row = dict(same_tokens=bool(torch.equal(out.tokens, ref.tokens)), mean_emitted=out.num_emitted.float().mean().item())
    teacher, student = inputs[:2]
    if device == "cuda":
        row["fused_ms"] = median_graph_ms(fused, args.repeats)
        try:
            row["reference_ms"] = median_graph_ms(reference, args.repeats)
        except RuntimeError as err:
            row["reference_ms"] = median_wall_ms(lambda: (reference(), torch.cuda.synchronize()), 2, args.repeats,
                                                 args.budget)
            row["reference_note"] = f"eager (graph capture failed: {err})"
        row["read_once_ms"] = 2 * teacher.numel() * teacher.element_size() / bandwidth * 1e3
    else:
        row["fused_ms"] = median_wall_ms(fused, args.warmup, args.repeats, args.budget)
        row["reference_ms"] = median_wall_ms(reference, 1, args.repeats, args.budget)
        row["read_once_ms"] = median_wall_ms(lambda: (teacher.amax(), student.amax()), args.warmup, args.repeats,
                                             args.budget)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK} (B, G, V)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--budget", type=float, default=5.0, help="seconds per measurement before cutting repeats")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "rsd_verify.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    shapes = QUICK if args.quick else SHAPES
    meta = dict(device=device, torch=torch.__version__, params=PARAMS, logits=LOGITS, dtype="float32",
                python=platform.python_version())
    bandwidth = None
    if device == "cuda":
        bandwidth = cuda_copy_bandwidth()
        meta.update(gpu=torch.cuda.get_device_name(), copy_bandwidth_gb_s=bandwidth / 1e9,
                    timing="median CUDA-graph replay", floor="ideal: both tensors read once at the copy bandwidth")
    else:
        from rsd_engine import _C

        meta.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(), isa=_C.isa(),
                    load_average=os.getloadavg(), timing="median wall clock after warm-up",
                    floor="read_once: amax over both logit tensors, measured in the same run")
    header = (f"{'B':>3} {'G':>2} {'V':>7} | {'fused ms':>9} {'torch ms':>9} {'speedup':>8} | {'floor ms':>9} "
              f"{'fused/floor':>11} | {'emitted':>7} | same")
    print(f"rsd_verify on {device} ({meta.get('gpu') or meta.get('isa')}), fused vs PyTorch reference")
    print(header)
    print("-" * len(header))
    rows = []
    for B, G, V in shapes:
        row = bench(B, G, V, args, device, bandwidth)
        row.update(B=B, G=G, V=V, speedup=row["reference_ms"] / row["fused_ms"],
                   fused_over_floor=row["fused_ms"] / row["read_once_ms"])
        rows.append(row)
        print(f"{B:>3} {G:>2} {V:>7} | {row['fused_ms']:>9.3f} {row['reference_ms']:>9.2f} {row['speedup']:>7.1f}x | "
              f"{row['read_once_ms']:>9.3f} {row['fused_over_floor']:>10.1f}x | {row['mean_emitted']:>7.2f} | "
              f"{'yes' if row['same_tokens'] else 'no (rounding)'}", flush=True)
    if device == "cpu":
        meta["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
