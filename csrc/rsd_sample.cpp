// Fused RSD sampling on CPU: the C++ twin of rsd_engine/sampling/reference.py (that docstring is the
// contract), exposed to Python as rsd_engine._C.rsd_sample.
//
// Per row: teacher proposals x ~ truncate(softmax(lT / temperature), top_k, top_p) on proposal_mask,
// drawn by inverse CDF in id order from uniforms[1 + k]; the first x with softmax(lS / check_temperature)[x]
// >= threshold is emitted, else the student's fallback y ~ truncate(softmax(lS / student_temperature),
// student_top_k, student_top_p) on fallback_mask from uniforms[0]. Reported with the emitted token's raw
// log-probabilities under both models. Flagged rows as in the reference: token -1 (-2) when the teacher
// (student) row holds NaN or +inf, -3 when the student must write but no fallback id is finite; no allowed
// finite proposal means no proposal is drawn. Weights are exp((x - max) * (1 / t)) with 1 / t in float32 and
// their sums in double; the check probability and its comparison with the threshold run in double, over a
// normaliser of float32 exponentials (the reference's are float64): a check within float32 rounding of the
// threshold may go either way, as the contract allows.
//
// How a row is read (rsd_row.h): pass 1 finds NaN/+inf and the maxima; pass 2 computes every exponential
// once (the normaliser, and the teacher's weights into a cache-resident scratch row); truncation gathers
// the few ids that can be kept and finds the exact cut-off by radix select over them, never sorting the
// row (rsd_truncate.h); a draw walks group masses, then one group. The student's fallback weights are
// computed only when every proposal was rejected. Rows run in parallel, one thread each; with fewer rows
// than threads a row is split across threads.
//
// Logits arrive as raw pointers (no libtorch linking); the Python wrapper validates them. The hot passes
// are compiled once per instruction set (portable, AVX2, AVX-512) and the best one is picked at import.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "rsd_select.h"
#include "rsd_types.h"
#include "rsd_verify_types.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RSD_X86_VARIANTS 1
#include <immintrin.h>
#endif

