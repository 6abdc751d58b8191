"""End-to-end RSD generation: Engine.generate_batch against the ways people do it today.

(a) naive HF loop: two transformers models with their own dynamic caches, a left-padded batch,
    torch softmax / top-p / multinomial each step;
(b) the authors' style: the same loop one sequence at a time (their generator sends one request per
    token per sequence to two engines, with no batching across sequences).

All three run in one process on the same models, the same prompts and the same number of new tokens; the
figure to quote is the ratio. On CPU each (pair, thread count, OpenMP wait policy, float32 GEMM: oneDNN or
torch's BLAS, --cpu-gemms) runs in a fresh worker process, so that its thread settings are its own (OpenMP
reads its wait policy once, at load) and its peak RSS is the engine's: the Engine is made as the README makes
it (max_batch_size 32, max_seq_len 4096 unless told otherwise) and peak RSS is read after its runs, before the
HF baselines load.
``--busy N`` runs N busy-loop processes beside the measurements: a machine shared with other work.

On CUDA (bench/device_check.sh), or with --in-process, the run is in this process and the JSON is
rewritten after every row, so a run cut short keeps what it measured. ``--teacher-shape`` and
``--student-shape`` pick random pairs of real shapes (bench/random_pair.py: Qwen3 0.6B/1.7B/8B, weights made on the card); ``--draft-tokens`` runs
plain RSD (0) and speculative rounds; ``--naive-batches``/``--naive-new-tokens`` bound the naive loop,
which is slow. Each row also carries the weight-streaming floor: one decode step reads both models'
weights once, at --floor-tb-s (4.3 TB/s, an H200's practical HBM rate); the engine's ms per step is a
run's wall time over its new tokens (prefill included), and its warm-up (capture, compiles) is apart.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import rsd_engine  # noqa: E402  before torch: rsd_engine asks OpenMP for passive waiting (threads.py)
import torch  # noqa: E402

from atomic_json import dump  # noqa: E402
from random_pair import SHAPES, build_random_pair, weight_bytes  # noqa: E402
from rsd_engine import Engine, SamplingParams  # noqa: E402
from rsd_engine.models import cpu_gemm  # noqa: E402
from rsd_engine.models.cpu_gemm import CHOICES as CPU_GEMMS, ENV as CPU_GEMM_ENV, uses_onednn  # noqa: E402

TEMPERATURE, TOP_P, THRESHOLD = 0.7, 0.95, 0.01


def top_p_probs(logits, temperature, top_p):
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p
    sorted_p[drop] = 0
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


@torch.inference_mode()
def hf_rsd_loop(teacher, student, prompts: list[list[int]], new_tokens: int, vocab: int) -> int:
    """The naive RSD loop over two HF models; returns tokens generated."""
    device = teacher.device
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    caches, logits = [], []
    for model in (teacher, student):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        caches.append(out.past_key_values)
        logits.append(out.logits[:, -1, :vocab].float())
    pos = pos[:, -1:]
    for _ in range(new_tokens):
        lt, ls = logits
        proposal = torch.multinomial(top_p_probs(lt, TEMPERATURE, TOP_P), 1)
        accepted = torch.softmax(ls, -1).gather(-1, proposal) >= THRESHOLD
        fallback = torch.multinomial(top_p_probs(ls, TEMPERATURE, TOP_P), 1)
        token = torch.where(accepted, proposal, fallback)
        mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
        pos = pos + 1
        for i, model in enumerate((teacher, student)):
            out = model(input_ids=token, attention_mask=mask, position_ids=pos, past_key_values=caches[i],
                        use_cache=True)
            caches[i] = out.past_key_values
            logits[i] = out.logits[:, -1, :vocab].float()
    return len(prompts) * new_tokens


def timed(fn, repeats: int, warmup=None) -> tuple[float, int, float]:
    """(median seconds, count, warm-up seconds) of fn() after one warm-up call (``warmup`` or fn itself)."""
    def run(f):
        count = f()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return count

    start = time.perf_counter()
    run(warmup or fn)  # on CUDA: graph capture, Triton compiles
    warmup_s = time.perf_counter() - start
    times, count = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = run(fn)
        times.append(time.perf_counter() - start)
    return statistics.median(times), count, warmup_s


def random_prompts(n: int, vocab: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (max(1, length - 7 * (i % 3)),), generator=gen).tolist() for i in range(n)]


def demo_prompts(n: int, tokenizer) -> list[list[int]]:
    """Chat-templated competition problems, as `rsd demo` sends them."""
    from rsd_engine.pipeline.data import champ_problems

    problems = champ_problems(n, numeric_only=True)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for p in problems]


def cpu_read_rate() -> float:
    """Bytes per second this process reads from memory with its own thread settings: the best of five sums of a
    1 GiB float32 buffer (far past the caches). The CPU floor's rate: measured, as no datasheet fits a VM."""
    buf = torch.ones(2**28)
    buf.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.nbytes / best


