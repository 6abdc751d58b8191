"""The verify step of exact speculative RSD on the split-row machinery of kernels/rsd_split.py: the contract
of rsd_engine/sampling/verify_reference.py, every position of a round computed at once.

A round's logits [B, P, V] (P = G + 1) are read as B * P rows: the (row, position) pairs are the rows of
rsd_split's launches, so stats and the three radix rounds find both sides' cuts at every position in
parallel. Then, with rp = row * P + position and the position's side rs = rp * 2 + side:
  5. law_kernel (rp, side): the cut of each side from the histograms, stored once (prefix and b2 with
     each segment's kept mass and kept ties, as rsd_split's final kernel; or, for a row with top-k and
     top-p both on, (tau, n_tie) of the one-program search and each segment's kept ties).
  6. failed_kernel (rp, chunk; the caller gives each program one segment), draft positions: per segment,
     the teacher's kept weight failing the check, sum wT(z) * (1 - ok(z)), and both sides' kept weights;
     the program holding the draft x stores wT(x), wS(x), ok(x).
  7. residual_kernel (rp, chunk, as failed_kernel), draft positions: r from the segments' sums in a fixed
     order, r^K, c and the keep test (chunk 0 stores them for the last kernel); where x is rejected, each
     segment's mass of max(0, Q - qS) and of Q, Q = qT * ok * c + r^K * qS.
  8. pick_kernel (row): walks the positions up to the first rejection or flag, reading only what the
     launches before stored: a kept draft costs a few scalar loads; a rejected one a draw from the residual
     (the segment holding the target mass from the segments' masses, then that segment's tiles in order up
     to the one that reaches it); the bonus position a plain RSD step (rsd_split's draws) from its
     [fallback, proposals] columns.
Kernels 6-8 take a segment TILE ids at a time (a divisor of SEG), their sums kept per lane and reduced once a
segment: both sides' fp64 laws over a whole segment of 4096 held more than an sm_90 thread's 255 registers.
Q arithmetic runs in fp64 from the fp32 weights, as the reference's: qT = w / (kept mass), the kept mass the
fp64 sum of the kept weights (segments in id order), not rsd_split's fixed-point mass (exact for the cut and
the draws, but each weight rounded to 2**-40). No spin waits, no autotune.
"""
import triton
import triton.language as tl

from .pdl import wait_then_release
from .rsd_sample import I32_MAX, _order_key, _row_stats, _scaled_exp, _truncate
from .rsd_split import ALL_TIES, BOTH, GREEDY, _add2, _add3, _first_last, _law, _load_row, _load_side, \
    _mode, _sample_side, _ukey

# Flags, as rsd_sample's: NaN/+inf in the teacher's row, in the student's; no finite logit the student may write.
TEACHER_NONFINITE = tl.constexpr(-1)
STUDENT_NONFINITE = tl.constexpr(-2)
NO_ALLOWED_TOKEN = tl.constexpr(-3)


@triton.jit
def _check_ok(ls, s_m, check_temperature, s_check, threshold):
    # The check of rsd_sample in fp64: softmax(lS / check_temperature)[y] >= threshold.
    z = (ls.to(tl.float64) - s_m.to(tl.float64)) / check_temperature.to(tl.float64)
    return tl.exp(z) / s_check.to(tl.float64) >= threshold.to(tl.float64)


@triton.jit
def _side(walk_ptr, rs, temperature, top_k, top_p):
    """(bad, m, lmax, argmax, softmax denominator, check denominator, mode) of one (position, side), as round 0
    stored them (rsd_split._store_side)."""
    bad, m, lmax, argmax, total, check = _load_side(walk_ptr, rs)
    return bad, m, lmax, argmax, total, check, _mode(bad, lmax, temperature, top_k, top_p)


@triton.jit
def _tile_law(row_ptr, mask_ptr, n_mask, lo, mode, live, lmax, temperature, cut, fine, den, argmax, kept_ties,
              ties_before, TILE: tl.constexpr):
    """TILE ids from lo (a tile of a segment) of a side's truncated law, fp64: (ids, logits, probabilities,
    ties_before). A tie at the cut is kept while its rank among the segment's ties, ties_before of them in the
    segment's earlier tiles, is below the segment's kept ties."""
    idx = lo + tl.arange(0, TILE)
    x, present = _load_row(row_ptr, mask_ptr, n_mask, idx)
    present = tl.where(live, present, 0) != 0  # (`present & live` trips the interpreter on a scalar bool)
    key = _ukey(x)
    both = mode == BOTH
    okey = _order_key(x).to(tl.int64)
    tie = present & tl.where(both, okey == cut, ((key >> 8) == cut) & ((key & 255) == fine))
    above = present & tl.where(both, okey > cut, ((key >> 8) > cut) | (((key >> 8) == cut) & ((key & 255) > fine)))
    kept, ties_before = _keep_ties_after(tie, kept_ties, ties_before)
    keep = above | kept
    t = tl.where(temperature != 0.0, temperature, 1.0)
    w = tl.where(keep, _scaled_exp(x, lmax, t), 0.0).to(tl.float64) / den
    one_hot = tl.where(present & (idx == argmax), 1.0, 0.0).to(tl.float64)
    return idx, x, tl.where(mode == GREEDY, one_hot, w), ties_before


