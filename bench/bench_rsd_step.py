"""One RSD sampling step: the fused op against the op-by-op PyTorch reference and the memory floor.

Rows are (op, B, V, logit dtype). CUDA: the Triton op against ``rsd_sample_reference`` on the same card,
each captured as a CUDA graph and timed as replays between CUDA events (µs per call, median of
repeats); the floor is the logit rows read once at --floor-tb-s (4.3 TB/s: an H200's practical HBM
rate), beside the card's measured copy bandwidth. CPU: the C++ op (``backend="cpp"``) against the same
reference, wall-clock median after warm-up; the floor there is measured in the same run (``amax`` over
both logit tensors); where the C++ extension is not built (a plain checkout), the reference stands in for the
fused op, and the JSON's meta says so. The ratio measured side by side is the figure to quote.
Default parameters are the paper's (temperature 0.7, top_p 0.95, threshold 0.01). Prints one table and
writes JSON after every row (bench/results/rsd_step.json unless --out says otherwise), whole or not at
all (bench/atomic_json.py), so a run cut short keeps what it measured; a row that fails is recorded with
its error and the run goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rsd_engine  # noqa: E402,F401  before torch: passive OpenMP waiting (rsd_engine/threads.py)
import torch  # noqa: E402

from atomic_json import dump  # noqa: E402
from rsd_engine.randomness import step_uniforms  # noqa: E402
from rsd_engine.sampling import RowParams, resolve_backend, rsd_sample, rsd_sample_reference  # noqa: E402

BATCHES = (1, 16, 64, 256)
VOCAB = 151_936
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARAMS = dict(temperature=0.7, top_k=0, top_p=0.95, threshold=0.01, check_temperature=1.0,
              student_temperature=0.7, student_top_k=0, student_top_p=0.95, proposal_trials=1)
LOGITS = "LM-like rows: 2*randn background plus 6 peaked ids per row (+3..+11); student = 0.8*teacher + 2*randn"
# Flatter than a real model's: their top is ~12 over the median, where SmolLM2-135M-Instruct's is 20-37 (27 on
# average, spread ~4; 96 sampled tokens of a math answer), so nearly every id has a fixed weight > 0 at t = 0.7
# (7-11% of SmolLM2's do). The sampler's atomics grow with those ids: the rows marked shape "model" time it on
# rows shaped as SmolLM2's too.
MODEL_LOGITS = ("model-shaped rows: 4*randn plus 8 peaked ids per row (+17..+27); student = 0.8*teacher + "
                "2*randn")
FLOOR_TB_S = 4.3


def make_step(B: int, V: int, device: str, seed: int = 0, dtype: torch.dtype = torch.float32, shape: str = "lm"):
    """(teacher, student, uniforms, params, mask, mask) for B rows of V ids, made on ``device``; ``shape`` "lm"
    (LOGITS) or "model" (MODEL_LOGITS)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    spread, n_peaks, lift, lowest = (2, 6, 8, 3) if shape == "lm" else (4, 8, 10, 17)
    teacher = torch.randn(B, V, generator=gen, device=device) * spread
    peaks = torch.randint(0, V, (B, n_peaks), generator=gen, device=device)
    teacher.scatter_add_(1, peaks, torch.rand(B, n_peaks, generator=gen, device=device) * lift + lowest)
    student = 0.8 * teacher + torch.randn(B, V, generator=gen, device=device) * 2
    params = RowParams(**{k: torch.full((B,), v, dtype=torch.int32 if isinstance(v, int) else torch.float32,
                                        device=device) for k, v in PARAMS.items()})
    uniforms = step_uniforms(torch.arange(B, device=device) + seed, torch.zeros(B, dtype=torch.int64, device=device))
    mask = torch.ones(V, dtype=torch.bool, device=device)
    return teacher.to(dtype), student.to(dtype), uniforms, params, mask, mask


