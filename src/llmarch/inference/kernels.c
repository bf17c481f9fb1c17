/* llmarch's native CPU kernels (see llmarch/inference/native.py, which compiles this file on
 * first use with the machine's C compiler, -O3 -march=native -fopenmp, and loads it with ctypes).
 *
 * Only what PyTorch does not do well enough for decoding is here, each measured against the
 * torch kernel it stands in for (benchmarks/quant_kernels.py):
 *
 *   llmarch_q8_linear   y = x W^T * scale + bias for int8 W with one scale per output row, for a
 *                       few rows of x (decoding). torch's _weight_int8pack_mm converts every
 *                       weight to bfloat16 and rounds the sums to bfloat16; it reads Gemma 3
 *                       270M's 262k x 640 head at about 10 GB/s on 2 cores of AVX-512, this loop
 *                       at 30-35 GB/s (the memory's rate), on 16-bit activation codes with
 *                       exact integer sums; on 2 AVX2 cores 27 GB/s with the hardware's prefetch
 *                       alone, 31-32 with each row asked for 6 KB ahead (PREFETCH_BYTES).
 *                       With a float16 scale per 32 weights of a row it reads a GGUF file's
 *                       Q8_0 blocks; llmarch_q5_0_linear reads Q5_0 codes, re-laid (22 bytes
 *                       per 32 weights as in the file, not 34 as int8), with the same sums.
 *   llmarch_q4_linear   the same for torch's packed int4 CPU layout (4-bit codes, a bfloat16 scale
 *                       and zero per group of inputs), read in place: torch's
 *                       _weight_int4pack_mm_for_cpu takes 61 us for Gemma 3 270M's 640 x 1024
 *                       output projection, 200 for Qwen2.5-0.5B's 896 x 4864 down projection.
 *   llmarch_rms_norm    x * rsqrt(mean(x^2) + eps), times a scale, then optionally RoPE, in one
 *                       pass over each row: torch's inference RMSNorm is nine operations (casts,
 *                       pow, mean, add, rsqrt, two multiplies) of a few microseconds each, RoPE
 *                       five more, and a decoding step runs one norm per norm: 91 for Gemma 3 270M.
 *   llmarch_attend_one  softmax(q k^T * scale + mask) v for one query per sequence (decoding),
 *                       query heads grouped over their KV head, in float32: the dozen torch
 *                       operations of llmarch.inference.packed.single_query_attention in one.
 *                       Each key and value row is read once for the query heads that share it,
 *                       and the keys are split in fixed chunks over the threads (Gemma 3's 4
 *                       heads over 512 cached keys: 78 -> 53 us with the cache in L2; from
 *                       memory, as decoding reads it, 104 -> 93 with rows asked for 4 ahead).
 *   llmarch_argmax      the index of each row's first largest value, a NaN counting as the largest,
 *                       as torch.argmax: greedy decoding's pick from Gemma 3's 262k logits, which
 *                       torch's reduction (it tracks the index in every lane) takes 280-360 us
 *                       for on 2 AVX2 cores, 2-3% of a token, this about 30.
 *   llmarch_decode_layers  a decoding step's layers, each the calls above in the order the model's
 *                       modules make them (llmarch.inference.step describes the layers): one call
 *                       a step instead of 15-20 a layer, each wrapped in Python and torch dispatch
 *                       (Gemma 3 270M in float32 on 2 AVX2 cores: 21.9 -> 12.3 ms a token).
 *
 * Vector loops for AVX-512 (x86-64-v4), for AVX2 with FMA (x86-64-v3: AMD Zen 2/3, Intel before
 * Skylake-X), and portable loops for the rest; llmarch_simd() says which this build has.
 *
 * Threads: OpenMP, linked by soname against the libgomp that torch itself loaded, so the kernels
 * run on torch's own thread team (torch.set_num_threads applies) and never add a second one.
 * Results do not depend on the thread count or on how many rows are computed together: each
 * output is one row's dot product, always summed in the same order.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LLMARCH_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLMARCH_AVX2 1 /* x86 without AVX-512 (AMD Zen 2/3, older Intel): 256-bit loops */
#endif

enum { F32 = 0, BF16 = 1 };

/* bumped whenever a signature changes: native.py refuses a library of another version */
int llmarch_abi_version(void) { return 14; }

/* the vector instructions this build's kernels use (reported by native.py): 2 AVX-512, 1 AVX2
 * with FMA, 0 the portable loops */
int llmarch_simd(void) {
#if defined(LLMARCH_AVX512)
    return 2;
#elif defined(LLMARCH_AVX2)
    return 1;
#else
    return 0;
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to nearest even, as torch converts float32 to bfloat16 (NaN stays a quiet NaN) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load_value(const void *p, int dtype, int64_t i) {
    return dtype == BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

#ifdef LLMARCH_AVX2
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 bfloat16 values at p as float32 */
static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif

/* Activations as 16-bit codes: x ~= sx * qx, sx = max |x| / 32767, qx = round(x / sx) (ties to
 * even), |x - sx * qx| <= max |x| / 65534: finer than a bfloat16 activation's own rounding for
 * every element above 1/256 of the row's largest. The products with the int8 weights are then
 * exact integer sums: the same bits in any order, on any build (AVX-512 or portable), for any
 * thread count; on AVX-512 two integer instructions per 32 weights (vpmaddwd, vpaddd; one,
 * vpdpwssd, with VNNI) where converting every weight to float32 takes three per 16. */
#define Q16_MAX 32767
#define CHUNK 4096 /* int32 lanes take at most 128 pair sums of 2 * 32767 * 128: < 2^31 */

static float codes16(const float *x, int64_t K, int16_t *q) {
    float mx = 0.f;
    int bad = 0;
    for (int64_t k = 0; k < K; k++) {
        float a = fabsf(x[k]);
        bad |= !isfinite(a);
        if (a > mx) mx = a;
    }
    if (bad || mx == 0.f) { /* a zero row gives the bias; an inf or NaN input, NaN outputs */
        for (int64_t k = 0; k < K; k++) q[k] = 0;
        return bad ? NAN : 0.f;
    }
    float sx = mx / (float)Q16_MAX;
    for (int64_t k = 0; k < K; k++) {
        float v = nearbyintf(x[k] / sx);
        q[k] = (int16_t)(v > Q16_MAX ? Q16_MAX : v < -Q16_MAX ? -Q16_MAX : v);
    }
    return sx;
}

/* sum_k q[k] * w[k], exactly */
static inline int64_t dot_q16_q8(const int16_t *q, const int8_t *w, int64_t K) {
    int64_t total = 0;
    for (int64_t c = 0; c < K; c += CHUNK) {
        int64_t end = c + CHUNK < K ? c + CHUNK : K, k = c;
#ifdef LLMARCH_AVX512
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
        for (; k + 64 <= end; k += 64) {
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k)));
            __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + k + 32)));
#ifdef __AVX512VNNI__
            a0 = _mm512_dpwssd_epi32(a0, w0, _mm512_loadu_si512((const void *)(q + k)));
            a1 = _mm512_dpwssd_epi32(a1, w1, _mm512_loadu_si512((const void *)(q + k + 32)));
#else
            a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(w0, _mm512_loadu_si512((const void *)(q + k))));
            a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(w1, _mm512_loadu_si512((const void *)(q + k + 32))));
#endif
        }
        for (; k < end; k += 32) { /* the rest, 32 at a time, masked past the end */
            int64_t left = end - k;
            __mmask32 m = left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1u);
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, w + k));
            a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(w0, _mm512_maskz_loadu_epi16(m, q + k)));
        }
        __m512i s64 = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(a0)),
                                       _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a0, 1)));
        s64 = _mm512_add_epi64(s64, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a1)));
        s64 = _mm512_add_epi64(s64, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a1, 1)));
        total += _mm512_reduce_add_epi64(s64);
#elif defined(LLMARCH_AVX2)
        __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
        for (; k + 32 <= end; k += 32) { /* each lane: at most 128 pair sums a chunk, as above */
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k + 16)));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(q + k))));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(q + k + 16))));
        }
        __m256i s64 = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(a0)),
                                       _mm256_cvtepi32_epi64(_mm256_extracti128_si256(a0, 1)));
        s64 = _mm256_add_epi64(s64, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(a1)));
        s64 = _mm256_add_epi64(s64, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(a1, 1)));
        int64_t lanes[4];
        _mm256_storeu_si256((__m256i *)lanes, s64);
        int64_t acc = lanes[0] + lanes[1] + lanes[2] + lanes[3];
        for (; k < end; k++) acc += (int64_t)((int32_t)q[k] * (int32_t)w[k]);
        total += acc;
