// The RSD step for one row, and the batch driver. Included once per instruction set, inside that build's
// namespace, after rsd_passes.h (see rsd_sample.cpp for the contract).

// Splits a row into BLOCK-aligned chunks, one per thread (n == 1: the calling thread does it all).
struct Chunks {
    int n;
    int64_t start(int c, int64_t len) const {
        const int64_t step = ((len + n - 1) / n + BLOCK - 1) / BLOCK * BLOCK;
        return std::min(len, c * step);
    }
    template <class F>
    void run(int64_t len, F&& f) const {
        if (n == 1) {
            f(0, int64_t(0), len);
            return;
        }
#pragma omp parallel for num_threads(n) schedule(static, 1)
        for (int c = 0; c < n; ++c) f(c, start(c, len), start(c + 1, len));
    }
};

// Where to start gathering truncation candidates: a key below the cut-off, estimated from a strided
// sample of the weights (the cut-off of a 150k-id row usually sits among its top few hundred ids, so
// gathering from a near guess instead of a safe bound saves most of the work). Mass goals are estimated
// through the tail below a threshold, which many small weights make reliable even when a few ids the
// sample missed hold most of the mass. The caller checks the guess and falls back to a safe floor.
static uint32_t estimate_floor(Workspace& ws, int64_t V, bool by_mass, double goal, double mass) {
    const int64_t stride = std::max<int64_t>(1, V / 4096);
    uint32_t* count = ws.pick_count.data();
    double* sampled = ws.pick_mass.data();
    std::fill(count, count + KEY_BUCKETS, 0u);
    std::fill(sampled, sampled + KEY_BUCKETS, 0.0);
    double sampled_total = 0;
    for (int64_t i = stride / 2; i < V; i += stride) {
        const float w = ws.weight[i];
        count[weight_key(w) >> 20]++;
        sampled[weight_key(w) >> 20] += w;
        sampled_total += w;
    }
    const double scale = (double)stride;
    double above_count = 0, above_mass = 0;
    for (int64_t b = KEY_BUCKETS - 1; b >= 1; --b) {
        above_count += count[b];
        above_mass += sampled[b];
        const bool enough = by_mass ? mass - scale * (sampled_total - above_mass) >= goal + 0.5 * (mass - goal)
                                    : scale * above_count >= 2 * goal + 8 * scale;
        if (enough) return (uint32_t)std::max<int64_t>(1, b - 2) << 20;
    }
    return 1;
}

// Candidates of a cut: every id whose weight key is >= floor, in id order, into ws.cand; returns how many.
static int64_t gather_all(Workspace& ws, int64_t V, uint32_t floor, const Chunks& ch) {
    int64_t counts[MAX_THREADS];
    auto offset = [&](int c) { return ch.start(c, V) + (int64_t)c * GATHER_SLACK; };  // room for overshoot
    ch.run(V, [&](int c, int64_t lo, int64_t hi) {
        counts[c] = gather(ws.weight.data(), lo, hi, floor, ws.keys.data() + offset(c), ws.ids.data() + offset(c));
    });
    int64_t n = 0;
    for (int c = 0; c < ch.n; ++c)
        for (int64_t i = offset(c), end = i + counts[c]; i < end; ++i) ws.cand[n++] = Cand{ws.keys[i], ws.ids[i]};
    return n;
}

static double candidate_mass(const Cand* c, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; ++i) m += key_value(c[i].key);
    return m;
}

// Gathers candidates holding the cut-off: at least `goal` of count (or mass) must lie at or above the
// floor. Returns how many; 0 if not even every id with mass reaches the goal.
static int64_t gather_candidates(Workspace& ws, int64_t V, bool by_mass, double goal, double mass, uint32_t safe_floor,
                                 const Chunks& ch) {
    const uint32_t guess = estimate_floor(ws, V, by_mass, goal, mass);
    if (guess > safe_floor) {
        const int64_t n = gather_all(ws, V, guess, ch);
        if (by_mass ? candidate_mass(ws.cand.data(), n) >= goal : n >= goal) return n;
    }
    const int64_t n = gather_all(ws, V, safe_floor, ch);
    return (by_mass ? candidate_mass(ws.cand.data(), n) >= goal : n >= goal) ? n : 0;
}

