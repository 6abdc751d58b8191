"""Teacher-forced scoring throughput: Engine.score_batch (whole batches per forward) against the ways
to do it without it.

(a) batched: Engine.score_batch, every cache slot scoring a sequence per forward (score_sequences);
(b) one at a time: the same scorer, one sequence per forward (max_batch=1), the way score_batch ran before;
(c) HF: transformers' forward over right-padded micro-batches with an attention mask, then
    log_softmax over the vocabulary and a gather of the targets, per model.

All run in this process on the same models and the same (prompt, response) pairs, scoring every
response token under teacher and student; the figure to quote is the ratio. Prints a table and
writes JSON.
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
from random_pair import build_random_pair  # noqa: E402
from rsd_engine import Engine  # noqa: E402
from rsd_engine.scoring import score_sequences  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, list]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def random_pairs(n: int, vocab: int, prompt_len: int, response_len: int, seed: int = 0):
    """Prompts of about prompt_len tokens and responses of response_len ± 10%, random ids."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        r = response_len + int(response_len * 0.1 * ((i % 5) - 2) / 2)
        p = prompt_len - 5 * (i % 3)
        pairs.append((torch.randint(0, vocab, (p,), generator=gen).tolist(),
                      torch.randint(0, vocab, (r,), generator=gen).tolist()))
    return pairs


def demo_pairs(n: int, tokenizer, response_len: int):
    """Chat-templated competition problems; each response is the text of the problems after it (real
    maths prose), cut to response_len tokens."""
    from rsd_engine.pipeline.data import champ_problems

    problems = champ_problems()
    out = []
    for i in range(n):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": problems[i].question}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
        text = "\n\n".join(p.question for p in problems[i + 1: i + 40])
        out.append((prompt, tokenizer.encode(text, add_special_tokens=False)[:response_len]))
    return out


@torch.inference_mode()
def hf_score(model, pairs, micro_batch: int) -> list[list[float]]:
    out = []
    for a in range(0, len(pairs), micro_batch):
        group = pairs[a: a + micro_batch]
        width = max(len(p) + len(c) for p, c in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for b, (p, c) in enumerate(group):
            ids[b, : len(p) + len(c)] = torch.tensor(p + c)
            mask[b, : len(p) + len(c)] = 1
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for b, (p, c) in enumerate(group):
            rows = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            out.append(logprobs[b, rows, torch.tensor(c)].tolist())
    return out


def bench_pair(name: str, teacher_dir, student_dir, args) -> dict:
    from transformers import AutoModelForCausalLM

    engine = Engine(teacher_dir, student_dir, device=args.device, dtype=args.dtype, max_batch_size=args.batch,
                    max_seq_len=args.prompt_len + args.response_len * 2, sampler="reference")
    if name == "random":
        pairs = random_pairs(args.batch, engine.space.size, args.prompt_len, args.response_len)
    else:
        pairs = demo_pairs(args.batch, engine.tokenizer, args.response_len)
    prompts, completions = [p for p, _ in pairs], [c for _, c in pairs]
    scored = sum(map(len, completions)) * 2  # every response token under both models
    engine.score_batch(prompts[:2], [c[:16] for c in completions[:2]])  # warm-up

    def batched():
        return engine.score_batch(prompts, completions)

    def one_at_a_time():
        return [[score_sequences(model, cache, [p + c], [len(p)], max_batch=1)[0]
                 for model, cache in ((engine.teacher, engine.teacher_cache), (engine.student, engine.student_cache))]
                for p, c in pairs]

    t_batched, ours = timed(batched, args.repeats)
    ours = [[s.teacher_logprobs, s.student_logprobs] for s in ours]
    t_single, single = timed(one_at_a_time, args.repeats)
    row = dict(pair=name, sequences=len(pairs), prompt_tokens=sum(map(len, prompts)) // len(pairs),
               response_tokens=sum(map(len, completions)) // len(pairs), scored_tokens=scored,
               batched_tok_s=scored / t_batched, one_at_a_time_tok_s=scored / t_single)
    drift = max_diff(ours, single)
    if not args.skip_hf:
        hf = [AutoModelForCausalLM.from_pretrained(d, dtype=engine.dtype).to(engine.device).eval()
              for d in (teacher_dir, student_dir)]
        t_hf, theirs = timed(lambda: [hf_score(m, pairs, args.hf_batch) for m in hf], args.repeats)
        row["hf_tok_s"] = scored / t_hf
        row["vs_hf"] = row["batched_tok_s"] / row["hf_tok_s"]
        drift = max(drift, max_diff(ours, [list(ts) for ts in zip(*theirs)]))
    row["vs_one_at_a_time"] = row["batched_tok_s"] / row["one_at_a_time_tok_s"]
    row["max_abs_logprob_diff"] = drift
    print(f"{name}: batched {row['batched_tok_s']:9.1f} tok/s | one at a time {row['one_at_a_time_tok_s']:9.1f} "
          f"({row['vs_one_at_a_time']:.2f}x)" + (f" | HF {row['hf_tok_s']:9.1f} ({row['vs_hf']:.2f}x)"
                                                  if "hf_tok_s" in row else ""), flush=True)
    return dict(teacher=str(teacher_dir), student=str(student_dir), rows=[row])


def max_diff(a, b) -> float:
    """Largest |difference| of two [sequence][model][token] log-prob lists."""
    return max(abs(x - y) for sa, sb in zip(a, b) for ma, mb in zip(sa, sb) for x, y in zip(ma, mb))


def main():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=["random", "demo"], default=["random"])
    parser.add_argument("--batch", type=int, default=32, help="responses scored (and cache slots)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=500)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hf-batch", type=int, default=8, help="HF micro-batch (its [B, T, V] logits are held whole)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "rsd-engine" / "bench"))
    parser.add_argument("--out", default="bench/results/score.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = dict(threads=args.threads, device=args.device, dtype=args.dtype, pairs={})
    for name in args.pairs:
        if name == "random":
            teacher_dir, student_dir = build_random_pair(args.cache, vocab_size=args.vocab)
        else:
            from rsd_engine.pipeline.demo_models import demo_student_dir, demo_teacher_dir

            teacher_dir, student_dir = demo_teacher_dir(), demo_student_dir()
        report["pairs"][name] = bench_pair(name, teacher_dir, student_dir, args)
    print()
    print(f"{'pair':>6} {'seqs':>5} {'resp':>5} {'batched tok/s':>14} {'1-at-a-time tok/s':>18} {'HF tok/s':>9} "
          f"{'vs 1-at-a-time':>15} {'vs HF':>7} {'max |diff|':>11}")
    for pair in report["pairs"].values():
        for r in pair["rows"]:
            hf = f"{r['hf_tok_s']:>9.1f}" if "hf_tok_s" in r else f"{'-':>9}"
            vs_hf = f"{r['vs_hf']:>6.2f}x" if "vs_hf" in r else f"{'-':>7}"
            print(f"{r['pair']:>6} {r['sequences']:>5} {r['response_tokens']:>5} {r['batched_tok_s']:>14.1f} "
                  f"{r['one_at_a_time_tok_s']:>18.1f} {hf} {r['vs_one_at_a_time']:>14.2f}x {vs_hf} "
                  f"{r['max_abs_logprob_diff']:>11.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
