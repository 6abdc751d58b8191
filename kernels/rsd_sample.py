"""Device functions of the RSD law for one row: statistics, the sort-free (tau, n_tie) truncation, inverse-CDF
draws. kernels/rsd_split.py (rsd_sample, sample_tokens) and kernels/rsd_verify.py are built on them; their
one-program search below is what rsd_split keeps for rows with top-k and top-p both on. The contract they
implement, that of rsd_engine/sampling/reference.py:

Inputs, for a batch of B rows (logits fp32, bf16 or fp16; last dim contiguous, any row stride):
    teacher [B, Vt], student [B, Vs], uniforms [B, D >= 1] fp32 in [0, 1] (column 0 = fallback draw,
    column 1 + k = proposal k), nine per-row parameters [B], proposal_mask [Vp] and fallback_mask [Vf]
    int8 (Vp, Vf <= min(Vt, Vs)).
Outputs: token [B] int64, accepted [B] int8, teacher_logprob [B] and student_logprob [B] fp32.

Law: x ~ qT = truncate(softmax(lT / temperature) on proposal_mask, top_k, top_p) is accepted iff
softmax(lS / check_temperature)[x] >= threshold, up to proposal_trials tries; otherwise the student
writes y ~ qS = truncate(softmax(lS / student_temperature) on fallback_mask, student_top_k, student_top_p).
Temperature 0 is argmax (lowest id). Weights are exp((l - max) * (1 / t)), 1 / t rounded once; the check
probability and its comparison with the threshold run in fp64, over a normaliser of fp32 exponentials (a check
within fp32 rounding of the threshold may go either way). A draw u picks the first id, in id order,
with weight > 0 whose cumulative kept mass is >= u * total. No allowed finite proposal: no proposal is
drawn. Flagged rows (accepted 0, NaN log-probs): token -1 (teacher) or -2 (student) for NaN or +inf
logits, -3 when the student must write but no fallback id is finite. Tokens equal the reference's except
where rounding decides: a uniform, or top_p times the kept mass, within float rounding of a cumulative
mass (sums here run in fp32 and in another order than the reference's fp64 ones), or weights that float32
rounding makes equal (ranked here by logit, in the reference by weight then id).

No sort. Tokens are ranked by (logit desc, id asc), which is the reference's (prob desc, id asc) because
scaling by 1 / temperature > 0 keeps the order (up to the float32 ties above). The kept set of top-k then
top-p is a prefix of that ranking, so it is (tau, n_tie): every key above the logit tau plus the first
n_tie ids, in id order, whose logit equals tau. tau is found by a multi-pivot search over logits mapped to
order-preserving int32 keys: each pass counts the tokens and the mass at or above NUM_PIVOTS pivots and
narrows the key interval to one pivot gap (and then to the present keys in it), so it ends after a few
passes (MAX_SEARCH_PASSES bounds it whatever happens).
Each row is read: once for statistics, once per search pass (top-k and top-p), once per draw.
"""
import triton
import triton.language as tl

I32_MAX = tl.constexpr(2147483647)
I32_MIN = tl.constexpr(-2147483648)
SIGN_OFF = tl.constexpr(0x7FFFFFFF)
# A search pass cuts the key interval (at most 2**32 wide) to one pivot gap, ceil(span / NUM_PIVOTS) with
# NUM_PIVOTS >= 2, so 33 passes always end it; the limit only keeps a broken invariant from hanging a GPU.
MAX_SEARCH_PASSES = tl.constexpr(64)


@triton.jit
def _order_key(x):
    # float32 -> int32 with the same order; -0.0 is folded into +0.0 so that equal floats get equal keys.
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & SIGN_OFF)


@triton.jit
def _key_value(key):
    # Inverse of _order_key (the bit flip is an involution).
    return (key ^ ((key >> 31) & SIGN_OFF)).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_exp(x, m, temperature):
    # exp((x - m) * (1 / t)) for x <= m, the contract's weight: subtracting first cannot overflow (x / t
    # does once |x| > FLT_MAX * t) and keeps ulp-sized gaps at tiny t. m = -inf means every x is -inf:
    # shifting by 0 then gives exp(-inf) = 0 rather than the NaN of -inf - -inf.
    # IEEE division (div_rn) for 1 / t, as the reference's; Triton's "/" is approximate on NVIDIA GPUs.
    m = tl.where(m > float("-inf"), m, 0.0)
    return tl.exp((x - m) * tl.math.div_rn(1.0, temperature))


@triton.jit
def _load_present(row_ptr, mask_ptr, n_mask, idx):
    """Logits of ids < n_mask (fp32) and whether each id is in the mask."""
    in_range = idx < n_mask
    present = in_range & (tl.load(mask_ptr + idx, mask=in_range, other=0) != 0)
    x = tl.load(row_ptr + idx, mask=in_range, other=float("-inf")).to(tl.float32)
    return x, present


