"""Split-row sampling: rsd_sample and sample_tokens as a few launches over many programs per row, for GPU
throughput. Same contract as kernels/rsd_sample.py (and rsd_engine/sampling/reference.py): same tokens,
flags and log-probs under the same uniforms, except where float rounding decides.

A row of each side (side 0: teacher with proposal_mask; side 1: student with fallback_mask) is cut into
segments of SEG ids; program (row, side, chunk) owns SPC consecutive segments. Launches, in order:
  1. stats_kernel: per chunk, per-lane partials over its segments (max, sum of exp, the check's sum,
     the masked max and its lowest id, NaN/+inf), reduced once at the end; zeroes the histograms.
  2-4. round_kernel ROUND 0, 1, 2: a radix select over order-preserving keys (logit bits, ukey in
     [0, 2**32)), digits of 12, 12 and 8 bits. Round r adds the count (top-k) or the mass (top-p) of the
     ids whose higher digits equal the cut's prefix, found by walking the histogram of round r - 1 from
     the state the previous launch stored (every program of a row walks the same integers, so all agree;
     chunk 0's stores the result for the next launch); round 2 adds both (the ties at the cut are counted,
     their mass shared). Mass is fixed point: round(w * 2**40) as int64, w = exp((l - lmax)
     * (1 / t)) in fp32 as the contract's weight, so the atomic sums are exact and order-free. Round 0 of a
     top-p row bins only the ids above a guard that the cut provably lies above (_mass_guard); the rest, most
     of a real model's row, are summed per program into one atomic; its chunk-0 program also stores the side's
     statistics combined from the chunks' partials, which every later launch loads (_store_side). Round 1
     also compacts, per segment, the ids in the cut's level-0 bin; round 2 reads only those (a gather),
     keeps its digit histogram per segment and each segment's mass above the cut's 24-bit prefix. A row
     is thus read about three times (stats, rounds 0 and 1) plus one segment per draw.
  5. the cut of each side and each segment's kept mass (_law), then every draw by inverse CDF: the segment
     holding the target mass (prefix sums over the segments, in id order), then one scan of that segment.
     sample_tokens does both in sample_final_kernel (one program per row); rsd_sample, a verify round
     without drafts, in kernels/rsd_verify.py's law_kernel (both sides at once) and pick_kernel (the
     proposal draws, the check, the fallback draw, log-probs).
The cut is the reference's: keys rank as (logit desc, id asc), top-k keeps the k first, top-p the
shortest prefix whose mass reaches top_p * the kept mass, ties at tau kept in id order (n_tie). A row
with both top-k and top-p active searches top-p inside the top-k set; it takes the one-program path of
kernels/rsd_sample.py when its law is found (slow, exact) rather than two more rounds for every row.
No spin waits and no autotune: each launch depends only on the ones before it (CUDA-graph capturable).
"""
import triton
import triton.language as tl

from .pdl import wait_then_release
from .rsd_sample import I32_MAX, _inverse_cdf, _order_key, _row_stats, _scaled_exp, _truncate

FIXED_ONE = tl.constexpr(1099511627776.0)  # 2**40: V * 2**40 < 2**63 for V < 2**23
NB0 = tl.constexpr(4096)  # digit 0: ukey >> 20
NB1 = tl.constexpr(4096)  # digit 1: (ukey >> 8) & 4095
NB2 = tl.constexpr(256)  # digit 2: ukey & 255
# Search modes of one side of one row.
GREEDY = tl.constexpr(0)  # temperature 0, a dead row, or NaN: no law to cut
FULL = tl.constexpr(1)  # nothing cut: every present id is kept
BY_COUNT = tl.constexpr(2)  # top-k only
BY_MASS = tl.constexpr(3)  # top-p only
BOTH = tl.constexpr(4)  # top-k then top-p: the one-program path
# A segment's kept ties at the cut (kt) when it keeps all of them (or has none): the scan that ranks a segment's
# ties then only runs in the one segment where the cut splits them.
ALL_TIES = tl.constexpr(2147483647)


