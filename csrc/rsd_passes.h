// The vectorised passes over one row of the fused RSD sampler. Included once per instruction set, inside
// that build's namespace, after rsd_simd.h (see rsd_sample.cpp). Every pass takes an id range [lo, hi)
// starting on a BLOCK boundary, so a row can be split across threads.

constexpr int64_t SUB = 128;  // float lanes add this many ids before widening to double (sums stay ~1e-7 exact)

struct Stats {
    bool bad;          // NaN or +inf anywhere
    float max_full;    // max over the whole range
    float max_masked;  // max over ids < V allowed by the mask
};

// Four independent accumulators: a running max is a dependency chain, and one chain is latency-bound.
template <class L, bool MASKED>
static inline void stats_span(const typename L::raw* x, const uint32_t* mask, int64_t i0, int64_t i1, vi* bad,
                              vf* max_full, vf* max_masked) {
    const vf inf = vset(__builtin_inff());
    auto lanes = [&](int a, vf v, vi m) {
        bad[a] |= (v != v) | (v == inf);
        max_full[a] = v > max_full[a] ? v : max_full[a];
        if (MASKED) {
            const vf w = m ? v : -inf;
            max_masked[a] = w > max_masked[a] ? w : max_masked[a];
        }
    };
    int64_t i = i0;
    for (; i + 4 * VW <= i1; i += 4 * VW)
        for (int a = 0; a < 4; ++a)
            lanes(a, L::load(x + i + a * VW), MASKED ? vmask(mask, i + a * VW) : vi{});
    for (; i + VW <= i1; i += VW) lanes(0, L::load(x + i), MASKED ? vmask(mask, i) : vi{});
    if (i < i1) lanes(0, load_tail<L>(x + i, i1 - i), MASKED ? vmask_tail(mask, i, i1 - i) : vi{});
}

template <class L>
static Stats scan_stats(const typename L::raw* x, int64_t lo, int64_t hi, int64_t V, const uint32_t* mask) {
    vi bad[4] = {vi{}, vi{}, vi{}, vi{}};
    vf max_full[4], max_masked[4];
    for (int a = 0; a < 4; ++a) max_full[a] = max_masked[a] = vset(-__builtin_inff());
    const int64_t mid = std::max(lo, std::min(V, hi));
    stats_span<L, true>(x, mask, lo, mid, bad, max_full, max_masked);
    stats_span<L, false>(x, mask, mid, hi, bad, max_full, max_masked);
    Stats s{any_lane(bad[0] | bad[1] | bad[2] | bad[3]), -__builtin_inff(), -__builtin_inff()};
    for (int a = 0; a < 4; ++a) {
        s.max_full = std::max(s.max_full, hmax(max_full[a]));
        s.max_masked = std::max(s.max_masked, hmax(max_masked[a]));
    }
    return s;
}

enum : int { WANT_WEIGHT = 1, WANT_FULL = 2, WANT_CHECK = 4, SHARE = 8 };

struct ExpArgs {
    float max_full;    // of the whole row
    float max_masked;  // of the ids that get a weight
    float inv_t;       // 1 / temperature of the weights
    float inv_check;   // 1 / check_temperature
};

struct ExpSums {
    double weight = 0;  // sum of the weights written
    double full = 0;    // sum exp(x - max_full): the log-softmax normaliser at temperature 1
    double check = 0;   // sum exp((x - max_full) / check_temperature)
};

template <int MODE, bool WEIGHTED>
static inline void exp_lanes(vf v, vi m, const ExpArgs& a, float* weight, int64_t n, vf& w, vf& f, vf& c) {
    vf full = vf{};
    if (MODE & (WANT_FULL | SHARE)) full = vexp(v - a.max_full);
    if (MODE & WANT_FULL) f += full;
    if (MODE & WANT_CHECK) c += vexp((v - a.max_full) * a.inv_check);
    if (WEIGHTED) {
        vf e = (MODE & SHARE) ? full : vexp((v - a.max_masked) * a.inv_t);
        e = m ? e : vset(0.0f);
        if (n == VW)
            vstore(weight, e);
        else
            vstore_tail(weight, e, n);
        w += e;
    }
}

