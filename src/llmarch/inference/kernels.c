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
 *
 * Threads: OpenMP, linked by soname against the libgomp that torch itself loaded, so the kernels
 * run on torch's own thread team (torch.set_num_threads applies) and never add a second one.
 * Results do not depend on the thread count or on how many rows are computed together: each
 * output is one row's dot product, always summed in the same order.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LLMARCH_AVX512 1
#endif

enum { F32 = 0, BF16 = 1 };

/* bumped whenever a signature changes: native.py refuses a library of another version */
int llmarch_abi_version(void) { return 1; }

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
