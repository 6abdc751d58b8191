"""Single-model sampling and the verify step of exact speculative RSD: one program per row, the contracts
of rsd_engine/sampling/sample_reference.py and verify_reference.py, built from the pieces of
kernels/rsd_sample.py (row statistics, the sort-free (tau, n_tie) truncation, inverse-CDF walks).

sample_tokens_kernel: one model's truncated law, as the RSD sample's fallback side.

rsd_verify_kernel, per row and per position i of the round (logits [B, P, V], P = G + 1):
  * i < num_draft: one pass over both rows gives r = sum of qT over kept teacher ids failing the check, and
    qT, qS, ok at the draft x; keep x iff Q(x) > 0 and u_keep * qS(x) <= Q(x), with
    Q = qT * ok * c + r^K * qS. On a rejection two more passes draw from max(0, Q - qS) (or from Q where
    rounding leaves that without mass) by inverse CDF in id order. The flag of the emitted y is
    u_flag * Q(y) <= qT(y) * ok(y) * c. Q is never stored: each pass rebuilds it per block.
  * i == num_draft: the bonus token, a plain RSD step (rsd_sample.py's _rsd_step) with this position's
    [fallback, proposals] columns.
The arithmetic on Q (r, c, r^K, the residual's sums) runs in fp64 from fp32 weights.
"""
import triton
import triton.language as tl

from .rsd_sample import I32_MAX, _inverse_cdf, _load_present, _order_key, _row_stats, _rsd_step, _scaled_exp, \
    _truncate

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
def _kept_prob(x, present, idx, ties_before, tau, n_tie, lmax, temperature, sampled, argmax, total):
    """The truncated law's probability (fp64) of each id of a block, and the ties at tau seen so far."""
    key = _order_key(x)
    tie = (present & (key == tau)).to(tl.int32)
    tie_rank = ties_before + tl.cumsum(tie, 0) - tie
    kept = present & ((key > tau) | ((tie != 0) & (tie_rank < n_tie)))
    total = tl.where(total > 0.0, total, 1.0).to(tl.float64)  # an empty law stays all zero, not NaN
    w = tl.where(kept, _scaled_exp(x, lmax, temperature), 0.0).to(tl.float64) / total
    one_hot = tl.where(present & (idx == argmax), 1.0, 0.0).to(tl.float64)
    return tl.where(sampled, w, one_hot), ties_before + tl.sum(tie, 0)


