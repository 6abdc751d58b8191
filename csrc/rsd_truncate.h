// Truncated laws (top-k, top-p) and their inverse-CDF draws, without sorting a row. Included once per
// instruction set, inside that build's namespace, after rsd_passes.h (see rsd_sample.cpp).
//
// A strided sample of the weights guesses a floor just below the cut-off; the ids above it are gathered
// (a vector compress) and checked to hold the goal, else a safe floor is used; the exact cut-off is then
// found by radix select over those candidates (rsd_select.h). Draws walk the kept candidates in id order.

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

// Candidates of a cut: every id whose weight key is >= floor, in id order, into ws.cand; returns how many
// and their mass.
static int64_t gather_all(Workspace& ws, int64_t V, uint32_t floor, const Chunks& ch, double* mass) {
    int64_t counts[MAX_THREADS];
    double masses[MAX_THREADS];
    auto offset = [&](int c) { return ch.start(c, V) + (int64_t)c * GATHER_SLACK; };  // room for overshoot
    ch.run(V, [&](int c, int64_t lo, int64_t hi) {
        masses[c] = 0;
        counts[c] = gather(ws.weight.data(), lo, hi, floor, ws.keys.data() + offset(c), ws.ids.data() + offset(c),
                           &masses[c]);
    });
    int64_t n = 0;
    *mass = 0;
    for (int c = 0; c < ch.n; ++c) {
        *mass += masses[c];
        for (int64_t i = offset(c), end = i + counts[c]; i < end; ++i) ws.cand[n++] = Cand{ws.keys[i], ws.ids[i]};
    }
    return n;
}

// Gathers candidates holding the cut-off: at least `goal` of count (or mass) must lie at or above the
// floor. Returns how many; 0 if not even every id with mass reaches the goal.
static int64_t gather_candidates(Workspace& ws, int64_t V, bool by_mass, double goal, double mass, uint32_t safe_floor,
                                 const Chunks& ch) {
    double got = 0;
    const uint32_t guess = estimate_floor(ws, V, by_mass, goal, mass);
    if (guess > safe_floor) {
        const int64_t n = gather_all(ws, V, guess, ch, &got);
        if ((by_mass ? got : (double)n) >= goal) return n;
    }
    const int64_t n = gather_all(ws, V, safe_floor, ch, &got);
    return (by_mass ? got : (double)n) >= goal ? n : 0;
}

// A law ready for draws: every id with mass (block masses in ws.block_mass), or the candidates
// ws.cand[0, n) (in id order) that a cut keeps, with their kept mass per GROUP in ws.group_mass.
struct Law {
    bool all;
    int64_t n;
    Cut cut;
    double total;
};

static Law candidate_law(Workspace& ws, int64_t n, const Cut& cut) {
    const Cand* c = ws.cand.data();
    double total = 0;
    for (int64_t g = 0; g * GROUP < n; ++g) {
        const int64_t lo = g * GROUP, hi = std::min(n, lo + GROUP);
        double a = 0, b = 0, d = 0, e = 0;  // four chains: one running double sum is latency-bound
        int64_t i = lo;
        for (; i + 4 <= hi; i += 4) {
            a += kept_weight(cut, c[i]);
            b += kept_weight(cut, c[i + 1]);
            d += kept_weight(cut, c[i + 2]);
            e += kept_weight(cut, c[i + 3]);
        }
        for (; i < hi; ++i) a += kept_weight(cut, c[i]);
        ws.group_mass[g] = (a + b) + (d + e);
        total += ws.group_mass[g];
    }
    return Law{false, n, cut, total};
}

static Law whole_law(const Workspace& ws, int64_t V) {
    double total = 0;
    for (int64_t b = 0, blocks = (V + BLOCK - 1) / BLOCK; b < blocks; ++b) total += ws.block_mass[b];
    return Law{true, 0, Cut{0, 0}, total};
}

// Candidates a cut keeps, in id order, into out; returns how many and adds their mass to *mass.
static int64_t keep_candidates(const Cand* cand, int64_t n, const Cut& cut, Cand* out, double* mass) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
        out[m] = cand[i];
        m += kept_by(cut, cand[i].key, cand[i].id);
        *mass += kept_weight(cut, cand[i]);
    }
    return m;
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
            const Cut k_cut{kth.key, kth.id};
            if (!p_on) return candidate_law(ws, n, k_cut);
            double k_mass = 0;
            const int64_t m = keep_candidates(cand, n, k_cut, work, &k_mass);
            const Cand last = rank_pick(work, m, true, (double)top_p * k_mass, count, pick_mass);
            return candidate_law(ws, n, Cut{last.key, last.id});
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
    return candidate_law(ws, n, Cut{last.key, last.id});
}

// Inverse CDF in id order: the first id whose cumulative kept mass is >= u * total; -1 if none.
static int64_t draw(const Workspace& ws, int64_t V, const Law& law, float u) {
    const double target = (double)u * law.total;
    if (law.all) return draw_blocks(ws.weight.data(), V, ws.block_mass.data(), target);
    const int64_t groups = (law.n + GROUP - 1) / GROUP;
    double before = 0;
    int64_t g = 0, last_group = -1;
    for (; g < groups; ++g) {
        if (ws.group_mass[g] > 0) {
            last_group = g;
            if (before + ws.group_mass[g] >= target) break;
        }
        before += ws.group_mass[g];
    }
    if (g == groups) {  // rounding left the target past the total: the last kept id
        if (last_group < 0) return -1;
        g = last_group;
        before -= ws.group_mass[g];
    }
    int64_t last = -1;
    for (int64_t i = g * GROUP, end = std::min(law.n, i + GROUP); i < end; ++i) {
        const Cand c = ws.cand[i];
        if (kept_by(law.cut, c.key, c.id)) {
            before += key_value(c.key);
            last = c.id;
            if (before >= target) return c.id;
        }
    }
    return last;
}