#else
        int64_t acc = 0; /* integer sums, exact in int64 (a chunk of int32 products can pass 2^31) */
        for (; k < end; k++) acc += (int64_t)((int32_t)q[k] * (int32_t)w[k]);
        total += acc;
#endif
    }
    return total;
}

/* IEEE half precision -> float32, exactly (normals, subnormals, infinities, NaN) */
static inline float f16_to_f32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: man * 2^-24, exact in float32 */
        float f = (float)man * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
#endif
}

#define SCALE_CHUNK 256 /* groups whose float32 scales are converted at a time (on the stack) */

/* GGUF's Q5_0 weights: 32 of a row share a float16 scale d, w = d * (code - 16), code in 0..31.
 * llmarch holds them as the file's codes re-laid for the vector loops (llmarch.inference.quant.
 * Q5Linear; 5.5 bits a weight, as in the file): the scales in their own (N, K / 32) array, as the
 * grouped int8 layout has them, and per block of 32 weights 20 bytes:
 *   bytes 0-3   the fifth bits: bit t of byte r is weight 4t + r's (byte lane i of a vector
 *               holding these 4 bytes in every dword reads its bit with one AND: bit i / 4);
 *   bytes 4-19  the low 4 bits as the file has them: weight j < 16 in byte j's low nibble,
 *               weight j + 16 in its high nibble. */
#define Q5_0_BYTES 20

/* a block's 32 weights as int8 codes - 16, in order */
static inline void q5_0_codes(const uint8_t *b, int8_t *out) {
    for (int j = 0; j < 16; j++) {
        int lo = j, hi = j + 16;
        out[lo] = (int8_t)((int)((b[4 + j] & 15) | (((b[lo & 3] >> (lo >> 2)) & 1) << 4)) - 16);
        out[hi] = (int8_t)((int)((b[4 + j] >> 4) | (((b[hi & 3] >> (hi >> 2)) & 1) << 4)) - 16);
    }
}

#if defined(LLMARCH_AVX512) || defined(LLMARCH_AVX2)
/* the same 32 codes in one vector: the 16 bytes in both halves, the high half shifted down 4
 * (its high nibbles), masked to 4 bits; each byte or-ed with 0xF0 (minus 16) where its fifth
 * bit is clear */
static inline __m256i q5_0_codes256(const uint8_t *b) {
    __m256i qs = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(b + 4)));
    __m256i nib = _mm256_and_si256(_mm256_srlv_epi64(qs, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(15));
    int32_t qh;
    memcpy(&qh, b, 4);
    const __m256i bit = _mm256_set_epi64x(0x8080808040404040LL, 0x2020202010101010LL, 0x0808080804040404LL,
                                          0x0202020201010101LL); /* byte lane i: 1 << (i / 4) */
    __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_set1_epi32(qh), bit), bit);
    return _mm256_or_si256(nib, _mm256_andnot_si256(set, _mm256_set1_epi8((char)0xF0)));
}
#endif

/* sum_g scale[g] * sum_{k in group g} q[k] * w[k] over groups of 32 (K a multiple of 32; scale
 * float16): each group's sums exact in eight int32 lanes (lane l: inputs 2l, 2l + 1, 16 + 2l,
 * 17 + 2l; at most 4 * 32767 * 128 < 2^24, so exact in float32 too), scaled into four sets of
 * eight float32 lanes (group g into set g % 4: four fused multiply-adds in flight) by one fused
 * multiply-add a group; at the end the sets added lane by lane, (s0 + s1) + (s2 + s3), and the
 * lanes in the tree ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)): the same bits on every
 * build (AVX-512 builds run the 256-bit loop). The scales are converted to float32 SCALE_CHUNK
 * at a time. The weights: int8 codes, 32 bytes a group (q5 0), or re-laid Q5_0 codes, Q5_0_BYTES
 * a group (q5 1: the same sums of the same codes, so the same bits); q5 is a constant in each
 * caller, so each gets its own loop. */
static inline __attribute__((always_inline)) float dot_groups(const int16_t *q, const uint8_t *w,
                                                              const uint16_t *scale, int64_t K, const int q5) {
    float sc[SCALE_CHUNK];
    int64_t G = K / 32;
#if defined(LLMARCH_AVX512) || defined(LLMARCH_AVX2)
    /* four named accumulators (an indexed array would live in memory) */
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#define LLMARCH_GROUP_FMA(g, a)                                                                          \
    {                                                                                                    \
        const int16_t *qg = q + (g) * 32;                                                                \
        __m256i w0, w1;                                                                                  \
        if (q5) {                                                                                        \
            __m256i c = q5_0_codes256(w + (g) * Q5_0_BYTES);                                             \
            w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(c));                                        \
            w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(c, 1));                                   \
        } else {                                                                                         \
            w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + (g) * 32)));                 \
            w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + (g) * 32 + 16)));            \
        }                                                                                                \
        __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)qg)),    \
                                     _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(qg + 16)))); \
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(sc + (g) - g0), a);               \
    }
    for (int64_t g0 = 0; g0 < G; g0 += SCALE_CHUNK) { /* SCALE_CHUNK is a multiple of 4: sets stay g % 4 */
        int64_t g1 = G - g0 < SCALE_CHUNK ? G : g0 + SCALE_CHUNK, g = g0;
#ifdef __F16C__
        for (; g + 8 <= g1; g += 8)
            _mm256_storeu_ps(sc + g - g0, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + g))));
#endif
        for (; g < g1; g++) sc[g - g0] = f16_to_f32(scale[g]);
        for (g = g0; g + 4 <= g1; g += 4) {
            LLMARCH_GROUP_FMA(g, a0)
            LLMARCH_GROUP_FMA(g + 1, a1)
            LLMARCH_GROUP_FMA(g + 2, a2)
            LLMARCH_GROUP_FMA(g + 3, a3)
        }
        if (g < g1) LLMARCH_GROUP_FMA(g, a0)
        if (g + 1 < g1) LLMARCH_GROUP_FMA(g + 1, a1)
        if (g + 2 < g1) LLMARCH_GROUP_FMA(g + 2, a2)
    }
#undef LLMARCH_GROUP_FMA
    __m256 v = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    v = _mm256_hadd_ps(v, v); /* (l0 + l1), (l2 + l3), ... within each half */
    v = _mm256_hadd_ps(v, v); /* ((l0 + l1) + (l2 + l3)) in the low half, ((l4 + l5) + (l6 + l7)) in the high */
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
#else
    float acc[4][8] = {{0}};
    int8_t codes[32];
    for (int64_t g0 = 0; g0 < G; g0 += SCALE_CHUNK) {
        int64_t g1 = G - g0 < SCALE_CHUNK ? G : g0 + SCALE_CHUNK;
        for (int64_t g = g0; g < g1; g++) sc[g - g0] = f16_to_f32(scale[g]);
        for (int64_t g = g0; g < g1; g++) {
            const int16_t *qg = q + g * 32;
            const int8_t *wg = (const int8_t *)w + g * 32;
            if (q5) {
                q5_0_codes(w + g * Q5_0_BYTES, codes);
                wg = codes;
            }
            for (int l = 0; l < 8; l++) {
                int32_t p = (int32_t)qg[2 * l] * wg[2 * l] + (int32_t)qg[2 * l + 1] * wg[2 * l + 1] +
                            (int32_t)qg[16 + 2 * l] * wg[16 + 2 * l] + (int32_t)qg[17 + 2 * l] * wg[17 + 2 * l];
                acc[g & 3][l] = fmaf((float)p, sc[g - g0], acc[g & 3][l]);
            }
        }
    }
    float v[8];
    for (int l = 0; l < 8; l++) v[l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
#endif
}

static float dot_grouped_row(const int16_t *q, const int8_t *w, const uint16_t *scale, int64_t K) {
    return dot_groups(q, (const uint8_t *)w, scale, K, 0);
}

static float dot_q5_0_row(const int16_t *q, const uint8_t *w, const uint16_t *scale, int64_t K) {
    return dot_groups(q, w, scale, K, 1);
}

/* Rows [r0, r1) of a matrix of re-laid Q5_0 codes (rows ldw bytes apart) and its float16 scales
 * (N, K / 32) as float32 (r1 - r0, K): d * (code - 16), exact in float32. */
int llmarch_q5_0_dequant(const uint8_t *w, int64_t ldw, const uint16_t *scale, int64_t K, int64_t r0, int64_t r1,
                         float *out) {
    if (K % 32 || r0 < 0 || r1 < r0) return -1;
    int64_t G = K / 32;
#pragma omp parallel for schedule(static) if ((r1 - r0) * K >= (1 << 16))
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w + r * ldw;
        float *o = out + (r - r0) * K;
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *bg = row + g * Q5_0_BYTES;
            float d = f16_to_f32(scale[r * G + g]);
#if defined(LLMARCH_AVX512) || defined(LLMARCH_AVX2)
            __m256i c = q5_0_codes256(bg);
            __m256 vd = _mm256_set1_ps(d);
            __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
            _mm256_storeu_ps(o + g * 32, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), vd));
            _mm256_storeu_ps(o + g * 32 + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), vd));
            _mm256_storeu_ps(o + g * 32 + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), vd));
            _mm256_storeu_ps(o + g * 32 + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), vd));