# Reductions over the same tile share one cross-warp exchange (tl.reduce of a tuple): on the GPU each reduction
# or scan over a tile is a round through shared memory with a barrier, which at B = 1 is most of the time. Each
# value of a tuple is combined in the same tree as it would be alone, so float sums round as tl.sum's do.
@triton.jit
def _add2(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _add3(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def _first_last(k0, p0, l0, q0, k1, p1, l1, q1):
    # (lowest k with its payload p, highest l with its payload q): an argmin and an argmax in one exchange.
    # Keys are unique but for the sentinels of lanes out of the running, whose payloads are never read.
    lo = k1 < k0
    hi = l1 > l0
    return tl.where(lo, k1, k0), tl.where(lo, p1, p0), tl.where(hi, l1, l0), tl.where(hi, q1, q0)


@triton.jit
def _argmax_carry(k0, a0, b0, c0, d0, k1, a1, b1, c1, d1):
    # The highest key with its four payloads: a selection by key in the same exchange as the values it selects.
    hi = k1 > k0
    return (tl.where(hi, k1, k0), tl.where(hi, a1, a0), tl.where(hi, b1, b0), tl.where(hi, c1, c0),
            tl.where(hi, d1, d0))


@triton.jit
def _stats_combine(bad0, m0, l0, a0, bad1, m1, l1, a1):
    # (bad, max, (lmax, its lowest id)): the lexicographic max of (logit, -id), so ties keep the lowest id.
    first = (l0 > l1) | ((l0 == l1) & (a0 < a1))
    return tl.maximum(bad0, bad1), tl.maximum(m0, m1), tl.where(first, l0, l1), tl.where(first, a0, a1)


@triton.jit
def _keep_ties(tie, n_tie):
    """Which ties at the cut (a segment's, boolean) are kept: the first n_tie in id order (kt of _law)."""
    if (n_tie > 0) & (n_tie < ALL_TIES):
        tie_i = tie.to(tl.int32)
        keep = tie & (tl.cumsum(tie_i, 0) - tie_i < n_tie)
    else:
        keep = tie & (n_tie > 0)
    return keep


@triton.jit
def _ukey(x):
    return _order_key(x).to(tl.int64) + 2147483648


@triton.jit
def _slot0(b, SPREAD: tl.constexpr):
    """Where bin b of a level-0 histogram is kept: bins b and b + 1 SPREAD-th of the histogram apart, so that
    the few neighbouring bins a flat row's ids crowd into (a bin spans 1/8 of an octave of logits) are atomic
    targets on different cache lines, not on one or two (an L2 slice serialises the atomics of a line)."""
    return (b % SPREAD) * (NB0 // SPREAD) + b // SPREAD


@triton.jit
def _fixed(x, lmax, temperature):
    return (_scaled_exp(x, lmax, temperature).to(tl.float64) * FIXED_ONE).to(tl.int64)


@triton.jit
def _load_row(row_ptr, mask_ptr, n_mask, idx):
    in_range = idx < n_mask
    present = in_range & (tl.load(mask_ptr + idx, mask=in_range, other=0) != 0)
    x = tl.load(row_ptr + idx, mask=in_range, other=float("-inf")).to(tl.float32)
    return x, present


@triton.jit
def _stats_chunk(row_ptr, n_logits, mask_ptr, n_mask, check_temperature, seg_lo, seg_hi, sc_ptr, sm_ptr,
                 n_seg, CHECK: tl.constexpr, SEG: tl.constexpr):
    """Per-lane partials over segments [seg_lo, seg_hi), reduced once: (bad, m, total, check, lmax, argmax)."""
    offs = tl.arange(0, SEG)
    bins = tl.arange(0, NB2)
    bad_v = tl.zeros((SEG,), tl.int32)
    m_v = tl.full((SEG,), float("-inf"), tl.float32)
    t_v = tl.zeros((SEG,), tl.float32)
    c_v = tl.zeros((SEG,), tl.float32)
    l_v = tl.full((SEG,), float("-inf"), tl.float32)
    a_v = tl.full((SEG,), I32_MAX, tl.int32)
    for s in range(seg_lo, seg_hi):
        idx = s * SEG + offs
        x = tl.load(row_ptr + idx, mask=idx < n_logits, other=float("-inf")).to(tl.float32)
        bad_v |= ((x != x) | (x == float("inf"))).to(tl.int32)
        m_new = tl.maximum(m_v, x)
        t_v = t_v * _scaled_exp(m_v, m_new, 1.0) + _scaled_exp(x, m_new, 1.0)
        if CHECK:
            c_v = c_v * _scaled_exp(m_v, m_new, check_temperature) + _scaled_exp(x, m_new, check_temperature)
        m_v = m_new
        present = (idx < n_mask) & (tl.load(mask_ptr + idx, mask=idx < n_mask, other=0) != 0)
        xm = tl.where(present, x, float("-inf"))
        better = xm > l_v  # strict: each lane keeps its lowest id of a tie
        a_v = tl.where(better, idx, a_v)
        l_v = tl.where(better, xm, l_v)
        # Round 2's per-segment histograms start at zero (its atomics come two launches later).
        zero = s * NB2 + bins < n_seg * NB2
        tl.store(sc_ptr + s * NB2 + bins, tl.zeros((NB2,), tl.int32), mask=zero)
        tl.store(sm_ptr + s * NB2 + bins, tl.zeros((NB2,), tl.int64), mask=zero)
    bad, m, lmax, argmax = tl.reduce((bad_v, m_v, l_v, a_v), 0, _stats_combine)
    total, check = tl.reduce((t_v * _scaled_exp(m_v, m, 1.0), c_v * _scaled_exp(m_v, m, check_temperature)), 0,
                             _add2)
    return bad, m, total, check, lmax, argmax


@triton.jit
def stats_kernel(
    teacher_ptr,  # [B, Vt] fp32 / bf16 / fp16, row stride teacher_stride
    student_ptr,  # [B, Vs] same dtypes (sample_tokens: the same tensor as teacher_ptr)
    proposal_mask_ptr, fallback_mask_ptr,  # [n_proposal], [n_fallback] int8
    check_temperature_ptr,  # [B / param_div] fp32: row r reads entry r // param_div (rsd_verify: P positions a row)
    stf_ptr,  # [B, 2, C, 4] fp32 out: m, total, check, lmax
    sti_ptr,  # [B, 2, C, 2] int32 out: bad, argmax
    h0c_ptr, h0m_ptr, h1c_ptr, h1m_ptr,  # [B, 2, NB0 / NB1] int32 / int64, zeroed here (level 0: bin b in slot
    # _slot0(b, SPREAD) of round_kernel's launches)
    sc_ptr, sm_ptr,  # [B, 2, n_seg, NB2] int32 / int64, zeroed here
    walk_ptr,  # [B, 2, 3, 6] int64: the row's size (round 0 adds it up, _row_size) zeroed here
    n_teacher, n_student, n_proposal, n_fallback, teacher_stride, student_stride, n_chunks, spc, n_seg, param_div,
    SEG: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    side = tl.program_id(1)
    chunk = tl.program_id(2)
    rs = row * 2 + side
    seg_lo = chunk * spc
    ct = tl.load(check_temperature_ptr + row // param_div)
    sc_row = sc_ptr + rs * n_seg * NB2
    sm_row = sm_ptr + rs * n_seg * NB2
    if side == 0:
        bad, m, total, check, lmax, argmax = _stats_chunk(
            teacher_ptr + row * teacher_stride, n_teacher, proposal_mask_ptr, n_proposal, ct, seg_lo,
            tl.minimum(seg_lo + spc, tl.cdiv(n_teacher, SEG)), sc_row, sm_row, n_seg, False, SEG)
    else:
        bad, m, total, check, lmax, argmax = _stats_chunk(
            student_ptr + row * student_stride, n_student, fallback_mask_ptr, n_fallback, ct, seg_lo,
            tl.minimum(seg_lo + spc, tl.cdiv(n_student, SEG)), sc_row, sm_row, n_seg, True, SEG)
    out = rs * n_chunks + chunk
    tl.store(stf_ptr + out * 4 + 0, m)
    tl.store(stf_ptr + out * 4 + 1, total)
    tl.store(stf_ptr + out * 4 + 2, check)
    tl.store(stf_ptr + out * 4 + 3, lmax)
    tl.store(sti_ptr + out * 2 + 0, bad)
    tl.store(sti_ptr + out * 2 + 1, argmax)
    if chunk == 0:
        b0 = tl.arange(0, NB0)
        tl.store(h0c_ptr + rs * NB0 + b0, tl.zeros((NB0,), tl.int32))
        tl.store(h0m_ptr + rs * NB0 + b0, tl.zeros((NB0,), tl.int64))
        b1 = tl.arange(0, NB1)
        tl.store(h1c_ptr + rs * NB1 + b1, tl.zeros((NB1,), tl.int32))
        tl.store(h1m_ptr + rs * NB1 + b1, tl.zeros((NB1,), tl.int64))
        tl.store(_row_size(walk_ptr, rs), tl.zeros((), tl.int64))


@triton.jit
def _side_stats(stf_ptr, sti_ptr, rs, n_chunks, CP2: tl.constexpr):
    """The chunks' partials of one (row, side): (bad, m, the chunks' sums of exp and of the check's exp,
    their maxima, lmax, argmax); argmax is the lowest id holding lmax (0 where no allowed id is finite). The
    sums are combined only where they are read (_total_terms, _check_terms), in one exchange together."""
    c = tl.arange(0, CP2)
    ok = c < n_chunks
    base = rs * n_chunks + c
    m_c = tl.load(stf_ptr + base * 4 + 0, mask=ok, other=float("-inf"))
    t_c = tl.load(stf_ptr + base * 4 + 1, mask=ok, other=0.0)
    k_c = tl.load(stf_ptr + base * 4 + 2, mask=ok, other=0.0)
    l_c = tl.load(stf_ptr + base * 4 + 3, mask=ok, other=float("-inf"))
    bad_c = tl.load(sti_ptr + base * 2 + 0, mask=ok, other=0)
    a_c = tl.load(sti_ptr + base * 2 + 1, mask=ok, other=I32_MAX)
    bad, m, lmax, argmax = tl.reduce((bad_c, m_c, l_c, a_c), 0, _stats_combine)
    argmax = tl.where(argmax < I32_MAX, argmax, 0)
    return bad, m, t_c, k_c, m_c, lmax, argmax


@triton.jit
def _total_terms(t_c, m_c, m):
    # The chunks' sums of exp(l - m_c), rescaled to the row's max: their sum is the softmax's denominator.
    return t_c * _scaled_exp(m_c, m, 1.0)


@triton.jit
def _check_terms(k_c, m_c, m, check_temperature):
    # The chunks' check sums rescaled to the row's max, in fp64: the check itself runs in fp64.
    shift = tl.where(m_c > float("-inf"), m_c - m, float("-inf")).to(tl.float64)
    return k_c.to(tl.float64) * tl.exp(shift / check_temperature.to(tl.float64))


@triton.jit
def _mode(bad, lmax, temperature, top_k, top_p):
    mode = tl.where((temperature == 0.0) | (lmax == float("-inf")) | (bad != 0), GREEDY, FULL)
    use_k = top_k > 0
    use_p = top_p < 1.0
    searched = tl.where(use_k & use_p, BOTH, tl.where(use_k, BY_COUNT, tl.where(use_p, BY_MASS, FULL)))
    return tl.where(mode == GREEDY, GREEDY, searched)


@triton.jit
def _top_bin(bins, reach, target, c, m, c_at_or_above, m_at_or_above):
    """The highest bin b with reach[b] >= target (bin 0 where none) with its count, mass, and count and mass
    at or above it, in one exchange: an argmax of the key b + 1 over the bins that reach (bin 0 keys 0 anyway,
    the others -1), the only key that is not unique being one no bin wins with."""
    key = tl.where(reach >= target, bins + 1, tl.where(bins == 0, 0, -1))
    k, bin_c, bin_m, c_from, m_from = tl.reduce((key, c, m, c_at_or_above, m_at_or_above), 0, _argmax_carry)
    return tl.maximum(k - 1, 0), bin_c, bin_m, c_from, m_from


@triton.jit
def _walk(hc_ptr, hm_ptr, NB: tl.constexpr, by_mass, target, above_c, above_m, SPREAD: tl.constexpr = 1):
    """The highest bin b with above + (count or mass of bins >= b) >= target, and above moved past the
    bins > b: (b, above_c, above_m, count of b, mass of b). SPREAD > 1: a level-0 histogram (_slot0)."""
    bins = tl.arange(0, NB)
    c = tl.load(hc_ptr + _slot0(bins, SPREAD))  # (SPREAD 1: slot b, bin b)
    m = tl.load(hm_ptr + _slot0(bins, SPREAD))
    c_at_or_above, m_at_or_above = tl.associative_scan((c, m), 0, _add2, reverse=True)
    reach = tl.where(by_mass, (above_m + m_at_or_above).to(tl.float64), (above_c + c_at_or_above).to(tl.float64))
    b, bin_c, bin_m, c_from, m_from = _top_bin(bins, reach, target, c, m, c_at_or_above, m_at_or_above)
    above_c += c_from - bin_c
    above_m += m_from - bin_m
    return b, above_c, above_m, bin_c, bin_m


@triton.jit
def _mass_guard(lmax, t, top_p, n_mask):
    """The level-0 digit under which round 0 sums a top-p row's ids per program instead of binning each with an
    atomic: every id under it weighs less than (1 - top_p) / (16 n_mask) of lmax's weight, so together they
    hold less than (1 - top_p) / 16 of the row's mass (which is at least lmax's weight, 2**40 in fixed point).
    The mass at or above the guard's bin thus exceeds top_p of the total, the walk's cut bin is at or above
    it, and every bin it reads is whole; the ids under it reach the walk only through the total (their sum
    is added to bin 0). The margin of 16 covers the fp32 rounding of the bound; the guard is lowered by a few
    ulps of lmax besides, for tiny temperatures. On SmolLM2-135M's logits (t = 0.7, top-p 0.95) this bins
    0.3-0.4% of the ids on average, against the 7-11% whose fixed weight is not 0."""
    spare = 1.0 - top_p
    x = lmax + t * (tl.log(spare / (16.0 * n_mask.to(tl.float32))) - 0.000244140625)
    x = x - (tl.abs(x) + tl.abs(lmax)) * 0.00000095367431640625
    return tl.where(spare > 0.0, (_ukey(x) >> 20).to(tl.int32), 0)


@triton.jit
def _row_size(walk_ptr, rs):
    """Where round 0 adds up a (row, side)'s size, one atomic per program: its present ids (top-k) or its total
    fixed-point mass (top-p), the level-0 histogram's sum, which round 1 then loads instead of summing the 4096
    bins (the last slot of the level-0 walk's entry, which _store_walk leaves alone)."""
    return walk_ptr + rs * 18 + 5


@triton.jit
def _search_state(h0c, h0m, mode, top_k, top_p, walk_ptr, rs, SPREAD: tl.constexpr):
    """Walk the level-0 histogram of one (row, side): (mode, prefix, target, above_c, above_m). A top-k as
    large as the present ids cuts nothing (mode FULL)."""
    size = tl.load(_row_size(walk_ptr, rs))  # present ids (top-k) or total mass (top-p)
    present, total = size.to(tl.int32), size
    mode = tl.where((mode == BY_COUNT) & (top_k >= present), FULL, mode)
    by_mass = mode == BY_MASS
    target = tl.where(by_mass, top_p.to(tl.float64) * total.to(tl.float64), top_k.to(tl.float64))
    b0, above_c, above_m, _c, _m = _walk(h0c, h0m, NB0, by_mass, target, tl.full((), 0, tl.int32),
                                         tl.full((), 0, tl.int64), SPREAD)
    return mode, b0.to(tl.int64), target, above_c, above_m


# Every program of a row's round walks the same histograms to the same state; the program of chunk 0 also
# stores it, so that the next launch reads it rather than walking again: walk_ptr [B, 2, 3, 6] int64, entries
# 0 and 1 the walks of levels 0 and 1 (5 slots each), entry 2 the side's statistics (_store_side).
@triton.jit
def _store_walk(walk_ptr, rs, level, mode, prefix, target, above_c, above_m):
    base = walk_ptr + (rs * 3 + level) * 6
    tl.store(base + 0, mode.to(tl.int64))
    tl.store(base + 1, prefix.to(tl.int64))
    tl.store(base + 2, target.to(tl.int64, bitcast=True))
    tl.store(base + 3, above_c.to(tl.int64))
    tl.store(base + 4, above_m.to(tl.int64))


@triton.jit
def _load_walk(walk_ptr, rs, level):
    """(mode, prefix, target, above_c, above_m) after the walk of levels 0..level (_store_walk)."""
    base = walk_ptr + (rs * 3 + level) * 6
    return (tl.load(base + 0).to(tl.int32), tl.load(base + 1), tl.load(base + 2).to(tl.float64, bitcast=True),
            tl.load(base + 3).to(tl.int32), tl.load(base + 4))


# A side's statistics combined from the chunks' partials, once: round 0's program of chunk 0 combines them (every
# program of round 0 needs lmax anyway) and stores them beside the walks; every later launch loads six scalars
# instead of combining the chunks again (a cross-warp exchange in each of rounds 1 and 2, the law, and three in
# the draws' kernel at B = 1). The softmax's and the check's denominators are combined in one exchange, each in
# the same tree as alone, so they equal what the readers computed before.
@triton.jit
def _store_side(walk_ptr, rs, bad, m, lmax, argmax, total, check):
    base = walk_ptr + (rs * 3 + 2) * 6
    tl.store(base + 0, bad.to(tl.int64))
    tl.store(base + 1, argmax.to(tl.int64))
    tl.store(base + 2, m.to(tl.int32, bitcast=True).to(tl.int64))
    tl.store(base + 3, lmax.to(tl.int32, bitcast=True).to(tl.int64))
    tl.store(base + 4, total.to(tl.int32, bitcast=True).to(tl.int64))
    tl.store(base + 5, check.to(tl.int64, bitcast=True))


@triton.jit
def _load_side(walk_ptr, rs):
    """(bad, m, lmax, argmax, total, check) of one (row, side) as _store_side stored them: bad != 0 where the
    row holds NaN/+inf, m the max of every logit, lmax the max of the allowed ones and argmax its lowest id,
    total the softmax's denominator sum exp(l - m) and check the check's in fp64 (sum exp((l - m) / ct);
    meaningful on the student's side only)."""
    base = walk_ptr + (rs * 3 + 2) * 6
    return (tl.load(base + 0).to(tl.int32), tl.load(base + 2).to(tl.int32).to(tl.float32, bitcast=True),
            tl.load(base + 3).to(tl.int32).to(tl.float32, bitcast=True), tl.load(base + 1).to(tl.int32),
            tl.load(base + 4).to(tl.int32).to(tl.float32, bitcast=True), tl.load(base + 5).to(tl.float64, bitcast=True))


@triton.jit
def _round_side(row_ptr, mask_ptr, n_mask, temperature, top_k, top_p, check_temperature, stf_ptr, sti_ptr, rs,
                n_chunks, chunk, spc, h0c, h0m, h1c, h1m, sc_ptr, sm_ptr, sa_ptr, cand_ptr, ncand_ptr, walk_ptr, n_seg,
                ROUND: tl.constexpr, SEG: tl.constexpr, CP2: tl.constexpr, SPREAD: tl.constexpr):
    if ROUND == 0:
        bad, m, t_c, k_c, m_c, lmax, argmax = _side_stats(stf_ptr, sti_ptr, rs, n_chunks, CP2)
        if chunk == 0:
            # (the check is the student's: sample_tokens passes its temperature, maybe 0, for its one side)
            ct = tl.where(check_temperature > 0.0, check_temperature, 1.0)
            total, check = tl.reduce((_total_terms(t_c, m_c, m), _check_terms(k_c, m_c, m, ct)), 0, _add2)
            _store_side(walk_ptr, rs, bad, m, lmax, argmax, total, check)
    else:
        bad, _m, lmax, _arg, _t, _k = _load_side(walk_ptr, rs)
    mode = _mode(bad, lmax, temperature, top_k, top_p)
    t = tl.where(temperature != 0.0, temperature, 1.0)
    offs = tl.arange(0, SEG)
    seg_lo = chunk * spc
    # Levels 0 and 1 walk counts (top-k) or masses (top-p), never both: one histogram of the two is filled there.
    if ROUND == 0:
        if mode == BY_COUNT:
            n_v = tl.zeros((SEG,), tl.int32)
            for s in range(seg_lo, tl.minimum(seg_lo + spc, tl.cdiv(n_mask, SEG))):
                x, present = _load_row(row_ptr, mask_ptr, n_mask, s * SEG + offs)
                d = (_ukey(x) >> 20).to(tl.int32)
                tl.atomic_add(h0c + _slot0(d, SPREAD), tl.full((SEG,), 1, tl.int32), mask=present, sem="relaxed")
                n_v += present.to(tl.int32)
            tl.atomic_add(_row_size(walk_ptr, rs), tl.sum(n_v, 0).to(tl.int64), sem="relaxed")
        elif mode == BY_MASS:
            guard = _mass_guard(lmax, t, top_p, n_mask)
            below = tl.zeros((SEG,), tl.int64)  # per-lane sums of the ids under the guard and above, reduced once
            binned = tl.zeros((SEG,), tl.int64)
            for s in range(seg_lo, tl.minimum(seg_lo + spc, tl.cdiv(n_mask, SEG))):
                x, present = _load_row(row_ptr, mask_ptr, n_mask, s * SEG + offs)
                wf = _fixed(x, lmax, t)
                d = (_ukey(x) >> 20).to(tl.int32)
                live = present & (wf > 0)
                tl.atomic_add(h0m + _slot0(d, SPREAD), wf, mask=live & (d >= guard), sem="relaxed")
                below += tl.where(live & (d < guard), wf, 0)
                binned += tl.where(live & (d >= guard), wf, 0)
            below_sum, binned_sum = tl.reduce((below, binned), 0, _add2)
            if below_sum > 0:
                tl.atomic_add(h0m, below_sum, sem="relaxed")  # bin 0 (slot 0): below the guard, as every id
                # summed here
            tl.atomic_add(_row_size(walk_ptr, rs), below_sum + binned_sum, sem="relaxed")
    elif ROUND == 1:
        if (mode == BY_COUNT) | (mode == BY_MASS):
            mode, prefix, target, above_c, above_m = _search_state(h0c, h0m, mode, top_k, top_p, walk_ptr, rs,
                                                                   SPREAD)
            if chunk == 0:
                _store_walk(walk_ptr, rs, 0, mode, prefix, target, above_c, above_m)
            if mode != FULL:
                last = offs == SEG - 1
                for s in range(seg_lo, tl.minimum(seg_lo + spc, n_seg)):
                    x, present = _load_row(row_ptr, mask_ptr, n_mask, s * SEG + offs)
                    key = _ukey(x)
                    wf = _fixed(x, lmax, t)
                    hit = present & ((key >> 20) == prefix)
                    # One scan gives the compaction slots of the ids in the cut's level-0 bin and, in its last lane,
                    # the segment's mass above that bin and its count of them: integer sums, exact in any order.
                    above, n_hit = tl.associative_scan(
                        (tl.where(present & ((key >> 20) > prefix), wf, 0), hit.to(tl.int32)), 0, _add2)
                    tl.store(sa_ptr + s + offs * 0, above, mask=last)
                    tl.store(ncand_ptr + s + offs * 0, n_hit, mask=last)
                    d = ((key >> 8) & 4095).to(tl.int32)
                    if mode == BY_COUNT:
                        tl.atomic_add(h1c + d, tl.full((SEG,), 1, tl.int32), mask=hit, sem="relaxed")
                    else:
                        tl.atomic_add(h1m + d, wf, mask=hit & (wf > 0), sem="relaxed")
                    # Those ids compacted per segment: round 2 reads only them.
                    tl.store(cand_ptr + s * SEG + n_hit - 1, s * SEG + offs, mask=hit)
    else:
        if (mode != GREEDY) & (mode != BOTH):
            prefix = tl.full((), -1, tl.int64)  # FULL: every present id lies above the cut
            if (mode == BY_COUNT) | (mode == BY_MASS):
                mode, prefix, target, above_c, above_m = _load_walk(walk_ptr, rs, 0)  # round 1's level-0 walk
                if mode != FULL:
                    b1, above_c, above_m, _bc, _bm = _walk(h1c, h1m, NB1, mode == BY_MASS, target, above_c, above_m)
                    prefix = prefix * NB1 + b1
                if chunk == 0:
                    _store_walk(walk_ptr, rs, 1, mode, prefix, target, above_c, above_m)
            if mode == FULL:
                for s in range(seg_lo, tl.minimum(seg_lo + spc, n_seg)):
                    x, present = _load_row(row_ptr, mask_ptr, n_mask, s * SEG + offs)
                    tl.store(sa_ptr + s, tl.sum(tl.where(present, _fixed(x, lmax, t), 0), 0))
            else:
                for s in range(seg_lo, tl.minimum(seg_lo + spc, n_seg)):
                    n_cand = tl.load(ncand_ptr + s)
                    if n_cand > 0:  # a segment with none of the cut's level-0 bin keeps round 1's mass above
                        live = offs < n_cand
                        idx = tl.load(cand_ptr + s * SEG + offs, mask=live, other=0)
                        x = tl.load(row_ptr + idx, mask=live, other=float("-inf")).to(tl.float32)
                        key = _ukey(x)
                        wf = _fixed(x, lmax, t)
                        above = tl.sum(tl.where(live & ((key >> 8) > prefix), wf, 0), 0)
                        tl.store(sa_ptr + s, tl.load(sa_ptr + s) + above)
                        hit = live & ((key >> 8) == prefix)
                        d = (key & 255).to(tl.int32)
                        tl.atomic_add(sc_ptr + s * NB2 + d, tl.full((SEG,), 1, tl.int32), mask=hit, sem="relaxed")
                        tl.atomic_add(sm_ptr + s * NB2 + d, wf, mask=hit & (wf > 0), sem="relaxed")


@triton.jit
def round_kernel(
    teacher_ptr, student_ptr, proposal_mask_ptr, fallback_mask_ptr,  # as stats_kernel
    temperature_ptr, top_k_ptr, top_p_ptr,  # [B / param_div] teacher side (sample_tokens: its only side)
    student_temperature_ptr, student_top_k_ptr, student_top_p_ptr,  # [B / param_div] student side
    check_temperature_ptr,  # [B / param_div] fp32: the check's temperature (the student side's statistics)
    stf_ptr, sti_ptr, h0c_ptr, h0m_ptr, h1c_ptr, h1m_ptr, sc_ptr, sm_ptr,  # as stats_kernel
    sa_ptr,  # [B, 2, n_seg] int64 out (ROUND 1, 2): each segment's mass above the cut's prefix so far
    cand_ptr,  # [B, 2, n_seg * SEG] int32 scratch (ROUND 1 writes, 2 reads): ids in the cut's level-0 bin
    ncand_ptr,  # [B, 2, n_seg] int32 scratch: how many of them each segment holds
    walk_ptr,  # [B, 2, 3, 6] int64 out: ROUND 0 the sides' statistics (_store_side), ROUND 1 and 2 the walks of
    # levels 0 and 1 (_store_walk)
    n_teacher, n_student, n_proposal, n_fallback, teacher_stride, student_stride, n_chunks, spc, n_seg, param_div,
    ROUND: tl.constexpr, SEG: tl.constexpr, CP2: tl.constexpr, SPREAD: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    side = tl.program_id(1)
    chunk = tl.program_id(2)
    rs = row * 2 + side
    prow = row // param_div
    h0c, h0m = h0c_ptr + rs * NB0, h0m_ptr + rs * NB0
    h1c, h1m = h1c_ptr + rs * NB1, h1m_ptr + rs * NB1
    sc, sm, sa = sc_ptr + rs * n_seg * NB2, sm_ptr + rs * n_seg * NB2, sa_ptr + rs * n_seg
    cand, ncand = cand_ptr + rs * n_seg * SEG, ncand_ptr + rs * n_seg
    if side == 0:
        _round_side(teacher_ptr + row * teacher_stride, proposal_mask_ptr, n_proposal, tl.load(temperature_ptr + prow),
                    tl.load(top_k_ptr + prow), tl.load(top_p_ptr + prow), tl.load(check_temperature_ptr + prow),
                    stf_ptr, sti_ptr, rs, n_chunks, chunk, spc, h0c, h0m, h1c, h1m, sc, sm, sa, cand, ncand, walk_ptr,
                    n_seg, ROUND, SEG, CP2, SPREAD)
    else:
        _round_side(student_ptr + row * student_stride, fallback_mask_ptr, n_fallback,
                    tl.load(student_temperature_ptr + prow), tl.load(student_top_k_ptr + prow),
                    tl.load(student_top_p_ptr + prow), tl.load(check_temperature_ptr + prow), stf_ptr, sti_ptr, rs,
                    n_chunks, chunk, spc, h0c, h0m, h1c, h1m, sc, sm, sa, cand, ncand, walk_ptr, n_seg, ROUND, SEG, CP2,
                    SPREAD)


@triton.jit
def _law(rs, mode, top_k, top_p, sc_ptr, sm_ptr, sa_ptr, walk_ptr, kept_ptr, kt_ptr, n_seg, SG: tl.constexpr):
    """The cut of one (row, side) from the three rounds, and each segment's kept mass (stored to kept_ptr as
    running sums over the segments in id order, inclusive) and kept ties (kt_ptr): (prefix, b2, kept total).
    Mode FULL keeps everything: prefix -1."""
    sc, sm, sa = sc_ptr + rs * n_seg * NB2, sm_ptr + rs * n_seg * NB2, sa_ptr + rs * n_seg
    kept, kt = kept_ptr + rs * n_seg, kt_ptr + rs * n_seg
    prefix = tl.full((), -1, tl.int64)
    target = tl.full((), 0.0, tl.float64)
    above_c = tl.full((), 0, tl.int32)
    above_m = tl.full((), 0, tl.int64)
    if mode != FULL:
        mode, prefix, target, above_c, above_m = _load_walk(walk_ptr, rs, 1)  # round 2's: levels 0 and 1
        prefix = tl.where(mode == FULL, -1, prefix)
    segs = tl.arange(0, SG)
    bins = tl.arange(0, NB2)
    b2 = tl.full((), 0, tl.int32)
    n_tie = tl.full((), 0, tl.int32)
    pf = tl.full((), 0, tl.int64)
    if mode != FULL:
        part_c = tl.zeros((SG, NB2), tl.int32)  # per-lane partials over the segments, reduced once
        part_m = tl.zeros((SG, NB2), tl.int64)
        for g in range(0, n_seg, SG):
            s = g + segs
            ok = (s < n_seg)[:, None] & (bins >= 0)[None, :]
            part_c += tl.load(sc + s[:, None] * NB2 + bins[None, :], mask=ok, other=0)
            part_m += tl.load(sm + s[:, None] * NB2 + bins[None, :], mask=ok, other=0)
        hist_c, hist_m = tl.reduce((part_c, part_m), 0, _add2)
        c_at_or_above, m_at_or_above = tl.associative_scan((hist_c, hist_m), 0, _add2, reverse=True)
        by_mass = mode == BY_MASS
        reach = tl.where(by_mass, (above_m + m_at_or_above).to(tl.float64),
                         (above_c + c_at_or_above).to(tl.float64))
        b2, ties, tie_mass, c_from, m_from = _top_bin(bins, reach, target, hist_c, hist_m, c_at_or_above,
                                                      m_at_or_above)
        above_c += c_from - ties
        above_m += m_from - tie_mass
        pf = tie_mass // tl.maximum(ties, 1)  # every tie at tau has the same key, so the same weight
        # top-p: the fewest ties r >= 1 whose mass reaches the target, in id order.
        need = tl.where(pf > 0, tl.math.ceil((target - above_m.to(tl.float64)) / pf.to(tl.float64)), ties)
        by_p = tl.minimum(tl.maximum(need.to(tl.int32), 1), ties)
        n_tie = tl.where(by_mass, by_p, top_k - above_c)
    total = tl.full((), 0, tl.int64)
    ties_before = tl.full((), 0, tl.int32)
    for g in range(0, n_seg, SG):
        s = g + segs
        in_seg = s < n_seg
        seg_kept = tl.load(sa + s, mask=in_seg, other=0)
        seg_ties = tl.zeros((SG,), tl.int32)
        if mode != FULL:
            ok = in_seg[:, None] & (bins >= 0)[None, :]
            seg_m = tl.load(sm + s[:, None] * NB2 + bins[None, :], mask=ok, other=0)
            seg_c = tl.load(sc + s[:, None] * NB2 + bins[None, :], mask=ok, other=0)
            seg_above, seg_ties = tl.reduce((tl.where(bins[None, :] > b2, seg_m, 0),
                                             tl.where(bins[None, :] == b2, seg_c, 0)), 1, _add2)
            seg_kept += seg_above
        before = ties_before + tl.cumsum(seg_ties, 0) - seg_ties
        kept_ties = tl.minimum(tl.maximum(n_tie - before, 0), seg_ties)
        seg_kept += kept_ties.to(tl.int64) * pf
        tl.store(kept + s, total + tl.cumsum(seg_kept, 0), mask=in_seg)  # inclusive, so no draw scans them
        tl.store(kt + s, tl.where(kept_ties == seg_ties, ALL_TIES, kept_ties), mask=in_seg)
        total += tl.sum(seg_kept, 0)
        ties_before += tl.sum(seg_ties, 0)
    return prefix, b2, total


@triton.jit
def _draw(row_ptr, mask_ptr, n_mask, lmax, temperature, rs, prefix, b2, total, u, kept_ptr, kt_ptr, n_seg,
          SEG: tl.constexpr, NSP2: tl.constexpr):
    """Inverse CDF: the first id, in id order, with kept weight > 0 whose cumulative kept mass reaches
    u * total (the last such id if rounding leaves the target above the sum). Finds the segment from the
    segments' kept masses, then scans that one segment."""
    s = tl.arange(0, NSP2)
    in_seg = s < n_seg
    # The law stored the segments' kept masses as running sums (inclusive, in id order): one exchange less a draw.
    cum = tl.load(kept_ptr + rs * n_seg + s, mask=in_seg, other=0)
    kept = tl.where(in_seg, cum - tl.load(kept_ptr + rs * n_seg + s - 1, mask=in_seg & (s > 0), other=0), 0)
    target = u.to(tl.float64) * total
    live = kept > 0
    # The first segment whose cumulative mass reaches the target (else the last live one), with the mass before it.
    first, carry_first, last, carry_last = tl.reduce(
        (tl.where(live & (cum.to(tl.float64) >= target), s, NSP2), cum - kept, tl.where(live, s, -1), cum - kept), 0,
        _first_last)
    seg = tl.where(first < NSP2, first, last)
    carry = tl.where(first < NSP2, carry_first, tl.where(last >= 0, carry_last, 0))
    n_tie = tl.load(kt_ptr + rs * n_seg + seg)
    offs = tl.arange(0, SEG)
    idx = seg * SEG + offs
    x, present = _load_row(row_ptr, mask_ptr, n_mask, idx)
    key = _ukey(x)
    tie = present & ((key >> 8) == prefix) & ((key & 255) == b2)
    above = present & (((key >> 8) > prefix) | (((key >> 8) == prefix) & ((key & 255) > b2)))
    keep = above | _keep_ties(tie, n_tie)
    wf = tl.where(keep, _fixed(x, lmax, temperature), 0)
    run = carry + tl.cumsum(wf, 0)
    hit, _h, last_id, _l = tl.reduce((tl.where((wf > 0) & (run.to(tl.float64) >= target), idx, I32_MAX), idx,
                                      tl.where(wf > 0, idx, -1), idx), 0, _first_last)
    return tl.where(hit < I32_MAX, hit, last_id)


@triton.jit
def _prepare(row_ptr, mask_ptr, n_logits, n_mask, mode, temperature, top_k, top_p, rs, sc, sm, sa, walk, kept, kt,
             n_seg, SEG: tl.constexpr, SG: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
             NUM_PIVOTS: tl.constexpr):
    """The cut of a sampled, live side, once per call whatever the number of draws: (prefix, b2, kept total
    fp64) from the rounds, or on the one-program path (mode BOTH) (tau, n_tie, kept total)."""
    t = tl.where(temperature != 0.0, temperature, 1.0)
    if mode == BOTH:
        _bad, _m, _tot, _chk, lmax, _arg, key_min, n_present, mass = _row_stats(
            row_ptr, n_logits, mask_ptr, n_mask, t, 1.0, False, SEG)
        tau, n_tie, kept_total = _truncate(row_ptr, mask_ptr, n_mask, t, top_k, top_p, lmax, key_min, n_present,
                                           mass, SEARCH_BLOCK, NUM_PIVOTS)
        cut, fine, total = tau.to(tl.int64), n_tie, kept_total.to(tl.float64)
    else:
        cut, fine, law_total = _law(rs, mode, top_k, top_p, sc, sm, sa, walk, kept, kt, n_seg, SG)
        total = law_total.to(tl.float64)
    return cut, fine, total


@triton.jit
def _sample_side(row_ptr, mask_ptr, n_mask, mode, lmax, temperature, cut, fine, total, u, rs, kept, kt, n_seg,
                 SEG: tl.constexpr, NSP2: tl.constexpr):
    """One draw from a side prepared by _prepare."""
    t = tl.where(temperature != 0.0, temperature, 1.0)
    if mode == BOTH:
        token = _inverse_cdf(row_ptr, mask_ptr, n_mask, lmax, t, cut.to(tl.int32), fine,
                             (u.to(tl.float64) * total).to(tl.float32), SEG)
    else:
        token = _draw(row_ptr, mask_ptr, n_mask, lmax, t, rs, cut, fine, total, u, kept, kt, n_seg, SEG, NSP2)
    return token


@triton.jit
def sample_final_kernel(
    logits_ptr,  # [B, V'] fp32 / bf16 / fp16, row stride stride (side 0 of the launches before)
    uniforms_ptr,  # [B] fp32
    temperature_ptr, top_k_ptr, top_p_ptr,  # [B] fp32, int32, fp32
    mask_ptr,  # [n_mask] int8
    stf_ptr, sti_ptr, h0c_ptr, h0m_ptr, h1c_ptr, h1m_ptr, sc_ptr, sm_ptr, sa_ptr, walk_ptr, kept_ptr, kt_ptr,
    token_ptr,  # [B] int64 out, -1 where flagged
    n_logits, n_mask, stride, n_seg,
    SEG: tl.constexpr, NSP2: tl.constexpr, SG: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
    NUM_PIVOTS: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride
    temperature = tl.load(temperature_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    rs = row * 2
    bad, _m, lmax, argmax, _t, _k = _load_side(walk_ptr, rs)
    mode = _mode(bad, lmax, temperature, top_k, top_p)
    token = argmax
    if mode != GREEDY:
        cut, fine, total = _prepare(logits_row, mask_ptr, n_logits, n_mask, mode, temperature, top_k, top_p, rs,
                                    sc_ptr, sm_ptr, sa_ptr, walk_ptr, kept_ptr, kt_ptr,
                                    n_seg, SEG, SG, SEARCH_BLOCK, NUM_PIVOTS)
        token = _sample_side(logits_row, mask_ptr, n_mask, mode, lmax, temperature, cut, fine, total,
                             tl.load(uniforms_ptr + row), rs, kept_ptr, kt_ptr, n_seg, SEG, NSP2)
    tl.store(token_ptr + row, tl.where((bad != 0) | (lmax == float("-inf")), -1, token).to(tl.int64))