namespace rsd {

#define VW 4  // SSE2 / NEON width
namespace portable {
#include "rsd_simd.h"
#include "rsd_passes.h"
#include "rsd_truncate.h"
#include "rsd_row.h"
#include "rsd_verify.h"
}  // namespace portable
#undef VW

#ifdef RSD_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define VW 8
#define RSD_ISA_AVX2 1
namespace avx2 {
#include "rsd_simd.h"
#include "rsd_passes.h"
#include "rsd_truncate.h"
#include "rsd_row.h"
#include "rsd_verify.h"
}  // namespace avx2
#undef RSD_ISA_AVX2
#undef VW
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")
#define VW 16
#define RSD_ISA_AVX512 1
namespace avx512 {
#include "rsd_simd.h"
#include "rsd_passes.h"
#include "rsd_truncate.h"
#include "rsd_row.h"
#include "rsd_verify.h"
}  // namespace avx512
#undef RSD_ISA_AVX512
#undef VW
#pragma GCC pop_options
#endif

enum Isa : int { PORTABLE = 0, AVX2 = 1, AVX512 = 2 };

static std::vector<std::string> available_isas() {
    std::vector<std::string> out{"portable"};
#ifdef RSD_X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back("avx2");
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        out.push_back("avx512");
#endif
    return out;
}

static int isa_code(const std::string& name) {
    return name == "avx512" ? AVX512 : name == "avx2" ? AVX2 : PORTABLE;
}

static int g_isa = isa_code(available_isas().back());

static void run(Batch b, int num_threads) {
    const std::vector<uint32_t> proposal_bits = pack_mask(b.proposal_mask, b.V);
    const std::vector<uint32_t> fallback_bits = pack_mask(b.fallback_mask, b.V);
    b.proposal_bits = proposal_bits.data();
    b.fallback_bits = fallback_bits.data();
#ifdef RSD_X86_VARIANTS
    if (g_isa == AVX512) return avx512::run_batch(b, num_threads);
    if (g_isa == AVX2) return avx2::run_batch(b, num_threads);
#endif
    portable::run_batch(b, num_threads);
}

static void run_sample(SampleBatch b, const uint8_t* mask, int num_threads) {
    const std::vector<uint32_t> bits = pack_mask(mask, b.V);
    b.mask_bits = bits.data();
#ifdef RSD_X86_VARIANTS
    if (g_isa == AVX512) return avx512::run_sample_batch(b, num_threads);
    if (g_isa == AVX2) return avx2::run_sample_batch(b, num_threads);
#endif
    portable::run_sample_batch(b, num_threads);
}

static void run_verify(VerifyBatch b, int num_threads) {
    const std::vector<uint32_t> proposal_bits = pack_mask(b.proposal_mask, b.V);
    const std::vector<uint32_t> fallback_bits = pack_mask(b.fallback_mask, b.V);
    b.proposal_bits = proposal_bits.data();
    b.fallback_bits = fallback_bits.data();
#ifdef RSD_X86_VARIANTS
    if (g_isa == AVX512) return avx512::run_verify_batch(b, num_threads);
    if (g_isa == AVX2) return avx2::run_verify_batch(b, num_threads);
#endif
    portable::run_verify_batch(b, num_threads);
}

}  // namespace rsd

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() = "Fused RSD sampling on CPU (see rsd_engine/sampling/cpp.py for the Python entry point).";
    m.def(
        "rsd_sample",
        [](int64_t B, uintptr_t teacher, int64_t teacher_stride, int64_t Vt, int teacher_dtype, uintptr_t student,
           int64_t student_stride, int64_t Vs, int student_dtype, uintptr_t uniforms, int64_t uniforms_stride,
           int64_t num_draws, uintptr_t temperature, uintptr_t top_k, uintptr_t top_p, uintptr_t threshold,
           uintptr_t check_temperature, uintptr_t student_temperature, uintptr_t student_top_k,
           uintptr_t student_top_p, uintptr_t proposal_trials, uintptr_t proposal_mask, uintptr_t fallback_mask,
           int64_t V, uintptr_t token, uintptr_t accepted, uintptr_t teacher_logprob, uintptr_t student_logprob,
           int num_threads) {
            using namespace rsd;
            Batch b{B,
                    (const void*)teacher, teacher_stride, Vt, teacher_dtype,
                    (const void*)student, student_stride, Vs, student_dtype,
                    (const float*)uniforms, uniforms_stride, num_draws,
                    (const float*)temperature, (const int32_t*)top_k, (const float*)top_p,
                    (const float*)threshold, (const float*)check_temperature,
                    (const float*)student_temperature, (const int32_t*)student_top_k,
                    (const float*)student_top_p, (const int32_t*)proposal_trials,
                    (const uint8_t*)proposal_mask, (const uint8_t*)fallback_mask, nullptr, nullptr, V,
                    (int64_t*)token, (uint8_t*)accepted, (float*)teacher_logprob, (float*)student_logprob};
            py::gil_scoped_release release;
            run(b, num_threads);
        },
        "Samples one RSD step for B rows from raw data pointers (validated by rsd_engine.sampling.cpp).",
        py::arg("B"), py::arg("teacher"), py::arg("teacher_stride"), py::arg("Vt"), py::arg("teacher_dtype"),
        py::arg("student"), py::arg("student_stride"), py::arg("Vs"), py::arg("student_dtype"), py::arg("uniforms"),
        py::arg("uniforms_stride"), py::arg("num_draws"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("threshold"), py::arg("check_temperature"), py::arg("student_temperature"),
        py::arg("student_top_k"), py::arg("student_top_p"), py::arg("proposal_trials"), py::arg("proposal_mask"),
        py::arg("fallback_mask"), py::arg("V"), py::arg("token"), py::arg("accepted"), py::arg("teacher_logprob"),
        py::arg("student_logprob"), py::arg("num_threads"));
    m.def(
        "sample_tokens",
        [](int64_t B, uintptr_t logits, int64_t stride, int64_t len, int dtype, uintptr_t uniforms,
           uintptr_t temperature, uintptr_t top_k, uintptr_t top_p, uintptr_t mask, int64_t V, uintptr_t token,
           int num_threads) {
            using namespace rsd;
            SampleBatch b{B, (const void*)logits, stride, len, dtype, (const float*)uniforms,
                          (const float*)temperature, (const int32_t*)top_k, (const float*)top_p, nullptr, V,
                          (int64_t*)token};
            py::gil_scoped_release release;
            run_sample(b, (const uint8_t*)mask, num_threads);
        },
        "Samples one token per row from one model's truncated law (validated by rsd_engine.sampling.cpp_verify).");
    m.def(
        "rsd_verify",
        [](int64_t B, int64_t P, uintptr_t teacher, int64_t teacher_stride_b, int64_t teacher_stride_p, int64_t Vt,
           int teacher_dtype, uintptr_t student, int64_t student_stride_b, int64_t student_stride_p, int64_t Vs,
           int student_dtype, uintptr_t draft, int64_t draft_stride, uintptr_t num_draft, uintptr_t uniforms,
           int64_t uniforms_stride_b, int64_t uniforms_stride_p, std::vector<int64_t> draws,
           std::vector<uintptr_t> params, uintptr_t proposal_mask, uintptr_t fallback_mask, int64_t V,
           uintptr_t tokens, uintptr_t num_emitted, uintptr_t accepted, uintptr_t teacher_logprob,
           uintptr_t student_logprob, int num_threads) {
            using namespace rsd;
            if (draws.size() != 4 || params.size() != 9) throw py::value_error("draws needs 4 entries, params 9");
            VerifyBatch b{B, P,
                          (const void*)teacher, teacher_stride_b, teacher_stride_p, Vt, teacher_dtype,
                          (const void*)student, student_stride_b, student_stride_p, Vs, student_dtype,
                          (const int64_t*)draft, draft_stride, (const int32_t*)num_draft,
                          (const float*)uniforms, uniforms_stride_b, uniforms_stride_p,
                          draws[0], draws[1], draws[2], draws[3],
                          (const float*)params[0], (const int32_t*)params[1], (const float*)params[2],
                          (const float*)params[3], (const float*)params[4], (const float*)params[5],
                          (const int32_t*)params[6], (const float*)params[7], (const int32_t*)params[8],
                          (const uint8_t*)proposal_mask, (const uint8_t*)fallback_mask, nullptr, nullptr, V,
                          (int64_t*)tokens, (int32_t*)num_emitted, (uint8_t*)accepted, (float*)teacher_logprob,
                          (float*)student_logprob};
            py::gil_scoped_release release;
            run_verify(b, num_threads);
        },
        "Verifies a speculative round of drafts against the RSD law (validated by rsd_engine.sampling.cpp_verify); "
        "draws = [plain columns, keep, residual, flag], params in RowParams order.");
    m.def("available_isas", &rsd::available_isas, "Instruction-set builds this CPU can run, best last.");
    m.def("isa", []() {
        static const char* names[] = {"portable", "avx2", "avx512"};
        return std::string(names[rsd::g_isa]);
    }, "The instruction-set build in use.");
    m.def(
        "set_isa",
        [](const std::string& name) {
            auto ok = rsd::available_isas();
            if (std::find(ok.begin(), ok.end(), name) == ok.end())
                throw py::value_error("isa '" + name + "' is not available on this CPU; choose one of " +
                                      py::str(py::cast(ok)).cast<std::string>());
            rsd::g_isa = rsd::isa_code(name);
        },
        "Selects an instruction-set build (for tests and benchmarks).");
}