def median_wall_us(fn, warmup: int, repeats: int, budget_s: float) -> float:
    for _ in range(warmup):
        fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def graph_of(fn) -> torch.cuda.CUDAGraph:
    """fn captured as a CUDA graph, after warm-up runs on a side stream (Triton compiles, allocator settles)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def median_graph_us(fn, repeats: int) -> float:
    """µs per call of fn replayed as a CUDA graph: the median over repeats of (CUDA-event time of n
    back-to-back replays) / n, n chosen so one repeat takes about a millisecond."""
    graph = graph_of(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(n):
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / n

    n = max(1, min(100, int(1000 / max(timed(1), 1.0))))
    return statistics.median(timed(n) for _ in range(repeats))


def kernel_breakdown(fn, calls: int = 5) -> list[dict]:
    """The GPU kernels of one call of fn in launch order, each with its mean µs over ``calls`` eager calls
    (torch.profiler): which launch of a fused op the time goes to (rsd_sample: stats, rounds 0-2, law, pick)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        kernels = sorted(((e.start_ns(), e.name(), e.duration_ns()) for e in prof.profiler.kineto_results.events()
                          if e.device_type() == torch.autograd.DeviceType.CUDA and not e.name().startswith("Memset")
                          and not e.name().startswith("Memcpy")), key=lambda k: k[0])
    except Exception as err:  # noqa: BLE001  the row's timings stand without it
        return [dict(note=f"profiler failed: {type(err).__name__}: {str(err)[:300]}")]
    if not kernels or len(kernels) % calls:
        return [dict(note=f"{len(kernels)} kernels over {calls} calls: not one sequence per call")]
    per_call = len(kernels) // calls
    return [dict(kernel=kernels[i][1][:80],
                 us=round(sum(kernels[c * per_call + i][2] for c in range(calls)) / calls / 1e3, 2))
            for i in range(per_call)]


def cuda_copy_bandwidth() -> float:
    """Bytes per second the card moves in a large device-to-device copy (read + write)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = median_graph_us(lambda: dst.copy_(src), 10)
    return 2 * src.numel() / (us * 1e-6)


def time_pair(fused, reference, device: str, args, floor_tensors) -> dict:
    """fused_us, reference_us and floor_us (see the module docstring) of two zero-argument callables."""
    if device == "cuda":
        row = dict(fused_us=median_graph_us(fused, args.repeats), fused_kernels=kernel_breakdown(fused))
        try:
            row["reference_us"] = median_graph_us(reference, args.repeats)
        except RuntimeError as err:  # should the reference ever stop being capturable, time it eagerly
            torch.cuda.synchronize()
            row["reference_us"] = median_wall_us(lambda: (reference(), torch.cuda.synchronize()), 2, args.repeats,
                                                 args.budget)
            row["reference_note"] = f"eager (graph capture failed: {str(err)[:200]})"
        nbytes = sum(t.numel() * t.element_size() for t in floor_tensors)
        row["floor_us"] = nbytes / (args.floor_tb_s * 1e12) * 1e6
    else:
        row = dict(fused_us=median_wall_us(fused, args.warmup, args.repeats, args.budget),
                   reference_us=median_wall_us(reference, 1, args.repeats, args.budget),
                   floor_us=median_wall_us(lambda: [t.amax() for t in floor_tensors], args.warmup, args.repeats,
                                           args.budget))
    row.update(speedup=row["reference_us"] / row["fused_us"], over_floor=row["fused_us"] / row["floor_us"],
               bytes=sum(t.numel() * t.element_size() for t in floor_tensors))
    return row


def round0_binned_ids(teacher, student, params) -> int:
    """The ids the Triton op's first radix round bins for these rows, one global atomic each (all-present masks,
    default parameters: top-p rows), computed with torch as kernels/rsd_split.py's round 0 decides them: an id
    whose fixed weight is > 0 and whose level-0 digit is at or above the mass guard (_mass_guard). The round
    adds one atomic per program for the rest. Beside each row's per-launch µs this gives its cost per atomic."""
    total = 0
    for logits, t, p in ((teacher, params.temperature, params.top_p),
                         (student, params.student_temperature, params.student_top_p)):
        x = logits.float()
        t, p = t.float()[:, None], p.float()[:, None]
        lmax = x.amax(dim=1, keepdim=True)
        live = (torch.exp((x - lmax) * (1.0 / t)).double() * 2.0 ** 40).long() > 0
        guard = lmax + t * (torch.log((1.0 - p) / (16.0 * x.shape[1])) - 2.0 ** -12)
        guard = guard - (guard.abs() + lmax.abs()) * 2.0 ** -20

        def digit(v):
            bits = torch.where(v == 0, torch.zeros_like(v), v).view(torch.int32).long()
            return (torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2 ** 31) >> 20

        searched = ((p < 1.0) & (t > 0))[:, 0]
        total += int((live & (digit(x) >= digit(guard)))[searched].sum())
    return total


