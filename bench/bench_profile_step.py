"""One decode step under torch.profiler: the top kernels by GPU time, and kernels, memcpys, launches and
blocking host waits per step.

The engine is driven through its public API only (``Engine.generate_batch``), so the figures hold
whatever the step looks like inside: after a warm-up (graph capture, compiles), two generations of the
same prompts are profiled, one of --tokens new tokens and one of --tokens + --steps; the difference of
the two, name by name, divided by --steps is one decode step (prefill, admission and set-up cancel out).
CUDA: kernels, memcpys and memsets as CUPTI reports them (kernels replayed inside a CUDA graph count one
by one); the blocking host calls in three groups: stream and device synchronizations
(cudaStreamSynchronize, cudaDeviceSynchronize: "syncs", issue 15's target is none), event waits
(cudaEventSynchronize: the engine's pipelined read of a step's outputs waits on one event by design, one
asynchronous copy and an event) and synchronous copies (cudaMemcpy); launches are kernel and graph launch
calls made by the host. The wall time per step is measured the same way without the profiler, and
written at once (the profile, which is slower, rewrites the file when it is done): a run cut short keeps
the wall time. CPU (dry runs of the plumbing): aten ops stand in for kernels. Prints the table and writes
JSON whole (bench/atomic_json.py; bench/results/profile_step.json by default).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rsd_engine  # noqa: E402,F401  before torch: passive OpenMP waiting (rsd_engine/threads.py)
import torch  # noqa: E402

from atomic_json import dump  # noqa: E402
from bench_e2e import random_prompts  # noqa: E402
from random_pair import SHAPES, build_random_pair, weight_bytes  # noqa: E402
from rsd_engine import Engine, SamplingParams  # noqa: E402

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cuStreamSynchronize", "cuCtxSynchronize")
EVENT_WAIT_CALLS = ("cudaEventSynchronize", "cuEventSynchronize")
BLOCKING_COPY_CALLS = ("cudaMemcpy", "cuMemcpyDtoH_v2", "cuMemcpyHtoD_v2")
LAUNCH_PREFIXES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cuGraphLaunch",
                   "cudaLaunchCooperativeKernel")


def kind_of(event: dict, device: str) -> str | None:
    """kernel / memcpy / memset / api (runtime and driver calls) / op, from a chrome-trace event's category."""
    cat = str(event.get("cat", "")).lower()
    if "memcpy" in cat:
        return "memcpy"
    if "memset" in cat:
        return "memset"
    if cat == "kernel" or (device == "cpu" and cat == "cpu_op"):
        return "kernel"  # on CPU, aten ops stand in for kernels
    if "runtime" in cat or "driver" in cat:
        return "api"
    return None


