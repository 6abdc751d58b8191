// Single-model sampling and the verify step of exact speculative RSD: the C++ twins of
// rsd_engine/sampling/sample_reference.py and verify_reference.py (those docstrings are the contracts).
// Included once per instruction set, inside that build's namespace, after rsd_row.h.
//
// Both reuse the fused sampler's machinery: a row's truncated law is its exponentials in a workspace plus
// the cut that truncate_law finds (rsd_truncate.h), so qT(y) and qS(y) of any one id cost a lookup. At a
// draft position the RSD law Q = qT·ok·c + r^K·qS is never written out: r sums qT over the teacher's kept
// ids that fail the check, and the residual max(0, Q - qS) = max(0, qT·ok·c - (1 - r^K)·qS) is positive
// only on those kept ids, so a rejection walks them alone. The bonus position is process_row itself.

// The student's row needs a workspace of its own while the teacher's law sits in the thread's main one.
static Workspace& student_workspace() {
    static thread_local Workspace ws;
    return ws;
}

// A truncated law over a workspace's weights, or the argmax when the temperature is 0.
struct RowLaw {
    bool greedy = true;
    int64_t argmax = -1;  // greedy: the one id (-1: the mask leaves no finite logit)
    Law law{true, 0, Cut{0, 0}, 0.0};
    const Workspace* ws = nullptr;

    bool empty() const { return greedy ? argmax < 0 : !(law.total > 0); }
    // The normalised probability of id y (< V).
    double prob(int64_t y) const {
        if (greedy) return y == argmax ? 1.0 : 0.0;
        const float w = ws->weight[y];
        if (!(w > 0) || !(law.total > 0)) return 0.0;
        return law.all || kept_by(law.cut, weight_key(w), (uint32_t)y) ? (double)w / law.total : 0.0;
    }
    // Calls f(y, prob) for every kept id, in id order.
    template <class F>
    void for_each(int64_t V, F&& f) const {
        if (greedy) {
            if (argmax >= 0) f(argmax, 1.0);
        } else if (law.total > 0 && law.all) {
            for (int64_t y = 0; y < V; ++y)
                if (ws->weight[y] > 0) f(y, (double)ws->weight[y] / law.total);
        } else if (law.total > 0) {
            for (int64_t j = 0; j < law.n; ++j) {
                const Cand c = ws->cand[j];
                if (kept_by(law.cut, c.key, c.id)) f((int64_t)c.id, (double)key_value(c.key) / law.total);
            }
        }
    }
    int64_t sample(int64_t V, float u) const { return greedy ? argmax : law.total > 0 ? draw(*ws, V, law, u) : -1; }
};

// truncate(softmax(x / t) on x.mask, top_k, top_p) into ws. With full != nullptr the same pass also sums the
// row's temperature-1 normaliser (for log-probs) into *full.
static RowLaw row_law(const RowView& x, const Stats& s, int64_t V, float t, int32_t top_k, float top_p,
                      Workspace& ws, const Chunks& ch, double* full = nullptr) {
    RowLaw q;
    q.ws = &ws;
    const bool any = s.max_masked > -__builtin_inff();
    if (t == 0.0f || !any) {
        if (any) q.argmax = first_max_any(x.dtype, x.logits, V, x.mask, s.max_masked);
        if (full) *full = exp_row(x, x.len, V, WANT_FULL, ExpArgs{s.max_full, s.max_masked, 1.0f, 1.0f}, ws, ch).full;
        return q;
    }
    q.greedy = false;
    const ExpArgs a{s.max_full, s.max_masked, 1.0f / t, 1.0f};
    const int mode = !full ? WANT_WEIGHT
                     : a.inv_t == 1.0f && s.max_masked == s.max_full ? WANT_WEIGHT | WANT_FULL | SHARE
                                                                      : WANT_WEIGHT | WANT_FULL;
    const ExpSums sums = exp_row(x, full ? x.len : V, V, mode, a, ws, ch);
    if (full) *full = sums.full;
    if (sums.weight > 0) q.law = truncate_law(ws, V, sums.weight, top_k, top_p, ch);
    return q;
}

// ---- sample_tokens ----

static void sample_row(const SampleBatch& b, int64_t r, Workspace& ws, const Chunks& ch) {
    const int size = b.dtype == FLOAT32 ? 4 : 2;
    const RowView x{(const char*)b.logits + r * b.stride * size, b.dtype, b.len, b.mask_bits};
    const Stats s = scan_row(x, b.V, ch);
    int64_t token = -1;
    if (!s.bad) token = row_law(x, s, b.V, b.temperature[r], b.top_k[r], b.top_p[r], ws, ch).sample(b.V, b.uniforms[r]);
    b.token[r] = token < 0 ? -1 : token;
}

