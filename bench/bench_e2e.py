"""End-to-end RSD generation: Engine.generate_batch against the ways people do it today.

(a) naive HF loop: two transformers models with their own dynamic caches, a left-padded batch,
    torch softmax / top-p / multinomial each step;
(b) the authors' style: the same loop one sequence at a time (their generator sends one request per
    token per sequence to two engines, with no batching across sequences).

All three run in this process on the same models, the same prompts and the same number of new
tokens; the figure to quote is the ratio. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.random_pair import build_random_pair  # noqa: E402
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
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
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
    fn()  # warm-up
    times, count = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), count


def random_prompts(n: int, vocab: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length - 7 * (i % 3),), generator=gen).tolist() for i in range(n)]


def demo_prompts(n: int, tokenizer) -> list[list[int]]:
    """Chat-templated competition problems, as `rsd demo` sends them."""
    from rsd_engine.pipeline.data import champ_problems

    problems = champ_problems(n, numeric_only=True)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for p in problems]


def bench_pair(name: str, teacher_dir, student_dir, args) -> dict:
    from transformers import AutoModelForCausalLM

    engine = Engine(teacher_dir, student_dir, device="cpu", dtype="float32", max_batch_size=max(args.batches),
                    max_seq_len=1024, sampler=args.sampler)
    hf = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (teacher_dir, student_dir)]
    vocab = engine.space.size
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=TEMPERATURE, top_p=TOP_P, threshold=THRESHOLD)
    rows = []
    for batch in args.batches:
        if name == "random":
            prompts = random_prompts(batch, vocab, args.prompt_len)
        else:
            prompts = demo_prompts(batch, engine.tokenizer)
        # Every method generates exactly new_tokens per sequence: EOS is not a stop here.
        seeded = [SamplingParams(**{**params.__dict__, "seed": i, "ignore_eos": True}) for i in range(batch)]
        accepted = []

        def ours():
            results = engine.generate_batch(prompts, seeded)
            accepted.extend(a for r in results for a in r.accepted)
            return sum(len(r.token_ids) for r in results)

        def naive():
            return hf_rsd_loop(*hf, prompts, args.new_tokens, vocab)

        def one_by_one():
            return sum(hf_rsd_loop(*hf, [p], args.new_tokens, vocab) for p in prompts)

        t_ours, n_ours = timed(ours, args.repeats)
        t_naive, n_naive = timed(naive, args.repeats)
        t_single, n_single = timed(one_by_one, 1) if batch > 1 else (t_naive, n_naive)
        row = dict(pair=name, batch=batch, new_tokens=args.new_tokens,
                   prompt_tokens=sum(map(len, prompts)) // len(prompts),
                   acceptance_rate=sum(accepted) / len(accepted),
                   engine_tok_s=n_ours / t_ours, naive_hf_tok_s=n_naive / t_naive,
                   one_by_one_tok_s=n_single / t_single)
        row["vs_naive_hf"] = row["engine_tok_s"] / row["naive_hf_tok_s"]
        row["vs_one_by_one"] = row["engine_tok_s"] / row["one_by_one_tok_s"]
        rows.append(row)
        print(f"{name} batch {batch:>3}: engine {row['engine_tok_s']:8.1f} tok/s | naive HF "
              f"{row['naive_hf_tok_s']:8.1f} ({row['vs_naive_hf']:.2f}x) | one by one {row['one_by_one_tok_s']:8.1f} "
              f"({row['vs_one_by_one']:.2f}x) | acceptance {row['acceptance_rate']:.3f}", flush=True)
    return dict(sampler=engine.sampler, teacher=str(teacher_dir), student=str(student_dir), rows=rows)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    report = dict(threads=args.threads, pairs={})
    for name in args.pairs:
        if name == "random":
            teacher_dir, student_dir = build_random_pair(args.cache, vocab_size=args.vocab)
        else:
            from rsd_engine.pipeline.demo_models import demo_student_dir, demo_teacher_dir

            teacher_dir, student_dir = demo_teacher_dir(), demo_student_dir()
        report["pairs"][name] = bench_pair(name, teacher_dir, student_dir, args)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=["random", "demo"], default=["random", "demo"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sampler", default="auto")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "rsd-engine" / "bench"))
    parser.add_argument("--out", default="bench/results/e2e.json")
    args = parser.parse_args()
    report = run(args)
    print()
    print(f"{'pair':>6} {'batch':>5} {'accept':>7} {'engine tok/s':>13} {'naive HF tok/s':>15} "
          f"{'1-by-1 tok/s':>13} {'vs naive':>9} {'vs 1-by-1':>10}")
    for pair in report["pairs"].values():
        for r in pair["rows"]:
            print(f"{r['pair']:>6} {r['batch']:>5} {r['acceptance_rate']:>7.3f} {r['engine_tok_s']:>13.1f} "
                  f"{r['naive_hf_tok_s']:>15.1f} {r['one_by_one_tok_s']:>13.1f} {r['vs_naive_hf']:>8.2f}x "
                  f"{r['vs_one_by_one']:>9.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