def held_weight_bytes(model) -> int:
    """Bytes a decode step reads of a loaded model's weights, in the dtype it runs in: each parameter once (a tied
    head is one tensor), less an untied input embedding table (a step reads one row of it per sequence)."""
    held = {p.data_ptr(): p.nbytes for p in model.parameters()}
    if not model.config.tie_word_embeddings:
        held.pop(model.model.embed_tokens.weight.data_ptr(), None)
    return sum(held.values())


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def pair_dirs(name: str, args):
    if name == "random":
        shapes = (("teacher-tiny", "student-tiny") if args.tiny else (args.teacher_shape, args.student_shape))
        return build_random_pair(args.cache, vocab_size=args.vocab, teacher=shapes[0], student=shapes[1],
                                 device=args.device)
    from rsd_engine.pipeline.demo_models import demo_student_dir, demo_teacher_dir

    return demo_teacher_dir(), demo_student_dir()


def worker(args, run: dict, save=lambda: None) -> dict:
    """One configuration, in this process: the engine's runs (one Engine per --draft-tokens value), its
    peak RSS, then the baselines. Rows are appended to run["rows"] and save() is called after each."""
    from rsd_engine.threads import set_threads

    requested = args.threads[-1]  # the worker's own --threads comes last
    threads = set_threads(None if requested == "default" else int(requested))
    name = args.pairs[-1]
    began = time.perf_counter()
    run.update(pair=name, progress=[])

    def progress(what: str):  # where a run that was cut short stopped, and when
        run["progress"].append(f"{time.perf_counter() - began:.1f}s {what}")
        save()

    progress("building the pair" if name == "random" else "finding the pair")
    teacher_dir, student_dir = pair_dirs(name, args)
    streamed = weight_bytes(teacher_dir) + weight_bytes(student_dir) if name == "random" else None
    run.update(teacher=str(teacher_dir), student=str(student_dir), rss_before_engine_gb=peak_rss_gb(),
               build_s=time.perf_counter() - began, weight_bytes=streamed)
    progress("pair built")
    rows, inputs, plain_rate = run["rows"], {}, {}
    if torch.device(args.device).type == "cpu":
        progress("measuring the memory read rate")
        run["cpu_read_gb_s"] = cpu_read_rate() / 1e9
    dtype = device = vocab = None
    for draft_tokens in args.draft_tokens:
        progress(f"loading the engine, draft_tokens={draft_tokens}")
        start = time.perf_counter()
        engine = Engine(teacher_dir, student_dir, device=args.device, max_batch_size=args.max_batch_size,
                        max_seq_len=args.max_seq_len, sampler=args.sampler, draft_tokens=draft_tokens)
        load_s = time.perf_counter() - start
        dtype, device, vocab = engine.dtype, engine.device, engine.space.size
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=TEMPERATURE, top_p=TOP_P,
                                threshold=THRESHOLD)
        for batch in args.batches:
            if batch not in inputs:
                inputs[batch] = random_prompts(batch, vocab, args.prompt_len) if name == "random" else \
                    demo_prompts(batch, engine.tokenizer)
            prompts = inputs[batch]
            # Every method generates exactly new_tokens per sequence: EOS is not a stop here.
            seeded = [SamplingParams(**{**params.__dict__, "seed": i, "ignore_eos": True}) for i in range(batch)]
            accepted, passes = [], []

            def ours():
                results = engine.generate_batch(prompts, seeded)
                accepted.extend(a for r in results for a in r.accepted)
                passes.append(sum(r.teacher_passes for r in results))
                return sum(len(r.token_ids) for r in results)

            progress(f"engine: batch {batch}, draft_tokens={draft_tokens} (warm-up, then {args.repeats} runs)")
            t_ours, n_ours, warmup_s = timed(ours, args.repeats)
            rate = n_ours / t_ours
            if draft_tokens == 0:
                plain_rate[batch] = rate
            row = dict(pair=name, device=str(engine.device), dtype=str(engine.dtype).removeprefix("torch."),
                       threads=threads, requested_threads=requested,
                       wait_policy=os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)"),
                       # oneDNN takes the matrices of MIN_WEIGHT_ELEMENTS or more; smaller ones stay on BLAS
                       cpu_gemm=("onednn" if uses_onednn() else "blas") if engine.device.type == "cpu" else None,
                       cpu_gemm_min_elements=cpu_gemm.MIN_WEIGHT_ELEMENTS,
                       batch=batch,
                       draft_tokens=draft_tokens, new_tokens=args.new_tokens,
                       prompt_tokens=sum(map(len, prompts)) // len(prompts), engine_load_s=load_s,
                       engine_warmup_s=warmup_s, acceptance_rate=sum(accepted) / len(accepted),
                       teacher_passes_per_token=passes[-1] / n_ours, engine_tok_s=rate,
                       engine_ms_per_step=1e3 * t_ours / args.new_tokens)
            if batch in plain_rate:
                row["vs_plain"] = rate / plain_rate[batch]
            # What models/skinny.py's probe chose on this card (rows up to which the fused skinny GEMMs run),
            # with its µs per forward of both paths: the side-by-side figure of that choice.
            for side, model in (("teacher", engine.teacher), ("student", engine.student)):
                row[f"{side}_skinny_rows"] = getattr(model, "skinny_rows", None)
                row[f"{side}_skinny_probe"] = getattr(model, "skinny_probe", None)
            if engine.device.type == "cpu":
                # One plain step reads both models' weights once for all rows, here at the rate measured above.
                held = held_weight_bytes(engine.teacher) + held_weight_bytes(engine.student)
                floor_s = held / (run["cpu_read_gb_s"] * 1e9)
                row.update(floor_ms_per_step=floor_s * 1e3, floor_tok_s=batch / floor_s, weight_bytes_held=held,
                           over_floor=row["engine_ms_per_step"] / (floor_s * 1e3))
            elif streamed and engine.device.type == "cuda":
                # One plain step reads both models' weights once for all rows.
                floor_s = streamed / (args.floor_tb_s * 1e12)
                row.update(floor_ms_per_step=floor_s * 1e3, floor_tok_s=batch / floor_s,
                           over_floor=row["engine_ms_per_step"] / (floor_s * 1e3))
            rows.append(row)
            save()
            print(f"{name} G={draft_tokens} batch {batch:>3}: engine {rate:8.1f} tok/s "
                  f"({row['engine_ms_per_step']:.2f} ms per step, warm-up {warmup_s:.1f} s)", flush=True)
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    engine_peak = peak_rss_gb()
    for row in rows:
        row["engine_peak_rss_gb"] = engine_peak
    if args.baselines:
        from transformers import AutoModelForCausalLM

        progress("loading the HF models")
        hf = [AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
              for d in (teacher_dir, student_dir)]
        naive_tokens = args.naive_new_tokens or args.new_tokens
        for batch in args.batches if args.naive_batches is None else args.naive_batches:
            prompts = inputs[batch]
            progress(f"naive HF loop: batch {batch}")
            t_naive, n_naive, _ = timed(lambda: hf_rsd_loop(*hf, prompts, naive_tokens, vocab), args.naive_repeats,
                                        warmup=lambda: hf_rsd_loop(*hf, prompts, 2, vocab))
            naive = n_naive / t_naive
            one_by_one = naive
            if batch > 1 and args.one_by_one:
                t_single, n_single, _ = timed(
                    lambda: sum(hf_rsd_loop(*hf, [p], naive_tokens, vocab) for p in prompts), 1,
                    warmup=lambda: hf_rsd_loop(*hf, prompts[:1], 2, vocab))
                one_by_one = n_single / t_single
            for row in rows:
                if row["batch"] == batch:
                    row.update(naive_hf_tok_s=naive, naive_new_tokens=naive_tokens,
                               vs_naive_hf=row["engine_tok_s"] / naive)
                    if batch == 1 or args.one_by_one:
                        row.update(one_by_one_tok_s=one_by_one, vs_one_by_one=row["engine_tok_s"] / one_by_one)
            save()
            print(f"{name} batch {batch:>3}: naive HF loop {naive:8.1f} tok/s ({naive_tokens} new tokens)", flush=True)
    progress("done")
    return run


