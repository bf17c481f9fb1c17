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
 *                       at 30-35 GB/s (the memory's rate), with float32 activations and sums.
 *   llmarch_rms_norm    x * rsqrt(mean(x^2) + eps), times a scale, in one pass over each row:
 *                       torch's inference RMSNorm is nine operations (casts, pow, mean, add,
 *                       rsqrt, two multiplies) of a few microseconds each, and a decoding step
 *                       runs one per norm: 91 for Gemma 3 270M.
 *   llmarch_attend_one  softmax(q k^T * scale + mask) v for one query per sequence (decoding),
 *                       query heads grouped over their KV head, in float32: the dozen torch
 *                       operations of llmarch.inference.packed.single_query_attention in one.
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
#endif

enum { F32 = 0, BF16 = 1 };

/* bumped whenever a signature changes: native.py refuses a library of another version */
int llmarch_abi_version(void) { return 3; }

/* 1 when this build's kernels use AVX-512 (reported by native.py) */
int llmarch_avx512(void) {
#ifdef LLMARCH_AVX512
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

/* sum_k x[k] * w[k], float32 x, int8 w */
static inline float dot_q8(const float *x, const int8_t *w, int64_t K) {
    int64_t k = 0;
    float s = 0.f;
#ifdef LLMARCH_AVX512
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 16))));
        a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), a1);
    }
    if (k < K) { /* the tail, masked: at most 31 inputs */
        int64_t left = K - k;
        __mmask16 m0 = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        __mmask16 m1 = left > 16 ? (__mmask16)((1u << (left - 16)) - 1u) : (__mmask16)0;
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m0, w + k)));
        a0 = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, x + k), a0);
        if (m1) {
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m1, w + k + 16)));
            a1 = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m1, x + k + 16), a1);
        }
        k = K;
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    /* portable: eight partial sums, which compilers vectorise without reassociating */
    float acc[8] = {0};
    for (; k + 8 <= K; k += 8)
        for (int j = 0; j < 8; j++) acc[j] += x[k + j] * (float)w[k + j];
    for (; k < K; k++) acc[0] += x[k] * (float)w[k];
    s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
#endif
    return s;
}

/* y (M, N) = x (M, K) W^T * scale + bias.
 *   x: float32 or bfloat16 (x_dtype), rows ldx apart; W: int8 (N, K), rows ldw >= K apart;
 *   scale: bfloat16 (N,); bias: NULL or (N,) of bias_dtype; y: y_dtype, rows N apart.
 * Returns 0, or -1 when the activations' float32 copy cannot be allocated. */
int llmarch_q8_linear(const void *x, int x_dtype, int64_t ldx, int64_t M, int64_t K,
                      const int8_t *w, int64_t ldw, int64_t N, const uint16_t *scale,
                      const void *bias, int bias_dtype, void *y, int y_dtype) {
    float *xf = (float *)malloc((size_t)(M * K > 0 ? M * K : 1) * sizeof(float));
    if (!xf) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) xf[m * K + k] = load_value(x, x_dtype, m * ldx + k);
    /* one thread for small matrices: a parallel region costs a few microseconds */
#pragma omp parallel for schedule(static) if (N * K >= (1 << 18))
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wn = w + n * ldw;
        float sc = bf16_to_f32(scale[n]);
        float b = bias ? load_value(bias, bias_dtype, n) : 0.f;
        for (int64_t m = 0; m < M; m++) {
            float v = dot_q8(xf + m * K, wn, K) * sc + b;
            if (y_dtype == BF16)
                ((uint16_t *)y)[m * N + n] = f32_to_bf16(v);
            else
                ((float *)y)[m * N + n] = v;
        }
    }
    free(xf);
    return 0;
}

