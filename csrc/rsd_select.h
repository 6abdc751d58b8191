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

inline bool kept_by(const Cut& cut, uint32_t key, uint32_t id) {
    return key > cut.key || (key == cut.key && id <= cut.id);
}

// Walks c[0, n) in rank order and returns the first candidate at which the running count (by_mass false)
// or running weight (by_mass true) reaches `goal`; the last one if rounding leaves the goal unreached.
// Each level histograms 11 bits of the key and keeps only the bucket that holds the goal, so a row is
// never sorted: what is left is a handful of candidates, or one run of equal keys already in id order.
// Reorders c; count/mass are scratch of KEY_BUCKETS entries.
inline Cand rank_pick(Cand* c, int64_t n, bool by_mass, double goal, uint32_t* count, double* mass) {
    static const int shift[3] = {20, 9, 0};  // weights are >= 0: bit 31 is always 0
    static const uint32_t digits[3] = {2048, 2048, 512};
    double before = 0;
    bool one_key = false;
    for (int level = 0; level < 3 && n > 64; ++level) {
        const int s = shift[level];
        const uint32_t mask = digits[level] - 1;
        std::fill(count, count + digits[level], 0u);
        if (by_mass) std::fill(mass, mass + digits[level], 0.0);
        for (int64_t i = 0; i < n; ++i) {
            uint32_t d = (c[i].key >> s) & mask;
            count[d]++;
            if (by_mass) mass[d] += key_value(c[i].key);
        }
        int64_t pick = -1, last = -1;
        for (int64_t d = mask; d >= 0; --d) {
            if (!count[d]) continue;
            last = d;
            double q = by_mass ? mass[d] : (double)count[d];
            if (before + q >= goal) {
                pick = d;
                break;
            }
            before += q;
        }
        if (pick < 0) {
            pick = last;
            before -= by_mass ? mass[last] : (double)count[last];
        }
        int64_t m = 0;
        for (int64_t i = 0; i < n; ++i)
            if (((c[i].key >> s) & mask) == (uint32_t)pick) c[m++] = c[i];
        n = m;
        one_key = level == 2;
    }
    if (!one_key) std::sort(c, c + n, ranked_before);
    for (int64_t i = 0; i < n; ++i) {
        double q = by_mass ? key_value(c[i].key) : 1.0;
        if (before + q >= goal) return c[i];
        before += q;
    }
    return c[n - 1];
}

}  // namespace rsd
