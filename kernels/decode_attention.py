"""Attention over the static KV cache in place: GQA, each row its own cache slot and positions.

Inputs: q [B, T, H, D] (RoPE applied; last two dims contiguous), the layer's cache k, v [S, L + 1, Hkv, D]
(head_dim contiguous, any other strides), slots [B] int64, positions [B, T] int64.
Output: out [B, T, H, D] in q's dtype: the query of row b at position p (clamped to L, the scratch position)
attends to cache[slots[b], j] for every j <= p, as causal SDPA over the row's sequence would. The new
tokens' K/V must be in the cache already (qk_norm_rope_store writes them), so a multi-token step (prefill
chunk, speculative verification) is causal within itself too.

No gather, no mask tensor: a program reads its slot's keys up to the largest position of its queries, so
the cost follows each row's real length and one compiled kernel (one CUDA graph) serves every span.
A program takes one (row, kv head) and BLOCK_M of its G * T query rows (the G query heads sharing the kv
head, for each of the T tokens): K and V are read once for the whole group. At small batch a row's keys
are split over SPLITS programs (flash-decoding); each writes a normalised partial and its log-sum-exp,
then counts itself in on an arrival counter of its (row, kv head, m-block); the program that arrives last
merges all the partials in split order and writes the output: one launch per layer for any SPLITS.
Nobody waits for anybody (no spin: CUDA-graph capturable, and the interpreter runs programs one by one).
"""
import triton
import triton.language as tl

from .pdl import wait_then_release


@triton.jit
def decode_attention_kernel(
    q_ptr,  # [B, T, H, D] fp32 / bf16 / fp16
    k_cache_ptr,  # [S, L + 1, Hkv, D]
    v_cache_ptr,  # [S, L + 1, Hkv, D]
    slots_ptr,  # [B] int64
    positions_ptr,  # [B, T] int64, contiguous
    out_ptr,  # [B, T, H, D] as q
    partial_ptr,  # SPLITS > 1: [B, T, H, SPLITS, D] fp32, each split's normalised output
    lse_ptr,  # SPLITS > 1: [B, T, H, SPLITS] fp32, each split's log-sum-exp; -inf for a split that saw no key
    counters_ptr,  # SPLITS > 1: [>= B * Hkv * m_blocks] int32, zero between launches (the last arrival resets)
    T, num_kv_heads, max_pos, scale,
    stride_qb, stride_qt, stride_qh,
    stride_cs, stride_cl, stride_ch,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    wait_then_release(PDL)
    b = (tl.program_id(0) // num_kv_heads).to(tl.int64)
    kv_head = tl.program_id(0) % num_kv_heads
    split = tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows t * G + g
    row_ok = rows < T * G
    t = rows // G
    head = kv_head * G + rows % G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    pos = tl.load(positions_ptr + b * T + t, mask=row_ok, other=0)
    pos = tl.minimum(pos, max_pos)
    q = tl.load(q_ptr + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_IN_FP32:  # Triton's interpreter multiplies bf16 tiles wrongly; compiled kernels never set this
        q = q.to(tl.float32)
    slot = tl.load(slots_ptr + b)
    cache_off = slot * stride_cs + kv_head * stride_ch

    span = tl.max(tl.where(row_ok, pos, 0), axis=0) + 1
    per_split = tl.cdiv(tl.cdiv(span, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(span, start + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        kv_off = cache_off + keys[:, None] * stride_cl + d[None, :]
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        s = tl.where(key_ok[None, :] & (keys[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep exp() finite
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        p = p.to(v.dtype)  # as flash attention: P @ V in the cache dtype, accumulated in fp32
        if DOT_IN_FP32:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    query = (b * T + t) * (num_kv_heads * G) + head  # index of (row, token, head) in [B * T * H]
    tile_ok = row_ok[:, None] & d_ok[None, :]
    out_off = query[:, None] * HEAD_DIM + d[None, :]
    if SPLITS == 1:
        tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=tile_ok)
    else:
        part = query * SPLITS + split
        tl.store(partial_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=tile_ok)
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + part, lse, mask=row_ok)
        # Memory ordering. The barrier orders every thread's partial stores above before the counter's
        # atomic, which one thread of the program issues; its release half (gpu scope, cumulative over what
        # the barrier ordered before it) publishes them. The last arrival's acquire half orders its loads
        # below after every other program's release, and the loads are `.cg` (served by L2, the point of
        # coherence): no stale line of this SM's L1 can answer them. (Barrier, then one thread's gpu-scope
        # release: the pattern of cooperative groups' grid sync.) Every program but the last leaves at once.
        tl.debug_barrier()
        counter = counters_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # clean for the next launch (graph replay)
            _combine_splits(partial_ptr, lse_ptr, out_ptr + out_off, query, row_ok, d, tile_ok, HEAD_DIM, BLOCK_M,
                            BLOCK_D, SPLITS)


@triton.jit
def _combine_splits(partial_ptr, lse_ptr, out_ptrs, query, row_ok, d, tile_ok, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    """out = sum_s exp(lse_s - max) * partial_s / sum_s exp(lse_s - max), summed in split order: the same
    output whichever program arrived last."""
    lse_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(SPLITS):
        lse_s = tl.load(lse_ptr + query * SPLITS + s, mask=row_ok, other=0.0, cache_modifier=".cg")
        lse_max = tl.maximum(lse_max, lse_s)  # split 0 always holds key 0: the max is finite
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(SPLITS):
        part = query * SPLITS + s
        w = tl.exp(tl.load(lse_ptr + part, mask=row_ok, other=0.0, cache_modifier=".cg") - lse_max)
        partial = tl.load(partial_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=tile_ok, other=0.0,
                          cache_modifier=".cg")
        acc += partial * w[:, None]
        total += w
    out = acc / total[:, None]
    tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=tile_ok)
