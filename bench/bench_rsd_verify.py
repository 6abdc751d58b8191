"""The verify step of a speculative round and the drafts' sampler: fused ops against the PyTorch references.

``rsd_verify``: one call over a round of G drafts, teacher and student logits [B, G+1, V], drafts sampled
from the student's rows with ``sample_tokens`` (as the engine drafts), every row verifying all G.
``sample_tokens``: one draft draw from [B, V] student rows. Rows are (op, B, G, V, logit dtype); timing,
floor and JSON as in bench_rsd_step.py (CUDA: Triton vs reference, CUDA-graph replays, the floor at
--floor-tb-s; CPU: C++ vs reference, wall clock, the floor measured; the reference against itself where
the C++ extension is not built). Also the mean tokens a verify row
emits. Prints one table and writes JSON after every row (bench/results/rsd_verify.json by default).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_rsd_step import (DTYPES, MODEL_LOGITS, VOCAB, add_common_arguments, common_meta,  # noqa: E402
                            forced_config, fused_backend, kernel_breakdown, make_step, median_graph_us, resolve,
                            run_rows, time_pair)
from rsd_engine.randomness import DRAFT_DRAW, round_uniforms  # noqa: E402
from rsd_engine.sampling import rsd_verify, rsd_verify_reference, sample_tokens  # noqa: E402

LOGITS = ("LM-like rows as bench_rsd_step (2*randn plus 6 peaked ids; student = 0.8*teacher + 2*randn), "
          "independent per position")


def make_round(B, G, V, device, dtype, shape="lm"):
    teacher, student, _, params, mask, _ = make_step(B * (G + 1), V, device, dtype=dtype, shape=shape)
    params = type(params)(*(p[:B] for p in params))
    teacher, student = teacher.view(B, G + 1, V), student.view(B, G + 1, V)
    uniforms = round_uniforms(torch.arange(B, device=device), torch.zeros(B, dtype=torch.int64, device=device), G + 1)
    draft = torch.stack([sample_tokens(student[:, i].contiguous(), uniforms[:, i, DRAFT_DRAW].contiguous(),
                                       params.student_temperature, params.student_top_k, params.student_top_p, mask)
                         for i in range(G)], dim=1)
    num_draft = torch.full((B,), G, dtype=torch.int32, device=device)
    return teacher, student, draft, num_draft, uniforms, params, mask, mask


def bench_verify(B, G, V, dtype, device, args, shape="lm") -> dict:
    backend = fused_backend(device)
    inputs = make_round(B, G, V, device, dtype, shape)
    fused = lambda: rsd_verify(*inputs, backend=backend, check_values=False)  # noqa: E731  (as the engine calls it)
    reference = lambda: rsd_verify_reference(*inputs)  # noqa: E731
    out, ref = fused(), reference()
    row = dict(same_tokens=bool(torch.equal(out.tokens, ref.tokens)),
               mean_emitted=out.num_emitted.float().mean().item())
    row.update(time_pair(fused, reference, device, args, inputs[:2]))
    return row


def bench_tile(B, G, V, dtype, tile, device, args) -> dict:
    """The Triton rsd_verify alone with its failed, residual and pick kernels taking ``tile`` ids at a time:
    CUDA_CONFIG's TILE against its alternatives (registers and spills against a draw's dependent tiles)."""
    inputs = make_round(B, G, V, device, dtype)
    fused = lambda: rsd_verify(*inputs, backend="triton", check_values=False)  # noqa: E731
    with forced_config(tile=tile):
        us = median_graph_us(fused, args.repeats)
        kernels = kernel_breakdown(fused)
        out = fused()
    nbytes = sum(t.numel() * t.element_size() for t in inputs[:2])  # as time_pair's floor
    floor = nbytes / (args.floor_tb_s * 1e12) * 1e6
    return dict(fused_us=us, fused_kernels=kernels, floor_us=floor, over_floor=us / floor,
                same_tokens=bool(torch.equal(out.tokens, rsd_verify_reference(*inputs).tokens)))


def bench_sample_tokens(B, V, dtype, device, args) -> dict:
    backend = fused_backend(device)
    _, logits, uniforms, params, mask, _ = make_step(B, V, device, dtype=dtype)
    draws = uniforms[:, 0].contiguous()
    call = (logits, draws, params.student_temperature, params.student_top_k, params.student_top_p, mask)
    fused = lambda: sample_tokens(*call, backend=backend, check_values=False)  # noqa: E731  (as the engine calls it)
    reference = lambda: sample_tokens(*call, check_values=False)  # noqa: E731
    row = dict(same_tokens=bool(torch.equal(fused(), reference())))
    row.update(time_pair(fused, reference, device, args, (logits,)))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="rsd_verify batch sizes")
    parser.add_argument("--gammas", type=int, nargs="+", default=[4], help="drafts per round G")
    parser.add_argument("--sample-batch", type=int, nargs="*", default=[1, 16, 64],
                        help="sample_tokens batch sizes (none: --sample-batch with no values)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[VOCAB])
    parser.add_argument("--model-rows-batch", type=int, nargs="*", default=[],
                        help="then rsd_verify at these batch sizes on model-shaped rows (MODEL_LOGITS), first dtype, "
                             "G and vocab only")
    parser.add_argument("--tiles", type=int, nargs="*", default=[],
                        help="CUDA: then time the Triton rsd_verify alone with each of these ids a tile (divisors "
                             "of CUDA_CONFIG's SEG; its TILE the default) at the --tile-batch sizes, first G, dtype "
                             "and vocab only")
    parser.add_argument("--tile-batch", type=int, nargs="+", default=[1, 16])
    add_common_arguments(parser, "rsd_verify.json")
    args = parser.parse_args(argv)
    device = resolve(args)
    meta = dict(common_meta(device, args), logits=LOGITS, model_logits=MODEL_LOGITS)
    print(f"rsd_verify and sample_tokens on {device} ({meta.get('gpu') or meta.get('isa') or meta['note']}), "
          f"fused vs PyTorch reference, µs per call")
    header = (f"{'op':>13} {'B':>4} {'G':>2} {'V':>7} {'dtype':>8} | {'fused µs':>10} {'torch µs':>10} "
              f"{'speedup':>8} | {'floor µs':>9} {'fused/floor':>11} | {'emitted':>7} | same")
    keys = [dict(op="rsd_verify", B=B, G=G, V=V, dtype=d) for d in args.dtype for V in args.vocab
            for G in args.gammas for B in args.batch]
    keys += [dict(op="sample_tokens", B=B, G=0, V=V, dtype=d) for d in args.dtype for V in args.vocab
             for B in args.sample_batch]
    keys += [dict(op="rsd_verify", B=B, G=args.gammas[0], V=args.vocab[0], dtype=args.dtype[0], shape="model")
             for B in args.model_rows_batch]
    if device == "cuda":  # last: a run cut short loses the sweep first
        keys += [dict(op="rsd_verify_tile", B=B, G=args.gammas[0], V=args.vocab[0], dtype=args.dtype[0], tile=t)
                 for B in args.tile_batch for t in args.tiles]

    def one(op, B, G, V, dtype, shape="lm", tile=None):
        if op == "rsd_verify":
            return bench_verify(B, G, V, DTYPES[dtype], device, args, shape)
        if op == "rsd_verify_tile":
            return bench_tile(B, G, V, DTYPES[dtype], tile, device, args)
        return bench_sample_tokens(B, V, DTYPES[dtype], device, args)

    def fmt(r):
        if r["op"] == "rsd_verify_tile":
            return (f"{'rsd_verify':>13} {r['B']:>4} {r['G']:>2} {r['V']:>7} {r['dtype']:>8} | {r['fused_us']:>10.1f} "
                    f"with tiles of {r['tile']} ids | {r['floor_us']:>9.2f} {r['over_floor']:>10.1f}x | "
                    f"{'yes' if r['same_tokens'] else 'no (rounding)'}")
        emitted = f"{r['mean_emitted']:>7.2f}" if "mean_emitted" in r else f"{'-':>7}"
        return (f"{r['op']:>13} {r['B']:>4} {r['G']:>2} {r['V']:>7} {r['dtype']:>8} | {r['fused_us']:>10.1f} "
                f"{r['reference_us']:>10.1f} {r['speedup']:>7.1f}x | {r['floor_us']:>9.2f} {r['over_floor']:>10.1f}x | "
                f"{emitted} | {'yes' if r['same_tokens'] else 'no (rounding)'}"
                f"{' (model-shaped rows)' if 'shape' in r else ''}")

    run_rows(keys, one, device, args, meta, header, fmt)


if __name__ == "__main__":
    main()