@triton.jit
def _keep_ties_after(tie, n_tie, before):
    """rsd_split._keep_ties for a tile that follows `before` of the segment's ties: (kept, before + the tile's
    ties). The count is only needed, and only taken, where the cut splits the segment's ties."""
    if (n_tie > 0) & (n_tie < ALL_TIES):
        tie_i = tie.to(tl.int32)
        keep = tie & (before + tl.cumsum(tie_i, 0) - tie_i < n_tie)
        before += tl.sum(tie_i, 0)
    else:
        keep = tie & (n_tie > 0)
    return keep, before


@triton.jit
def _segment_cuts(cut_ptr, fine_ptr, kt_ptr, rp, n_seg, seg):
    """Both sides' cut (prefix or tau), fine digit (or n_tie) and the segment's kept ties at the cut, loaded
    once for all the tiles of a segment."""
    rt = rp * 2
    rs = rt + 1
    return (tl.load(cut_ptr + rt), tl.load(fine_ptr + rt), tl.load(kt_ptr + rt * n_seg + seg), tl.load(cut_ptr + rs),
            tl.load(fine_ptr + rs), tl.load(kt_ptr + rs * n_seg + seg))


@triton.jit
def _tile_laws(teacher_row, student_row, proposal_mask_ptr, fallback_mask_ptr, n_vocab, lo, cuts, t_den, s_den,
               t_mode, t_live, t_lmax, temperature, t_argmax, s_mode, s_live, s_lmax, student_temperature, s_argmax,
               t_before, s_before, TILE: tl.constexpr):
    """(ids, qT, qS, student logits, t_before, s_before) of one tile of a position (cuts: _segment_cuts of its
    segment); t_den = s_den = 1 gives the weights."""
    t_cut, t_fine, t_kt, s_cut, s_fine, s_kt = cuts
    idx, _lt, qt, t_before = _tile_law(teacher_row, proposal_mask_ptr, n_vocab, lo, t_mode, t_live, t_lmax,
                                       temperature, t_cut, t_fine, t_den, t_argmax, t_kt, t_before, TILE)
    _idx, ls, qs, s_before = _tile_law(student_row, fallback_mask_ptr, n_vocab, lo, s_mode, s_live, s_lmax,
                                       student_temperature, s_cut, s_fine, s_den, s_argmax, s_kt, s_before, TILE)
    return idx, qt, qs, ls, t_before, s_before


@triton.jit
def _keep_state(failed_ptr, at_ptr, rp, n_seg, t_live, trials, x, n_vocab, u_keep, NSP2: tl.constexpr):
    """Both laws' kept masses and r from the segments' fp64 sums (fixed order), r^K, c and the keep test of
    the draft x: (r_k, c, kept, qT(x)·ok(x)·c, Q(x), teacher's kept mass, student's kept mass)."""
    s = tl.arange(0, NSP2)
    base = failed_ptr + rp * 3 * n_seg + s
    failed, t_den, s_den = tl.reduce((tl.load(base, mask=s < n_seg, other=0.0),
                                      tl.load(base + n_seg, mask=s < n_seg, other=0.0),
                                      tl.load(base + 2 * n_seg, mask=s < n_seg, other=0.0)), 0, _add3)
    t_den = tl.where(t_den > 0.0, t_den, 1.0)  # an empty law stays all zero, not NaN
    s_den = tl.where(s_den > 0.0, s_den, 1.0)
    r = tl.where(t_live, failed / t_den, 1.0)
    r_k = tl.full((), 1.0, tl.float64)
    for _ in range(0, trials):
        r_k = r_k * r
    c = tl.where(r < 1.0, (1.0 - r_k) / tl.where(r < 1.0, 1.0 - r, 1.0), trials.to(tl.float64))
    qt_x = tl.load(at_ptr + rp * 3 + 0) / t_den
    qs_x = tl.load(at_ptr + rp * 3 + 1) / s_den
    ok_x = tl.load(at_ptr + rp * 3 + 2)
    in_range = (x >= 0) & (x < n_vocab)
    tp_x = tl.where(in_range & (ok_x != 0.0), qt_x * c, 0.0)
    q_x = tl.where(in_range, tp_x + r_k * qs_x, 0.0)
    kept = (q_x > 0.0) & (u_keep.to(tl.float64) * qs_x <= q_x)
    return r_k, c, kept, tp_x, q_x, t_den, s_den