#else
            int8_t c[32];
            q5_0_codes(bg, c);
            for (int j = 0; j < 32; j++) o[g * 32 + j] = d * (float)c[j];
#endif
        }
    }
    return 0;
}

/* y (M, N) = x (M, K) W^T * scale + bias, on 16-bit codes of each row of x (see above):
 *   y[m, n] = (float)(sx[m] * sum_k qx[m, k] w[n, k] * scale[n]) + bias[n], the sum exact.
 *   x: float32 or bfloat16 (x_dtype), rows ldx apart; W: int8 (N, K), rows ldw >= K apart;
 *   scale: bfloat16 (N,); bias: NULL or (N,) of bias_dtype; y: y_dtype, rows N apart.
 * Any K: int32 sums over chunks of CHUNK inputs, an int64 total. group 32 instead: scale (N, K / 32)
 * of float16 (a GGUF block's own scale type), one per 32 inputs of a row (K a multiple of 32), y[m, n] = (float)(sx[m] * dot_grouped_row);
 * group 0: one scale a row, as above. Returns 0, or -1 when the codes' buffer cannot be allocated
 * or the group is neither. */
#define W_Q5_0 (-5) /* codes16_linear's weights as Q5_0 blocks (else an int8 group: 0 or 32) */

/* Weight rows are asked for this far ahead of the row being summed. The hardware's own prefetch
 * alone kept Gemma 3's 262k x 640 head at 27 GB/s on 2 AVX2 cores (the memory gives 31-33): each
 * row's sum and store stall the stream; asked for 6 KB ahead it reads at 31-32 GB/s. */
#define PREFETCH_BYTES 6144

static inline void prefetch_row(const char *row, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(row + o, 0, 3);
}

static int codes16_linear(const void *x, int x_dtype, int64_t ldx, int64_t M, int64_t K, const void *wv,
                          int64_t ldw, int64_t N, const uint16_t *scale, int64_t group, const void *bias,
                          int bias_dtype, void *y, int y_dtype) {
    if (!(group == 0 || ((group == 32 || group == W_Q5_0) && K % 32 == 0))) return -1;
    float *xf = (float *)malloc((size_t)(K > 0 ? K : 1) * sizeof(float));
    int16_t *q = (int16_t *)malloc((size_t)(M * K > 0 ? M * K : 1) * sizeof(int16_t));
    double *sx = (double *)malloc((size_t)(M > 0 ? M : 1) * sizeof(double));
    if (!xf || !q || !sx) {
        free(xf), free(q), free(sx);
        return -1;
    }
    for (int64_t m = 0; m < M; m++) {
        for (int64_t k = 0; k < K; k++) xf[k] = load_value(x, x_dtype, m * ldx + k);
        sx[m] = codes16(xf, K, q + m * K);
    }
    free(xf);
    int64_t ahead = ldw > 0 ? (PREFETCH_BYTES + ldw - 1) / ldw : 1;
    /* one thread for small matrices: a parallel region costs a few microseconds */
#pragma omp parallel for schedule(static) if (N * K >= (1 << 18))
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wn = (const int8_t *)wv + n * ldw;
        if (n + ahead < N)
            prefetch_row((const char *)wv + (n + ahead) * ldw, ldw);
        double sc = group ? 1.0 : bf16_to_f32(scale[n]);
        float b = bias ? load_value(bias, bias_dtype, n) : 0.f;
        for (int64_t m = 0; m < M; m++) {
            double dot = group == W_Q5_0 ? (double)dot_q5_0_row(q + m * K, (const uint8_t *)wn, scale + n * (K / 32), K)
                         : group       ? (double)dot_grouped_row(q + m * K, wn, scale + n * (K / 32), K)
                                       : (double)dot_q16_q8(q + m * K, wn, K);
            float v = (float)(dot * sx[m] * sc) + b;
            if (y_dtype == BF16)
                ((uint16_t *)y)[m * N + n] = f32_to_bf16(v);
            else
                ((float *)y)[m * N + n] = v;
        }
    }
    free(q);
    free(sx);
    return 0;
}

int llmarch_q8_linear(const void *x, int x_dtype, int64_t ldx, int64_t M, int64_t K,
                      const int8_t *w, int64_t ldw, int64_t N, const uint16_t *scale, int64_t group,
                      const void *bias, int bias_dtype, void *y, int y_dtype) {
    if (group != 0 && group != 32) return -1;
    return codes16_linear(x, x_dtype, ldx, M, K, w, ldw, N, scale, group, bias, bias_dtype, y, y_dtype);
}

/* llmarch_q8_linear for W as re-laid Q5_0 codes (rows ldw bytes apart) and float16 scales (N, K / 32):
 * the same 16-bit codes of x, and each group's sums as dot_grouped_row makes them (the same bits
 * as llmarch_q8_linear with group 32 on the same codes and scales), reading 22 bytes per 32
 * weights instead of 34. */
int llmarch_q5_0_linear(const void *x, int x_dtype, int64_t ldx, int64_t M, int64_t K, const uint8_t *w,
                        int64_t ldw, int64_t N, const uint16_t *scale, const void *bias, int bias_dtype, void *y,
                        int y_dtype) {
    return codes16_linear(x, x_dtype, ldx, M, K, w, ldw, N, scale, W_Q5_0, bias, bias_dtype, y, y_dtype);
}

static inline void store_value(void *p, int dtype, int64_t i, float v) {
    if (dtype == BF16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* the value as stored in dtype, read back as float32 (bfloat16: rounded) */
static inline float as_stored(int dtype, float v) { return dtype == BF16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* y = rms_normalize(x) * scale per row, then RoPE, as llmarch computes them in torch:
 *   normalize: h = x * rsqrt(sum(x^2) / dim + eps) in float32 (else h = x: RoPE alone);
 *   scale_f32 (Gemma, OLMo 2: the scale in float32): v = h * scale, rounded once to y_dtype;
 *   otherwise (Llama, Qwen): h rounded to y_dtype first, then times the scale (read from
 *   scale_dtype), rounded again, as torch multiplies two tensors of y_dtype;
 *   scale NULL: v = h rounded to y_dtype (a weightless norm);
 *   cos, sin (dim,) of y_dtype, NULL for none: y_j = r(r(v_j cos_j) + r(v_{(j + dim/2) mod dim} sin_j)),
 *   r() the rounding to y_dtype: llmarch.model.layers.apply_rope's three operations (sin with
 *   its first half negated, as llmarch.model.layers.Rotary makes it), the same roundings.
 * x rows ldx apart, scale rows ld_scale apart (0: one scale for every row), y rows ldy apart.
 * Returns 0, or -1 for a row longer than the RoPE buffer (8192). */
#define ROPE_MAX 8192
int llmarch_rms_norm(const void *x, int x_dtype, int64_t ldx, int64_t rows, int64_t dim, int normalize,
                     const void *scale, int scale_dtype, int64_t ld_scale, int scale_f32, float eps,
                     const void *cos, const void *sin, void *y, int y_dtype, int64_t ldy) {
    if (cos && (dim > ROPE_MAX || dim % 2)) return -1;
#pragma omp parallel for schedule(static) if (rows * dim >= (1 << 16))
    for (int64_t r = 0; r < rows; r++) {
        float inv = 1.f;
        if (normalize) {
            float ss = 0.f;
            int64_t k = 0;
            if (x_dtype == F32) {
                const float *xr = (const float *)x + r * ldx;
#ifdef LLMARCH_AVX512
                __m512 a = _mm512_setzero_ps();
                for (; k + 16 <= dim; k += 16) {
                    __m512 v = _mm512_loadu_ps(xr + k);
                    a = _mm512_fmadd_ps(v, v, a);
                }
                ss = _mm512_reduce_add_ps(a);
#elif defined(LLMARCH_AVX2)
                __m256 a = _mm256_setzero_ps();
                for (; k + 8 <= dim; k += 8) {
                    __m256 v = _mm256_loadu_ps(xr + k);
                    a = _mm256_fmadd_ps(v, v, a);
                }
                ss = hsum256(a);
#endif
                for (; k < dim; k++) ss += xr[k] * xr[k];
            } else {
                const uint16_t *xr = (const uint16_t *)x + r * ldx;
#ifdef LLMARCH_AVX512
                __m512 a = _mm512_setzero_ps();
                for (; k + 16 <= dim; k += 16) {
                    __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xr + k))), 16));
                    a = _mm512_fmadd_ps(v, v, a);
                }
                ss = _mm512_reduce_add_ps(a);
#elif defined(LLMARCH_AVX2)
                __m256 a = _mm256_setzero_ps();
                for (; k + 8 <= dim; k += 8) {
                    __m256 v = load_bf16x8(xr + k);
                    a = _mm256_fmadd_ps(v, v, a);
                }
                ss = hsum256(a);
#endif
                for (; k < dim; k++) {
                    float v = bf16_to_f32(xr[k]);
                    ss += v * v;
                }
            }
            float mean = ss / (float)dim + eps;
            inv = 1.0f / sqrtf(mean);
        }
        int64_t off = r * ld_scale;
        float rot[cos ? dim : 1]; /* the row before RoPE, as stored in y_dtype */
        for (int64_t j = 0; j < dim; j++) {
            float h = normalize ? load_value(x, x_dtype, r * ldx + j) * inv : load_value(x, x_dtype, r * ldx + j);
            float v;
            if (!scale)
                v = h;
            else if (scale_f32)
                v = h * load_value(scale, scale_dtype, off + j);
            else
                v = as_stored(y_dtype, h) * load_value(scale, scale_dtype, off + j);
            if (cos)
                rot[j] = as_stored(y_dtype, v);
            else
                store_value(y, y_dtype, r * ldy + j, v);
        }
        if (cos) {
            int64_t half = dim / 2;
            for (int64_t j = 0; j < dim; j++) {
                float a = as_stored(y_dtype, rot[j] * load_value(cos, y_dtype, j));
                float b = as_stored(y_dtype, rot[(j + half) % dim] * load_value(sin, y_dtype, j));
                store_value(y, y_dtype, r * ldy + j, a + b);
            }
        }
    }
    return 0;
}