template <class L, int MODE, bool WEIGHTED>
static inline void exp_span(const typename L::raw* x, const uint32_t* mask, int64_t i0, int64_t i1,
                            const ExpArgs& a, float* weight, vd& wd, vd& fd, vd& cd) {
    for (int64_t s0 = i0; s0 < i1; s0 += SUB) {
        const int64_t s1 = std::min(s0 + SUB, i1);
        vf w = vf{}, f = vf{}, c = vf{};
        int64_t i = s0;
        for (; i + VW <= s1; i += VW)
            exp_lanes<MODE, WEIGHTED>(L::load(x + i), WEIGHTED ? vmask(mask, i) : vi{}, a, weight + i, VW, w, f, c);
        if (i < s1)
            exp_lanes<MODE, WEIGHTED>(load_tail<L>(x + i, s1 - i), WEIGHTED ? vmask_tail(mask, i, s1 - i) : vi{},
                                      a, weight + i, s1 - i, w, f, c);
        if (WEIGHTED) wd += widen(w);
        if (MODE & WANT_FULL) fd += widen(f);
        if (MODE & WANT_CHECK) cd += widen(c);
    }
}

// One pass of exponentials over [lo, hi): the row's normalisers and, for ids < V, the weights
// mask ? exp((x - max_masked) / t) : 0 (an unnormalised softmax) with their mass per block.
template <class L, int MODE>
static ExpSums exp_pass(const typename L::raw* x, int64_t lo, int64_t hi, int64_t V, const uint32_t* mask,
                        const ExpArgs& a, float* weight, double* block_mass) {
    ExpSums s;
    vd fd = vd{}, cd = vd{};
    constexpr bool NORMALISERS = (MODE & (WANT_FULL | WANT_CHECK)) != 0;
    for (int64_t b0 = lo; b0 < hi; b0 += BLOCK) {
        const int64_t b1 = std::min(b0 + BLOCK, hi);
        vd wd = vd{};
        int64_t wend = b0;
        if ((MODE & WANT_WEIGHT) && b0 < V) {
            wend = std::min(b1, V);
            exp_span<L, MODE, true>(x, mask, b0, wend, a, weight, wd, fd, cd);
            block_mass[b0 / BLOCK] = hsum(wd);
            s.weight += block_mass[b0 / BLOCK];
        }
        if (NORMALISERS) exp_span<L, MODE, false>(x, mask, wend, b1, a, weight, wd, fd, cd);
    }
    s.full = hsum(fd);
    s.check = hsum(cd);
    return s;
}

// First id < V allowed by the mask whose logit equals m (argmax, ties to the lowest id).
template <class L>
static int64_t first_max(const typename L::raw* x, int64_t V, const uint32_t* mask, float m) {
    const vf mv = vset(m);
    int64_t i = 0;
    for (; i + VW <= V; i += VW) {
        const uint32_t hit = lane_bits(vmask(mask, i) & (L::load(x + i) == mv));
        if (hit) return i + __builtin_ctz(hit);
    }
    for (; i < V; ++i)
        if ((mask[i >> 5] >> (i & 31) & 1) && L::one(x + i) == m) return i;
    return -1;
}

#if VW == 8 && defined(RSD_ISA_AVX2)
// For each 8-bit lane mask, the lane indices of its set bits first: a compress for vpermd.
struct CompressTable {
    alignas(32) int32_t perm[256][8];
    CompressTable() {
        for (int m = 0; m < 256; ++m) {
            int n = 0;
            for (int j = 0; j < 8; ++j)
                if (m >> j & 1) perm[m][n++] = j;
            while (n < 8) perm[m][n++] = 0;
        }
    }
};
static const CompressTable compress_table;
#endif

// Stores the lanes of k and id whose bit is set in m, packed, at keys / ids; returns how many. Branch-free
// where the ISA has a compress (a branch per vector mispredicts on every other vector when a few percent of
// ids qualify); may write up to VW entries past the count.
static inline int compress_store(vi k, vi id, uint32_t m, uint32_t* keys, uint32_t* ids) {
    const int count = __builtin_popcount(m);
#if VW == 16 && defined(RSD_ISA_AVX512)
    _mm512_storeu_si512(keys, _mm512_maskz_compress_epi32((__mmask16)m, (__m512i)k));
    _mm512_storeu_si512(ids, _mm512_maskz_compress_epi32((__mmask16)m, (__m512i)id));
#elif VW == 8 && defined(RSD_ISA_AVX2)
    const __m256i perm = _mm256_load_si256((const __m256i*)compress_table.perm[m]);
    _mm256_storeu_si256((__m256i*)keys, _mm256_permutevar8x32_epi32((__m256i)k, perm));
    _mm256_storeu_si256((__m256i*)ids, _mm256_permutevar8x32_epi32((__m256i)id, perm));
#else
    for (int n = 0; m; m &= m - 1, ++n) {
        keys[n] = (uint32_t)k[__builtin_ctz(m)];
        ids[n] = (uint32_t)id[__builtin_ctz(m)];
    }
#endif
    return count;
}

