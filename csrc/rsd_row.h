// The RSD step for one row, and the batch driver. Included once per instruction set, inside that build's
// namespace, after rsd_truncate.h (see rsd_sample.cpp for the contract).

// One model's row as the passes see it.
struct RowView {
    const void* logits;
    int dtype;
    int64_t len;           // Vt or Vs
    const uint32_t* mask;  // [V] bit-packed: ids that may be sampled
};

static Stats scan_row(const RowView& x, int64_t V, const Chunks& ch) {
    Stats part[MAX_THREADS];
    ch.run(x.len, [&](int c, int64_t lo, int64_t hi) {
        part[c] = scan_stats_any(x.dtype, x.logits, lo, hi, V, x.mask);
    });
    Stats s = part[0];
    for (int c = 1; c < ch.n; ++c)
        s = Stats{s.bad || part[c].bad, std::max(s.max_full, part[c].max_full),
                  std::max(s.max_masked, part[c].max_masked)};
    return s;
}

// Writes weights into ws for ids < min(hi, V) when the mode asks for them.
static ExpSums exp_row(const RowView& x, int64_t hi, int64_t V, int mode, const ExpArgs& a, Workspace& ws,
                       const Chunks& ch) {
    ExpSums part[MAX_THREADS];
    ch.run(hi, [&](int c, int64_t lo, int64_t end) {
        part[c] = exp_pass_any(mode, x.dtype, x.logits, lo, end, V, x.mask, a, ws.weight.data(), ws.block_mass.data());
    });
    ExpSums s;
    for (int c = 0; c < ch.n; ++c) {
        s.weight += part[c].weight;
        s.full += part[c].full;
        s.check += part[c].check;
    }
    return s;
}

static double log_softmax_at(const RowView& x, const Stats& s, double norm, int64_t i) {
    return (double)logit_at(x.dtype, x.logits, i) - s.max_full - std::log(norm);
}

static void process_row(const Batch& b, int64_t r, Workspace& ws, const Chunks& ch) {
    const int64_t V = b.V;
    const int tsize = b.teacher_dtype == FLOAT32 ? 4 : 2, ssize = b.student_dtype == FLOAT32 ? 4 : 2;
    const RowView teacher{(const char*)b.teacher + r * b.teacher_stride * tsize, b.teacher_dtype, b.Vt,
                          b.proposal_bits};
    const RowView student{(const char*)b.student + r * b.student_stride * ssize, b.student_dtype, b.Vs,
                          b.fallback_bits};
    const float* u = b.uniforms + r * b.uniforms_stride;
    const float temperature = b.temperature[r], check_temperature = b.check_temperature[r];
    const float student_temperature = b.student_temperature[r];
    const int64_t trials = std::max<int64_t>(0, std::min<int64_t>(b.proposal_trials[r], b.num_draws - 1));
    const float inf = __builtin_inff();
    b.accepted[r] = 0;
    b.teacher_logprob[r] = b.student_logprob[r] = __builtin_nanf("");

    // The teacher row: read once for NaN/+inf and maxima, once more (from cache) for every exponential:
    // its log-softmax normaliser and the proposal weights.
    const Stats t = scan_row(teacher, V, ch);
    if (t.bad) {
        b.token[r] = TEACHER_NONFINITE;
        return;
    }
    const bool greedy = temperature == 0.0f;
    const bool proposals = trials > 0 && t.max_masked > -inf;
    const ExpArgs ta{t.max_full, t.max_masked, greedy ? 1.0f : 1.0f / temperature, 1.0f};
    const int tmode = !proposals || greedy                                  ? WANT_FULL
                      : ta.inv_t == 1.0f && t.max_masked == t.max_full ? WANT_WEIGHT | WANT_FULL | SHARE
                                                                        : WANT_WEIGHT | WANT_FULL;
    const ExpSums tsum = exp_row(teacher, b.Vt, V, tmode, ta, ws, ch);

    // The student row the same way: its normaliser and the check softmax's.
    const Stats s = scan_row(student, V, ch);
    if (s.bad) {
        b.token[r] = STUDENT_NONFINITE;
        return;
    }
    const ExpArgs sa{s.max_full, s.max_masked, 1.0f, 1.0f / check_temperature};
    const ExpSums ssum = exp_row(student, b.Vs, V, check_temperature == 1.0f ? WANT_FULL : WANT_FULL | WANT_CHECK, sa,
                                 ws, ch);
    const double check_norm = check_temperature == 1.0f ? ssum.full : ssum.check;

    // Proposals: the first whose check probability reaches the threshold is emitted.
    auto check_ok = [&](int64_t x) {
        const double z = ((double)logit_at(student.dtype, student.logits, x) - s.max_full) / check_temperature;
        return std::exp(z) / check_norm >= (double)b.threshold[r];
    };
    int64_t token = -1;
    if (proposals && greedy) {
        const int64_t x = first_max_any(teacher.dtype, teacher.logits, V, teacher.mask, t.max_masked);
        if (x >= 0 && check_ok(x)) token = x;
    } else if (proposals && tsum.weight > 0) {
        const Law law = truncate_law(ws, V, tsum.weight, b.top_k[r], b.top_p[r], ch);
        for (int64_t k = 0; k < trials && token < 0; ++k) {
            const int64_t x = draw(ws, V, law, u[1 + k]);
            if (x >= 0 && check_ok(x)) token = x;
        }
    }
    b.accepted[r] = token >= 0;

    // Fallback, only when every proposal was rejected: the student writes the token itself.
    if (token < 0 && s.max_masked > -inf) {
        if (student_temperature == 0.0f) {
            token = first_max_any(student.dtype, student.logits, V, student.mask, s.max_masked);
        } else {
            const ExpArgs fa{s.max_full, s.max_masked, 1.0f / student_temperature, 1.0f};
            const double mass = exp_row(student, V, V, WANT_WEIGHT, fa, ws, ch).weight;
            if (mass > 0)
                token = draw(ws, V, truncate_law(ws, V, mass, b.student_top_k[r], b.student_top_p[r], ch), u[0]);
        }
    }
    if (token < 0) {  // no id the student may write has a finite logit
        b.token[r] = NO_ALLOWED_TOKEN;
        return;
    }
    b.token[r] = token;
    b.teacher_logprob[r] = (float)log_softmax_at(teacher, t, tsum.full, token);
    b.student_logprob[r] = (float)log_softmax_at(student, s, ssum.full, token);
}

// Rows in parallel, one thread each; with fewer rows than threads, each row is split across all threads.
static void run_batch(const Batch& b, int num_threads) {
    if (b.B <= 0) return;
    num_threads = std::max(1, std::min(num_threads, MAX_THREADS));
    const int64_t len = std::max(b.Vt, b.Vs);
    if (b.B < num_threads && len >= 16 * BLOCK) {
        Workspace& ws = thread_workspace();
        ws.reserve(b.V);
        const Chunks ch{num_threads};
        for (int64_t r = 0; r < b.B; ++r) process_row(b, r, ws, ch);
        return;
    }
    const int threads = (int)std::min<int64_t>(num_threads, b.B);
    const bool parallel = threads > 1 && b.B * len >= 65536;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (parallel)
    for (int64_t r = 0; r < b.B; ++r) {
        Workspace& ws = thread_workspace();
        ws.reserve(b.V);
        process_row(b, r, ws, Chunks{1});
    }
}
