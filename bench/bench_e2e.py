"""End-to-end RSD generation: Engine.generate_batch against the ways people do it today.

(a) naive HF loop: two transformers models with their own dynamic caches, a left-padded batch,
    torch softmax / top-p / multinomial each step;
(b) the authors' style: the same loop one sequence at a time (their generator sends one request per
    token per sequence to two engines, with no batching across sequences).

All three run in one process on the same models, the same prompts and the same number of new tokens;
the figure to quote is the ratio. Each (pair, thread count, OpenMP wait policy) runs in a fresh worker
process, so that its thread settings are its own (OpenMP reads its wait policy once, at load) and its
peak RSS is the engine's: the Engine is made as the README makes it (max_batch_size 32, max_seq_len
4096 unless told otherwise) and peak RSS is read after its runs, before the HF baselines load.
``--busy N`` runs N busy-loop processes beside the measurements: a machine shared with other work.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
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

from random_pair import build_random_pair  # noqa: E402
from rsd_engine import Engine, SamplingParams  # noqa: E402

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


def timed(fn, repeats: int) -> tuple[float, int]:
    def run():
        count = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return count

    run()  # warm-up (on CUDA: graph capture, Triton compiles)
    times, count = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), count


def random_prompts(n: int, vocab: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (max(1, length - 7 * (i % 3)),), generator=gen).tolist() for i in range(n)]


def demo_prompts(n: int, tokenizer) -> list[list[int]]:
    """Chat-templated competition problems, as `rsd demo` sends them."""
    from rsd_engine.pipeline.data import champ_problems

    problems = champ_problems(n, numeric_only=True)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for p in problems]


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def pair_dirs(name: str, args):
    if name == "random":
        if args.tiny:
            return build_random_pair(args.cache, vocab_size=args.vocab, teacher="teacher-tiny",
                                     student="student-tiny")
        return build_random_pair(args.cache, vocab_size=args.vocab)
    from rsd_engine.pipeline.demo_models import demo_student_dir, demo_teacher_dir

    return demo_teacher_dir(), demo_student_dir()


def worker(args) -> dict:
    """One configuration, in this (fresh) process: the engine's runs, its peak RSS, then the baselines."""
    from rsd_engine.threads import set_threads

    requested = args.threads[-1]  # the worker's own --threads comes last
    threads = set_threads(None if requested == "default" else int(requested))
    name = args.pairs[-1]
    teacher_dir, student_dir = pair_dirs(name, args)
    rss_before = peak_rss_gb()
    engine = Engine(teacher_dir, student_dir, device=args.device, max_batch_size=args.max_batch_size,
                    max_seq_len=args.max_seq_len, sampler=args.sampler)
    vocab = engine.space.size
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=TEMPERATURE, top_p=TOP_P, threshold=THRESHOLD)
    rows, inputs = [], {}
    for batch in args.batches:
        prompts = random_prompts(batch, vocab, args.prompt_len) if name == "random" else \
            demo_prompts(batch, engine.tokenizer)
        # Every method generates exactly new_tokens per sequence: EOS is not a stop here.
        seeded = [SamplingParams(**{**params.__dict__, "seed": i, "ignore_eos": True}) for i in range(batch)]
        accepted = []

        def ours():
            results = engine.generate_batch(prompts, seeded)
            accepted.extend(a for r in results for a in r.accepted)
            return sum(len(r.token_ids) for r in results)

        t_ours, n_ours = timed(ours, args.repeats)
        inputs[batch] = prompts
        rows.append(dict(pair=name, device=str(engine.device), threads=threads, requested_threads=requested,
                         wait_policy=os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)"), batch=batch,
                         new_tokens=args.new_tokens, prompt_tokens=sum(map(len, prompts)) // len(prompts),
                         acceptance_rate=sum(accepted) / len(accepted), engine_tok_s=n_ours / t_ours))
    engine_peak = peak_rss_gb()
    for row in rows:
        row["engine_peak_rss_gb"] = engine_peak
    if args.baselines:
        from transformers import AutoModelForCausalLM

        hf = [AutoModelForCausalLM.from_pretrained(d, dtype=engine.dtype).to(engine.device).eval()
              for d in (teacher_dir, student_dir)]
        del engine
        for row in rows:
            prompts = inputs[row["batch"]]
            t_naive, n_naive = timed(lambda: hf_rsd_loop(*hf, prompts, args.new_tokens, vocab), args.repeats)
            row["naive_hf_tok_s"] = n_naive / t_naive
            if row["batch"] > 1:
                t_single, n_single = timed(
                    lambda: sum(hf_rsd_loop(*hf, [p], args.new_tokens, vocab) for p in prompts), 1)
                row["one_by_one_tok_s"] = n_single / t_single
            else:
                row["one_by_one_tok_s"] = row["naive_hf_tok_s"]
            row["vs_naive_hf"] = row["engine_tok_s"] / row["naive_hf_tok_s"]
            row["vs_one_by_one"] = row["engine_tok_s"] / row["one_by_one_tok_s"]
    return dict(pair=name, teacher=str(teacher_dir), student=str(student_dir), rss_before_engine_gb=rss_before,
                rows=rows)