// Ids in [lo, hi) whose weight key is >= tau (>= 1), in id order, as keys[] / ids[]; returns how many and
// adds their mass to *mass.
static int64_t gather(const float* weight, int64_t lo, int64_t hi, uint32_t tau, uint32_t* keys, uint32_t* ids,
                      double* mass) {
    const vi t = vseti((int32_t)tau);
    vi id;
    for (int j = 0; j < VW; ++j) id[j] = (int32_t)lo + j;
    vd total = vd{};
    int64_t n = 0, i = lo;
    while (i + VW <= hi) {
        const int64_t end = i + std::min<int64_t>(SUB, (hi - i) / VW * VW);
        vf sub = vf{};
        for (; i < end; i += VW, id += VW) {
            const vf v = vload(weight + i);
            const vi hit = as_int(v) >= t;
            sub += hit ? v : vset(0.0f);
            n += compress_store(as_int(v), id, lane_bits(hit), keys + n, ids + n);
        }
        total += widen(sub);
    }
    double tail = 0;
    for (; i < hi; ++i) {
        const uint32_t k = weight_key(weight[i]);
        if (k >= tau) {
            keys[n] = k;
            ids[n++] = (uint32_t)i;
            tail += weight[i];
        }
    }
    *mass += hsum(total) + tail;
    return n;
}

// Inverse CDF over every id with mass: walks the block masses, then one block; -1 if no mass.
static int64_t draw_blocks(const float* weight, int64_t V, const double* block_mass, double target) {
    const int64_t blocks = (V + BLOCK - 1) / BLOCK;
    double before = 0;
    int64_t b = 0, last_block = -1;
    for (; b < blocks; ++b) {
        if (block_mass[b] > 0) {
            last_block = b;
            if (before + block_mass[b] >= target) break;
        }
        before += block_mass[b];
    }
    if (b == blocks) {  // rounding left the target past the total: the last id with mass
        if (last_block < 0) return -1;
        b = last_block;
        before -= block_mass[b];
    }
    int64_t last = -1;
    for (int64_t i = b * BLOCK, end = std::min(V, i + BLOCK); i < end; ++i) {
        if (weight[i] > 0) {
            before += weight[i];
            last = i;
            if (before >= target) return i;
        }
    }
    return last;
}

// Runtime dtype -> loader.
template <class F>
static inline void with_loader(int dtype, F&& f) {
    if (dtype == FLOAT32)
        f(LoadF32{});
    else if (dtype == BFLOAT16)
        f(LoadBF16{});
    else
        f(LoadF16{});
}

static Stats scan_stats_any(int dtype, const void* row, int64_t lo, int64_t hi, int64_t V, const uint32_t* mask) {
    Stats s{false, -__builtin_inff(), -__builtin_inff()};
    with_loader(dtype, [&](auto tag) {
        using L = decltype(tag);
        s = scan_stats<L>((const typename L::raw*)row, lo, hi, V, mask);
    });
    return s;
}

static ExpSums exp_pass_any(int mode, int dtype, const void* row, int64_t lo, int64_t hi, int64_t V,
                            const uint32_t* mask, const ExpArgs& a, float* weight, double* block_mass) {
    ExpSums s;
    with_loader(dtype, [&](auto tag) {
        using L = decltype(tag);
        auto x = (const typename L::raw*)row;
        switch (mode) {
            case WANT_FULL: s = exp_pass<L, WANT_FULL>(x, lo, hi, V, mask, a, weight, block_mass); break;
            case WANT_FULL | WANT_CHECK:
                s = exp_pass<L, WANT_FULL | WANT_CHECK>(x, lo, hi, V, mask, a, weight, block_mass);
                break;
            case WANT_WEIGHT: s = exp_pass<L, WANT_WEIGHT>(x, lo, hi, V, mask, a, weight, block_mass); break;
            case WANT_WEIGHT | WANT_FULL:
                s = exp_pass<L, WANT_WEIGHT | WANT_FULL>(x, lo, hi, V, mask, a, weight, block_mass);
                break;
            default:
                s = exp_pass<L, WANT_WEIGHT | WANT_FULL | SHARE>(x, lo, hi, V, mask, a, weight, block_mass);
                break;
        }
    });
    return s;
}

static int64_t first_max_any(int dtype, const void* row, int64_t V, const uint32_t* mask, float m) {
    int64_t i = -1;
    with_loader(dtype, [&](auto tag) {
        using L = decltype(tag);
        i = first_max<L>((const typename L::raw*)row, V, mask, m);
    });
    return i;
}

static float logit_at(int dtype, const void* row, int64_t i) {
    float v = 0;
    with_loader(dtype, [&](auto tag) {
        using L = decltype(tag);
        v = L::one((const typename L::raw*)row + i);
    });
    return v;
}

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
