"""The attention inputs of one layer from its merged projection: q/k RMSNorm (Qwen3), RoPE, cache write.

Inputs: qkv [M = B * T, (H + 2 Hkv) * D] (q heads, then k heads, then v heads; rows of any stride), q_norm
and k_norm [D] (HAS_QK_NORM), cos and sin tables [P, D / 2] fp32 indexed by position, positions [M] int64,
slots [B] int64. Outputs: q [M, H, D] (normed, rotated) and, in place, k and v of every token at
cache[slots[m // T], min(position, max_pos)] (max_pos = L, the scratch position for padded entries,
which are rotated as at max_pos: the tables have max_pos + 1 rows).
One program per (token, head) over the H + 2 Hkv heads. RoPE is the rotate-half layout: (x1, x2) ->
(x1 cos - x2 sin, x2 cos + x1 sin), in fp32 and rounded once.
"""
import triton
import triton.language as tl

from .pdl import wait_then_release


@triton.jit
def qk_norm_rope_store_kernel(
    qkv_ptr,  # [M, (H + 2 Hkv) * D] model dtype
    q_norm_ptr,  # [D] model dtype
    k_norm_ptr,  # [D] model dtype
    cos_ptr,  # [P, D / 2] fp32
    sin_ptr,  # [P, D / 2] fp32
    positions_ptr,  # [M] int64
    slots_ptr,  # [B] int64
    q_out_ptr,  # [M, H, D] model dtype
    k_cache_ptr,  # [S, L + 1, Hkv, D]
    v_cache_ptr,  # [S, L + 1, Hkv, D]
    T, max_pos, stride_qkv, stride_cs, stride_cl, stride_ch, eps,
    H: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr,
    HAS_QK_NORM: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    wait_then_release(PDL)
    m = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    i = tl.arange(0, HALF_BLOCK)
    ok = i < HALF
    src = qkv_ptr + m * stride_qkv + head * HEAD_DIM
    x1 = tl.load(src + i, mask=ok, other=0.0)
    x2 = tl.load(src + HALF + i, mask=ok, other=0.0)
    pos = tl.minimum(tl.load(positions_ptr + m), max_pos)
    cache_off = tl.load(slots_ptr + m // T) * stride_cs + pos * stride_cl
    if head >= H + HKV:
        dst = v_cache_ptr + cache_off + (head - H - HKV) * stride_ch
        tl.store(dst + i, x1, mask=ok)
        tl.store(dst + HALF + i, x2, mask=ok)
    else:
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        if HAS_QK_NORM:
            r = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / HEAD_DIM + eps)
            if head < H:
                w_ptr = q_norm_ptr
            else:
                w_ptr = k_norm_ptr
            w1 = tl.load(w_ptr + i, mask=ok, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + i, mask=ok, other=0.0).to(tl.float32)
            # HF rounds the norm, then the weighted norm, to the model dtype.
            a = ((a * r).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
            b = ((b * r).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype).to(tl.float32)
        c = tl.load(cos_ptr + pos * HALF + i, mask=ok, other=0.0)
        s = tl.load(sin_ptr + pos * HALF + i, mask=ok, other=0.0)
        y1 = (a * c - b * s).to(x1.dtype)
        y2 = (b * c + a * s).to(x1.dtype)
        if head < H:
            dst = q_out_ptr + (m * H + head) * HEAD_DIM
        else:
            dst = k_cache_ptr + cache_off + (head - H) * stride_ch
        tl.store(dst + i, y1, mask=ok)
        tl.store(dst + HALF + i, y2, mask=ok)