#ifdef LLMARCH_AVX512
/* e^x for 16 floats (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n),
 * within 2 units of the last place; 0 below -104 (where float32's e^x underflows), as expf */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}
#elif defined(LLMARCH_AVX2)
/* e^x for 8 floats: the same polynomial; 2^n built in the exponent bits, so 0 below about -87
 * (where expf's results fall under 2^-125, float32's smallest normals: nothing in a softmax) */
static inline __m256 exp256(__m256 x) {
    __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654475f), _CMP_GE_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.33654475f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* n in [-126, 128]: 2^n as (n - 1 + 127) << 23 times 2, so that n = 128 stays finite */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
    y = _mm256_mul_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), _mm256_set1_ps(2.0f));
    return _mm256_and_ps(y, tiny);
}
#endif

/* q . k[ko .. ko + D) in float32, k of kv_dtype */
static inline float dot_key(const float *qf, const void *k, int kv_dtype, int64_t ko, int64_t D) {
    float dot = 0.f;
    int64_t d = 0;
#ifdef LLMARCH_AVX512
    __m512 a = _mm512_setzero_ps();
    if (kv_dtype == BF16) {
        const uint16_t *kr = (const uint16_t *)k + ko;
        for (; d + 16 <= D; d += 16) {
            __m512 kv = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(kr + d))), 16));
            a = _mm512_fmadd_ps(kv, _mm512_loadu_ps(qf + d), a);
        }
    } else {
        const float *kr = (const float *)k + ko;
        for (; d + 16 <= D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(kr + d), _mm512_loadu_ps(qf + d), a);
    }
    dot = _mm512_reduce_add_ps(a);
#elif defined(LLMARCH_AVX2)
    __m256 a = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
    if (kv_dtype == BF16) {
        const uint16_t *kr = (const uint16_t *)k + ko;
        for (; d + 16 <= D; d += 16) {
            a = _mm256_fmadd_ps(load_bf16x8(kr + d), _mm256_loadu_ps(qf + d), a);
            a2 = _mm256_fmadd_ps(load_bf16x8(kr + d + 8), _mm256_loadu_ps(qf + d + 8), a2);
        }
    } else {
        const float *kr = (const float *)k + ko;
        for (; d + 16 <= D; d += 16) {
            a = _mm256_fmadd_ps(_mm256_loadu_ps(kr + d), _mm256_loadu_ps(qf + d), a);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(kr + d + 8), _mm256_loadu_ps(qf + d + 8), a2);
        }
    }
    dot = hsum256(_mm256_add_ps(a, a2));
#endif
    for (; d < D; d++) dot += qf[d] * load_value(k, kv_dtype, ko + d);
    return dot;
}

/* acc[0 .. D) += w * v[vo .. vo + D), v of kv_dtype */
static inline void add_value(float *acc, float w, const void *v, int kv_dtype, int64_t vo, int64_t D) {
    int64_t d = 0;
#ifdef LLMARCH_AVX512
    __m512 wv = _mm512_set1_ps(w);
    if (kv_dtype == BF16) {
        const uint16_t *vr = (const uint16_t *)v + vo;
        for (; d + 16 <= D; d += 16) {
            __m512 vv = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vr + d))), 16));
            _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(wv, vv, _mm512_loadu_ps(acc + d)));
        }
    } else {
        const float *vr = (const float *)v + vo;
        for (; d + 16 <= D; d += 16)
            _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(wv, _mm512_loadu_ps(vr + d), _mm512_loadu_ps(acc + d)));
    }
#elif defined(LLMARCH_AVX2)
    __m256 wv = _mm256_set1_ps(w);
    if (kv_dtype == BF16) {
        const uint16_t *vr = (const uint16_t *)v + vo;
        for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(wv, load_bf16x8(vr + d), _mm256_loadu_ps(acc + d)));
    } else {
        const float *vr = (const float *)v + vo;
        for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(vr + d), _mm256_loadu_ps(acc + d)));
    }
#endif
    for (; d < D; d++) acc[d] += w * load_value(v, kv_dtype, vo + d);
}

/* p[0 .. n) = e^(p - mx), returning their sum */
static inline float exp_sum(float *p, int64_t n, float mx) {
    float sum = 0.f;
    int64_t s0 = 0;
#ifdef LLMARCH_AVX512
    __m512 vmx = _mm512_set1_ps(mx), vsum = _mm512_setzero_ps();
    for (; s0 + 16 <= n; s0 += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p + s0), vmx));
        _mm512_storeu_ps(p + s0, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    sum = _mm512_reduce_add_ps(vsum);
#elif defined(LLMARCH_AVX2)
    __m256 vmx = _mm256_set1_ps(mx), vsum = _mm256_setzero_ps();
    for (; s0 + 8 <= n; s0 += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + s0), vmx));
        _mm256_storeu_ps(p + s0, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    sum = hsum256(vsum);
#endif
    for (int64_t s = s0; s < n; s++) {
        float e = expf(p[s] - mx);
        p[s] = e;
        sum += e;
    }
    return sum;
}

/* keys per partial softmax: a fixed split, so that results do not depend on the thread count */
#define ATTEND_CHUNK 128

/* out[b, h] = sum_s p[s] v[b, h / g, s] with p = softmax_s(scale * q[b, h] . k[b, h / g, s] + mask[b, s]),
 * g = heads / kv_heads, all in float32. q: (B, H, D) of q_dtype with strides (qsb, qsh, 1); k, v:
 * (B, KV, S, D) of kv_dtype with strides (ksb, ksh, kss, 1) and (vsb, vsh, vss, 1); mask: NULL or
 * additive (B, S) of mask_dtype with row stride msb; out: (B, H, D) of q_dtype, contiguous. Returns 0, or -1
 * when the scores' buffer cannot be allocated.
 *
 * Each task is one sequence, one KV head and ATTEND_CHUNK of its keys, for the g query heads that
 * share them: a key's and a value's row is read from memory once for all g (Gemma 3: 4 query heads
 * on one KV head), and the chunks of one head run on all threads (flash decoding). A chunk keeps
 * its largest score m, its sum of e^(score - m) l and its weighted values a; the head's output is
 * sum_c e^(m_c - M) a_c / sum_c e^(m_c - M) l_c, M the largest m_c (one chunk: a / l). */
