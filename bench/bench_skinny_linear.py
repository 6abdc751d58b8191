"""The fused skinny GEMM (kernels/skinny_linear.py) against today's cuBLAS path, per op and per layer.

Rows are (model, op, M): the Qwen3 0.6B, 1.7B and 8B layer shapes (bench/random_pair.py), M token rows (1: a
decode step at batch 1; 5: a verification round of 4 drafts; 16: the most the skinny path takes), bf16.
Ops, each against the kernels it replaces: qkv and gate_up (add_rms_norm + F.linear), o (F.linear + the
residual add), down (silu_mul + F.linear + the residual add), and layer (the four skinny calls against
today's sequence of the CUDA forward: norm, qkv, o, add+norm, gate_up, silu_mul, down; attention, common to
both, left out). CUDA: each side captured as a CUDA graph over enough weight copies that they do not sit in
L2, replayed between CUDA events (µs per call, median of repeats); the floor is the weight bytes read once at
--floor-tb-s. ``max_abs_diff``: the two sides' outputs compared once (bf16 rounding apart). --sweep adds
the skinny kernel's alternative launch configs at M=1 and 5 (data for triton_ops.skinny_config's rule).
CPU: one tiny shape under Triton's interpreter, wall clock (that the benchmark runs, not a speed).
Prints one table and writes JSON after every row (--json, default bench/results/skinny_linear.json).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rsd_engine  # noqa: E402,F401  before torch: passive OpenMP waiting (rsd_engine/threads.py)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_rsd_step import FLOOR_TB_S, median_graph_us, median_wall_us, run_rows  # noqa: E402
from random_pair import SHAPES  # noqa: E402
from rsd_engine.models import triton_ops as ops  # noqa: E402

MODELS = ("qwen3-0.6b", "qwen3-1.7b", "qwen3-8b")
OPS = ("qkv", "o", "gate_up", "down", "layer")
EPS = 1e-6
L2_CLEAR_BYTES = 256 * 2**20  # weight copies per graph: each op's weights over this many bytes (H200 L2: 60 MiB)
SWEEP = {  # (BLOCK_N, BLOCK_K, STAGES) by M: the FMA form at one row, the dot above
    1: [(2, 2048, 4), (4, 512, 4), (4, 1024, 3), (4, 1024, 4), (4, 1024, 6), (4, 2048, 4), (8, 512, 4), (8, 1024, 4),
        (16, 256, 4)],
    5: [(16, 256, 3), (16, 512, 2), (16, 512, 3), (16, 512, 4), (16, 1024, 3), (32, 256, 3), (32, 256, 4),
        (64, 128, 4)]}
TINY = dict(hidden_size=48, num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=40)


def layer_weights(shape: dict, device, dtype, gen) -> dict:
    """One decoder layer's merged weights of ``shape`` (random, std 0.02; norm weights near 1)."""
    h, i, d = shape["hidden_size"], shape["intermediate_size"], shape.get("head_dim", 64)
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    w = lambda n, k: torch.randn(n, k, generator=gen, device=device).mul_(0.02).to(dtype)  # noqa: E731
    g = lambda n: (1 + 0.1 * torch.randn(n, generator=gen, device=device)).to(dtype)  # noqa: E731
    return dict(qkv=w((heads + 2 * kv) * d, h), o=w(h, heads * d), gate_up=w(2 * i, h), down=w(h, i),
                input_norm=g(h), post_norm=g(h))


def make_ops(weights: dict, M: int, device, dtype, gen):
    """{op: (skinny, cublas, weight bytes)} of zero-argument callables over ``weights``; each returns its output."""
    h, heads_d, i = weights["o"].shape[0], weights["o"].shape[1], weights["down"].shape[1]
    x = lambda k: torch.randn(M, k, generator=gen, device=device).to(dtype)  # noqa: E731
    hidden, attn, gate_up = x(h), x(heads_d), x(2 * i)
    delta = torch.zeros_like(hidden)  # the previous MLP output, added by today's first norm: 0 for the check
    W = weights
    skinny = dict(
        qkv=lambda: ops.skinny_linear(hidden, W["qkv"], norm_weight=W["input_norm"], eps=EPS),
        o=lambda: ops.skinny_linear(attn, W["o"], residual=hidden),
        gate_up=lambda: ops.skinny_linear(hidden, W["gate_up"], norm_weight=W["post_norm"], eps=EPS),
        down=lambda: ops.skinny_linear(gate_up, W["down"], silu_mul=True, residual=hidden))
    cublas = dict(
        qkv=lambda: F.linear(ops.add_rms_norm(hidden, None, W["input_norm"], EPS), W["qkv"]),
        o=lambda: hidden.add_(F.linear(attn, W["o"])),
        gate_up=lambda: F.linear(ops.add_rms_norm(hidden, None, W["post_norm"], EPS), W["gate_up"]),
        down=lambda: hidden.add_(F.linear(ops.silu_mul(gate_up), W["down"])))

    def skinny_layer():
        ops.skinny_linear(hidden, W["qkv"], norm_weight=W["input_norm"], eps=EPS)
        ops.skinny_linear(attn, W["o"], residual=hidden)
        up = ops.skinny_linear(hidden, W["gate_up"], norm_weight=W["post_norm"], eps=EPS)
        return ops.skinny_linear(up, W["down"], silu_mul=True, residual=hidden)

    def cublas_layer():  # as CausalLM._forward_triton above the skinny limit; the MLP's output is the delta
        F.linear(ops.add_rms_norm(hidden, delta, W["input_norm"], EPS), W["qkv"])
        up = F.linear(ops.add_rms_norm(hidden, F.linear(attn, W["o"]), W["post_norm"], EPS), W["gate_up"])
        return delta.copy_(F.linear(ops.silu_mul(up), W["down"]))

    skinny["layer"], cublas["layer"] = skinny_layer, cublas_layer
    nbytes = {name: W[name].numel() * W[name].element_size() for name in OPS[:4]}
    nbytes["layer"] = sum(nbytes.values())
    return {name: (skinny[name], cublas[name], nbytes[name]) for name in OPS}, hidden, delta