def tally(trace_path: Path, device: str) -> dict:
    """Per kind and name: (count, total µs) over one profiled run; plus the categories seen."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    by_kind = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    categories = Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        categories[str(e.get("cat"))] += 1
        kind = kind_of(e, device)
        if kind:
            entry = by_kind[kind][e.get("name", "?")]
            entry[0] += 1
            entry[1] += float(e.get("dur", 0.0))
    return dict(by_kind=by_kind, categories=categories)


def profiled(fn, device: str, folder: Path, name: str) -> dict:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    path = folder / f"{name}.json"
    prof.export_chrome_trace(str(path))
    return tally(path, device)


def per_step(short: dict, long: dict, kind: str, steps: int) -> dict[str, tuple[float, float]]:
    """name -> (calls per step, µs per step) for the extra steps of the long run. A name called as often in both
    runs is no part of a step: its difference in time is noise (under load, a setup's aten::zeros showed 86 µs a
    step at 0 calls and topped the table)."""
    out = {}
    a, b = short["by_kind"].get(kind, {}), long["by_kind"].get(kind, {})
    for name in set(a) | set(b):
        calls = (b.get(name, [0, 0.0])[0] - a.get(name, [0, 0.0])[0]) / steps
        us = (b.get(name, [0, 0.0])[1] - a.get(name, [0, 0.0])[1]) / steps
        if calls > 0:
            out[name] = (calls, us)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher-shape", choices=list(SHAPES), default="qwen3-1.7b")
    parser.add_argument("--student-shape", choices=list(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--vocab", type=int, default=49152, help="words, for shapes without their own vocabulary")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--draft-tokens", type=int, default=0)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8, help="new tokens of the short run")
    parser.add_argument("--steps", type=int, default=16, help="extra decode steps of the long run")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--top", type=int, default=25, help="kernels listed (default: %(default)s)")
    parser.add_argument("--floor-tb-s", type=float, default=4.3)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "rsd-engine" / "bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "profile_step.json")
    parser.add_argument("--pdl", action="store_true",
                        help="CUDA, compute capability 9.0 on: last, the step's wall time again on an engine whose "
                             "Triton kernels launch with programmatic dependent launch (RSD_PDL=on), beside this "
                             "engine's (off, timed again after the profile), and whether its tokens are the same")
    args = parser.parse_args(argv)
    device = args.device
    pdl_before = os.environ.get("RSD_PDL")
    if args.pdl:
        os.environ["RSD_PDL"] = "off"  # the plain run is plain whatever the caller's environment says

    teacher_dir, student_dir = build_random_pair(args.cache, vocab_size=args.vocab, teacher=args.teacher_shape,
                                                 student=args.student_shape, device=device)
    engine = Engine(teacher_dir, student_dir, device=device, max_batch_size=args.batch, max_seq_len=args.max_seq_len,
                    draft_tokens=args.draft_tokens)
    prompts = random_prompts(args.batch, engine.space.size, args.prompt_len)

    def generate(new_tokens):
        params = [SamplingParams(max_new_tokens=new_tokens, seed=i, ignore_eos=True) for i in range(args.batch)]
        results = engine.generate_batch(prompts, params)
        if device == "cuda":
            torch.cuda.synchronize()
        return [r.token_ids for r in results]

    def wall(new_tokens):
        start = time.perf_counter()
        generate(new_tokens)
        return time.perf_counter() - start

    long_tokens = args.tokens + args.steps
    start = time.perf_counter()
    tokens = generate(long_tokens)  # warm-up: graph capture and compiles for this span and batch
    warmup_s = time.perf_counter() - start
    walls = [(wall(long_tokens) - wall(args.tokens)) / args.steps for _ in range(3)]
    report = dict(
        device=device, gpu=torch.cuda.get_device_name() if device == "cuda" else None, torch=torch.__version__,
        teacher=args.teacher_shape, student=args.student_shape, batch=args.batch, draft_tokens=args.draft_tokens,
        dtype=str(engine.dtype).removeprefix("torch."), prompt_len=args.prompt_len, steps=args.steps,
        method=f"generate({long_tokens}) minus generate({args.tokens}) new tokens, per step",
        warmup_s=warmup_s, wall_ms_per_step=1e3 * statistics.median(walls),
        profile="not yet: the run was cut short before the profiler's figures")
    if device == "cuda":
        streamed = weight_bytes(teacher_dir) + weight_bytes(student_dir)
        report.update(weight_bytes=streamed, floor_ms_per_step=streamed / (args.floor_tb_s * 1e12) * 1e3)
    dump(report, args.out)
    print(f"wall: {report['wall_ms_per_step']:.2f} ms per step (written to {args.out}); profiling", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        short = profiled(lambda: generate(args.tokens), device, Path(folder), "short")
        long = profiled(lambda: generate(long_tokens), device, Path(folder), "long")
    steps = args.steps
    kernels = per_step(short, long, "kernel", steps)
    memcpys = per_step(short, long, "memcpy", steps)
    memsets = per_step(short, long, "memset", steps)
    api = per_step(short, long, "api", steps)
    syncs, event_waits, blocking_copies = ({name: calls for name, (calls, _) in api.items() if name in group}
                                           for group in (SYNC_CALLS, EVENT_WAIT_CALLS, BLOCKING_COPY_CALLS))
    launches = {name: calls for name, (calls, _) in api.items() if name.startswith(LAUNCH_PREFIXES)}
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[: args.top]
    gpu_us = sum(us for _, us in kernels.values())
    del report["profile"]
    report.update(
        kernel_kind="CUDA kernels (CUPTI)" if device == "cuda" else "aten ops (CPU dry run)",
        kernels_per_step=sum(c for c, _ in kernels.values()), kernel_us_per_step=gpu_us,
        memcpys_per_step=sum(c for c, _ in memcpys.values()), memsets_per_step=sum(c for c, _ in memsets.values()),
        syncs_per_step=sum(syncs.values()), syncs=syncs, event_waits_per_step=sum(event_waits.values()),
        event_waits=event_waits, blocking_copies_per_step=sum(blocking_copies.values()),
        blocking_copies=blocking_copies, launches_per_step=sum(launches.values()), launches=launches,
        memcpys={name: calls for name, (calls, _) in memcpys.items()},
        top_kernels=[dict(name=name[:160], calls_per_step=calls, us_per_step=us, share=us / gpu_us if gpu_us else 0.0)
                     for name, (calls, us) in top],
        trace_categories=dict(long["categories"]))
    dump(report, args.out)

    print(f"one decode step ({args.teacher_shape} + {args.student_shape}, batch {args.batch}, "
          f"draft_tokens {args.draft_tokens}) on {device}: {report['wall_ms_per_step']:.2f} ms wall, "
          f"{report['kernels_per_step']:.0f} {report['kernel_kind']} ({gpu_us / 1e3:.2f} ms), "
          f"{report['memcpys_per_step']:.1f} memcpy, {report['syncs_per_step']:.1f} stream/device syncs, "
          f"{report['event_waits_per_step']:.1f} event waits, {report['blocking_copies_per_step']:.1f} blocking "
          f"copies, "
          f"{report['launches_per_step']:.1f} host launches per step"
          + (f"; floor {report['floor_ms_per_step']:.3f} ms" if "floor_ms_per_step" in report else ""))
    print(f"{'calls/step':>10} {'µs/step':>9} {'share':>6}  kernel")
    for row in report["top_kernels"]:
        print(f"{row['calls_per_step']:>10.1f} {row['us_per_step']:>9.1f} {row['share']:>6.1%}  {row['name'][:100]}")

    if args.pdl:
        if device != "cuda" or torch.cuda.get_device_capability() < (9, 0):
            report["pdl"] = dict(note="not measured: programmatic dependent launch needs a CUDA card of compute "
                                      "capability 9.0 or later")
        else:
            # Off timed again here, after the profiler's runs, so that both sides of the comparison follow them;
            # then a second engine (its own graphs, captured with PDL launches), the first one's memory freed first.
            off_ms = 1e3 * statistics.median((wall(long_tokens) - wall(args.tokens)) / args.steps for _ in range(3))
            del engine
            gc.collect()
            torch.cuda.empty_cache()
            os.environ["RSD_PDL"] = "on"
            engine = Engine(teacher_dir, student_dir, device=device, max_batch_size=args.batch,
                            max_seq_len=args.max_seq_len, draft_tokens=args.draft_tokens)
            pdl_tokens = generate(long_tokens)  # warm-up: its compiles and captures
            on_ms = 1e3 * statistics.median((wall(long_tokens) - wall(args.tokens)) / args.steps for _ in range(3))
            report["pdl"] = dict(wall_ms_per_step=on_ms, wall_ms_per_step_off=off_ms, speedup=off_ms / on_ms,
                                 same_tokens=pdl_tokens == tokens)
        print(f"PDL: {report['pdl']}")
        if pdl_before is None:
            os.environ.pop("RSD_PDL", None)
        else:
            os.environ["RSD_PDL"] = pdl_before
    dump(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