int llmarch_attend_one(const void *q, int q_dtype, int64_t qsb, int64_t qsh, const void *k, const void *v,
                       int kv_dtype, int64_t ksb, int64_t ksh, int64_t kss, int64_t vsb, int64_t vsh, int64_t vss,
                       const void *mask, int mask_dtype, int64_t msb, int64_t B, int64_t H, int64_t KV, int64_t S, int64_t D,
                       float scale, void *out) {
    if (S < 1 || KV < 1 || H % KV) return -2;
    int64_t g = H / KV, C = S < ATTEND_CHUNK ? S : ATTEND_CHUNK, nc = (S + C - 1) / C, tasks = B * KV * nc;
    int64_t per = g * (C + 2 * D + 2); /* a task's scores, query rows, weighted values, m and l */
    int64_t esz = kv_dtype == BF16 ? 2 : 4; /* bytes of a key's or value's element */
    float *buf = (float *)malloc((size_t)(tasks * per + 1) * sizeof(float));
    if (!buf) return -1;
#pragma omp parallel for schedule(static) if (B * H * S * D >= (1 << 16))
    for (int64_t task = 0; task < tasks; task++) {
        int64_t b = task / (KV * nc), kh = task / nc % KV, c = task % nc;
        int64_t s0 = c * C, n = S - s0 < C ? S - s0 : C;
        float *p = buf + task * per, *qf = p + g * C, *acc = qf + g * D, *ml = acc + g * D;
        for (int64_t j = 0; j < g; j++)
            for (int64_t d = 0; d < D; d++) qf[j * D + d] = load_value(q, q_dtype, b * qsb + (kh * g + j) * qsh + d);
        for (int64_t j = 0; j < g; j++) ml[j] = -INFINITY;
        for (int64_t s = 0; s < n; s++) {
            int64_t ko = b * ksb + kh * ksh + (s0 + s) * kss;
            if (s + 4 < n)
                prefetch_row((const char *)k + (ko + 4 * kss) * esz, D * esz);
            float m = mask ? load_value(mask, mask_dtype, b * msb + s0 + s) : 0.f;
            for (int64_t j = 0; j < g; j++) { /* the key's row, read once, stays in L1 for the other heads */
                float sc = dot_key(qf + j * D, k, kv_dtype, ko, D) * scale + m;
                p[j * C + s] = sc;
                if (sc > ml[j]) ml[j] = sc;
            }
        }
        for (int64_t j = 0; j < g; j++)
            ml[g + j] = ml[j] == -INFINITY ? 0.f : exp_sum(p + j * C, n, ml[j]); /* a chunk all -inf counts nothing */
        for (int64_t x = 0; x < g * D; x++) acc[x] = 0.f;
        for (int64_t s = 0; s < n; s++) {
            int64_t vo = b * vsb + kh * vsh + (s0 + s) * vss;
            if (s + 4 < n)
                prefetch_row((const char *)v + (vo + 4 * vss) * esz, D * esz);
            for (int64_t j = 0; j < g; j++)
                if (ml[j] != -INFINITY) add_value(acc + j * D, p[j * C + s], v, kv_dtype, vo, D);
        }
    }
    for (int64_t bh = 0; bh < B * H; bh++) { /* the chunks of each head, in order */
        int64_t b = bh / H, h = bh % H, kh = h / g, j = h % g;
        float M = -INFINITY;
        for (int64_t c = 0; c < nc; c++) {
            float m = buf[((b * KV + kh) * nc + c) * per + g * (C + 2 * D) + j];
            if (m > M) M = m;
        }
        float *o = buf + ((b * KV + kh) * nc) * per + g * C + g * D + j * D; /* chunk 0's values, summed into */
        float l = 0.f;
        for (int64_t c = 0; c < nc; c++) {
            float *t = buf + ((b * KV + kh) * nc + c) * per, *ml = t + g * (C + 2 * D);
            float w = M == -INFINITY ? NAN : ml[j] == -INFINITY ? 0.f : expf(ml[j] - M); /* all masked: NaN, as torch */
            l += w * ml[g + j];
            if (c == 0) {
                if (w != 1.f) for (int64_t d = 0; d < D; d++) o[d] *= w;
            } else if (w != 0.f) {
                float *a = t + g * C + g * D + j * D;
                for (int64_t d = 0; d < D; d++) o[d] += w * a[d];
            }
        }
        float inv = 1.0f / l;
        for (int64_t d = 0; d < D; d++) store_value(out, q_dtype, bh * D + d, o[d] * inv);
    }
    free(buf);
    return 0;
}

/* y (M, N) = x (M, K) W^T + bias for W in torch's int4 CPU packing, as torch lays it out for the
 * CPU it runs on (llmarch.inference.native reads the layout off the packing op): rows in blocks
 * of br (64 on AVX-512, 32 on AVX2), each block K * br / 2 bytes, column k's br / 2 bytes at
 * k * br / 2, byte j holding row j's code (low nibble) and row j + br / 2's (high); w = (code - 8)
 * * scale + zero, (scale, zero) bfloat16 pairs at sz[(g * npad + row) * 2], g = k / group.
 * Per row and group, float32: y += scale * sum_k x_k code_k + (zero - 8 scale) * sum_k x_k.
 * x rows ldx apart (x_dtype); y (M, N) of y_dtype, N <= npad the rows kept. Returns 0, or -1 when
 * the activations' buffer cannot be allocated or br is not an even number up to 64. */
int llmarch_q4_linear(const void *x, int x_dtype, int64_t ldx, int64_t M, int64_t K, const uint8_t *w,
                      int64_t N, int64_t npad, const uint16_t *sz, int64_t group, int64_t br, const void *bias,
                      int bias_dtype, void *y, int y_dtype) {
    if (br < 2 || br > 64 || br % 2 || npad % br) return -1;
    int64_t G = K / group, blocks = npad / br, half = br / 2;
    float *xf = (float *)malloc((size_t)(M * K + M * G + 1) * sizeof(float));
    if (!xf) return -1;
    float *xs = xf + M * K; /* per row of x and group: sum of its inputs */
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            float t = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) {
                float v = load_value(x, x_dtype, m * ldx + k);
                xf[m * K + k] = v;
                t += v;
            }
            xs[m * G + g] = t;
        }
#pragma omp parallel for schedule(static) if (npad * K >= (1 << 18))
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *wb = w + b * half * K;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = xf + m * K;
            float out[64];
            int done = 0;
#ifdef LLMARCH_AVX512
            if (br == 64) {
                __m512 y0 = _mm512_setzero_ps(), y1 = y0, y2 = y0, y3 = y0;
                const __m256i low4 = _mm256_set1_epi8(0x0f);
                const __m512i zmask = _mm512_set1_epi32((int)0xffff0000u);
                for (int64_t g = 0; g < G; g++) {
                    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                    for (int64_t k = g * group; k < (g + 1) * group; k++) {
                        __m256i bytes = _mm256_loadu_si256((const __m256i *)(wb + k * 32));
                        __m256i lo = _mm256_and_si256(bytes, low4);
                        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
                        __m512 xk = _mm512_set1_ps(xm[k]);
                        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo))), xk, a0);
                        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1))), xk, a1);
                        a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi))), xk, a2);
                        a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1))), xk, a3);
                    }
                    const uint16_t *p = sz + (g * npad + b * 64) * 2;
                    __m512 xg = _mm512_set1_ps(xs[m * G + g]), eight = _mm512_set1_ps(8.f);
                    __m512i v;
#define LLMARCH_Q4_GROUP(acc, yv, off)                                                             \
    v = _mm512_loadu_si512((const void *)(p + (off) * 2));                                        \
    {                                                                                             \
        __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));                                \
        __m512 zz = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_and_si512(v, zmask)), _mm512_mul_ps(eight, sc)); \
        yv = _mm512_add_ps(yv, _mm512_add_ps(_mm512_mul_ps(sc, acc), _mm512_mul_ps(zz, xg)));     \
    }
                    LLMARCH_Q4_GROUP(a0, y0, 0)
                    LLMARCH_Q4_GROUP(a1, y1, 16)
                    LLMARCH_Q4_GROUP(a2, y2, 32)
                    LLMARCH_Q4_GROUP(a3, y3, 48)
#undef LLMARCH_Q4_GROUP
                }
                _mm512_storeu_ps(out, y0);
                _mm512_storeu_ps(out + 16, y1);
                _mm512_storeu_ps(out + 32, y2);
                _mm512_storeu_ps(out + 48, y3);
                done = 1;
            }
#endif
#if defined(LLMARCH_AVX512) || defined(LLMARCH_AVX2)
            if (br == 32 && !done) { /* torch's AVX2 layout: 16 bytes a column, rows j and j + 16 */
                __m256 y0 = _mm256_setzero_ps(), y1 = y0, y2 = y0, y3 = y0;
                const __m128i low4 = _mm_set1_epi8(0x0f);
                const __m256i zmask = _mm256_set1_epi32((int)0xffff0000u);
                for (int64_t g = 0; g < G; g++) {
                    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                    for (int64_t k = g * group; k < (g + 1) * group; k++) {
                        __m128i bytes = _mm_loadu_si128((const __m128i *)(wb + k * 16));
                        __m128i lo = _mm_and_si128(bytes, low4);
                        __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
                        __m256 xk = _mm256_set1_ps(xm[k]);
                        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), xk, a0);
                        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), xk, a1);
                        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), xk, a2);
                        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), xk, a3);
                    }
                    const uint16_t *p = sz + (g * npad + b * 32) * 2;
                    __m256 xg = _mm256_set1_ps(xs[m * G + g]), eight = _mm256_set1_ps(8.f);
                    __m256i v;
