// Plain data shared by every instruction-set build of the fused RSD sampler (rsd_sample.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace rsd {

enum Dtype : int { FLOAT32 = 0, BFLOAT16 = 1, FLOAT16 = 2 };

constexpr int64_t BLOCK = 1024;  // ids per block of mass: a draw walks block sums, then one block
constexpr int64_t GROUP = 64;    // truncation candidates per group of kept mass, likewise
constexpr int KEY_BUCKETS = 2048;  // top 11 bits of a positive float32's bit pattern
constexpr int MAX_THREADS = 256;
constexpr int64_t GATHER_SLACK = 16;  // a vector compress-store may write this far past its count

// Flagged rows' tokens (rsd_engine/sampling/reference.py: TEACHER_NONFINITE, STUDENT_NONFINITE, NO_ALLOWED_TOKEN).
constexpr int64_t TEACHER_NONFINITE = -1;
constexpr int64_t STUDENT_NONFINITE = -2;
constexpr int64_t NO_ALLOWED_TOKEN = -3;

// Everything one call samples from and writes to; pointers are the tensors' data, strides in elements.
struct Batch {
    int64_t B;
    const void* teacher; int64_t teacher_stride; int64_t Vt; int teacher_dtype;  // [B, Vt]
    const void* student; int64_t student_stride; int64_t Vs; int student_dtype;  // [B, Vs]
    const float* uniforms; int64_t uniforms_stride; int64_t num_draws;            // [B, 1 + K]
    const float* temperature;          // [B]
    const int32_t* top_k;              // [B]
    const float* top_p;                // [B]
    const float* threshold;            // [B]
    const float* check_temperature;    // [B]
    const float* student_temperature;  // [B]
    const int32_t* student_top_k;      // [B]
    const float* student_top_p;        // [B]
    const int32_t* proposal_trials;    // [B]
    const uint8_t* proposal_mask;      // [V] bool
    const uint8_t* fallback_mask;      // [V] bool
    const uint32_t* proposal_bits;     // [V / 32] the masks bit-packed (filled by the driver)
    const uint32_t* fallback_bits;     // [V / 32]
    int64_t V;
    int64_t* token;                    // [B]
    uint8_t* accepted;                 // [B] bool
    float* teacher_logprob;            // [B]
    float* student_logprob;            // [B]
};

// A candidate of a truncation: the bit pattern of its weight (monotonic for weights >= 0) and its id.
struct Cand {
    uint32_t key;
    uint32_t id;
};

// The kept set of a truncated law: the ids ranked at or before (key, id) in the order (weight desc,
// id asc), i.e. key_i > key or (key_i == key and i <= id).
struct Cut {
    uint32_t key;
    uint32_t id;
};

// Per-thread scratch, grown on demand and kept between calls (no page faults on the hot path).
struct Workspace {
    std::vector<float> weight;        // [V] unnormalised softmax of the row being truncated
    std::vector<double> block_mass;   // [V / BLOCK] mass per block
    std::vector<double> group_mass;   // [V / GROUP] kept mass per GROUP candidates
    std::vector<Cand> cand, cand2;    // [V] truncation candidates
    std::vector<uint32_t> keys, ids;  // [V + slack] candidates as gathered, per chunk
    std::vector<uint32_t> pick_count; // [4, KEY_BUCKETS] radix-select and sampling scratch
    std::vector<double> pick_mass;    // [4, KEY_BUCKETS]

    void reserve(int64_t V) {
        if ((int64_t)weight.size() < V) {
            weight.resize(V);
            cand.resize(V);
            cand2.resize(V);
            group_mass.resize(V / GROUP + 1);
            keys.resize(V + GATHER_SLACK * (MAX_THREADS + 1));
            ids.resize(V + GATHER_SLACK * (MAX_THREADS + 1));
        }
        int64_t blocks = (V + BLOCK - 1) / BLOCK;
        if ((int64_t)block_mass.size() < blocks) block_mass.resize(blocks);
        if (pick_count.size() < 4 * KEY_BUCKETS) {
            pick_count.resize(4 * KEY_BUCKETS);
            pick_mass.resize(4 * KEY_BUCKETS);
        }
    }
};

// Bit-packs a bool mask so that a pass reads V / 8 bytes of it (L1-resident) instead of V.
inline std::vector<uint32_t> pack_mask(const uint8_t* mask, int64_t V) {
    std::vector<uint32_t> bits((V + 31) / 32 + 1, 0u);
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) {  // eight 0/1 bytes -> eight bits: the multiply lands byte k on bit 56 + k
        uint64_t w;
        std::memcpy(&w, mask + i, 8);
        bits[i >> 5] |= (uint32_t)((w * 0x0102040810204080ull) >> 56) << (i & 31);
    }
    for (; i < V; ++i) bits[i >> 5] |= (uint32_t)(mask[i] != 0) << (i & 31);
    return bits;
}

inline Workspace& thread_workspace() {
    static thread_local Workspace ws;
    return ws;
}

}  // namespace rsd