@triton.jit
def _row_stats(row_ptr, n_logits, mask_ptr, n_mask, temperature, check_temperature, CHECK: tl.constexpr,
               BLOCK: tl.constexpr):
    """One online pass over a row.

    Whole row: bad (NaN or +inf present), m and total (max and sum of exp(l - m), for log-probs),
    check_total (sum of exp(l / check_temperature - m / check_temperature), if CHECK).
    Ids < n_mask in the mask: lmax, argmax (lowest id), key_min, n_present and
    mass = sum of exp(l / temperature - lmax / temperature).
    """
    offs = tl.arange(0, BLOCK)
    bad = tl.full((), 0, tl.int32)
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.full((), 0.0, tl.float32)
    check_total = tl.full((), 0.0, tl.float32)
    lmax = tl.full((), float("-inf"), tl.float32)
    argmax = tl.full((), 0, tl.int32)
    key_min = tl.full((), I32_MAX, tl.int32)
    n_present = tl.full((), 0, tl.int32)
    mass = tl.full((), 0.0, tl.float32)
    for start in range(0, n_logits, BLOCK):
        idx = start + offs
        x = tl.load(row_ptr + idx, mask=idx < n_logits, other=float("-inf")).to(tl.float32)
        bad |= tl.max(((x != x) | (x == float("inf"))).to(tl.int32), 0)
        m_new = tl.maximum(m, tl.max(x, 0))
        total = total * _scaled_exp(m, m_new, 1.0) + tl.sum(_scaled_exp(x, m_new, 1.0), 0)
        if CHECK:
            check_total = (check_total * _scaled_exp(m, m_new, check_temperature)
                           + tl.sum(_scaled_exp(x, m_new, check_temperature), 0))
        m = m_new

        present = (idx < n_mask) & (tl.load(mask_ptr + idx, mask=idx < n_mask, other=0) != 0)
        xm = tl.where(present, x, float("-inf"))
        block_max = tl.max(xm, 0)
        block_arg = tl.min(tl.where(present & (xm == block_max), idx, I32_MAX), 0)
        argmax = tl.where(block_max > lmax, block_arg, argmax)  # strict: the lowest id keeps a tie
        lmax_new = tl.maximum(lmax, block_max)
        mass = mass * _scaled_exp(lmax, lmax_new, temperature) + tl.sum(_scaled_exp(xm, lmax_new, temperature), 0)
        lmax = lmax_new
        key_min = tl.minimum(key_min, tl.min(tl.where(present, _order_key(x), I32_MAX), 0))
        n_present += tl.sum(present.to(tl.int32), 0)
    return bad, m, total, check_total, lmax, argmax, key_min, n_present, mass