#define LLMARCH_Q4_GROUP(acc, yv, off)                                                             \
    v = _mm256_loadu_si256((const __m256i *)(p + (off) * 2));                                     \
    {                                                                                             \
        __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));                                \
        __m256 zz = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_and_si256(v, zmask)), _mm256_mul_ps(eight, sc)); \
        yv = _mm256_add_ps(yv, _mm256_add_ps(_mm256_mul_ps(sc, acc), _mm256_mul_ps(zz, xg)));     \
    }
                    LLMARCH_Q4_GROUP(a0, y0, 0)
                    LLMARCH_Q4_GROUP(a1, y1, 8)
                    LLMARCH_Q4_GROUP(a2, y2, 16)
                    LLMARCH_Q4_GROUP(a3, y3, 24)
#undef LLMARCH_Q4_GROUP
                }
                _mm256_storeu_ps(out, y0);
                _mm256_storeu_ps(out + 8, y1);
                _mm256_storeu_ps(out + 16, y2);
                _mm256_storeu_ps(out + 24, y3);
                done = 1;
            }
#endif
            if (!done) {
                for (int r = 0; r < br; r++) out[r] = 0.f;
                for (int64_t g = 0; g < G; g++) {
                    float a[64] = {0};
                    for (int64_t k = g * group; k < (g + 1) * group; k++)
                        for (int64_t j = 0; j < half; j++) {
                            uint8_t byte = wb[k * half + j];
                            a[j] += (float)(byte & 15) * xm[k];
                            a[j + half] += (float)(byte >> 4) * xm[k];
                        }
                    for (int64_t r = 0; r < br; r++) {
                        const uint16_t *p = sz + (g * npad + b * br + r) * 2;
                        float sc = bf16_to_f32(p[0]), zz = bf16_to_f32(p[1]) - 8.f * sc;
                        out[r] = out[r] + (sc * a[r] + zz * xs[m * G + g]);
                    }
                }
            }
            for (int64_t r = 0; r < br && b * br + r < N; r++) {
                int64_t n = b * br + r;
                float vv = out[r] + (bias ? load_value(bias, bias_dtype, n) : 0.f);
                store_value(y, y_dtype, m * N + n, vv);
            }
        }
    }
    free(xf);
    return 0;
}

/* The int4 weight of llmarch_q4_linear (same layout and arguments), rows of blocks [b0, b1)
 * dequantised and transposed: out (K, (b1 - b0) * br) float32, out[k, (b - b0) * br + r] =
 * (code - 8) * scale + zero of row b * br + r (in that order of operations: the values of
 * Int4Linear.rows, to the bit). For products of many rows, where a float GEMM on the weights'
 * float copy, a few blocks at a time, is faster than any int4 kernel here. Returns 0, or -1
 * for a br that is not an even number up to 64 or blocks out of range. */
int llmarch_q4_dequant_t(const uint8_t *w, int64_t K, int64_t npad, const uint16_t *sz, int64_t group,
                         int64_t br, int64_t b0, int64_t b1, float *out) {
    if (br < 2 || br > 64 || br % 2 || npad % br || b0 < 0 || b1 > npad / br || b0 > b1 || group <= 0 || K % group)
        return -1;
    int64_t half = br / 2, cols = (b1 - b0) * br;
#pragma omp parallel for schedule(static) if (cols * K >= (1 << 16))
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *wb = w + b * half * K;
        float sc[64], zz[64];
        for (int64_t g = 0; g < K / group; g++) {
            for (int64_t r = 0; r < br; r++) {
                const uint16_t *p = sz + (g * npad + b * br + r) * 2;
                sc[r] = bf16_to_f32(p[0]);
                zz[r] = bf16_to_f32(p[1]);
            }
            for (int64_t k = g * group; k < (g + 1) * group; k++) {
                const uint8_t *col = wb + k * half;
                float *o = out + k * cols + (b - b0) * br;
                int64_t j = 0;
#if defined(LLMARCH_AVX512) || defined(LLMARCH_AVX2)
                /* 8 bytes: 8 rows' low codes and the 8 rows half a block on; mul then add, as below */
                const __m256i eight = _mm256_set1_epi32(8), low4 = _mm256_set1_epi32(15);
                for (; j + 8 <= half; j += 8) {
                    __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(col + j)));
                    __m256 lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(bytes, low4), eight));
                    __m256 hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bytes, 4), eight));
                    _mm256_storeu_ps(o + j, _mm256_add_ps(_mm256_mul_ps(lo, _mm256_loadu_ps(sc + j)), _mm256_loadu_ps(zz + j)));
                    _mm256_storeu_ps(o + j + half, _mm256_add_ps(_mm256_mul_ps(hi, _mm256_loadu_ps(sc + j + half)),
                                                                 _mm256_loadu_ps(zz + j + half)));
                }
#endif
                for (; j < half; j++) {
                    o[j] = (float)((int)(col[j] & 15) - 8) * sc[j] + zz[j];
                    o[j + half] = (float)((int)(col[j] >> 4) - 8) * sc[j + half] + zz[j + half];
                }
            }
        }
    }
    return 0;
}

/* c (M, N) int32 = a (M, K) int8 times b (N, K) int8 transposed, exact integer sums: torch._int_mm's
 * product (the same values: integer sums have no order), for CPUs where oneDNN has no int8 kernel
 * and torch's falls back to a reference loop (an AVX2 CPU: 150 ms for a 128 x 640 x 1536 product).
 * Rows of a in blocks of 64 (their 16-bit copies stay in cache) against tiles of 4 rows of b
 * widened to 16 bits once per block; on AVX2 two rows of a by four of b at a time (vpmaddwd).
 * Each int32 sum holds k products of at most 128 * 128: exact below K = 131072, as torch's.
 * Returns 0, or -1 when the 16-bit copies cannot be allocated. */
int llmarch_int8_mm(const int8_t *a, int64_t lda, const int8_t *b, int64_t ldb, int64_t M, int64_t N, int64_t K,
                    int32_t *c, int64_t ldc) {
    enum { MB = 64, NB = 4 };
    int64_t K16 = (K + 15) / 16 * 16; /* rows padded with zeros to whole vectors */
    int16_t *a16 = (int16_t *)calloc((size_t)(MB * K16 + 1), sizeof(int16_t));
    int16_t *b16 = (int16_t *)calloc((size_t)(((N + NB - 1) / NB) * NB * K16 + 1), sizeof(int16_t));
    if (!a16 || !b16) {
        free(a16), free(b16);
        return -1;
    }
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) b16[n * K16 + k] = b[n * ldb + k];
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int64_t mn = M - m0 < MB ? M - m0 : MB;
        for (int64_t m = 0; m < mn; m++)
            for (int64_t k = 0; k < K; k++) a16[m * K16 + k] = a[(m0 + m) * lda + k];
#pragma omp parallel for schedule(static) if (mn * N * K >= (1 << 18))
        for (int64_t n0 = 0; n0 < N; n0 += NB) {
            int64_t nn = N - n0 < NB ? N - n0 : NB;
            const int16_t *w = b16 + n0 * K16;
            int64_t m = 0;
#if defined(LLMARCH_AVX512) || defined(LLMARCH_AVX2)
            if (nn == NB) {
                for (; m + 2 <= mn; m += 2) {
                    const int16_t *x0 = a16 + m * K16, *x1 = x0 + K16;
                    __m256i s[2][NB];
                    for (int i = 0; i < 2; i++)
                        for (int j = 0; j < NB; j++) s[i][j] = _mm256_setzero_si256();
                    for (int64_t k = 0; k < K16; k += 16) {
                        __m256i v0 = _mm256_loadu_si256((const __m256i *)(x0 + k));
                        __m256i v1 = _mm256_loadu_si256((const __m256i *)(x1 + k));
                        for (int j = 0; j < NB; j++) {
                            __m256i wj = _mm256_loadu_si256((const __m256i *)(w + j * K16 + k));
                            s[0][j] = _mm256_add_epi32(s[0][j], _mm256_madd_epi16(v0, wj));
                            s[1][j] = _mm256_add_epi32(s[1][j], _mm256_madd_epi16(v1, wj));
                        }
                    }
                    for (int i = 0; i < 2; i++)
                        for (int j = 0; j < NB; j++) {
                            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s[i][j]), _mm256_extracti128_si256(s[i][j], 1));
                            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
                            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
                            c[(m0 + m + i) * ldc + n0 + j] = _mm_cvtsi128_si32(h);
                        }
                }
            }
