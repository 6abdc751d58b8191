"""The CUDA decoder's Triton kernels (kernels/decode_attention.py, add_rms_norm.py, qk_norm_rope_store.py,
silu_mul.py) on CPU under the interpreter, against SDPA and plain PyTorch; and compiled for sm_80/sm_90
without a GPU. The whole CUDA forward against HF is tests/test_models.py::test_triton_forward_matches_hf."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rsd_engine.models import rope
from rsd_engine.models import triton_ops as ops
from rsd_engine.models.kv_cache import KVCache
from rsd_engine.models.transformer import RMSNorm

KV_HEADS, HEAD_DIM, MAX_SEQ_LEN = 2, 16, 80


def sdpa_reference(q, k_cache, v_cache, slots, positions):
    """Causal SDPA over each row's slot: the query at position p sees cache positions 0..min(p, L)."""
    B, T, H, D = q.shape
    L = k_cache.shape[1] - 1
    k = k_cache[slots].transpose(1, 2).repeat_interleave(H // k_cache.shape[2], dim=1)  # [B, H, L + 1, D]
    v = v_cache[slots].transpose(1, 2).repeat_interleave(H // k_cache.shape[2], dim=1)
    visible = torch.arange(L + 1) <= positions.clamp(max=L)[..., None]  # [B, T, L + 1]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.nan_to_num(), v.nan_to_num(), attn_mask=visible[:, None])
    return out.transpose(1, 2)


@pytest.mark.parametrize("T, G, splits", [(1, 2, 1), (1, 2, 4), (1, 1, 2), (3, 4, 1), (3, 4, 8), (9, 2, 2),
                                          (40, 1, 1), (40, 1, 4)])
def test_attention_matches_sdpa(T, G, splits):
    """Ragged rows in shuffled slots (one past the cache's end, clamped to the scratch position), T new
    tokens each (decode, verification, a prefill chunk over several key blocks), GQA ratio G, keys split
    over programs or not. Positions after each row's last are NaN: a read past a row's span shows.
    With splits, the last program of each (row, kv head, m-block) to arrive merges the partials: run
    twice in a row (as a graph replays), the arrival counters must be back at zero after each launch, and
    the second run must give the first's output bit for bit."""
    g = torch.Generator().manual_seed(T * 10 + G)
    cache = KVCache(1, 4, MAX_SEQ_LEN, KV_HEADS, HEAD_DIM, dtype=torch.float32, device="cpu")
    k_cache, v_cache = cache.k[0], cache.v[0]
    k_cache.copy_(torch.randn(k_cache.shape, generator=g))
    v_cache.copy_(torch.randn(v_cache.shape, generator=g))
    slots = torch.tensor([2, 0, 3])
    starts = torch.tensor([0, 70, MAX_SEQ_LEN - T + 5])[:, None]
    positions = starts + torch.arange(T)
    for b, slot in enumerate(slots.tolist()):
        last = min(int(positions[b, -1]), MAX_SEQ_LEN)
        k_cache[slot, last + 1:] = float("nan")
        v_cache[slot, last + 1:] = float("nan")
    q = torch.randn(3, T, KV_HEADS * G, HEAD_DIM, generator=g)
    expected = sdpa_reference(q, k_cache, v_cache, slots, positions)
    first = ops.decode_attention(q, k_cache, v_cache, slots, positions, splits=splits)
    torch.testing.assert_close(first, expected, atol=2e-5, rtol=2e-5)
    assert all(not c.any() for c in ops._counters.values()), "an arrival counter was left non-zero"
    again = ops.decode_attention(q, k_cache, v_cache, slots, positions, splits=splits)
    assert torch.equal(again, first)
    assert all(not c.any() for c in ops._counters.values())


@pytest.mark.parametrize("D, G, kv_heads, T, splits", [(64, 7, 2, 1, 4), (64, 7, 2, 5, 2), (128, 4, 8, 1, 8),
                                                    (96, 3, 2, 5, 4), (128, 8, 1, 3, 32)])
def test_attention_at_real_head_sizes(D, G, kv_heads, T, splits):
    """The heads of real models (head_dim 64 with 7 query heads a KV head, Qwen2.5-0.5B's; 128 with 4 and 8,
    Qwen3's and Llama's; 96, no power of two: padded tiles) against SDPA, NaN past each row's span: the other cases
    use head_dim 16."""
    g = torch.Generator().manual_seed(D + G)
    L = 150
    k_cache, v_cache = (torch.randn(4, L + 1, kv_heads, D, generator=g) for _ in range(2))
    slots = torch.tensor([2, 0, 3])
    positions = torch.tensor([[0], [70], [L - 2]]) + torch.arange(T)
    for b, slot in enumerate(slots.tolist()):
        last = min(int(positions[b, -1]), L)
        k_cache[slot, last + 1:] = float("nan")
        v_cache[slot, last + 1:] = float("nan")
    q = torch.randn(3, T, kv_heads * G, D, generator=g)
    torch.testing.assert_close(ops.decode_attention(q, k_cache, v_cache, slots, positions, splits=splits),
                               sdpa_reference(q, k_cache, v_cache, slots, positions), atol=2e-5, rtol=2e-5)


def test_attention_splits_one_launch_whatever_the_split_count(monkeypatch):
    """Splitting a row's keys costs no second launch: the last arrival merges."""
    launches = []
    launch = ops._launch
    monkeypatch.setattr(ops, "_launch", lambda kernel, *a, **k: (launches.append(kernel), launch(kernel, *a, **k)))
    k_cache = torch.randn(2, MAX_SEQ_LEN + 1, KV_HEADS, HEAD_DIM)
    q = torch.randn(2, 1, KV_HEADS * 2, HEAD_DIM)
    for splits in (1, 2, 8):
        ops.decode_attention(q, k_cache, k_cache, torch.tensor([1, 0]), torch.tensor([[5], [60]]), splits=splits)
    assert len(launches) == 3


def test_add_rms_norm_and_silu_mul_match_pytorch():
    g = torch.Generator().manual_seed(0)
    residual, delta = torch.randn(3, 48, generator=g), torch.randn(3, 48, generator=g)
    norm = RMSNorm(48, 1e-6)
    norm.weight.data = torch.randn(48, generator=g)
    stream = residual.clone()
    out = ops.add_rms_norm(stream, delta, norm.weight, 1e-6)
    torch.testing.assert_close(stream, residual + delta)
    torch.testing.assert_close(out, norm(residual + delta), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.add_rms_norm(residual.clone(), None, norm.weight, 1e-6), norm(residual),
                               atol=1e-5, rtol=1e-5)
    gate_up = torch.randn(3, 2 * 40, generator=g)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate_up[:, :40]) * gate_up[:, 40:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_rope_store_matches_pytorch(qk_norm):
    """q comes back normed and rotated; k (normed, rotated) and v land at (slot, position), a position past
    the cache's end in the scratch position; nothing else in the cache changes."""
    g = torch.Generator().manual_seed(1)
    H, B, T = 4, 2, 3
    freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    cos, sin = rope.tables(freq, MAX_SEQ_LEN + 1, "cpu")
    qkv = torch.randn(B * T, (H + 2 * KV_HEADS) * HEAD_DIM, generator=g)
    q_norm, k_norm = RMSNorm(HEAD_DIM, 1e-6), RMSNorm(HEAD_DIM, 1e-6)
    q_norm.weight.data, k_norm.weight.data = torch.randn(HEAD_DIM, generator=g), torch.randn(HEAD_DIM, generator=g)
    cache = KVCache(1, 3, MAX_SEQ_LEN, KV_HEADS, HEAD_DIM, dtype=torch.float32, device="cpu")
    slots, positions = torch.tensor([2, 0]), torch.tensor([[4, 5, 6], [MAX_SEQ_LEN - 1, MAX_SEQ_LEN, MAX_SEQ_LEN + 7]])
    weights = (q_norm.weight, k_norm.weight) if qk_norm else (None, None)
    q = ops.qk_norm_rope_store(qkv, positions.view(-1), slots, cos, sin, *weights, cache.k[0], cache.v[0],
                               num_heads=H, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, tokens_per_row=T, eps=1e-6)

    q_ref, k_ref, v_ref = qkv.view(B, T, -1, HEAD_DIM).split([H, KV_HEADS, KV_HEADS], dim=2)
    if qk_norm:
        q_ref, k_ref = q_norm(q_ref), k_norm(k_ref)
    c, s = rope.cos_sin(positions, freq, torch.float32)
    q_ref, k_ref = rope.apply_rope(q_ref, c, s), rope.apply_rope(k_ref, c, s)
    real = positions <= MAX_SEQ_LEN  # past it a padded entry is rotated as at the scratch position
    torch.testing.assert_close(q.view(B, T, H, HEAD_DIM)[real], q_ref[real], atol=1e-5, rtol=1e-5)
    expected_k, expected_v = torch.zeros_like(cache.k[0]), torch.zeros_like(cache.v[0])
    expected_k[slots[:, None], positions.clamp(max=MAX_SEQ_LEN)] = k_ref
    expected_v[slots[:, None], positions.clamp(max=MAX_SEQ_LEN)] = v_ref
    # The scratch position was written twice (last write wins in either order): compare the real ones.
    torch.testing.assert_close(cache.k[0][:, :MAX_SEQ_LEN], expected_k[:, :MAX_SEQ_LEN], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v[0][:, :MAX_SEQ_LEN], expected_v[:, :MAX_SEQ_LEN])


COMPILE = """
import importlib, sys, types
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
DOT = dict(DOT_PRECISION="tf32", DOT_IN_FP32=False)
KERNELS = {  # file: (kernel, constexprs, pointer types other than the model dtype)
    "decode_attention": [
        ("decode_attention_kernel", dict(G=2, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=64, SPLITS=1, **DOT),
         {"slots_ptr": "*i64", "positions_ptr": "*i64", "partial_ptr": "*fp32", "lse_ptr": "*fp32",
          "counters_ptr": "*i32"}),
        ("decode_attention_kernel", dict(G=4, HEAD_DIM=64, BLOCK_D=64, BLOCK_M=64, BLOCK_N=64, SPLITS=8, **DOT),
         {"slots_ptr": "*i64", "positions_ptr": "*i64", "partial_ptr": "*fp32", "lse_ptr": "*fp32",
          "counters_ptr": "*i32"})],
    "add_rms_norm": [("add_rms_norm_kernel", dict(HAS_DELTA=True, BLOCK=2048), {})],
    "silu_mul": [("silu_mul_kernel", dict(BLOCK=1024), {})],
    "qk_norm_rope_store": [("qk_norm_rope_store_kernel", dict(H=16, HKV=8, HEAD_DIM=128, HALF_BLOCK=64,
                                                              HAS_QK_NORM=True),
                            {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "positions_ptr": "*i64", "slots_ptr": "*i64"})],
    "advance": [("advance_pack_kernel", dict(HAS_SLOTS=slots, BLOCK=128),
                 {**{n: "*i64" for n in ("token_ptr", "student_tokens_ptr", "teacher_tokens_ptr", "student_pos_ptr",
                                         "teacher_pos_ptr", "steps_ptr", "slots_ptr", "teacher_next_ptr",
                                         "teacher_advance_ptr")},
                  "accepted_ptr": "*i8", "teacher_logprob_ptr": "*fp32", "student_logprob_ptr": "*fp32",
                  "out_ptr": "*fp64"}) for slots in (True, False)] + [
        ("round_advance_pack_kernel", dict(W=5, WP2=8, HAS_SLOTS=slots, BLOCK=64),
         {**{n: "*i64" for n in ("tokens_ptr", "student_tokens_ptr", "teacher_tokens_ptr", "student_pos_ptr",
                                 "teacher_pos_ptr", "steps_ptr", "max_new_tokens_ptr", "slots_ptr", "teacher_next_ptr",
                                 "teacher_advance_ptr")},
          "num_emitted_ptr": "*i32", "num_draft_ptr": "*i32", "accepted_ptr": "*i8", "mapped_ptr": "*i8",
          "teacher_logprob_ptr": "*fp32", "student_logprob_ptr": "*fp32", "out_ptr": "*fp64"})
        for slots in (True, False)],
}
# kernels/ as a package of its own name (its modules import each other relatively, e.g. kernels/pdl.py), not as
# "kernels": the Hugging Face distribution of that name would shadow it.
package = types.ModuleType("rsd_kernels_under_test")
package.__path__ = [sys.argv[1]]
sys.modules[package.__name__] = package
for name, kernels in KERNELS.items():
    module = importlib.import_module(f"{package.__name__}.{name}")
    for kernel_name, constexprs, pointers in kernels:
        kernel = getattr(module, kernel_name)
        if "PDL" in kernel.arg_names:  # as launched without programmatic dependent launch (sm_80 has none)
            constexprs = {**constexprs, "PDL": False}
        signature = {n: "constexpr" if n in constexprs else pointers.get(n, "*bf16") if n.endswith("_ptr")
                     else "fp32" if n in ("eps", "scale") else "i32" for n in kernel.arg_names}
        source = ASTSource(kernel, signature, {(kernel.arg_names.index(n),): v for n, v in constexprs.items()})
        for capability in (80, 90):
            ptx = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4}).asm["ptx"]
        if constexprs.get("SPLITS", 1) > 1:  # the last-arrival merge's memory ordering, as the kernel's comment says
            atomic = ptx.index("atom.global.gpu.acq_rel.add")
            assert "bar.sync" in ptx[:atomic], "no barrier before the arrival atomic"
            assert "ld.global.cg" in ptx[atomic:], "the merge's loads may hit a stale L1"
        print(kernel_name)
"""


def test_kernels_compile_for_cuda_without_a_gpu():
    """The interpreter does not check what the compiler checks (types across branches and loops, dot
    shapes); compiling each kernel to sm_80 and sm_90 cubins does, without a GPU."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    kernels = Path(__file__).resolve().parents[1] / "kernels"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILE, str(kernels)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.split()) == 9