def run_worker(argv: list[str], pair: str, threads: str, policy: str, gemm: str) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, CPU_GEMM_ENV: gemm}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, *argv, "--worker", "--pairs", pair, "--threads", threads,
               "--worker-out", out.name]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(Path(out.name).read_text())


def write_report(report: dict, path: str):
    dump(report, path)  # whole or not at all: a run killed while writing keeps its previous rows


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=["random", "demo"], default=["random", "demo"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152, help="random pair's words (shapes without their own)")
    parser.add_argument("--tiny", action="store_true", help="the random pair at a few MB (plumbing checks)")
    parser.add_argument("--teacher-shape", choices=list(SHAPES), default="teacher", help="random pair's teacher")
    parser.add_argument("--student-shape", choices=list(SHAPES), default="student", help="random pair's student")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[0],
                        help="Engine draft_tokens values, one Engine each (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-batches", type=int, nargs="*", default=None,
                        help="batches the naive HF loop runs (default: --batches; none: no value)")
    parser.add_argument("--naive-new-tokens", type=int, default=None,
                        help="naive loop's new tokens (default: --new-tokens)")
    parser.add_argument("--naive-repeats", type=int, default=None, help="default: --repeats")
    parser.add_argument("--no-one-by-one", dest="one_by_one", action="store_false",
                        help="skip the one-sequence-at-a-time baseline at batch > 1")
    parser.add_argument("--floor-tb-s", type=float, default=4.3, help="HBM rate of the CUDA floor, TB/s")
    parser.add_argument("--threads", nargs="+", default=["default"],
                        help="thread counts to compare, 'default' = rsd's default (default: %(default)s)")
    parser.add_argument("--wait-policies", nargs="+", default=["PASSIVE"], choices=["PASSIVE", "ACTIVE"],
                        help="OMP_WAIT_POLICY values to compare (default: rsd's, %(default)s)")
    parser.add_argument("--cpu-gemms", nargs="+", default=None, choices=list(CPU_GEMMS),
                        help="float32 CPU GEMMs to compare, RSD_CPU_GEMM (rsd_engine/models/cpu_gemm.py; default: "
                             "RSD_CPU_GEMM if set, else rsd's default)")
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes beside the runs (default: 0)")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="time the engine only (no HF loops)")
    parser.add_argument("--device", default="cpu", help="engine and baselines device (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="Engine argument (default: %(default)s)")
    parser.add_argument("--max-seq-len", type=int, default=4096, help="Engine argument (default: %(default)s)")
    parser.add_argument("--sampler", default="auto")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "rsd-engine" / "bench"))
    parser.add_argument("--out", default="bench/results/e2e.json")
    parser.add_argument("--in-process", action="store_true",
                        help="no worker processes (one thread setting; always so on CUDA)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.cpu_gemms = args.cpu_gemms or [cpu_gemm.choice()]
    except ValueError as err:
        parser.error(str(err))
    if len(args.cpu_gemms) > 1 and (args.in_process or torch.device(args.device).type == "cuda"):
        parser.error("--cpu-gemms compares choices in worker processes: give one with --in-process or on CUDA")
    if max(args.batches) > args.max_batch_size:
        parser.error(f"--batches up to {max(args.batches)} need --max-batch-size >= that")
    if not set(args.naive_batches or []) <= set(args.batches):
        parser.error("--naive-batches must be among --batches (the naive loop runs the engine's prompts)")
    args.naive_repeats = args.naive_repeats or args.repeats
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(args, dict(rows=[]))))
        return

    report = dict(device=args.device, busy_loops=args.busy, cpus=os.cpu_count(), load_average_before=os.getloadavg(),
                  settings=dict(new_tokens=args.new_tokens, prompt_len=args.prompt_len, repeats=args.repeats,
                                naive_batches=args.naive_batches if args.naive_batches is not None else args.batches,
                                naive_new_tokens=args.naive_new_tokens or args.new_tokens,
                                naive_repeats=args.naive_repeats, one_by_one=args.one_by_one,
                                floor=(f"both models' weights read once per step at {args.floor_tb_s} TB/s" if
                                       torch.device(args.device).type == "cuda" else "both models' weights as the "
                                       "engine holds them, read once per step at the rate measured in each worker "
                                       "(cpu_read_gb_s: best of five sums of 1 GiB)")),
                  runs=[])
    naive = report["settings"]
    if args.baselines and (naive["naive_batches"] != args.batches or naive["naive_new_tokens"] != args.new_tokens):
        naive["naive_note"] = (f"shrunk to fit the time budget: the naive HF loop ran {naive['naive_new_tokens']} new "
                               f"tokens at batches {naive['naive_batches']} only; its tok/s is of its own run")
    if args.in_process or torch.device(args.device).type == "cuda":
        # In this process (thread settings do not matter on CUDA), the JSON kept after every row.
        os.environ[CPU_GEMM_ENV] = args.cpu_gemms[0]
        for pair in args.pairs:
            run = dict(rows=[])
            report["runs"].append(run)
            worker(argparse.Namespace(**{**vars(args), "pairs": [pair], "threads": args.threads[:1]}), run,
                   save=lambda: write_report(report, args.out))
    else:
        passthrough = [a for a in argv if a not in ("--worker",)]
        busy = busy_loops(args.busy)
        try:
            for pair in args.pairs:
                for policy in args.wait_policies:
                    for threads in args.threads:
                        for gemm in args.cpu_gemms:
                            report["runs"].append(run_worker(passthrough, pair, threads, policy, gemm))
        finally:
            for p in busy:
                p.kill()
                p.wait()
    report["load_average_after"] = os.getloadavg()
    print_table(report, args)
    write_report(report, args.out)
    print(f"wrote {args.out}")