#endif
            for (; m < mn; m++)
                for (int64_t j = 0; j < nn; j++) {
                    const int16_t *x = a16 + m * K16, *wj = w + j * K16;
                    int32_t acc = 0;
                    for (int64_t k = 0; k < K16; k++) acc += (int32_t)x[k] * (int32_t)wj[k];
                    c[(m0 + m) * ldc + n0 + j] = acc;
                }
        }
    }
    free(a16);
    free(b16);
    return 0;
}

/* y (M, N) float32 = (float(acc[m]) * s1[m] + float(acc[M + m]) * s2[m]) * scale[n]: the sums of
 * two levels of int8 activation codes (llmarch.inference.quant.w8a8_mm's acc, (2M, N) int32)
 * combined with their row scales and the weight's (bfloat16) column scales, the same float32
 * operations in the same order as its five torch operations (so the same bits) in one pass. */
void llmarch_w8a8_combine(const int32_t *acc, const float *s1, const float *s2, const uint16_t *scale,
                          int64_t M, int64_t N, float *y) {
#pragma omp parallel for schedule(static) if (M * N >= (1 << 16))
    for (int64_t m = 0; m < M; m++) {
        const int32_t *a = acc + m * N, *b = acc + (M + m) * N;
        float u = s1[m], v = s2[m];
        for (int64_t n = 0; n < N; n++) {
            float p = (float)a[n] * u, q = (float)b[n] * v;
            y[m * N + n] = (p + q) * bf16_to_f32(scale[n]);
        }
    }
}

/* the index of the first largest value of x[0..n), a NaN counting as larger than any number (the
 * first NaN, then), as torch.argmax computes it; -1 for n < 1. Two passes over the row: its
 * largest value (any NaN noted), then the first place that holds it. */
static int64_t argmax_row(const float *x, int64_t n) {
    if (n < 1)
        return -1;
    int64_t i = 0;
    float best = x[0];
#if defined(LLMARCH_AVX512) || defined(LLMARCH_AVX2)
    if (n >= 32) {
        __m256 m0 = _mm256_loadu_ps(x), m1 = m0, m2 = m0, m3 = m0, nan = _mm256_setzero_ps();
        for (; i + 32 <= n; i += 32) {
            __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
            __m256 c = _mm256_loadu_ps(x + i + 16), d = _mm256_loadu_ps(x + i + 24);
            m0 = _mm256_max_ps(m0, a), m1 = _mm256_max_ps(m1, b), m2 = _mm256_max_ps(m2, c), m3 = _mm256_max_ps(m3, d);
            nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q), _mm256_cmp_ps(b, b, _CMP_UNORD_Q)),
                                                 _mm256_or_ps(_mm256_cmp_ps(c, c, _CMP_UNORD_Q), _mm256_cmp_ps(d, d, _CMP_UNORD_Q))));
        }
        if (!_mm256_testz_ps(nan, nan)) { /* a NaN in the vector part: the first one */
            for (int64_t j = 0;; j++)
                if (x[j] != x[j])
                    return j;
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
        for (int k = 0; k < 8; k++)
            best = lanes[k] > best ? lanes[k] : best;
    }
#endif
    for (; i < n; i++) { /* the rest (the whole row in the portable build) */
        if (x[i] != x[i])
            return i; /* before it, no NaN */
        best = x[i] > best ? x[i] : best;
    }
    int64_t j = 0;
#if defined(LLMARCH_AVX512) || defined(LLMARCH_AVX2)
    __m256 target = _mm256_set1_ps(best);
    for (; j + 8 <= n; j += 8) {
        int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), target, _CMP_EQ_OQ));
        if (hit)
            return j + __builtin_ctz(hit);
    }
#endif
    for (; j < n; j++)
        if (x[j] == best)
            return j;
    return -1; /* not reached: best is one of the values */
}

/* argmax_row of each of `rows` rows of x (leading dimension ldx) into out */
void llmarch_argmax(const float *x, int64_t rows, int64_t n, int64_t ldx, int64_t *out) {
    for (int64_t r = 0; r < rows; r++)
        out[r] = argmax_row(x + r * ldx, n);
}

/* ---------------------------------------------------------------------------------------------
 * One decoding step of a stack of decoder layers, for one token (llmarch.inference.step builds
 * the layers' descriptions from a packed model and checks that they describe it): the same
 * kernels, in the same order, on the same roundings as the model's modules call them one by one
 * (llmarch.model.decoder.Block.layer with llmarch.inference.packed's modules), without the
 * Python and torch dispatch around each of the 15-20 calls of a layer. The one difference: the
 * FFN's activation, computed here as x * sigmoid(.) on the exp above where torch evaluates
 * 0.5 x (1 + tanh(.)) (GELU) or x / (1 + exp(-x)) (SiLU) with its own vector functions: a few
 * units in float32's last place (a bfloat16 result can land on the other side of a rounding).
 * ------------------------------------------------------------------------------------------- */

enum { LIN_Q8 = 1, LIN_Q4 = 2, LIN_Q5_0 = 3 };
enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };

/* a linear layer: y[out_off : out_off + n] = x W^T (+ bias) */
typedef struct {
    const void *w;      /* int8 (n, ldw); re-laid Q5_0 codes, rows ldw bytes apart; int4 in torch's packing (npad, k / 2) */
    const void *scales; /* int8: bfloat16 (n,) or float16 (n, k / 32); Q5_0: float16 (n, k / 32); int4: scales and zeros (k / group, npad, 2) */
    const void *bias;   /* NULL, or (n,) of bias_dtype */
    int64_t n, k, ldw, npad, group, br, out_off;
    int32_t kind, bias_dtype;
} llm_linear;

/* an RMSNorm as llmarch_rms_norm computes it; scale NULL: no norm in this place */
typedef struct {
    const void *scale;
    float eps;
    int32_t scale_dtype, scale_f32, pad_;
} llm_norm;

typedef struct {
    llm_norm attn_norm, attn_post_norm, mlp_norm, mlp_post_norm, q_norm, k_norm;
    llm_linear qkv[3], o, gate_up[2], down;
    /* the fused projections' layout: q, k, v at these offsets of the qkv outputs; gate, up of gate_up's */
    int64_t q_off, k_off, v_off, qkv_width, heads, kv_heads, head_dim, gate_off, up_off, ffn_width;
    void *k_cache, *v_cache; /* (1, kv_heads, size, head_dim) of the activations' dtype */
    int64_t *pos;            /* (1, size): each slot's position, -1 when empty */
    int64_t size, window, chunk; /* window, chunk: 0 for none */
    int64_t slot, keys;      /* this step: the slot written, the slots attended (0 .. keys - 1) */
    float attn_scale;
    int32_t n_qkv, n_gate_up, act, rope; /* rope: the index of the step's (cos, sin) tables, -1 for none */
    int32_t pad_;
} llm_layer;

int64_t llmarch_layer_struct_size(void) { return (int64_t)sizeof(llm_layer); }

static int run_linear(const llm_linear *l, const void *x, int dtype, void *out) {
    char *y = (char *)out + l->out_off * (dtype == BF16 ? 2 : 4);
    if (l->kind == LIN_Q8)
        return llmarch_q8_linear(x, dtype, l->k, 1, l->k, (const int8_t *)l->w, l->ldw, l->n,
                                 (const uint16_t *)l->scales, l->group, l->bias, l->bias_dtype, y, dtype);
    if (l->kind == LIN_Q5_0)
        return llmarch_q5_0_linear(x, dtype, l->k, 1, l->k, (const uint8_t *)l->w, l->ldw, l->n,
                                   (const uint16_t *)l->scales, l->bias, l->bias_dtype, y, dtype);
    if (l->kind == LIN_Q4)
        return llmarch_q4_linear(x, dtype, l->k, 1, l->k, (const uint8_t *)l->w, l->n, l->npad,
                                 (const uint16_t *)l->scales, l->group, l->br, l->bias, l->bias_dtype, y, dtype);
    return -1;
}

static void run_norm(const llm_norm *nm, const void *x, int dtype, int64_t dim, void *y) {
    llmarch_rms_norm(x, dtype, dim, 1, dim, 1, nm->scale, nm->scale_dtype, 0, nm->scale_f32, nm->eps, NULL, NULL,
                     y, dtype, dim);
}

/* x += y, each rounded to dtype as torch adds two tensors */
static void add_rows(void *x, const void *y, int dtype, int64_t n) {
    for (int64_t i = 0; i < n; i++) store_value(x, dtype, i, load_value(x, dtype, i) + load_value(y, dtype, i));
}