// Rows in parallel, one thread each; with fewer rows than threads, each row is split across all threads.
template <class F>
static void for_rows(int64_t B, int64_t len, int num_threads, F&& row) {
    if (B <= 0) return;
    num_threads = std::max(1, std::min(num_threads, MAX_THREADS));
    if (B < num_threads && len >= 16 * BLOCK) {
        for (int64_t r = 0; r < B; ++r) row(r, Chunks{num_threads});
        return;
    }
    const int threads = (int)std::min<int64_t>(num_threads, B);
    const bool parallel = threads > 1 && B * len >= 65536;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (parallel)
    for (int64_t r = 0; r < B; ++r) row(r, Chunks{1});
}

static void run_sample_batch(const SampleBatch& b, int num_threads) {
    for_rows(b.B, b.len, num_threads, [&](int64_t r, const Chunks& ch) {
        Workspace& ws = thread_workspace();
        ws.reserve(b.V);
        sample_row(b, r, ws, ch);
    });
}

// ---- rsd_verify ----

struct Emitted {
    int64_t token;
    bool accepted;
    bool kept;  // a draft was kept: the round goes on
    float teacher_logprob, student_logprob;
};

// Keep test, residual and posterior flag at one draft position (verify_reference.py, the i < num_draft case).
static Emitted verify_draft(const VerifyBatch& b, int64_t r, const RowView& teacher, const RowView& student,
                            int64_t x, const float* u, Workspace& wt, Workspace& ws, const Chunks& ch) {
    const int64_t V = b.V;
    const float nan = __builtin_nanf("");
    Emitted out{TEACHER_NONFINITE, false, false, nan, nan};
    const Stats t = scan_row(teacher, V, ch);
    if (t.bad) return out;
    const Stats s = scan_row(student, V, ch);
    if (s.bad) {
        out.token = STUDENT_NONFINITE;
        return out;
    }
    // K as the bonus position's plain step takes it, at most num_draws - 1: one law for a whole round.
    const int64_t trials = std::max<int64_t>(0, std::min<int64_t>(b.proposal_trials[r], b.num_draws - 1));
    Stats proposals = t;
    if (trials == 0) proposals.max_masked = -__builtin_inff();  // no proposal at all: an empty qT, r = 1
    double t_full = 0;
    const RowLaw qt = row_law(teacher, proposals, V, b.temperature[r], b.top_k[r], b.top_p[r], wt, ch, &t_full);
    // The student's normalisers: at check_temperature 1 the check's is the log-softmax's, summed in the pass
    // that writes the fallback weights; otherwise one pass sums both first.
    const float check_temperature = b.check_temperature[r];
    double s_full = 0, check_norm = 0;
    RowLaw qs;
    if (check_temperature == 1.0f) {
        qs = row_law(student, s, V, b.student_temperature[r], b.student_top_k[r], b.student_top_p[r], ws, ch, &s_full);
        check_norm = s_full;
    } else {
        const ExpSums sn = exp_row(student, b.Vs, V, WANT_FULL | WANT_CHECK,
                                   ExpArgs{s.max_full, s.max_masked, 1.0f, 1.0f / check_temperature}, ws, ch);
        s_full = sn.full;
        check_norm = sn.check;
        qs = row_law(student, s, V, b.student_temperature[r], b.student_top_k[r], b.student_top_p[r], ws, ch);
    }
    if (qs.empty()) {  // the student could not have drafted here
        out.token = NO_ALLOWED_TOKEN;
        return out;
    }
    const double threshold = b.threshold[r];
    // The check of rsd_sample, softmax(lS / check_temperature)[y] >= threshold in double, is monotone in the
    // logit: it holds above the logit `cut`. Only logits within far more than double rounding of it pay
    // for the exact test (a truncated teacher keeps tens of thousands of ids on a flat row).
    const double cut = s.max_full + check_temperature * std::log(threshold * check_norm);
    const double margin = std::isfinite(cut) ? 1e-6 * (1.0 + std::fabs(cut)) : 0.0;
    auto ok = [&](int64_t y) {
        const double l = logit_at(student.dtype, student.logits, y);
        if (l > cut + margin) return true;
        if (l < cut - margin) return false;
        return std::exp((l - s.max_full) / check_temperature) / check_norm >= threshold;
    };

    double rejected = qt.empty() ? 1.0 : 0.0;  // r: the teacher's mass that fails the check
    qt.for_each(V, [&](int64_t y, double p) { rejected += ok(y) ? 0.0 : p; });
    const double r_k = std::pow(rejected, (double)trials);
    const double c = rejected < 1.0 ? (1.0 - r_k) / (1.0 - rejected) : (double)trials;  // 1 + r + ... + r^(K-1)
    auto teacher_part = [&](int64_t y) {
        const double p = qt.prob(y);
        return p > 0 && ok(y) ? p * c : 0.0;
    };
    auto law = [&](int64_t y) { return teacher_part(y) + r_k * qs.prob(y); };

    const bool in_range = x >= 0 && x < V;
    const double q_x = in_range ? law(x) : 0.0, qs_x = in_range ? qs.prob(x) : 0.0;
    int64_t y = x;
    out.kept = q_x > 0 && (double)u[b.keep_draw] * qs_x <= q_x;
    if (!out.kept) {
        // The residual max(0, Q - qS), by inverse CDF in id order over the teacher's kept ids.
        auto residual = [&](int64_t z, double p) {
            const double tp = p > 0 && ok(z) ? p * c : 0.0;
            return std::max(0.0, tp - (1.0 - r_k) * qs.prob(z));
        };
        double total = 0;
        qt.for_each(V, [&](int64_t z, double p) { total += residual(z, p); });
        const double target = (double)u[b.residual_draw] * total;
        double before = 0;
        int64_t pick = -1, last = -1;
        if (total > 0) {
            qt.for_each(V, [&](int64_t z, double p) {
                const double w = pick < 0 ? residual(z, p) : 0.0;
                if (w > 0) {
                    before += w;
                    last = z;
                    if (before >= target) pick = z;
                }
            });
        } else {  // rounding left no residual: draw from Q itself
            for (int64_t z = 0; z < V; ++z) total += law(z);
            const double target_q = (double)u[b.residual_draw] * total;
            for (int64_t z = 0; z < V && pick < 0; ++z) {
                const double w = law(z);
                if (w > 0) {
                    before += w;
                    last = z;
                    if (before >= target_q) pick = z;
                }
            }
        }
        y = pick >= 0 ? pick : last;
        if (y < 0) {  // Q has no mass at all (cannot happen while qS has some)
            out.token = NO_ALLOWED_TOKEN;
            return out;
        }
    }
    const double tp = teacher_part(y);
    out.token = y;
    out.accepted = tp > 0 && (double)u[b.flag_draw] * law(y) <= tp;
    out.teacher_logprob = (float)log_softmax_at(teacher, t, t_full, y);
    out.student_logprob = (float)log_softmax_at(student, s, s_full, y);
    return out;
}