def bench_op(model: str, op: str, M: int, device: str, args, config=None) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = TINY if model == "tiny" else SHAPES[model]
    gen = torch.Generator(device=device).manual_seed(0)
    weights = layer_weights(shape, device, dtype, gen)
    names = ("qkv", "o", "gate_up", "down") if op == "layer" else (op,)
    op_bytes = sum(weights[n].numel() * weights[n].element_size() for n in names)
    copies = 1 if device != "cuda" else max(2, min(64, math.ceil(L2_CLEAR_BYTES / op_bytes)))
    calls = [make_ops(weights if c == 0 else layer_weights(shape, device, dtype, gen), M, device, dtype, gen)
             for c in range(copies)]
    skinny, cublas, nbytes = calls[0][0][op]
    hidden, delta = calls[0][1], calls[0][2]
    saved_config = ops.skinny_config
    if config is not None:
        ops.skinny_config = lambda n, k, m, dtype, dev: config
    try:
        start = hidden.clone()
        out_skinny = skinny().clone()
        hidden.copy_(start)
        out_cublas = cublas().clone()
        if op == "layer":  # today's path leaves the MLP's output to the next norm: add it here
            out_cublas = hidden.float() + out_cublas.float()
        hidden.copy_(start)
        row = dict(N=list(weights[op].shape)[0] if op != "layer" else None, copies=copies,
                   max_abs_diff=(out_skinny.float() - out_cublas.float()).abs().max().item(), bytes=nbytes)
        each = lambda side: lambda: [c[0][op][side]() for c in calls]  # noqa: E731
        if device == "cuda":  # a sweep row times the skinny side only (its cuBLAS side is the default row's)
            row["skinny_us"] = median_graph_us(each(0), args.repeats) / copies
            row["cublas_us"] = None if config else median_graph_us(each(1), args.repeats) / copies
            row["floor_us"] = nbytes / (args.floor_tb_s * 1e12) * 1e6
            row["skinny_over_floor"] = row["skinny_us"] / row["floor_us"]
        else:
            row.update(skinny_us=median_wall_us(skinny, 1, args.repeats, args.budget),
                       cublas_us=median_wall_us(cublas, 1, args.repeats, args.budget))
        if row["cublas_us"] is not None:
            row["speedup"] = row["cublas_us"] / row["skinny_us"]
            if "floor_us" in row:
                row["cublas_over_floor"] = row["cublas_us"] / row["floor_us"]
        return row
    finally:
        ops.skinny_config = saved_config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="M 1 and 5 only; 8B shapes only for the layer row")
    parser.add_argument("--sweep", action="store_true", help="also time the alternative launch configs")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=2.0, help="CPU: seconds per measurement")
    parser.add_argument("--floor-tb-s", type=float, default=FLOOR_TB_S)
    parser.add_argument("--json", dest="out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "skinny_linear.json")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda":
        rows_m = (1, 5) if args.quick else (1, 5, 16)
        keys = [dict(model=m, op=op, M=M) for m in MODELS for M in rows_m for op in OPS
                if not (args.quick and m == "qwen3-8b" and op != "layer")]
        if args.sweep:
            keys += [dict(model=m, op=op, M=M, config=list(c)) for m in MODELS[:2] for op in OPS[:4]
                     for M, configs in SWEEP.items() for c in configs]
    else:
        keys = [dict(model="tiny", op=op, M=M) for op in OPS for M in (1, 5)]
    meta = dict(device=device, torch=torch.__version__, dtype="bfloat16" if device == "cuda" else "float32",
                skinny_config="triton_ops.skinny_config unless the row names one (BLOCK_N, BLOCK_K, num_stages)")
    if device == "cuda":
        meta.update(gpu=torch.cuda.get_device_name(), floor_tb_s=args.floor_tb_s,
                    timing="median of CUDA-event times of back-to-back CUDA-graph replays, per call")
    else:
        meta.update(timing="wall clock under TRITON_INTERPRET (no speed figure)")
    header = f"{'model':<11} {'op':<8} {'M':>3} {'config':<14} {'skinny us':>10} {'cublas us':>10} {'floor us':>9} " \
             f"{'speedup':>8} {'maxdiff':>8}"

    def fmt(r):
        num = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        return (f"{r['model']:<11} {r['op']:<8} {r['M']:>3} {str(r.get('config') or ''):<14} {r['skinny_us']:>10.2f} "
                f"{num(r['cublas_us'], '.2f'):>10} {num(r.get('floor_us'), '.2f'):>9} "
                f"{num(r.get('speedup'), '.2f'):>8} {r['max_abs_diff']:>8.3g}")

    def one(model, op, M, config=None):
        return bench_op(model, op, M, device, args, tuple(config) if config else None)

    start = time.perf_counter()
    run_rows(keys, one, device, args, meta, header, fmt)
    print(f"{time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