/* gate <- act(gate) rounded to dtype, times up, rounded again (torch's two operations) */
static void glu_activation(void *gate, const void *up, int dtype, int64_t n, int act) {
    int64_t i = 0;
#if defined(LLMARCH_AVX512) || defined(LLMARCH_AVX2)
    float buf[16];
    for (; i + 16 <= n; i += 16) {
        for (int j = 0; j < 16; j++) buf[j] = load_value(gate, dtype, i + j);
#ifdef LLMARCH_AVX512
        __m512 g = _mm512_loadu_ps(buf);
        __m512 z = act == ACT_GELU_TANH
            ? _mm512_mul_ps(_mm512_set1_ps(-1.5957691216057308f),  /* -2 sqrt(2 / pi) */
                            _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), g), _mm512_mul_ps(g, g), g))
            : _mm512_sub_ps(_mm512_setzero_ps(), g);
        _mm512_storeu_ps(buf, _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(z))));
#else
        for (int h = 0; h < 16; h += 8) {
            __m256 g = _mm256_loadu_ps(buf + h);
            __m256 z = act == ACT_GELU_TANH
                ? _mm256_mul_ps(_mm256_set1_ps(-1.5957691216057308f),
                                _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), g), _mm256_mul_ps(g, g), g))
                : _mm256_sub_ps(_mm256_setzero_ps(), g);
            /* exp256 gives 0 below -87: x / (1 + 0) = x, as the sigmoid is 1 there */
            _mm256_storeu_ps(buf + h, _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(z))));
        }
#endif
        for (int j = 0; j < 16; j++) {
            float a = as_stored(dtype, buf[j]);
            store_value(gate, dtype, i + j, a * load_value(up, dtype, i + j));
        }
    }
#endif
    for (; i < n; i++) {
        float g = load_value(gate, dtype, i);
        float z = act == ACT_GELU_TANH ? -1.5957691216057308f * (g + 0.044715f * g * g * g) : -g;
        float a = as_stored(dtype, g / (1.0f + expf(z)));
        store_value(gate, dtype, i, a * load_value(up, dtype, i));
    }
}

/* Decoder layers 0 .. n_layers - 1 on one token's residual stream x (hidden,) of dtype, in place:
 *   h = attn_norm(x); q, k, v = qkv(h); q, k = rope(q_norm(q)), rope(k_norm(k)); k, v -> the cache
 *   at slot (pos[slot] = position); a = attention of q over slots 0 .. keys - 1 (a slot visible
 *   when its position p >= 0, p <= position, position - p < window, in position's chunk);
 *   x = x + attn_post_norm(o(a)); x = x + mlp_post_norm(down(act(gate(h')) * up(h'))), h' = mlp_norm(x);
 * each norm skipped where its scale is NULL. cos[i], sin[i]: the step's RoPE tables (head_dim,).
 * mask_min: what a hidden key's score gets (the model's dtype's lowest, as its mask holds).
 * Returns 0, -1 when a buffer cannot be allocated, -2 for a layer this function cannot run. */
int llmarch_decode_layers(const llm_layer *layers, int64_t n_layers, void *x, int dtype, int64_t hidden,
                          int64_t position, const void *const *cos, const void *const *sin, float mask_min) {
    int64_t esz = dtype == BF16 ? 2 : 4, qkv_w = 1, qk_w = 1, att_w = 1, ffn_w = 1, keys = 1;
    for (int64_t i = 0; i < n_layers; i++) {
        const llm_layer *L = layers + i;
        if (L->qkv_width > qkv_w) qkv_w = L->qkv_width;
        if ((L->heads + L->kv_heads) * L->head_dim > qk_w) qk_w = (L->heads + L->kv_heads) * L->head_dim;
        if (L->heads * L->head_dim > att_w) att_w = L->heads * L->head_dim;
        if (2 * L->ffn_width > ffn_w) ffn_w = 2 * L->ffn_width;
        if (L->keys > keys) keys = L->keys;
        if (L->slot < 0 || L->slot >= L->size || L->keys < 1 || L->keys > L->size || L->kv_heads < 1
            || L->heads % L->kv_heads || L->n_qkv < 1 || L->n_qkv > 3 || L->n_gate_up < 1 || L->n_gate_up > 2)
            return -2;
    }
    size_t bytes = (size_t)(3 * hidden + qkv_w + qk_w + att_w + ffn_w) * esz + (size_t)keys * sizeof(float);
    char *buf = (char *)malloc(bytes);
    if (!buf) return -1;
    char *h = buf, *y = h + hidden * esz, *y2 = y + hidden * esz, *qkv = y2 + hidden * esz, *qk = qkv + qkv_w * esz;
    char *att = qk + qk_w * esz, *ffn = att + att_w * esz;
    float *mask = (float *)(ffn + ffn_w * esz);
    int rc = 0;
    for (int64_t i = 0; i < n_layers && rc == 0; i++) {
        const llm_layer *L = layers + i;
        int64_t D = L->head_dim, H = L->heads, KV = L->kv_heads;
        /* attention */
        const void *in = x;
        if (L->attn_norm.scale) {
            run_norm(&L->attn_norm, x, dtype, hidden, h);
            in = h;
        }
        for (int j = 0; j < L->n_qkv && rc == 0; j++) rc = run_linear(&L->qkv[j], in, dtype, qkv);
        if (rc) break;
        const void *c = L->rope >= 0 ? cos[L->rope] : NULL, *s = L->rope >= 0 ? sin[L->rope] : NULL;
        /* queries: normed and rotated into qk; keys straight into their cache slots */
        const llm_norm *qn = &L->q_norm, *kn = &L->k_norm;
        if (qn->scale || c)
            llmarch_rms_norm(qkv + L->q_off * esz, dtype, D, H, D, qn->scale != NULL, qn->scale, qn->scale_dtype, 0,
                             qn->scale_f32, qn->eps, c, s, qk, dtype, D);
        else
            memcpy(qk, qkv + L->q_off * esz, (size_t)(H * D * esz));
        char *kc = (char *)L->k_cache + L->slot * D * esz, *vc = (char *)L->v_cache + L->slot * D * esz;
        int64_t head_stride = L->size * D; /* elements between two heads' rows of a cache */
        if (kn->scale || c)
            llmarch_rms_norm(qkv + L->k_off * esz, dtype, D, KV, D, kn->scale != NULL, kn->scale, kn->scale_dtype, 0,
                             kn->scale_f32, kn->eps, c, s, kc, dtype, head_stride);
        else
            for (int64_t j = 0; j < KV; j++) memcpy(kc + j * head_stride * esz, qkv + (L->k_off + j * D) * esz, (size_t)(D * esz));
        for (int64_t j = 0; j < KV; j++) memcpy(vc + j * head_stride * esz, qkv + (L->v_off + j * D) * esz, (size_t)(D * esz));
        L->pos[L->slot] = position;
        int all = 1;
        for (int64_t t = 0; t < L->keys; t++) {
            int64_t p = L->pos[t];
            int ok = p >= 0 && p <= position && (!L->window || position - p < L->window);
            if (ok && L->chunk) { /* floor division, as torch.div(..., rounding_mode="floor") */
                int64_t a = position / L->chunk - (position % L->chunk < 0), b = p / L->chunk - (p % L->chunk < 0);
                ok = a == b;
            }
            mask[t] = ok ? 0.f : mask_min;
            all &= ok;
        }
        rc = llmarch_attend_one(qk, dtype, H * D, D, L->k_cache, L->v_cache, dtype, KV * head_stride, head_stride, D,
                                KV * head_stride, head_stride, D, all ? NULL : mask, F32, 0, 1, H, KV, L->keys, D,
                                L->attn_scale, att);
        if (rc || (rc = run_linear(&L->o, att, dtype, y))) break;
        if (L->attn_post_norm.scale) {
            run_norm(&L->attn_post_norm, y, dtype, hidden, y2);
            add_rows(x, y2, dtype, hidden);
        } else {
            add_rows(x, y, dtype, hidden);
        }
        /* feed-forward */
        in = x;
        if (L->mlp_norm.scale) {
            run_norm(&L->mlp_norm, x, dtype, hidden, h);
            in = h;
        }
        for (int j = 0; j < L->n_gate_up && rc == 0; j++) rc = run_linear(&L->gate_up[j], in, dtype, ffn);
        if (rc) break;
        glu_activation(ffn + L->gate_off * esz, ffn + L->up_off * esz, dtype, L->ffn_width, L->act);
        if ((rc = run_linear(&L->down, ffn + L->gate_off * esz, dtype, y))) break;
        if (L->mlp_post_norm.scale) {
            run_norm(&L->mlp_post_norm, y, dtype, hidden, y2);
            add_rows(x, y2, dtype, hidden);
        } else {
            add_rows(x, y, dtype, hidden);
        }
    }
    free(buf);
    return rc ? -1 : 0;
}
