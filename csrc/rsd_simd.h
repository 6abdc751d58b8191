// Portable SIMD helpers (GCC/Clang vector extensions) for the fused RSD sampler.
// Included once per instruction set, inside that build's namespace, with VW (lanes) defined, so it has
// no include guard and includes nothing itself (rsd_sample.cpp includes the standard headers first).

typedef float vf __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));
typedef uint32_t vu __attribute__((vector_size(4 * VW)));
typedef uint16_t vh __attribute__((vector_size(2 * VW)));
typedef uint8_t vb __attribute__((vector_size(VW)));
typedef double vd __attribute__((vector_size(8 * VW)));

static inline vf vset(float a) { return vf{} + a; }
static inline vi vseti(int32_t a) { return vi{} + a; }
static inline vi as_int(vf a) { return (vi)a; }
static inline vf as_float(vi a) { return (vf)a; }

static inline vf vload(const float* p) {
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

static inline double hsum(vf v) {
    double s = 0;
    for (int j = 0; j < VW; ++j) s += v[j];
    return s;
}

static inline vd widen(vf v) { return __builtin_convertvector(v, vd); }

static inline double hsum(vd v) {
    double s = 0;
    for (int j = 0; j < VW; ++j) s += v[j];
    return s;
}

static inline float hmax(vf v) {
    float m = v[0];
    for (int j = 1; j < VW; ++j) m = v[j] > m ? v[j] : m;
    return m;
}

// Bit j set iff lane j of a comparison result (-1 / 0) is set.
static inline uint32_t lane_bits(vi m) {
#if VW == 16 && defined(RSD_ISA_AVX512)
    return _mm512_movepi32_mask((__m512i)m);
#elif VW == 8 && defined(RSD_ISA_AVX2)
    return (uint32_t)_mm256_movemask_ps((__m256)m);
#elif VW == 4 && defined(RSD_X86_VARIANTS)
    return (uint32_t)_mm_movemask_ps((__m128)m);
#else
    uint32_t bits = 0;
    for (int j = 0; j < VW; ++j) bits |= (uint32_t)(m[j] != 0) << j;
    return bits;
#endif
}

static inline bool any_lane(vi m) { return lane_bits(m) != 0; }

// Lanes of a bit-packed mask from id i on (i is a multiple of VW, so the lanes sit in one word).
static inline vi vmask(const uint32_t* bits, int64_t i) {
    vi lane_bit;
    for (int j = 0; j < VW; ++j) lane_bit[j] = 1 << j;
    const uint32_t w = bits[i >> 5] >> (i & 31);
    return (vseti((int32_t)w) & lane_bit) != 0;
}

// exp(x) for x <= 0 (Cephes expf: 2^n times a degree-7 polynomial on |r| <= ln2/2, about 1 ulp);
// -inf, NaN and x < -87 give exactly 0, so masked ids carry no mass at all.
static inline vf vexp(vf x) {
    const vf floor_x = vset(-87.0f);
    vi live = x > floor_x;
    x = live ? x : floor_x;
    vf t = x * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23 rounds x * log2(e) to an integer
    vf n = t - 12582912.0f;
    vi ni = as_int(t) - 0x4B400000;
    vf r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf z = r * r;
    vf p = vset(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    vf scale = as_float((ni + 127) << 23);
    return live ? p * scale : vset(0.0f);
}

// Loaders: logits of any supported dtype as float32 lanes, exactly (bf16 and fp16 widen losslessly).
struct LoadF32 {
    typedef float raw;
    static vf load(const raw* p) { return vload(p); }
    static float one(const raw* p) { return *p; }
};

struct LoadBF16 {
    typedef uint16_t raw;
    static vf load(const raw* p) {
        vh h;
        __builtin_memcpy(&h, p, sizeof h);
        return (vf)(__builtin_convertvector(h, vu) << 16);
    }
    static float one(const raw* p) {
        uint32_t bits = (uint32_t)*p << 16;
        float f;
        __builtin_memcpy(&f, &bits, 4);
        return f;
    }
};

struct LoadF16 {
    typedef uint16_t raw;
    // Re-bias the exponent; inf/NaN get the float32 maximum exponent, subnormals are renormalised by
    // a float subtraction (the classic branch-free half -> float conversion).
    static vf widen(vu h) {
        const vu exp_mask = vu{} + (0x7c00u << 13);
        vu o = (h & 0x7fffu) << 13;
        vu e = o & exp_mask;
        o += (127 - 15) << 23;
        o = (e == exp_mask) ? o + ((128 - 16) << 23) : o;
        vf sub = (vf)(o + (1u << 23)) - (vf)(vu{} + (113u << 23));
        o = (e == 0) ? (vu)sub : o;
        return (vf)(o | ((h & 0x8000u) << 16));
    }
    static vf load(const raw* p) {
        vh h;
        __builtin_memcpy(&h, p, sizeof h);
        return widen(__builtin_convertvector(h, vu));
    }
    static float one(const raw* p) {
        vu h = vu{} + (uint32_t)*p;
        return widen(h)[0];
    }
};

// A partial vector: lanes past n read as -inf (no mass, no maximum, not NaN).
template <class L>
static inline vf load_tail(const typename L::raw* p, int64_t n) {
    float buf[VW];
    for (int j = 0; j < VW; ++j) buf[j] = j < n ? L::one(p + j) : -__builtin_inff();
    return vload(buf);
}

static inline vi vmask_tail(const uint32_t* bits, int64_t i, int64_t n) {
    vi lane;
    for (int j = 0; j < VW; ++j) lane[j] = j;
    return vmask(bits, i) & (lane < (int32_t)n);
}

static inline vf vload_tail(const float* p, int64_t n) {
    float buf[VW];
    for (int j = 0; j < VW; ++j) buf[j] = j < n ? p[j] : 0.0f;
    return vload(buf);
}

static inline void vstore_tail(float* p, vf v, int64_t n) {
    for (int j = 0; j < n; ++j) p[j] = v[j];
}