@triton.jit
def _search(row_ptr, mask_ptr, n_mask, lmax, temperature, target, lo, hi, lo_count, lo_mass, hi_count, hi_mass,
            BY_MASS: tl.constexpr, BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """Largest present key v with G(v) >= target, G(v) = count (or mass) of present ids with key >= v.

    Invariant: lo is a present key with G(lo) >= target, hi - 1 is a present key, G(hi) < target.
    Returns (v, G(v) count, G(v) mass, count and mass of the keys above v).
    """
    offs = tl.arange(0, BLOCK)
    rank = tl.arange(0, NUM_PIVOTS)
    passes = tl.full((), 0, tl.int32)
    # In int64: lo + 1 overflows int32 at lo = INT32_MAX, and hi - lo can too.
    while (lo.to(tl.int64) + 1 < hi.to(tl.int64)) & (passes < MAX_SEARCH_PASSES):
        passes += 1
        span = hi.to(tl.int64) - lo.to(tl.int64)
        pivots = (lo.to(tl.int64) + span * rank // NUM_PIVOTS).to(tl.int32)  # pivots[0] = lo
        count = tl.full((NUM_PIVOTS,), 0, tl.int32)
        mass = tl.full((NUM_PIVOTS,), 0.0, tl.float32)
        min_at_or_above = tl.full((NUM_PIVOTS,), I32_MAX, tl.int32)
        max_below = tl.full((NUM_PIVOTS,), I32_MIN, tl.int32)
        for start in range(0, n_mask, BLOCK):
            x, present = _load_present(row_ptr, mask_ptr, n_mask, start + offs)
            key = _order_key(x)[None, :]
            p = _scaled_exp(x, lmax, temperature)[None, :]
            at_or_above = present[None, :] & (key >= pivots[:, None])
            below = present[None, :] & (key < pivots[:, None])
            count += tl.sum(at_or_above.to(tl.int32), 1)
            mass += tl.sum(tl.where(at_or_above, p, 0.0), 1)
            min_at_or_above = tl.minimum(min_at_or_above, tl.min(tl.where(at_or_above, key, I32_MAX), 1))
            max_below = tl.maximum(max_below, tl.max(tl.where(below, key, I32_MIN), 1))
        if BY_MASS:
            ok = mass >= target
        else:
            ok = count.to(tl.float32) >= target
        best = tl.max(tl.where(ok | (pivots == lo), rank, 0), 0)
        # The answer lies in [pivots[best], pivots[best + 1]), or [pivots[best], hi) for the last pivot;
        # both ends move onto present keys, and hi - 1 being present makes max_below(hi) = hi - 1.
        last = best == NUM_PIVOTS - 1
        lo = tl.sum(tl.where(rank == best, min_at_or_above, 0), 0)
        lo_count = tl.sum(tl.where(rank == best, count, 0), 0)
        lo_mass = tl.sum(tl.where(rank == best, mass, 0.0), 0)
        hi_count = tl.where(last, hi_count, tl.sum(tl.where(rank == best + 1, count, 0), 0))
        hi_mass = tl.where(last, hi_mass, tl.sum(tl.where(rank == best + 1, mass, 0.0), 0))
        hi = tl.where(last, hi, tl.sum(tl.where(rank == best + 1, max_below, 0), 0) + 1)
    return lo, lo_count, lo_mass, hi_count, hi_mass


@triton.jit
def _truncate(row_ptr, mask_ptr, n_mask, temperature, top_k, top_p, lmax, key_min, n_present, mass,
              BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """Kept set (tau, n_tie) of truncate(softmax(l / temperature), top_k, top_p) and its mass."""
    key_max = _order_key(lmax)
    tau = key_min
    n_tie = tl.full((), I32_MAX, tl.int32)
    total = mass
    tau_count = n_present
    tau_mass = mass
    if (top_k > 0) & (top_k < n_present):
        tau, tau_count, tau_mass, above_count, above_mass = _search(
            row_ptr, mask_ptr, n_mask, lmax, temperature, top_k.to(tl.float32), key_min, key_max + 1,
            n_present, mass, tl.full((), 0, tl.int32), tl.full((), 0.0, tl.float32), False, BLOCK, NUM_PIVOTS)
        n_tie = top_k - above_count
        total = above_mass + n_tie.to(tl.float32) * _scaled_exp(_key_value(tau), lmax, temperature)
    if top_p < 1.0:
        # The top-p cut lies at or above the top-k cut; G(tau_k) >= top_p * total holds by construction.
        target = top_p * total
        tau_p, tau_count, tau_mass, above_count, above_mass = _search(
            row_ptr, mask_ptr, n_mask, lmax, temperature, target, tau, key_max + 1,
            tau_count, tau_mass, tl.full((), 0, tl.int32), tl.full((), 0.0, tl.float32), True, BLOCK, NUM_PIVOTS)
        p_tau = _scaled_exp(_key_value(tau_p), lmax, temperature)
        # Ties at tau_p are kept in id order while the mass ranked before them is < target:
        # the smallest r >= 1 with above_mass + r * p_tau >= target, capped at the number of ties.
        a = tl.full((), 1, tl.int32)
        b = tau_count - above_count
        while a < b:
            mid = (a + b) // 2
            if above_mass + mid.to(tl.float32) * p_tau < target:
                a = mid + 1
            else:
                b = mid
        n_tie = tl.where(tau_p == tau, tl.minimum(n_tie, a), a)
        tau = tau_p
        total = above_mass + n_tie.to(tl.float32) * p_tau
    return tau, n_tie, total


@triton.jit
def _inverse_cdf(row_ptr, mask_ptr, n_mask, lmax, temperature, tau, n_tie, target, BLOCK: tl.constexpr):
    """First id, in id order, whose cumulative kept mass reaches target (the last kept id if rounding
    leaves target above the sum)."""
    offs = tl.arange(0, BLOCK)
    carry = tl.full((), 0.0, tl.float32)
    ties_before = tl.full((), 0, tl.int32)
    token = tl.full((), -1, tl.int32)
    last_kept = tl.full((), 0, tl.int32)
    start = tl.full((), 0, tl.int32)
    while (start < n_mask) & (token < 0):
        idx = start + offs
        x, present = _load_present(row_ptr, mask_ptr, n_mask, idx)
        key = _order_key(x)
        tie = (present & (key == tau)).to(tl.int32)
        tie_rank = ties_before + tl.cumsum(tie, 0) - tie
        kept = present & ((key > tau) | ((tie != 0) & (tie_rank < n_tie)))
        w = tl.where(kept, _scaled_exp(x, lmax, temperature), 0.0)
        cum = carry + tl.cumsum(w, 0)
        first = tl.min(tl.where((w > 0) & (cum >= target), idx, I32_MAX), 0)
        token = tl.where(first < I32_MAX, first, -1)
        last_kept = tl.maximum(last_kept, tl.max(tl.where(w > 0, idx, 0), 0))
        carry = tl.max(cum, 0)  # the cumsum's own last value, so the running sum stays one chain
        ties_before += tl.sum(tie, 0)
        start += BLOCK
    return tl.where(token >= 0, token, last_kept)
