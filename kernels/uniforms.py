"""The counter-based uniforms of rsd_engine/randomness.py in one launch (DESIGN.md §3).

out [B, P, D] float32: out[b, p, d] = the uniform of draw d of request seeds[b] at step start_steps[b] + p,
bit for bit what ``randomness.step_uniforms`` computes with torch ops (P = 1 is a plain step, P = G + 1 a
speculative round). Same arithmetic as the reference: int64 lanes holding 32-bit words, multipliers below
2**31, so no product overflows and every backend agrees. On CUDA the torch version is ~70 tiny kernels.
"""
import triton
import triton.language as tl

M32 = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & M32
    x = x ^ (x >> 16)
    return x


@triton.jit
def uniforms_kernel(
    seeds_ptr,  # [B] int64
    start_steps_ptr,  # [B] int64
    out_ptr,  # [B, P, D] fp32, contiguous
    total, P, D,  # total = B * P * D
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    draw = (i % D).to(tl.int64)
    position = (i // D) % P
    row = i // (D * P)
    seed = tl.load(seeds_ptr + row, mask=ok, other=0)
    step = tl.load(start_steps_ptr + row, mask=ok, other=0) + position
    h = tl.full([BLOCK], 0x6A09E667, tl.int64)
    h = _mix32(h ^ (seed & M32))
    h = _mix32(h ^ ((seed >> 32) & M32))
    h = _mix32(h ^ (step & M32))
    h = _mix32(h ^ ((step >> 32) & M32))
    h = _mix32(h ^ draw)
    h = _mix32(h ^ 0x3C6EF372)
    tl.store(out_ptr + i, ((h >> 8) + 1).to(tl.float32) * (1.0 / 16777216), mask=ok)