@triton.jit
def _side_law(row_ptr, mask_ptr, n_vocab, temperature, top_k, top_p, lmax, key_min, n_present, mass, live,
              SEARCH_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """(tau, n_tie, kept mass) of one side's truncated law; sampled rows only, live ones searched."""
    tau = key_min
    n_tie = tl.full((), I32_MAX, tl.int32)
    total = mass
    if (temperature != 0.0) & live:
        tau, n_tie, total = _truncate(row_ptr, mask_ptr, n_vocab, temperature, top_k, top_p, lmax, key_min,
                                      n_present, mass, SEARCH_BLOCK, NUM_PIVOTS)
    return tau, n_tie, tl.where(temperature != 0.0, total, 1.0)


@triton.jit
def _verify_draft(teacher_row, student_row, uniforms_row, x, proposal_mask_ptr, fallback_mask_ptr, n_teacher,
                  n_student, n_vocab, temperature, top_k, top_p, threshold, check_temperature, student_temperature,
                  student_top_k, student_top_p, trials, keep_draw, residual_draw, flag_draw, BLOCK: tl.constexpr,
                  SEARCH_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """Keep test, residual and flag at a draft position: (token, accepted, teacher_logprob, student_logprob,
    kept)."""
    offs = tl.arange(0, BLOCK)
    t_sampled = temperature != 0.0
    s_sampled = student_temperature != 0.0
    t_temp = tl.where(t_sampled, temperature, 1.0)
    s_temp = tl.where(s_sampled, student_temperature, 1.0)
    t_bad, t_m, t_norm, _t_check, t_lmax, t_argmax, t_key_min, t_present, t_mass = _row_stats(
        teacher_row, n_teacher, proposal_mask_ptr, n_vocab, t_temp, 1.0, False, BLOCK)
    s_bad, s_m, s_norm, s_check, s_lmax, s_argmax, s_key_min, s_present, s_mass = _row_stats(
        student_row, n_student, fallback_mask_ptr, n_vocab, s_temp, check_temperature, True, BLOCK)
    t_live = (t_lmax > float("-inf")) & (trials > 0)
    s_live = s_lmax > float("-inf")
    token = x.to(tl.int32)
    accepted = tl.full((), 0, tl.int32)
    kept = tl.full((), 0, tl.int32)
    if (t_bad == 0) & (s_bad == 0) & s_live:
        t_tau, t_n_tie, t_total = _side_law(teacher_row, proposal_mask_ptr, n_vocab, temperature, top_k, top_p,
                                            t_lmax, t_key_min, t_present, t_mass, t_live, SEARCH_BLOCK, NUM_PIVOTS)
        s_tau, s_n_tie, s_total = _side_law(student_row, fallback_mask_ptr, n_vocab, student_temperature,
                                            student_top_k, student_top_p, s_lmax, s_key_min, s_present, s_mass,
                                            s_live, SEARCH_BLOCK, NUM_PIVOTS)
        # Pass 1: r, and qT, qS, ok at the draft.
        failed = tl.full((), 0.0, tl.float64)
        qt_x = tl.full((), 0.0, tl.float64)
        qs_x = tl.full((), 0.0, tl.float64)
        ok_x = tl.full((), 0, tl.int32)
        t_ties = tl.full((), 0, tl.int32)
        s_ties = tl.full((), 0, tl.int32)
        for start in range(0, n_vocab, BLOCK):
            idx = start + offs
            lt, t_in = _load_present(teacher_row, proposal_mask_ptr, n_vocab, idx)
            ls, s_in = _load_present(student_row, fallback_mask_ptr, n_vocab, idx)
            qt, t_ties = _kept_prob(lt, tl.where(t_live, t_in, 0) != 0, idx, t_ties, t_tau, t_n_tie, t_lmax, t_temp, t_sampled,
                                    t_argmax, t_total)
            qs, s_ties = _kept_prob(ls, s_in, idx, s_ties, s_tau, s_n_tie, s_lmax, s_temp, s_sampled, s_argmax,
                                    s_total)
            ok = _check_ok(ls, s_m, check_temperature, s_check, threshold)
            failed += tl.sum(tl.where(ok, 0.0, qt), 0)
            at_x = idx == x
            qt_x += tl.sum(tl.where(at_x, qt, 0.0), 0)
            qs_x += tl.sum(tl.where(at_x, qs, 0.0), 0)
            ok_x |= tl.max(tl.where(at_x & ok, 1, 0), 0)
        r = tl.where(t_live, failed, 1.0)
        r_k = tl.full((), 1.0, tl.float64)
        for _ in range(0, trials):
            r_k = r_k * r
        c = tl.where(r < 1.0, (1.0 - r_k) / tl.where(r < 1.0, 1.0 - r, 1.0), trials.to(tl.float64))
        in_range = (x >= 0) & (x < n_vocab)
        tp_y = tl.where(in_range & (ok_x != 0), qt_x * c, 0.0)
        q_y = tl.where(in_range, tp_y + r_k * qs_x, 0.0)
        kept = ((q_y > 0.0) & (tl.load(uniforms_row + keep_draw).to(tl.float64) * qs_x <= q_y)).to(tl.int32)
        if kept == 0:
            # Pass 2: the residual's mass (and Q's, for when rounding leaves the residual none).
            res_total = tl.full((), 0.0, tl.float64)
            q_total = tl.full((), 0.0, tl.float64)
            t_ties = tl.full((), 0, tl.int32)
            s_ties = tl.full((), 0, tl.int32)
            for start in range(0, n_vocab, BLOCK):
                idx = start + offs
                lt, t_in = _load_present(teacher_row, proposal_mask_ptr, n_vocab, idx)
                ls, s_in = _load_present(student_row, fallback_mask_ptr, n_vocab, idx)
                qt, t_ties = _kept_prob(lt, tl.where(t_live, t_in, 0) != 0, idx, t_ties, t_tau, t_n_tie, t_lmax, t_temp, t_sampled,
                                        t_argmax, t_total)
                qs, s_ties = _kept_prob(ls, s_in, idx, s_ties, s_tau, s_n_tie, s_lmax, s_temp, s_sampled, s_argmax,
                                        s_total)
                tp = tl.where(_check_ok(ls, s_m, check_temperature, s_check, threshold), qt * c, 0.0)
                res_total += tl.sum(tl.maximum(tp - (1.0 - r_k) * qs, 0.0), 0)
                q_total += tl.sum(tp + r_k * qs, 0)
            use_q = res_total <= 0.0
            target = tl.load(uniforms_row + residual_draw).to(tl.float64) * tl.where(use_q, q_total, res_total)
            # Pass 3: inverse CDF in id order, keeping tp and Q of the id it stops at.
            carry = tl.full((), 0.0, tl.float64)
            pick = tl.full((), -1, tl.int32)
            last = tl.full((), -1, tl.int32)
            tp_last = tl.full((), 0.0, tl.float64)
            q_last = tl.full((), 0.0, tl.float64)
            t_ties = tl.full((), 0, tl.int32)
            s_ties = tl.full((), 0, tl.int32)
            start = tl.full((), 0, tl.int32)
            while (start < n_vocab) & (pick < 0):
                idx = start + offs
                lt, t_in = _load_present(teacher_row, proposal_mask_ptr, n_vocab, idx)
                ls, s_in = _load_present(student_row, fallback_mask_ptr, n_vocab, idx)
                qt, t_ties = _kept_prob(lt, tl.where(t_live, t_in, 0) != 0, idx, t_ties, t_tau, t_n_tie, t_lmax, t_temp, t_sampled,
                                        t_argmax, t_total)
                qs, s_ties = _kept_prob(ls, s_in, idx, s_ties, s_tau, s_n_tie, s_lmax, s_temp, s_sampled, s_argmax,
                                        s_total)
                tp = tl.where(_check_ok(ls, s_m, check_temperature, s_check, threshold), qt * c, 0.0)
                q = tp + r_k * qs
                w = tl.where(use_q, q, tl.maximum(tp - (1.0 - r_k) * qs, 0.0))
                cum = carry + tl.cumsum(w, 0)
                first = tl.min(tl.where((w > 0.0) & (cum >= target), idx, I32_MAX), 0)
                block_last = tl.max(tl.where(w > 0.0, idx, -1), 0)
                at = tl.where(first < I32_MAX, first, block_last)
                tp_at = tl.sum(tl.where(idx == at, tp, 0.0), 0)
                q_at = tl.sum(tl.where(idx == at, q, 0.0), 0)
                pick = tl.where(first < I32_MAX, first, -1)
                last = tl.where(block_last >= 0, block_last, last)
                tp_last = tl.where(at >= 0, tp_at, tp_last)
                q_last = tl.where(at >= 0, q_at, q_last)
                carry = tl.max(cum, 0)
                start += BLOCK
            token = tl.where(pick >= 0, pick, last)
            tp_y = tp_last
            q_y = q_last
        accepted = ((tp_y > 0.0) & (tl.load(uniforms_row + flag_draw).to(tl.float64) * q_y <= tp_y)).to(tl.int32)
    safe = tl.maximum(token, 0)
    lt = tl.load(teacher_row + safe).to(tl.float32)
    ls = tl.load(student_row + safe).to(tl.float32)
    flag = tl.where(t_bad != 0, TEACHER_NONFINITE, tl.where(s_bad != 0, STUDENT_NONFINITE, NO_ALLOWED_TOKEN))
    token = tl.where((t_bad != 0) | (s_bad != 0) | ~s_live | (token < 0), flag, token)
    return token, accepted, (lt - t_m) - tl.log(t_norm), (ls - s_m) - tl.log(s_norm), kept


@triton.jit
def rsd_verify_kernel(
    teacher_ptr,  # [B, P, Vt] fp32 / bf16 / fp16, vocabulary contiguous
    student_ptr,  # [B, P, Vs] same dtypes
    draft_ptr,  # [B, P - 1] int64
    num_draft_ptr,  # [B] int32
    uniforms_ptr,  # [B, P, D] fp32
    temperature_ptr, top_k_ptr, top_p_ptr, threshold_ptr, check_temperature_ptr,  # [B] each (top_k int32)
    student_temperature_ptr, student_top_k_ptr, student_top_p_ptr, proposal_trials_ptr,  # [B] each
    proposal_mask_ptr,  # [V] int8
    fallback_mask_ptr,  # [V] int8
    tokens_ptr,  # [B, P] int64 out
    num_emitted_ptr,  # [B] int32 out
    accepted_ptr,  # [B, P] int8 out
    teacher_logprob_ptr,  # [B, P] fp32 out
    student_logprob_ptr,  # [B, P] fp32 out
    n_teacher, n_student, n_vocab, num_positions,
    teacher_stride_b, teacher_stride_p, student_stride_b, student_stride_p, draft_stride,
    uniforms_stride_b, uniforms_stride_p, num_draws, keep_draw, residual_draw, flag_draw,
    BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    temperature = tl.load(temperature_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    threshold = tl.load(threshold_ptr + row)
    check_temperature = tl.load(check_temperature_ptr + row)
    student_temperature = tl.load(student_temperature_ptr + row)
    student_top_k = tl.load(student_top_k_ptr + row)
    student_top_p = tl.load(student_top_p_ptr + row)
    trials = tl.load(proposal_trials_ptr + row)
    n = tl.minimum(tl.maximum(tl.load(num_draft_ptr + row), 0), num_positions - 1)
    out = row * num_positions
    for i in range(0, num_positions):
        tl.store(tokens_ptr + out + i, -1)
        tl.store(accepted_ptr + out + i, 0)
        tl.store(teacher_logprob_ptr + out + i, float("nan"))
        tl.store(student_logprob_ptr + out + i, float("nan"))

    i = tl.full((), 0, tl.int32)
    going = tl.full((), 1, tl.int32)
    while going != 0:
        teacher_row = teacher_ptr + row * teacher_stride_b + i * teacher_stride_p
        student_row = student_ptr + row * student_stride_b + i * student_stride_p
        uniforms_row = uniforms_ptr + row * uniforms_stride_b + i * uniforms_stride_p
        if i == n:
            token, accepted, t_lp, s_lp = _rsd_step(
                teacher_row, student_row, uniforms_row, proposal_mask_ptr, fallback_mask_ptr, n_teacher, n_student,
                n_vocab, n_vocab, temperature, top_k, top_p, threshold, check_temperature, student_temperature,
                student_top_k, student_top_p, tl.minimum(trials, num_draws - 1), BLOCK, SEARCH_BLOCK, NUM_PIVOTS)
            kept = tl.full((), 0, tl.int32)
        else:
            x = tl.load(draft_ptr + row * draft_stride + i)
            token, accepted, t_lp, s_lp, kept = _verify_draft(
                teacher_row, student_row, uniforms_row, x, proposal_mask_ptr, fallback_mask_ptr, n_teacher,
                n_student, n_vocab, temperature, top_k, top_p, threshold, check_temperature, student_temperature,
                student_top_k, student_top_p, trials, keep_draw, residual_draw, flag_draw, BLOCK, SEARCH_BLOCK,
                NUM_PIVOTS)
        flagged = token < 0
        tl.store(tokens_ptr + out + i, token.to(tl.int64))
        tl.store(accepted_ptr + out + i, tl.where(flagged, 0, accepted).to(tl.int8))
        tl.store(teacher_logprob_ptr + out + i, tl.where(flagged, float("nan"), t_lp))
        tl.store(student_logprob_ptr + out + i, tl.where(flagged, float("nan"), s_lp))
        i += 1
        going = ((kept != 0) & ~flagged & (i < num_positions)).to(tl.int32)
    tl.store(num_emitted_ptr + row, i)


@triton.jit
def sample_tokens_kernel(
    logits_ptr,  # [B, V'] fp32 / bf16 / fp16, row stride stride
    uniforms_ptr,  # [B] fp32
    temperature_ptr,  # [B] fp32
    top_k_ptr,  # [B] int32
    top_p_ptr,  # [B] fp32
    mask_ptr,  # [V] int8
    token_ptr,  # [B] int64 out
    n_logits, n_vocab, stride,
    BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride
    temperature = tl.load(temperature_ptr + row)
    sampled = temperature != 0.0
    temp = tl.where(sampled, temperature, 1.0)
    bad, _m, _norm, _check, lmax, argmax, key_min, n_present, mass = _row_stats(
        logits_row, n_logits, mask_ptr, n_vocab, temp, 1.0, False, BLOCK)
    live = lmax > float("-inf")
    token = argmax
    if sampled & live & (bad == 0):
        tau, n_tie, total = _side_law(logits_row, mask_ptr, n_vocab, temperature, tl.load(top_k_ptr + row),
                                      tl.load(top_p_ptr + row), lmax, key_min, n_present, mass, live, SEARCH_BLOCK,
                                      NUM_PIVOTS)
        token = _inverse_cdf(logits_row, mask_ptr, n_vocab, lmax, temp, tau, n_tie,
                             tl.load(uniforms_ptr + row) * total, BLOCK)
    tl.store(token_ptr + row, tl.where((bad != 0) | ~live, -1, token).to(tl.int64))
