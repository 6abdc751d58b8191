// Plain data of the single-model sampler and the speculative verify step (rsd_verify.h), shared by every
// instruction-set build. Pointers are the tensors' data, strides in elements.
#pragma once

#include <cstdint>

namespace rsd {

struct SampleBatch {
    int64_t B;
    const void* logits; int64_t stride; int64_t len; int dtype;  // [B, len]
    const float* uniforms;                                       // [B]
    const float* temperature;                                    // [B]
    const int32_t* top_k;                                        // [B]
    const float* top_p;                                          // [B]
    const uint32_t* mask_bits;                                   // [V / 32] bit-packed
    int64_t V;
    int64_t* token;                                              // [B]
};

struct VerifyBatch {
    int64_t B, P;  // rows, positions per round (G + 1)
    const void* teacher; int64_t teacher_stride_b, teacher_stride_p, Vt; int teacher_dtype;  // [B, P, Vt]
    const void* student; int64_t student_stride_b, student_stride_p, Vs; int student_dtype;  // [B, P, Vs]
    const int64_t* draft; int64_t draft_stride;                                             // [B, P - 1]
    const int32_t* num_draft;                                                                // [B]
    const float* uniforms; int64_t uniforms_stride_b, uniforms_stride_p;                     // [B, P, D]
    int64_t num_draws;  // the plain step's columns [fallback, proposal 0 .. K-1] at the front of each position
    int64_t keep_draw, residual_draw, flag_draw;
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
    const uint32_t* proposal_bits;     // [V / 32] (filled by the driver)
    const uint32_t* fallback_bits;     // [V / 32]
    int64_t V;
    int64_t* tokens;                   // [B, P]
    int32_t* num_emitted;              // [B]
    uint8_t* accepted;                 // [B, P] bool
    float* teacher_logprob;            // [B, P]
    float* student_logprob;            // [B, P]
};

}  // namespace rsd