// A law ready for draws: every id with mass (block masses in ws.block_mass), or the kept ids in id
// order in ws.cand[0, kept) with their running mass in ws.running.
struct Law {
    bool all;
    int64_t kept;
    double total;
};

// Keeps, in id order, the candidates a cut keeps, with their running mass.
static Law kept_law(Workspace& ws, int64_t n, const Cut& cut) {
    int64_t m = 0;
    double run = 0;
    for (int64_t i = 0; i < n; ++i) {
        const Cand c = ws.cand[i];
        if (kept_by(cut, c.key, c.id)) {
            run += key_value(c.key);
            ws.cand[m] = c;
            ws.running[m++] = run;
        }
    }
    return Law{false, m, run};
}

static Law whole_law(const Workspace& ws, int64_t V) {
    double total = 0;
    for (int64_t b = 0, blocks = (V + BLOCK - 1) / BLOCK; b < blocks; ++b) total += ws.block_mass[b];
    return Law{true, 0, total};
}

// truncate(weights, top_k, top_p) as in the reference: top-k keeps the k best ranked, top-p then keeps
// an id iff the mass ranked before it is < top_p * (mass top-k kept). The cut-offs are found on copies
// (rank_pick reorders), so ws.cand stays in id order for the draws.
static Law truncate_law(Workspace& ws, int64_t V, double mass, int32_t top_k, float top_p, const Chunks& ch) {
    const bool p_on = top_p < 1.0f;
    const bool k_on = top_k > 0 && top_k < V;
    uint32_t* count = ws.pick_count.data();
    double* pick_mass = ws.pick_mass.data();
    Cand *cand = ws.cand.data(), *work = ws.cand2.data();
    if (k_on) {
        const int64_t n = gather_candidates(ws, V, false, (double)top_k, mass, 1, ch);
        if (n > 0) {  // else fewer than k ids have mass: top-k keeps them all
            std::memcpy(work, cand, n * sizeof(Cand));
            const Cand kth = rank_pick(work, n, false, (double)top_k, count, pick_mass);
            const Law top = kept_law(ws, n, Cut{kth.key, kth.id});
            if (!p_on) return top;
            std::memcpy(work, cand, top.kept * sizeof(Cand));
            const Cand last = rank_pick(work, top.kept, true, (double)top_p * top.total, count, pick_mass);
            return kept_law(ws, top.kept, Cut{last.key, last.id});
        }
    }
    if (!p_on) return whole_law(ws, V);
    // Ids below this floor weigh at most V * floor < (1 - top_p) * mass together, so the cut lies above it.
    const float floor = (float)((1.0 - top_p) * mass / (double)V * 0.999);
    const double goal = (double)top_p * mass;
    const int64_t n = gather_candidates(ws, V, true, goal, mass, std::max(weight_key(floor), 1u), ch);
    if (n == 0) return whole_law(ws, V);
    std::memcpy(work, cand, n * sizeof(Cand));
    const Cand last = rank_pick(work, n, true, goal, count, pick_mass);
    return kept_law(ws, n, Cut{last.key, last.id});
}

// Inverse CDF in id order: the first id whose cumulative kept mass is >= u * total; -1 if none.
static int64_t draw(const Workspace& ws, int64_t V, const Law& law, float u) {
    const double target = (double)u * law.total;
    if (!law.all) {
        if (law.kept == 0) return -1;
        const double* run = ws.running.data();
        const int64_t i = std::lower_bound(run, run + law.kept, target) - run;
        return ws.cand[std::min(i, law.kept - 1)].id;
    }
    return draw_blocks(ws.weight.data(), V, ws.block_mass.data(), target);
}

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
        b.token[r] = -1;
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
        b.token[r] = -2;
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
    if (token < 0) {  // no id the student may write has any mass
        b.token[r] = -2;
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