@contextlib.contextmanager
def forced_config(chunks: int | None = None, num_warps: int | None = None, tile: int | None = None,
                  spread: int | None = None, pdl: bool | None = None):
    """The Triton ops' launch configuration overridden: ``chunks`` programs per row and side instead of the
    launch table's, ``num_warps`` warps a program, ``tile`` ids a tile of rsd_verify's failed, residual and
    pick kernels and ``spread`` the level-0 histograms' layout (1: bins in order) instead of CUDA_CONFIG's,
    ``pdl`` RSD_PDL on or off (programmatic dependent launch, kernels/pdl.py) (None: unchanged)."""
    from rsd_engine.sampling import triton as triton_backend

    config = triton_backend.CUDA_CONFIG
    previous = dict(config)
    previous_pdl = os.environ.get("RSD_PDL")
    config["chunks"] = chunks
    if num_warps is not None:
        config["num_warps"] = num_warps
    if tile is not None:
        config["TILE"] = tile
    if spread is not None:
        config["SPREAD"] = spread
    if pdl is not None:
        os.environ["RSD_PDL"] = "on" if pdl else "off"
    try:
        yield
    finally:
        config.clear()
        config.update(previous)
        if previous_pdl is None:
            os.environ.pop("RSD_PDL", None)
        else:
            os.environ["RSD_PDL"] = previous_pdl