def run_worker(argv: list[str], pair: str, threads: str, policy: str) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, *argv, "--worker", "--pairs", pair, "--threads", threads,
               "--worker-out", out.name]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(Path(out.name).read_text())


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=["random", "demo"], default=["random", "demo"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--tiny", action="store_true", help="the random pair at a few MB (plumbing checks)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", nargs="+", default=["default"],
                        help="thread counts to compare, 'default' = rsd's default (default: %(default)s)")
    parser.add_argument("--wait-policies", nargs="+", default=["PASSIVE"], choices=["PASSIVE", "ACTIVE"],
                        help="OMP_WAIT_POLICY values to compare (default: rsd's, %(default)s)")
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes beside the runs (default: 0)")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="time the engine only (no HF loops)")
    parser.add_argument("--device", default="cpu", help="engine and baselines device (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="Engine argument (default: %(default)s)")
    parser.add_argument("--max-seq-len", type=int, default=4096, help="Engine argument (default: %(default)s)")
    parser.add_argument("--sampler", default="auto")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "rsd-engine" / "bench"))
    parser.add_argument("--out", default="bench/results/e2e.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if max(args.batches) > args.max_batch_size:
        parser.error(f"--batches up to {max(args.batches)} need --max-batch-size >= that")
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return

    passthrough = [a for a in argv if a not in ("--worker",)]
    report = dict(busy_loops=args.busy, cpus=os.cpu_count(), load_average_before=os.getloadavg(), runs=[])
    busy = busy_loops(args.busy)
    try:
        for pair in args.pairs:
            for policy in args.wait_policies:
                for threads in args.threads:
                    run = run_worker(passthrough, pair, threads, policy)
                    report["runs"].append(run)
                    for r in run["rows"]:
                        print(f"{r['pair']} threads {r['threads']} ({r['requested_threads']}) {r['wait_policy']} "
                              f"batch {r['batch']:>3}: engine {r['engine_tok_s']:8.1f} tok/s, peak RSS "
                              f"{r['engine_peak_rss_gb']:.2f} GB", flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    report["load_average_after"] = os.getloadavg()
    rows = [r for run in report["runs"] for r in run["rows"]]
    print()
    print(f"machine: {report['cpus']} CPUs, {args.busy} busy-loop processes beside, load average "
          f"{report['load_average_before'][0]:.1f} before / {report['load_average_after'][0]:.1f} after")
    print(f"{'pair':>6} {'thr':>7} {'wait':>7} {'batch':>5} {'accept':>7} {'engine tok/s':>13} {'vs 1st':>7} "
          f"{'peak RSS GB':>11} {'naive HF':>9} {'1-by-1':>8} {'vs naive':>9} {'vs 1-by-1':>10}")
    first = {}
    for r in rows:
        base = first.setdefault((r["pair"], r["batch"]), r["engine_tok_s"])
        hf = (f"{r['naive_hf_tok_s']:>9.1f} {r['one_by_one_tok_s']:>8.1f} {r['vs_naive_hf']:>8.2f}x "
              f"{r['vs_one_by_one']:>9.2f}x") if "naive_hf_tok_s" in r else ""
        print(f"{r['pair']:>6} {r['requested_threads']:>7} {r['wait_policy'][:7]:>7} {r['batch']:>5} "
              f"{r['acceptance_rate']:>7.3f} {r['engine_tok_s']:>13.1f} {r['engine_tok_s'] / base:>6.2f}x "
              f"{r['engine_peak_rss_gb']:>11.2f} {hf}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