# The most proposal trials a position takes: the plain step's (rsd_engine.params.MAX_PROPOSAL_TRIALS, its
# NUM_DRAWS - 1), at the drafts as at the bonus position, so that a round has one law.
MAX_TRIALS = tl.constexpr(16)
KEEP_SLOTS = tl.constexpr(8)  # keep_ptr's row: kept (0 / 1), r^K, c, qT(x)·ok(x)·c, Q(x), the two kept masses


@triton.jit
def _store_keep(keep_ptr, rp, kept, r_k, c, tp_x, q_x, t_den, s_den):
    base = keep_ptr + rp * KEEP_SLOTS
    tl.store(base + 0, kept.to(tl.float64))
    tl.store(base + 1, r_k)
    tl.store(base + 2, c)
    tl.store(base + 3, tp_x)
    tl.store(base + 4, q_x)
    tl.store(base + 5, t_den)
    tl.store(base + 6, s_den)


@triton.jit
def _load_keep(keep_ptr, rp):
    """_keep_state's results as residual_kernel's chunk-0 program stored them, bit for bit."""
    base = keep_ptr + rp * KEEP_SLOTS
    return (tl.load(base + 1), tl.load(base + 2), tl.load(base + 0) != 0.0, tl.load(base + 3), tl.load(base + 4),
            tl.load(base + 5), tl.load(base + 6))