def print_table(report, args):
    rows = [r for run in report["runs"] for r in run["rows"]]
    print()
    print(f"machine: {report['cpus']} CPUs, {args.busy} busy-loop processes beside, load average "
          f"{report['load_average_before'][0]:.1f} before / {report['load_average_after'][0]:.1f} after")
    print(f"{'pair':>6} {'thr':>7} {'wait':>7} {'gemm':>6} {'G':>2} {'batch':>5} {'accept':>7} {'engine tok/s':>13} {'vs 1st':>7} "
          f"{'ms/step':>8} {'floor ms':>9} {'/floor':>7} {'peak RSS GB':>11} {'naive HF':>9} {'1-by-1':>8} "
          f"{'vs naive':>9} {'vs 1-by-1':>10}")
    first = {}
    for r in rows:
        base = first.setdefault((r["pair"], r["batch"], r["draft_tokens"]), r["engine_tok_s"])
        floor = (f"{r['floor_ms_per_step']:>9.3f} {r['over_floor']:>6.1f}x" if "floor_ms_per_step" in r
                 else f"{'-':>9} {'-':>7}")
        naive = f"{r['naive_hf_tok_s']:>9.1f} " if "naive_hf_tok_s" in r else f"{'-':>9} "
        naive += f"{r['one_by_one_tok_s']:>8.1f} " if "one_by_one_tok_s" in r else f"{'-':>8} "
        naive += f"{r['vs_naive_hf']:>8.2f}x " if "vs_naive_hf" in r else f"{'-':>9} "
        naive += f"{r['vs_one_by_one']:>9.2f}x" if "vs_one_by_one" in r else f"{'-':>10}"
        print(f"{r['pair']:>6} {r['requested_threads']:>7} {r['wait_policy'][:7]:>7} {r.get('cpu_gemm') or '-':>6} "
              f"{r['draft_tokens']:>2} "
              f"{r['batch']:>5} {r['acceptance_rate']:>7.3f} {r['engine_tok_s']:>13.1f} "
              f"{r['engine_tok_s'] / base:>6.2f}x {r['engine_ms_per_step']:>8.2f} {floor} "
              f"{r['engine_peak_rss_gb']:>11.2f} {naive}")


if __name__ == "__main__":
    main()
