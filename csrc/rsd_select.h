// Exact truncation cut-offs without sorting a row: an MSD radix select over candidate (weight, id) pairs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "rsd_types.h"

namespace rsd {

inline float key_value(uint32_t key) {
    float f;
    std::memcpy(&f, &key, 4);
    return f;
}

inline uint32_t weight_key(float w) {
    uint32_t k;
    std::memcpy(&k, &w, 4);
    return k;
}

// The reference ranks by (probability desc, id asc); weights are positive, so their bit patterns order
// like their values.
inline bool ranked_before(const Cand& a, const Cand& b) { return a.key != b.key ? a.key > b.key : a.id < b.id; }

// Bitwise, not short-circuit: compiles to flag arithmetic instead of a branch that mispredicts.
inline bool kept_by(const Cut& cut, uint32_t key, uint32_t id) {
    return (key > cut.key) | ((key == cut.key) & (id <= cut.id));
}

// A candidate's weight if the cut keeps it, else 0 (by masking its bits, again to stay branch-free).
inline double kept_weight(const Cut& cut, const Cand& c) {
    return key_value(c.key & (0u - (uint32_t)kept_by(cut, c.key, c.id)));
}

// Walks c[0, n) in rank order and returns the first candidate at which the running count (by_mass false)
// or running weight (by_mass true) reaches `goal`; the last one if rounding leaves the goal unreached.
// Each level histograms 11 bits of the key and keeps only the bucket that holds the goal, so a row is
// never sorted: what is left is a handful of candidates, or one run of equal keys already in id order.
// Reorders c; count/mass are scratch of 4 * KEY_BUCKETS entries (four interleaved histograms, since
// neighbouring candidates often share a bucket and one histogram would serialise on it).
inline Cand rank_pick(Cand* c, int64_t n, bool by_mass, double goal, uint32_t* count, double* mass) {
    static const int shift[3] = {20, 9, 0};  // weights are >= 0: bit 31 is always 0
    static const uint32_t digits[3] = {2048, 2048, 512};
    double before = 0;
    bool one_key = false;
    for (int level = 0; level < 3 && n > 64; ++level) {
        const int s = shift[level];
        const uint32_t width = digits[level], mask = width - 1;
        std::fill(count, count + 4 * width, 0u);
        std::fill(mass, mass + 4 * width, 0.0);
        for (int64_t i = 0; i < n; ++i) {
            const uint32_t d = (c[i].key >> s & mask) + (uint32_t)(i & 3) * width;
            count[d]++;
            mass[d] += key_value(c[i].key);
        }
        int64_t pick = -1, last = -1;
        double q = 0;
        for (int64_t d = mask; d >= 0; --d) {
            const uint32_t k = count[d] + count[d + width] + count[d + 2 * width] + count[d + 3 * width];
            if (!k) continue;
            last = d;
            q = by_mass ? (mass[d] + mass[d + width]) + (mass[d + 2 * width] + mass[d + 3 * width]) : (double)k;
            if (before + q >= goal) {
                pick = d;
                break;
            }
            before += q;
        }
        if (pick < 0) {
            pick = last;
            before -= q;
        }
        int64_t m = 0;
        for (int64_t i = 0; i < n; ++i) {
            c[m] = c[i];
            m += (c[i].key >> s & mask) == (uint32_t)pick;
        }
        n = m;
        one_key = level == 2;
    }
    if (!one_key) std::sort(c, c + n, ranked_before);
    for (int64_t i = 0; i < n; ++i) {
        const double q = by_mass ? key_value(c[i].key) : 1.0;
        if (before + q >= goal) return c[i];
        before += q;
    }
    return c[n - 1];
}

}  // namespace rsd