def bench_config(B, V, dtype, chunks, num_warps, device, args, spread=None, pdl=None) -> dict:
    """The Triton rsd_sample alone with ``chunks`` programs per row and side, ``num_warps`` warps a program,
    the level-0 histograms' bins ``spread`` over their cache lines (1: in order) or its launches with
    programmatic dependent launch (``pdl``): the launch configuration's alternatives (occupancy against
    contention and registers; round 0's atomics on a few lines or many; the gaps between the six launches).
    PDL changes no arithmetic: its outputs must be the op's as launched bit for bit, else the row is an error (a
    race), not a time. (The other settings may round the statistics' sums in another order.)"""
    teacher, student, uniforms, params, mask, _ = make_step(B, V, device, dtype=dtype)
    fused = lambda: rsd_sample(teacher, student, uniforms, params, mask, mask, backend="triton",  # noqa: E731
                               check_values=False)
    launched = None
    if pdl is not None:
        with forced_config(chunks, num_warps, spread=spread, pdl=False):
            launched = fused()
    with forced_config(chunks, num_warps, spread=spread, pdl=pdl):
        if launched is not None and not all(same_values(a, b) for a, b in zip(launched, fused())):
            raise RuntimeError("RSD_PDL changed the op's outputs (tokens, flags or log-probs)")
        us = median_graph_us(fused, args.repeats)
        kernels = kernel_breakdown(fused)
    nbytes = 2 * teacher.numel() * teacher.element_size()
    floor = nbytes / (args.floor_tb_s * 1e12) * 1e6
    return dict(fused_us=us, fused_kernels=kernels, floor_us=floor, over_floor=us / floor,
                round0_binned_ids=round0_binned_ids(teacher, student, params))


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, NaN where the other is NaN (a flagged row's log-probs), and nowhere else."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def fused_backend(device: str) -> str:
    """The fused op's backend: Triton on CUDA, C++ on CPU; the reference where the C++ extension is not built."""
    return resolve_backend("auto", device)


def bench_rsd_sample(B, V, dtype, device, args, shape="lm") -> dict:
    teacher, student, uniforms, params, mask, _ = make_step(B, V, device, dtype=dtype, shape=shape)
    backend = fused_backend(device)
    # As the engine calls it (its rows were checked once, by SamplingParams): the reference checks no values either.
    fused = lambda: rsd_sample(teacher, student, uniforms, params, mask, mask, backend=backend,  # noqa: E731
                               check_values=False)
    reference = lambda: rsd_sample_reference(teacher, student, uniforms, params, mask, mask)  # noqa: E731
    row = dict(same_tokens=bool(torch.equal(fused().token, reference().token)),
               round0_binned_ids=round0_binned_ids(teacher, student, params))
    row.update(time_pair(fused, reference, device, args, (teacher, student)))
    return row


def run_rows(rows_to_run, bench_one, device, args, meta, header, fmt) -> list[dict]:
    """Runs bench_one(*key) for every key, printing and writing the JSON after each row; a failing row is
    recorded with its error (an out-of-memory or a kernel that does not compile must not end the run)."""
    rows = []
    print(header)
    print("-" * len(header), flush=True)
    for key in rows_to_run:
        start = time.perf_counter()
        try:
            row = {**key, **bench_one(**key)}
            print(fmt(row), flush=True)
        except Exception as err:  # noqa: BLE001  recorded, and the next row runs
            row = {**key, "error": f"{type(err).__name__}: {str(err)[:500]}"}
            print(f"{key}: FAILED {row['error']}", flush=True)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        dump(dict(meta=meta, rows=rows), args.out, default=str)
    print(f"wrote {args.out}")
    return rows


def common_meta(device: str, args) -> dict:
    meta = dict(device=device, torch=torch.__version__, params=PARAMS, logits=LOGITS, model_logits=MODEL_LOGITS,
                python=platform.python_version(), fused_backend=fused_backend(device))
    if device == "cuda":
        meta.update(gpu=torch.cuda.get_device_name(), copy_bandwidth_gb_s=cuda_copy_bandwidth() / 1e9,
                    timing="median of CUDA-event times of back-to-back CUDA-graph replays",
                    floor=f"the logit rows read once at {args.floor_tb_s} TB/s", floor_tb_s=args.floor_tb_s)
    else:
        if meta["fused_backend"] == "cpp":
            from rsd_engine import _C

            meta["isa"] = _C.isa()
        else:
            meta["note"] = ("rsd_engine._C is not built: the reference stands in for the fused op, so fused and "
                            "reference times are the same code")
        meta.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    load_average=os.getloadavg(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                    timing="median wall clock after warm-up",
                    floor="amax over the logit tensors (each read once), measured in the same run")
    return meta


def add_common_arguments(parser, default_out: str):
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"],
                        help="logit dtypes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--budget", type=float, default=5.0, help="seconds per measurement before cutting repeats")
    parser.add_argument("--floor-tb-s", type=float, default=FLOOR_TB_S,
                        help="memory rate of the floor on CUDA, TB/s (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / default_out)


def resolve(args) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    return ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--vocab", type=int, nargs="+", default=[VOCAB])
    parser.add_argument("--chunks", type=int, nargs="*", default=[],
                        help="CUDA: then time the Triton op alone with each of these programs per row and side "
                             "(the launch table's alternatives) at the --chunk-batch sizes, first dtype only")
    parser.add_argument("--warps", type=int, nargs="*", default=[],
                        help="CUDA: then time the Triton op alone with each of these warps a program (the launch "
                             "table's chunks) at the --chunk-batch sizes, first dtype only")
    parser.add_argument("--chunk-batch", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--spreads", type=int, nargs="*", default=[],
                        help="CUDA: first of the sweeps, time the Triton op alone with the level-0 histograms' bins "
                             "spread this many ways (1: in order; CUDA_CONFIG's SPREAD the default) at the "
                             "--spread-batch sizes, first dtype and vocab only")
    parser.add_argument("--spread-batch", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--pdl-batch", type=int, nargs="*", default=[],
                        help="CUDA, compute capability 9.0 on: after the spreads, time the Triton op alone with its "
                             "launches' programmatic dependent launch on (RSD_PDL=on) at these batch sizes, first "
                             "dtype and vocab only")
    parser.add_argument("--model-rows-batch", type=int, nargs="*", default=[],
                        help="then these batch sizes on model-shaped rows (MODEL_LOGITS), first dtype and vocab only")
    add_common_arguments(parser, "rsd_step.json")
    args = parser.parse_args(argv)
    device = resolve(args)
    meta = common_meta(device, args)
    print(f"rsd_sample on {device} ({meta.get('gpu') or meta.get('isa') or meta['note']}), fused vs op-by-op "
          f"PyTorch, µs per call")
    header = (f"{'B':>4} {'V':>7} {'dtype':>8} | {'fused µs':>10} {'torch µs':>10} {'speedup':>8} | "
              f"{'floor µs':>9} {'fused/floor':>11} | same")
    keys = [dict(op="rsd_sample", B=B, V=V, dtype=d) for d in args.dtype for V in args.vocab for B in args.batch]
    keys += [dict(op="rsd_sample", B=B, V=args.vocab[0], dtype=args.dtype[0], shape="model")
             for B in args.model_rows_batch]
    if device == "cuda":  # last: a run cut short loses the sweeps first
        keys += [dict(op="rsd_sample_spread", B=B, V=args.vocab[0], dtype=args.dtype[0], spread=w)
                 for B in args.spread_batch for w in args.spreads]
        if args.pdl_batch and torch.cuda.get_device_capability() >= (9, 0):
            keys += [dict(op="rsd_sample_pdl", B=B, V=args.vocab[0], dtype=args.dtype[0], pdl="on")
                     for B in args.pdl_batch]
        keys += [dict(op="rsd_sample_chunks", B=B, V=args.vocab[0], dtype=args.dtype[0], chunks=c)
                 for B in args.chunk_batch for c in args.chunks]
        keys += [dict(op="rsd_sample_warps", B=B, V=args.vocab[0], dtype=args.dtype[0], num_warps=w)
                 for B in args.chunk_batch for w in args.warps]

    sweeps = ("rsd_sample_chunks", "rsd_sample_warps", "rsd_sample_spread", "rsd_sample_pdl")

    def one(op, B, V, dtype, chunks=None, shape="lm", num_warps=None, spread=None, pdl=None):
        if op in sweeps:
            return bench_config(B, V, DTYPES[dtype], chunks, num_warps, device, args, spread,
                                None if pdl is None else pdl == "on")
        return bench_rsd_sample(B, V, DTYPES[dtype], device, args, shape)

    def fmt(r):
        if r["op"] in sweeps:
            what = {"rsd_sample_chunks": f"{r.get('chunks')} chunks per row and side",
                    "rsd_sample_warps": f"{r.get('num_warps')} warps a program",
                    "rsd_sample_spread": f"level-0 bins spread {r.get('spread')} ways",
                    "rsd_sample_pdl": f"programmatic dependent launch {r.get('pdl')}"}[r["op"]]
            return (f"{r['B']:>4} {r['V']:>7} {r['dtype']:>8} | {r['fused_us']:>10.1f} with {what} | "
                    f"{r['floor_us']:>9.2f} {r['over_floor']:>10.1f}x")
        return (f"{r['B']:>4} {r['V']:>7} {r['dtype']:>8} | {r['fused_us']:>10.1f} {r['reference_us']:>10.1f} "
                f"{r['speedup']:>7.1f}x | {r['floor_us']:>9.2f} {r['over_floor']:>10.1f}x | "
                f"{'yes' if r['same_tokens'] else 'no (rounding)'}{' (model-shaped rows)' if 'shape' in r else ''}")

    run_rows(keys, one, device, args, meta, header, fmt)


if __name__ == "__main__":
    main()