static inline void store_value(void *p, int dtype, int64_t i, float v) {
    if (dtype == BF16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* the value as stored in dtype, read back as float32 (bfloat16: rounded) */
static inline float as_stored(int dtype, float v) { return dtype == BF16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* y = rms_normalize(x) * scale per row, as llmarch.model.layers.RMSNorm computes it:
 *   h = x * rsqrt(sum(x^2) / dim + eps), float32;
 *   scale_f32 (Gemma, OLMo 2: the scale in float32): y = h * scale, rounded once to y_dtype;
 *   otherwise (Llama, Qwen): h rounded to y_dtype first, then times the scale (read from
 *   scale_dtype), rounded again, as torch multiplies two tensors of y_dtype;
 *   scale NULL: y = h rounded to y_dtype (a weightless norm).
 * x rows ldx apart, scale rows ld_scale apart (0: one scale for every row), y rows ldy apart. */
void llmarch_rms_norm(const void *x, int x_dtype, int64_t ldx, int64_t rows, int64_t dim, const void *scale,
                      int scale_dtype, int64_t ld_scale, int scale_f32, float eps, void *y, int y_dtype, int64_t ldy) {
#pragma omp parallel for schedule(static) if (rows * dim >= (1 << 16))
    for (int64_t r = 0; r < rows; r++) {
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
#endif
            for (; k < dim; k++) {
                float v = bf16_to_f32(xr[k]);
                ss += v * v;
            }
        }
        float mean = ss / (float)dim + eps;
        float inv = 1.0f / sqrtf(mean);
        const void *sr = scale;
        int64_t off = r * ld_scale;
        for (int64_t j = 0; j < dim; j++) {
            float h = load_value(x, x_dtype, r * ldx + j) * inv;
            float v;
            if (!sr)
                v = h;
            else if (scale_f32)
                v = h * load_value(sr, scale_dtype, off + j);
            else
                v = as_stored(y_dtype, h) * load_value(sr, scale_dtype, off + j);
            store_value(y, y_dtype, r * ldy + j, v);
        }
    }
}

/* out[b, h] = sum_s p[s] v[b, h / g, s] with p = softmax_s(scale * q[b, h] . k[b, h / g, s] + mask[b, s]),
 * g = heads / kv_heads, all in float32. q: (B, H, D) of q_dtype with strides (qsb, qsh, 1); k, v:
 * (B, KV, S, D) of kv_dtype with strides (ksb, ksh, kss, 1) and (vsb, vsh, vss, 1); mask: NULL or
 * additive (B, S) of mask_dtype with row stride msb; out: (B, H, D) of q_dtype, contiguous. Returns 0, or -1
 * when the scores' buffer cannot be allocated. */
int llmarch_attend_one(const void *q, int q_dtype, int64_t qsb, int64_t qsh, const void *k, const void *v,
                       int kv_dtype, int64_t ksb, int64_t ksh, int64_t kss, int64_t vsb, int64_t vsh, int64_t vss,
                       const void *mask, int mask_dtype, int64_t msb, int64_t B, int64_t H, int64_t KV, int64_t S, int64_t D,
                       float scale, void *out) {
    int64_t g = H / KV;
    float *buf = (float *)malloc((size_t)(B * H * (S + 2 * D) + 1) * sizeof(float));
    if (!buf) return -1;
#pragma omp parallel for schedule(static) if (B * H * S * D >= (1 << 16))
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H, kh = h / g;
        float *p = buf + bh * (S + 2 * D), *qf = p + S, *acc = qf + D;
        for (int64_t d = 0; d < D; d++) qf[d] = load_value(q, q_dtype, b * qsb + h * qsh + d);
        float mx = -INFINITY;
        for (int64_t s = 0; s < S; s++) {
            int64_t ko = b * ksb + kh * ksh + s * kss;
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
#endif
            for (; d < D; d++) dot += qf[d] * load_value(k, kv_dtype, ko + d);
            float sc = dot * scale + (mask ? load_value(mask, mask_dtype, b * msb + s) : 0.f);
            p[s] = sc;
            if (sc > mx) mx = sc;
        }
        float sum = 0.f;
        for (int64_t s = 0; s < S; s++) {
            float e = expf(p[s] - mx);
            p[s] = e;
            sum += e;
        }
        for (int64_t d = 0; d < D; d++) acc[d] = 0.f;
        for (int64_t s = 0; s < S; s++) {
            float w = p[s];
            int64_t vo = b * vsb + kh * vsh + s * vss;
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
#endif
            for (; d < D; d++) acc[d] += w * load_value(v, kv_dtype, vo + d);
        }
        float inv = 1.0f / sum;
        for (int64_t d = 0; d < D; d++) store_value(out, q_dtype, bh * D + d, acc[d] * inv);
    }
    free(buf);
    return 0;
}