@triton.jit
def _store_law(row_ptr, mask_ptr, n_logits, n_vocab, temperature, top_k, top_p, used, rs, sc_ptr, sm_ptr, sa_ptr,
               walk_ptr, kept_ptr, kt_ptr, cut_ptr, fine_ptr, total_ptr, n_seg, SEG: tl.constexpr, SG: tl.constexpr,
               SEARCH_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    bad, _m, lmax, _argmax, _total, _check, mode = _side(walk_ptr, rs, temperature, top_k, top_p)
    cut = tl.full((), -1, tl.int64)
    fine = tl.full((), 0, tl.int32)
    total = tl.full((), 1.0, tl.float64)
    if (mode != GREEDY) & used:
        t = tl.where(temperature != 0.0, temperature, 1.0)
        if mode == BOTH:
            # The one-program search (rsd_split's path for these rows), then each segment's kept ties.
            _bad, _m2, _tot, _chk, _lmax, _arg, key_min, n_present, mass = _row_stats(
                row_ptr, n_logits, mask_ptr, n_vocab, t, 1.0, False, SEG)
            tau, n_tie, kept_total = _truncate(row_ptr, mask_ptr, n_vocab, t, top_k, top_p, lmax, key_min, n_present,
                                               mass, SEARCH_BLOCK, NUM_PIVOTS)
            cut = tau.to(tl.int64)
            fine = n_tie
            total = kept_total.to(tl.float64)
            ties_before = tl.full((), 0, tl.int32)
            for s in range(0, n_seg):
                x, present = _load_row(row_ptr, mask_ptr, n_vocab, s * SEG + tl.arange(0, SEG))
                ties = tl.sum((present & (_order_key(x) == tau)).to(tl.int32), 0)
                kept_ties = tl.minimum(tl.maximum(n_tie - ties_before, 0), ties)
                tl.store(kt_ptr + rs * n_seg + s, tl.where(kept_ties == ties, ALL_TIES, kept_ties))
                ties_before += ties
        else:
            cut, fine, law_total = _law(rs, mode, top_k, top_p, sc_ptr, sm_ptr, sa_ptr, walk_ptr, kept_ptr, kt_ptr,
                                        n_seg, SG)
            total = law_total.to(tl.float64)
    tl.store(cut_ptr + rs, cut)
    tl.store(fine_ptr + rs, fine)
    tl.store(total_ptr + rs, total)


@triton.jit
def law_kernel(
    teacher_ptr, student_ptr,  # [B * P, Vt], [B * P, Vs] fp32 / bf16 / fp16, row strides teacher_stride, ...
    num_draft_ptr,  # [B] int32
    temperature_ptr, top_k_ptr, top_p_ptr, student_temperature_ptr, student_top_k_ptr, student_top_p_ptr,  # [B]
    proposal_trials_ptr,  # [B] int32: a row's parameters hold at all its positions
    proposal_mask_ptr, fallback_mask_ptr,  # [V] int8
    stf_ptr, sti_ptr, h0c_ptr, h0m_ptr, h1c_ptr, h1m_ptr, sc_ptr, sm_ptr, sa_ptr, walk_ptr,  # rsd_split's scratch
    kept_ptr, kt_ptr,  # [B * P, 2, n_seg] int64 / int32 out: the segments' kept mass (running sums) and kept ties
    cut_ptr, fine_ptr, total_ptr,  # [B * P, 2] int64, int32, fp64 out: the cut, its kept mass (fixed point)
    at_ptr,  # [B * P, 3] fp64 out: zeroed here (failed_kernel writes qT(x), qS(x), ok(x))
    n_teacher, n_student, n_vocab, num_positions, teacher_stride, student_stride, n_seg,
    SEG: tl.constexpr, SG: tl.constexpr, SEARCH_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    wait_then_release(PDL)
    rp = tl.program_id(0).to(tl.int64)
    side = tl.program_id(1)
    rs = rp * 2 + side
    row = rp // num_positions  # the parameters are the row's
    n = tl.minimum(tl.maximum(tl.load(num_draft_ptr + row), 0), num_positions - 1)
    needed = rp % num_positions <= n  # positions past the bonus are never read
    if side == 0:
        for j in range(0, 3):
            tl.store(at_ptr + rp * 3 + j, tl.zeros((), tl.float64))
        _store_law(teacher_ptr + rp * teacher_stride, proposal_mask_ptr, n_teacher, n_vocab,
                   tl.load(temperature_ptr + row), tl.load(top_k_ptr + row), tl.load(top_p_ptr + row),
                   needed & (tl.load(proposal_trials_ptr + row) > 0), rs, sc_ptr, sm_ptr, sa_ptr, walk_ptr, kept_ptr,
                   kt_ptr, cut_ptr, fine_ptr, total_ptr, n_seg, SEG, SG, SEARCH_BLOCK, NUM_PIVOTS)
    else:
        _store_law(student_ptr + rp * student_stride, fallback_mask_ptr, n_student, n_vocab,
                   tl.load(student_temperature_ptr + row), tl.load(student_top_k_ptr + row),
                   tl.load(student_top_p_ptr + row), needed, rs, sc_ptr, sm_ptr, sa_ptr, walk_ptr, kept_ptr, kt_ptr,
                   cut_ptr, fine_ptr, total_ptr, n_seg, SEG, SG, SEARCH_BLOCK, NUM_PIVOTS)


@triton.jit
def _position(walk_ptr, rp, num_positions, num_draft_ptr, temperature_ptr, top_k_ptr, top_p_ptr, check_temperature_ptr,
              student_temperature_ptr, student_top_k_ptr, student_top_p_ptr, proposal_trials_ptr):
    """What failed_kernel and residual_kernel need of a position: whether it is a draft to verify, and each
    side's statistics and mode."""
    i = rp % num_positions
    row = rp // num_positions  # the parameters are the row's
    n = tl.minimum(tl.maximum(tl.load(num_draft_ptr + row), 0), num_positions - 1)
    temperature = tl.load(temperature_ptr + row)
    student_temperature = tl.load(student_temperature_ptr + row)
    trials = tl.minimum(tl.load(proposal_trials_ptr + row), MAX_TRIALS)
    t_bad, _tm, t_lmax, t_argmax, _tt, _tk, t_mode = _side(walk_ptr, rp * 2, temperature, tl.load(top_k_ptr + row),
                                                             tl.load(top_p_ptr + row))
    s_bad, s_m, s_lmax, s_argmax, _st, s_check, s_mode = _side(
        walk_ptr, rp * 2 + 1, student_temperature, tl.load(student_top_k_ptr + row), tl.load(student_top_p_ptr + row))
    check_temperature = tl.load(check_temperature_ptr + row)
    t_live = (t_lmax > float("-inf")) & (trials > 0)
    s_live = s_lmax > float("-inf")
    draft = (i < n) & (t_bad == 0) & (s_bad == 0) & s_live
    return (draft, trials, temperature, t_mode, t_live, t_lmax, t_argmax, student_temperature, s_mode, s_live,
            s_lmax, s_argmax, s_m, s_check, check_temperature)


@triton.jit
def failed_kernel(
    teacher_ptr, student_ptr, draft_ptr, num_draft_ptr,  # as law_kernel; draft [B, P - 1] int64, row draft_stride
    temperature_ptr, top_k_ptr, top_p_ptr, threshold_ptr, check_temperature_ptr,  # [B] each
    student_temperature_ptr, student_top_k_ptr, student_top_p_ptr, proposal_trials_ptr,  # [B] each
    proposal_mask_ptr, fallback_mask_ptr,  # [V] int8
    walk_ptr, kt_ptr, cut_ptr, fine_ptr,  # as law_kernel (walk_ptr: the sides' statistics, rsd_split._store_side)
    failed_ptr,  # [B * P, 3, n_seg] fp64 out: per segment, sum of wT(z) * (1 - ok(z)), of wT, of wS (kept weights)
    at_ptr,  # [B * P, 3] fp64 out: wT(x), wS(x), ok(x) at the draft x
    n_vocab, num_positions, teacher_stride, student_stride, draft_stride, spc, n_seg,
    SEG: tl.constexpr, TILE: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    wait_then_release(PDL)
    rp = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    (draft, _trials, temperature, t_mode, t_live, t_lmax, t_argmax, student_temperature, s_mode, s_live, s_lmax,
     s_argmax, s_m, s_check, check_temperature) = _position(
        walk_ptr, rp, num_positions, num_draft_ptr, temperature_ptr, top_k_ptr, top_p_ptr, check_temperature_ptr,
        student_temperature_ptr, student_top_k_ptr, student_top_p_ptr, proposal_trials_ptr)
    if draft:
        x = tl.load(draft_ptr + (rp // num_positions) * draft_stride + rp % num_positions)
        threshold = tl.load(threshold_ptr + rp // num_positions)
        teacher_row = teacher_ptr + rp * teacher_stride
        student_row = student_ptr + rp * student_stride
        seg_lo = chunk * spc
        for s in range(seg_lo, tl.minimum(seg_lo + spc, n_seg)):
            cuts = _segment_cuts(cut_ptr, fine_ptr, kt_ptr, rp, n_seg, s)
            t_before = tl.full((), 0, tl.int32)
            s_before = tl.full((), 0, tl.int32)
            failed_v = tl.zeros((TILE,), tl.float64)  # per-lane sums over the segment's tiles, reduced once
            t_v = tl.zeros((TILE,), tl.float64)
            s_v = tl.zeros((TILE,), tl.float64)
            for j in tl.static_range(SEG // TILE):
                lo = s * SEG + j * TILE
                idx, qt, qs, ls, t_before, s_before = _tile_laws(
                    teacher_row, student_row, proposal_mask_ptr, fallback_mask_ptr, n_vocab, lo, cuts, 1.0, 1.0,
                    t_mode, t_live, t_lmax, temperature, t_argmax, s_mode, s_live, s_lmax, student_temperature,
                    s_argmax, t_before, s_before, TILE)
                ok = _check_ok(ls, s_m, check_temperature, s_check, threshold)
                failed_v += tl.where(ok, 0.0, qt)
                t_v += qt
                s_v += qs
                if (x >= lo) & (x < lo + TILE):
                    at_x = idx == x  # one lane: its sums are its values
                    qt_x, qs_x, ok_x = tl.reduce((tl.where(at_x, qt, 0.0), tl.where(at_x, qs, 0.0),
                                                  tl.where(at_x & ok, 1.0, 0.0).to(tl.float64)), 0, _add3)
                    tl.store(at_ptr + rp * 3 + 0, qt_x)
                    tl.store(at_ptr + rp * 3 + 1, qs_x)
                    tl.store(at_ptr + rp * 3 + 2, ok_x)
            seg_failed, seg_t, seg_s = tl.reduce((failed_v, t_v, s_v), 0, _add3)
            tl.store(failed_ptr + rp * 3 * n_seg + s, seg_failed)
            tl.store(failed_ptr + (rp * 3 + 1) * n_seg + s, seg_t)
            tl.store(failed_ptr + (rp * 3 + 2) * n_seg + s, seg_s)


@triton.jit
def residual_kernel(
    teacher_ptr, student_ptr, draft_ptr, num_draft_ptr, uniforms_ptr,  # uniforms [B * P, D] fp32, row u_stride
    temperature_ptr, top_k_ptr, top_p_ptr, threshold_ptr, check_temperature_ptr,  # as failed_kernel
    student_temperature_ptr, student_top_k_ptr, student_top_p_ptr, proposal_trials_ptr,
    proposal_mask_ptr, fallback_mask_ptr,
    walk_ptr, kt_ptr, cut_ptr, fine_ptr, failed_ptr, at_ptr,  # as failed_kernel
    res_ptr, qm_ptr,  # [B * P, n_seg] fp64 out: each segment's mass of max(0, Q - qS) and of Q (rejected x)
    keep_ptr,  # [B * P, KEEP_SLOTS] fp64 out (chunk 0, draft positions): the keep test's state (_store_keep)
    n_vocab, num_positions, teacher_stride, student_stride, draft_stride, uniforms_stride, keep_draw, spc, n_seg,
    SEG: tl.constexpr, TILE: tl.constexpr, NSP2: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    wait_then_release(PDL)
    rp = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    (draft, trials, temperature, t_mode, t_live, t_lmax, t_argmax, student_temperature, s_mode, s_live, s_lmax,
     s_argmax, s_m, s_check, check_temperature) = _position(
        walk_ptr, rp, num_positions, num_draft_ptr, temperature_ptr, top_k_ptr, top_p_ptr, check_temperature_ptr,
        student_temperature_ptr, student_top_k_ptr, student_top_p_ptr, proposal_trials_ptr)
    if draft:
        x = tl.load(draft_ptr + (rp // num_positions) * draft_stride + rp % num_positions)
        r_k, c, kept, tp_x, q_x, t_den, s_den = _keep_state(failed_ptr, at_ptr, rp, n_seg, t_live, trials, x,
                                                            n_vocab, tl.load(uniforms_ptr + rp * uniforms_stride
                                                                             + keep_draw), NSP2)
        if chunk == 0:  # pick_kernel walks the positions one after another: it loads this instead of reducing
            _store_keep(keep_ptr, rp, kept, r_k, c, tp_x, q_x, t_den, s_den)
        if not kept:
            threshold = tl.load(threshold_ptr + rp // num_positions)
            teacher_row = teacher_ptr + rp * teacher_stride
            student_row = student_ptr + rp * student_stride
            seg_lo = chunk * spc
            for s in range(seg_lo, tl.minimum(seg_lo + spc, n_seg)):
                cuts = _segment_cuts(cut_ptr, fine_ptr, kt_ptr, rp, n_seg, s)
                t_before = tl.full((), 0, tl.int32)
                s_before = tl.full((), 0, tl.int32)
                res_v = tl.zeros((TILE,), tl.float64)  # per-lane sums over the segment's tiles, reduced once
                q_v = tl.zeros((TILE,), tl.float64)
                for j in tl.static_range(SEG // TILE):
                    _idx, qt, qs, ls, t_before, s_before = _tile_laws(
                        teacher_row, student_row, proposal_mask_ptr, fallback_mask_ptr, n_vocab, s * SEG + j * TILE,
                        cuts, t_den, s_den, t_mode, t_live, t_lmax, temperature, t_argmax, s_mode, s_live, s_lmax,
                        student_temperature, s_argmax, t_before, s_before, TILE)
                    tp = tl.where(_check_ok(ls, s_m, check_temperature, s_check, threshold), qt * c, 0.0)
                    res_v += tl.maximum(tp - (1.0 - r_k) * qs, 0.0)
                    q_v += tp + r_k * qs
                seg_res, seg_q = tl.reduce((res_v, q_v), 0, _add2)
                tl.store(res_ptr + rp * n_seg + s, seg_res)
                tl.store(qm_ptr + rp * n_seg + s, seg_q)


@triton.jit
def _hit_last_end(k0, tk0, qk0, l0, tl0, ql0, e0, k1, tk1, qk1, l1, tl1, ql1, e1):
    # One exchange of a draw's tile: the lowest id reaching the target and the highest live id, each with its
    # (qT·ok·c, Q), and the tile's running mass at its end (the highest of a non-decreasing run).
    lo = k1 < k0
    hi = l1 > l0
    return (tl.where(lo, k1, k0), tl.where(lo, tk1, tk0), tl.where(lo, qk1, qk0), tl.where(hi, l1, l0),
            tl.where(hi, tl1, tl0), tl.where(hi, ql1, ql0), tl.maximum(e0, e1))


@triton.jit
def _residual_draw(teacher_row, student_row, proposal_mask_ptr, fallback_mask_ptr, n_vocab, rp, n_seg, cut_ptr,
                   fine_ptr, t_den, s_den, kt_ptr, res_ptr, qm_ptr, u, r_k, c, threshold, t_mode, t_live, t_lmax,
                   temperature, t_argmax, s_mode, s_live, s_lmax, student_temperature, s_argmax, s_m, s_check,
                   check_temperature, SEG: tl.constexpr, NSP2: tl.constexpr, TILE: tl.constexpr):
    """y ~ norm(max(0, Q - qS)) (from Q where rounding leaves that no mass) by inverse CDF in id order: the
    segment holding the target from the segments' masses, then its tiles in order until one reaches the target
    (the running mass carried from tile to tile). (y, qT(y)·ok(y)·c, Q(y)); y = -1 where no id has mass."""
    s = tl.arange(0, NSP2)
    in_seg = s < n_seg
    res = tl.load(res_ptr + rp * n_seg + s, mask=in_seg, other=0.0)
    qm = tl.load(qm_ptr + rp * n_seg + s, mask=in_seg, other=0.0)
    res_total, q_total = tl.reduce((res, qm), 0, _add2)
    use_q = res_total <= 0.0
    mass = tl.where(use_q, qm, res)
    cum = tl.cumsum(mass, 0)
    target = u.to(tl.float64) * tl.where(use_q, q_total, res_total)
    live = mass > 0.0
    # The first segment whose cumulative mass reaches the target (else the last live one, else segment 0), with
    # the mass before it.
    first, carry_first, last, carry_last = tl.reduce(
        (tl.where(live & (cum >= target), s, NSP2), cum - mass, tl.where(live, s, -1), cum - mass), 0, _first_last)
    seg = tl.where(first < NSP2, first, tl.maximum(last, 0))
    carry = tl.where(first < NSP2, carry_first, tl.where(last >= 0, carry_last, 0.0))
    cuts = _segment_cuts(cut_ptr, fine_ptr, kt_ptr, rp, n_seg, seg)
    t_before = tl.full((), 0, tl.int32)
    s_before = tl.full((), 0, tl.int32)
    y = tl.full((), -1, tl.int32)
    tp_y = tl.full((), 0.0, tl.float64)
    q_y = tl.full((), 0.0, tl.float64)
    found = tl.full((), 0, tl.int32)
    for j in range(0, SEG // TILE):
        if found == 0:
            idx, qt, qs, ls, t_before, s_before = _tile_laws(
                teacher_row, student_row, proposal_mask_ptr, fallback_mask_ptr, n_vocab, seg * SEG + j * TILE, cuts,
                t_den, s_den, t_mode, t_live, t_lmax, temperature, t_argmax, s_mode, s_live, s_lmax,
                student_temperature, s_argmax, t_before, s_before, TILE)
            tp = tl.where(_check_ok(ls, s_m, check_temperature, s_check, threshold), qt * c, 0.0)
            q = tp + r_k * qs
            w = tl.where(use_q, q, tl.maximum(tp - (1.0 - r_k) * qs, 0.0))
            run = carry + tl.cumsum(w, 0)
            hit, tp_hit, q_hit, last_id, tp_last, q_last, carry = tl.reduce(
                (tl.where((w > 0.0) & (run >= target), idx, I32_MAX), tp, q, tl.where(w > 0.0, idx, -1), tp, q, run),
                0, _hit_last_end)
            if hit < I32_MAX:
                y, tp_y, q_y, found = hit, tp_hit, q_hit, 1
            elif last_id >= 0:  # rounding may leave the target past the segment's sum: its last live id
                y, tp_y, q_y = last_id, tp_last, q_last
    return y, tp_y, q_y


@triton.jit
def pick_kernel(
    teacher_ptr, student_ptr, draft_ptr, num_draft_ptr, uniforms_ptr,  # as residual_kernel
    temperature_ptr, top_k_ptr, top_p_ptr, threshold_ptr, check_temperature_ptr,  # [B] each
    student_temperature_ptr, student_top_k_ptr, student_top_p_ptr, proposal_trials_ptr,
    proposal_mask_ptr, fallback_mask_ptr,
    walk_ptr,  # [B * P, 2, 3, 6] int64: the sides' statistics (rsd_split._store_side)
    kept_ptr, kt_ptr, cut_ptr, fine_ptr, total_ptr, res_ptr, qm_ptr, keep_ptr,
    tokens_ptr,  # [B, P] int64 out
    num_emitted_ptr,  # [B] int32 out
    accepted_ptr,  # [B, P] int8 out
    teacher_logprob_ptr, student_logprob_ptr,  # [B, P] fp32 out
    n_vocab, num_positions, teacher_stride, student_stride, draft_stride, uniforms_stride, num_draws,
    residual_draw, flag_draw, n_seg,
    SEG: tl.constexpr, TILE: tl.constexpr, NSP2: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(num_draft_ptr + row), 0), num_positions - 1)
    out = row * num_positions
    for j in range(0, num_positions):
        tl.store(tokens_ptr + out + j, -1)
        tl.store(accepted_ptr + out + j, 0)
        tl.store(teacher_logprob_ptr + out + j, float("nan"))
        tl.store(student_logprob_ptr + out + j, float("nan"))
    i = tl.full((), 0, tl.int64)
    going = tl.full((), 1, tl.int32)
    while going != 0:
        rp = out + i
        rt = rp * 2
        rs = rt + 1
        teacher_row = teacher_ptr + rp * teacher_stride
        student_row = student_ptr + rp * student_stride
        uniforms_row = uniforms_ptr + rp * uniforms_stride
        temperature = tl.load(temperature_ptr + row)  # the parameters are the row's, at every position
        student_temperature = tl.load(student_temperature_ptr + row)
        check_temperature = tl.load(check_temperature_ptr + row)
        threshold = tl.load(threshold_ptr + row)
        trials = tl.minimum(tl.load(proposal_trials_ptr + row), MAX_TRIALS)
        t_bad, t_m, t_lmax, t_argmax, t_total, _tk, t_mode = _side(walk_ptr, rt, temperature, tl.load(top_k_ptr + row),
                                                                   tl.load(top_p_ptr + row))
        s_bad, s_m, s_lmax, s_argmax, s_total, s_check, s_mode = _side(
            walk_ptr, rs, student_temperature, tl.load(student_top_k_ptr + row), tl.load(student_top_p_ptr + row))
        s_live = s_lmax > float("-inf")
        token = t_argmax
        accepted = tl.full((), 0, tl.int32)
        kept = tl.full((), 0, tl.int32)
        if i == n:
            # The bonus: rsd_split's final kernel with this position's cuts and [fallback, proposals] columns.
            bonus_trials = tl.minimum(trials, num_draws - 1)
            if (t_bad == 0) & (s_bad == 0):
                k = tl.full((), 0, tl.int32)
                while (k < bonus_trials) & (accepted == 0) & (t_lmax > float("-inf")):
                    proposal = t_argmax
                    if t_mode != GREEDY:
                        proposal = _sample_side(teacher_row, proposal_mask_ptr, n_vocab, t_mode, t_lmax, temperature,
                                                tl.load(cut_ptr + rt), tl.load(fine_ptr + rt),
                                                tl.load(total_ptr + rt), tl.load(uniforms_row + 1 + k), rt,
                                                kept_ptr, kt_ptr, n_seg, SEG, NSP2)
                    ls = tl.load(student_row + proposal).to(tl.float32)
                    accepted = _check_ok(ls, s_m, check_temperature, s_check, threshold).to(tl.int32)
                    token = proposal
                    k += 1
                if accepted == 0:
                    token = s_argmax
                    if s_mode != GREEDY:
                        token = _sample_side(student_row, fallback_mask_ptr, n_vocab, s_mode, s_lmax,
                                             student_temperature, tl.load(cut_ptr + rs), tl.load(fine_ptr + rs),
                                             tl.load(total_ptr + rs), tl.load(uniforms_row), rs, kept_ptr, kt_ptr,
                                             n_seg, SEG, NSP2)
            token = tl.where((accepted == 0) & ~s_live, NO_ALLOWED_TOKEN, token)
        else:
            x = tl.load(draft_ptr + row * draft_stride + i)
            token = x.to(tl.int32)
            if (t_bad == 0) & (s_bad == 0) & s_live:
                t_live = (t_lmax > float("-inf")) & (trials > 0)
                r_k, c, keep, tp_y, q_y, t_den, s_den = _load_keep(keep_ptr, rp)
                kept = keep.to(tl.int32)
                if kept == 0:
                    token, tp_y, q_y = _residual_draw(
                        teacher_row, student_row, proposal_mask_ptr, fallback_mask_ptr, n_vocab, rp, n_seg, cut_ptr,
                        fine_ptr, t_den, s_den, kt_ptr, res_ptr, qm_ptr, tl.load(uniforms_row + residual_draw), r_k, c,
                        threshold, t_mode, t_live, t_lmax, temperature, t_argmax, s_mode, s_live, s_lmax,
                        student_temperature, s_argmax, s_m, s_check, check_temperature, SEG, NSP2, TILE)
                accepted = ((tp_y > 0.0) & (tl.load(uniforms_row + flag_draw).to(tl.float64) * q_y <= tp_y)).to(
                    tl.int32)
            token = tl.where(~s_live | (token < 0), NO_ALLOWED_TOKEN, token)
        token = tl.where(t_bad != 0, TEACHER_NONFINITE, tl.where(s_bad != 0, STUDENT_NONFINITE, token))
        flagged = token < 0
        safe = tl.maximum(token, 0)
        lt = tl.load(teacher_row + safe).to(tl.float32)
        ls = tl.load(student_row + safe).to(tl.float32)
        tl.store(tokens_ptr + out + i, token.to(tl.int64))
        tl.store(accepted_ptr + out + i, tl.where(flagged, 0, accepted).to(tl.int8))
        tl.store(teacher_logprob_ptr + out + i, tl.where(flagged, float("nan"), (lt - t_m) - tl.log(t_total)))
        tl.store(student_logprob_ptr + out + i, tl.where(flagged, float("nan"), (ls - s_m) - tl.log(s_total)))
        i += 1
        going = ((kept != 0) & ~flagged & (i < num_positions)).to(tl.int32)
    tl.store(num_emitted_ptr + row, i.to(tl.int32))