static void verify_row(const VerifyBatch& b, int64_t r, Workspace& wt, Workspace& ws, const Chunks& ch) {
    const int64_t P = b.P;
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(b.num_draft[r], P - 1));
    const int tsize = b.teacher_dtype == FLOAT32 ? 4 : 2, ssize = b.student_dtype == FLOAT32 ? 4 : 2;
    for (int64_t i = 0; i < P; ++i) {
        b.tokens[r * P + i] = -1;
        b.accepted[r * P + i] = 0;
        b.teacher_logprob[r * P + i] = b.student_logprob[r * P + i] = __builtin_nanf("");
    }
    int64_t i = 0;
    for (; i < P; ++i) {
        const void* trow = (const char*)b.teacher + (r * b.teacher_stride_b + i * b.teacher_stride_p) * tsize;
        const void* srow = (const char*)b.student + (r * b.student_stride_b + i * b.student_stride_p) * ssize;
        const float* u = b.uniforms + r * b.uniforms_stride_b + i * b.uniforms_stride_p;
        Emitted e;
        if (i == n) {  // every draft kept: the bonus token is a plain RSD step at this position
            uint8_t accepted = 0;
            const Batch plain{1, trow, 0, b.Vt, b.teacher_dtype, srow, 0, b.Vs, b.student_dtype, u, 0, b.num_draws,
                              b.temperature + r, b.top_k + r, b.top_p + r, b.threshold + r, b.check_temperature + r,
                              b.student_temperature + r, b.student_top_k + r, b.student_top_p + r,
                              b.proposal_trials + r, b.proposal_mask, b.fallback_mask, b.proposal_bits,
                              b.fallback_bits, b.V, &e.token, &accepted, &e.teacher_logprob, &e.student_logprob};
            process_row(plain, 0, wt, ch);
            e.accepted = accepted != 0;
            e.kept = false;
        } else {
            const RowView teacher{trow, b.teacher_dtype, b.Vt, b.proposal_bits};
            const RowView student{srow, b.student_dtype, b.Vs, b.fallback_bits};
            e = verify_draft(b, r, teacher, student, b.draft[r * b.draft_stride + i], u, wt, ws, ch);
        }
        b.tokens[r * P + i] = e.token;
        b.accepted[r * P + i] = e.token >= 0 && e.accepted;
        if (e.token >= 0) {
            b.teacher_logprob[r * P + i] = e.teacher_logprob;
            b.student_logprob[r * P + i] = e.student_logprob;
        }
        if (!e.kept || e.token < 0) break;
    }
    b.num_emitted[r] = (int32_t)std::min<int64_t>(i + 1, P);
}

static void run_verify_batch(const VerifyBatch& b, int num_threads) {
    for_rows(b.B, std::max(b.Vt, b.Vs) * b.P, num_threads, [&](int64_t r, const Chunks& ch) {
        Workspace& wt = thread_workspace();
        Workspace& ws = student_workspace();
        wt.reserve(b.V);
        ws.reserve(b.V);
        verify_row(b, r, wt, ws, ch);
    });
}
