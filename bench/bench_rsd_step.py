"""One RSD sampling step: the fused kernel against the op-by-op PyTorch reference (issue 3).

CPU: the C++ kernel (``backend="cpp"``) against ``rsd_sample_reference``, both called as the engine calls
them, wall-clock median after warm-up. Beside them, the time to read both logit tensors once
(``amax``), measured in the same run: the memory floor of any sampler.
CUDA (wherever one exists): the Triton kernel against the same reference, each captured as a CUDA graph
and timed as replays; the ideal is one read of each logit row at the card's measured copy bandwidth.

Effective bandwidth counts the bytes of both logit rows once. The ratio measured side by side is the
figure to quote. Default parameters are the paper's (temperature 0.7, top_p 0.95, threshold 0.01).
Prints one table and writes JSON (bench/results/rsd_step.json unless --out says otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rsd_engine  # noqa: E402,F401  before torch: passive OpenMP waiting (rsd_engine/threads.py)
import torch  # noqa: E402

from rsd_engine.randomness import step_uniforms  # noqa: E402
from rsd_engine.sampling import RowParams, rsd_sample, rsd_sample_reference  # noqa: E402

BATCHES = (1, 8, 16, 32, 128)
VOCABS = (32_000, 49_152, 151_936)
QUICK = ((1, 32_000), (16, 151_936), (32, 49_152))
PARAMS = dict(temperature=0.7, top_k=0, top_p=0.95, threshold=0.01, check_temperature=1.0,
              student_temperature=0.7, student_top_k=0, student_top_p=0.95, proposal_trials=1)
LOGITS = "LM-like rows: 2*randn background plus 6 peaked ids per row (+3..+11); student = 0.8*teacher + 2*randn"


def make_step(B: int, V: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, V, generator=gen) * 2
    teacher.scatter_add_(1, torch.randint(0, V, (B, 6), generator=gen), torch.rand(B, 6, generator=gen) * 8 + 3)
    student = 0.8 * teacher + torch.randn(B, V, generator=gen) * 2
    params = RowParams(**{k: torch.full((B,), v, dtype=torch.int32 if isinstance(v, int) else torch.float32)
                          for k, v in PARAMS.items()})
    uniforms = step_uniforms(torch.arange(B) + seed, torch.zeros(B, dtype=torch.int64))
    mask = torch.ones(V, dtype=torch.bool)
    to = lambda t: t.to(device)  # noqa: E731
    return to(teacher), to(student), to(uniforms), RowParams(*map(to, params)), to(mask), to(mask)


def median_wall_ms(fn, warmup: int, repeats: int, budget_s: float) -> float:
    for _ in range(warmup):
        fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def median_graph_ms(fn, repeats: int) -> float:
    """Median time of one CUDA-graph replay of fn."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compiles kernels and settles the allocator before capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_copy_bandwidth() -> float:
    """Bytes per second the card moves in a large device-to-device copy (read + write)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_graph_ms(lambda: dst.copy_(src), 20)
    return 2 * src.numel() / (ms * 1e-3)


def bench_cpu(B, V, args):
    teacher, student, uniforms, params, mask, _ = make_step(B, V, "cpu")
    fused = lambda: rsd_sample(teacher, student, uniforms, params, mask, mask, backend="cpp")  # noqa: E731
    reference = lambda: rsd_sample_reference(teacher, student, uniforms, params, mask, mask)  # noqa: E731
    same = torch.equal(fused().token, reference().token)
    fused_ms = median_wall_ms(fused, args.warmup, args.repeats, args.budget)
    reference_ms = median_wall_ms(reference, 1, args.repeats, args.budget)
    floor_ms = median_wall_ms(lambda: (teacher.amax(), student.amax()), args.warmup, args.repeats, args.budget)
    return dict(fused_ms=fused_ms, reference_ms=reference_ms, read_once_ms=floor_ms, same_tokens=same)


def bench_cuda(B, V, args, bandwidth):
    teacher, student, uniforms, params, mask, _ = make_step(B, V, "cuda")
    fused = lambda: rsd_sample(teacher, student, uniforms, params, mask, mask, backend="triton")  # noqa: E731
    reference = lambda: rsd_sample_reference(teacher, student, uniforms, params, mask, mask)  # noqa: E731
    same = torch.equal(fused().token, reference().token)
    row = dict(fused_ms=median_graph_ms(fused, args.repeats), same_tokens=same)
    try:
        row["reference_ms"] = median_graph_ms(reference, args.repeats)
    except RuntimeError as err:  # should the reference ever stop being capturable, time it eagerly
        row["reference_ms"] = median_wall_ms(lambda: (reference(), torch.cuda.synchronize()), 2, args.repeats,
                                             args.budget)
        row["reference_note"] = f"eager (graph capture failed: {err})"
    row["read_once_ms"] = 2 * teacher.numel() * teacher.element_size() / bandwidth * 1e3  # the ideal
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK} (B, V) pairs")
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--budget", type=float, default=5.0, help="seconds per measurement before cutting repeats")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "rsd_step.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    shapes = list(QUICK) if args.quick else [(B, V) for V in args.vocab for B in args.batch]

    meta = dict(device=device, torch=torch.__version__, params=PARAMS, logits=LOGITS, dtype="float32",
                python=platform.python_version())
    bandwidth = None
    if device == "cuda":
        bandwidth = cuda_copy_bandwidth()
        meta.update(gpu=torch.cuda.get_device_name(), copy_bandwidth_gb_s=bandwidth / 1e9,
                    timing="median CUDA-graph replay", floor="ideal: both rows read once at the copy bandwidth")
    else:
        from rsd_engine import _C

        meta.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(), isa=_C.isa(),
                    load_average=os.getloadavg(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                    timing="median wall clock after warm-up",
                    floor="read_once: amax over both logit tensors, measured in the same run")

    rows = []
    header = (f"{'B':>4} {'V':>7} | {'fused ms':>9} {'torch ms':>9} {'speedup':>8} | {'fused GB/s':>10} "
              f"{'floor ms':>9} {'fused/floor':>11} | same")
    print(f"RSD step on {device} ({meta.get('gpu') or meta.get('isa')}), fused vs op-by-op PyTorch")
    print(header)
    print("-" * len(header))
    for B, V in shapes:
        row = bench_cuda(B, V, args, bandwidth) if device == "cuda" else bench_cpu(B, V, args)
        bytes_read = 2 * B * V * 4
        row.update(B=B, V=V, bytes=bytes_read, speedup=row["reference_ms"] / row["fused_ms"],
                   fused_gb_s=bytes_read / (row["fused_ms"] * 1e-3) / 1e9,
                   fused_over_floor=row["fused_ms"] / row["read_once_ms"])
        rows.append(row)
        print(f"{B:>4} {V:>7} | {row['fused_ms']:>9.3f} {row['reference_ms']:>9.2f} {row['speedup']:>7.1f}x | "
              f"{row['fused_gb_s']:>10.1f} {row['read_once_ms']:>9.3f} {row['fused_over_floor']:>10.1f}x | "
              f"{'yes' if row['same_tokens'] else 'no (rounding)'}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
