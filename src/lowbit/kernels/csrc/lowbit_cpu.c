/* lowbit native CPU kernels: weight-only int8/int4 and W8A8 matmuls that read lowbit's stored bytes.
 *
 * Built by lowbit.kernels.native (cc -O3 -march=native -fopenmp), loaded with ctypes. No Python or
 * torch headers: plain pointers, row-major, contiguous.
 *
 * Weights W (N, K) as stored by lowbit.core.codec, row n at w + n * row_bytes:
 *   CODE_S8  int8 two's complement, one byte per code         w = (q - zp) * s
 *   CODE_U8  uint8, one byte per code                         w = (q - zp) * s
 *   CODE_U4  4-bit, code 2j in the low nibble of byte j       w = (u + offset - zp) * s   (offset = qmin)
 *   CODE_L4  4-bit indices into a 16-entry float table        w = lut[u] * s              (nf4, fp4, log2)
 * The table of row n is lut + n * lut_stride (lut_stride 0: one table for every row).
 * Scales and zero points (N, G), G = ceil(K / group); the last group may be partial.
 * Scales are float32, float16 or bfloat16; zero points absent, int8 or uint8.
 *
 * Per group g of row n:  y[m, n] += s * (sum_k c_k x[m, k]  -  z * sum_k x[m, k]),  z = zp - offset,
 * so codes are turned into floats once and the zero point costs one multiply per group.
 * Activations are copied into a zero-padded buffer (K rounded up to 32; for 4-bit codes in the portable
 * path each block of 32 reordered even-then-odd to match the nibbles; the AVX-512 4-bit path has its own
 * order, lowbit_cpu_q4.c), which is what makes any K and partial groups safe.
 * Per-call buffers sit on the caller's stack up to STACK_WS bytes (decode-sized calls never malloc).
 *
 * lowbit_cpu_q4.c (included in the AVX-512 section) holds lb_wo_gemm's path for 4-bit codes there.
 * lowbit_cpu_a8.c (included at the end) holds lb_wo_gemm_a8: the same weights against activations
 * rounded to int8 per block of 32, with integer dot products (vpdpbusd). lowbit_cpu_decode.c (after it)
 * holds lb_decode_tokens: tokens through a Llama-type decoder on these kernels.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

enum { CODE_S8 = 0, CODE_U8 = 1, CODE_U4 = 2, CODE_L4 = 3 };
enum { SC_F32 = 0, SC_F16 = 1, SC_BF16 = 2 };
enum { ZP_NONE = 0, ZP_S8 = 1, ZP_U8 = 2 };

#define BLK 32              /* codes per inner block */
#define STACK_WS (32 << 10) /* per-call buffers up to this size live on the caller's stack */

int lb_abi_version(void) { return 8; }

static inline int nibbles(int code) { return code == CODE_U4 || code == CODE_L4; }

#ifdef __AVX512F__
int lb_has_avx512(void) { return 1; }
#else
int lb_has_avx512(void) { return 0; }
#endif

static inline float scale_at(const void *p, int kind, int64_t i) {
    if (kind == SC_F32) return ((const float *)p)[i];
    if (kind == SC_F16) return (float)((const _Float16 *)p)[i];
    uint32_t b = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline float zp_at(const void *p, int kind, int64_t i) {
    if (kind == ZP_S8) return (float)((const int8_t *)p)[i];
    if (kind == ZP_U8) return (float)((const uint8_t *)p)[i];
    return 0.0f;
}

static inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

/* A per-call buffer of `bytes`: `stack` (STACK_WS bytes, 64-aligned) when it fits, else the heap (then
 * *heap holds it, for free()). NULL if the heap is out of memory. */
static void *workspace(size_t bytes, void *stack, void **heap) {
    *heap = NULL;
    if (bytes <= STACK_WS) return stack;
    return *heap = aligned_alloc(64, (size_t)round_up((int64_t)bytes, 64));
}

/* The next `bytes` of a workspace cut into 64-byte aligned pieces. */
static inline void *take(uint8_t **p, int64_t bytes) {
    void *r = *p;
    *p += round_up(bytes, 64);
    return r;
}

/* xs (M, G): sums of x (M, K) over each group of `group` columns (the last may be partial). */
static void group_sums(const float *x, int64_t M, int64_t K, int64_t group, int64_t G, float *xs) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            int64_t k1 = (g + 1) * group < K ? (g + 1) * group : K;
            float acc = 0.0f;
            for (int64_t k = g * group; k < k1; k++) acc += x[m * K + k];
            xs[m * G + g] = acc;
        }
}

/* xp (Mp, Kp) padded activations and xs (Mp, G) group sums; rows >= M are zero. */
static void prepare_x(const float *x, int64_t M, int64_t Mp, int64_t K, int64_t Kp, int64_t group,
                      int64_t G, int nibbles, float *xp, float *xs) {
    memset(xp, 0, sizeof(float) * Mp * Kp);
    memset(xs, 0, sizeof(float) * Mp * G);
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        float *dst = xp + m * Kp;
        for (int64_t k = 0; k < K; k++) {
            int64_t b = k / BLK, j = k % BLK;
            int64_t pos = nibbles ? b * BLK + (j % 2) * (BLK / 2) + j / 2 : k;
            dst[pos] = xr[k];
        }
    }
    group_sums(x, M, K, group, G, xs);
}

#ifdef __AVX512F__
/* 16 scales from index i as floats (mask: which of the 16 exist). */
static inline __m512 scales16(const void *p, int kind, int64_t i, __mmask16 mk) {
    if (kind == SC_F32) return _mm512_maskz_loadu_ps(mk, (const float *)p + i);
    __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t *)p + i);
    if (kind == SC_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* corr[i] = sum_g s_g (zp_g - offset) xs[m0 + i, g] for i < MB: the zero-point term of row n, 16 groups
 * at a time. */
static inline void zp_correction(int64_t n, int64_t m0, const int MB, int64_t G, const void *scale, int sk,
                                 const void *zp, int zk, float offset, const float *xs, float *corr) {
    __m512 cv[4];
    for (int i = 0; i < MB; i++) cv[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16) {
        __mmask16 mk = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
        __m512 zv = _mm512_set1_ps(-offset);
        if (zk != ZP_NONE) {
            __m128i zb = _mm_maskz_loadu_epi8(mk, (const uint8_t *)zp + n * G + g);
            __m512i zi = zk == ZP_S8 ? _mm512_cvtepi8_epi32(zb) : _mm512_cvtepu8_epi32(zb);
            zv = _mm512_add_ps(_mm512_cvtepi32_ps(zi), zv);
        }
        __m512 sz = _mm512_mul_ps(scales16(scale, sk, n * G + g, mk), zv);
        for (int i = 0; i < MB; i++)
            cv[i] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(mk, xs + (m0 + i) * G + g), cv[i]);
    }
    for (int i = 0; i < MB; i++) corr[i] = _mm512_reduce_add_ps(cv[i]);
}

/* 32 codes of block kb as two float vectors: codes [0,16) of the block -> *a, [16,32) -> *b
 * (for 4-bit: even codes -> *a, odd -> *b, matching prepare_x's reordering). CODE_L4 looks each index
 * up in the row's table `lut` (one permute per 16 codes). */
static inline void load_block(const uint8_t *wr, int64_t kb, int64_t row_bytes, int code, __m512 lut,
                              __m512 *a, __m512 *b) {
    if (nibbles(code)) {
        int64_t off = kb * 16, left = row_bytes - off;
        __m128i raw = left >= 16 ? _mm_loadu_si128((const __m128i *)(wr + off))
                                 : _mm_maskz_loadu_epi8((__mmask16)((1u << left) - 1), wr + off);
        __m512i v = _mm512_cvtepu8_epi32(raw);
        __m512i lo = _mm512_and_si512(v, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(v, 4);
        if (code == CODE_L4) {
            *a = _mm512_permutexvar_ps(lo, lut);
            *b = _mm512_permutexvar_ps(hi, lut);
        } else {
            *a = _mm512_cvtepi32_ps(lo);
            *b = _mm512_cvtepi32_ps(hi);
        }
        return;
    }
    int64_t off = kb * BLK, left = row_bytes - off;
    __mmask32 mk = left >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
    __m256i raw = _mm256_maskz_loadu_epi8(mk, wr + off);
    __m128i lo = _mm256_castsi256_si128(raw), hi = _mm256_extracti128_si256(raw, 1);
    if (code == CODE_S8) {
        *a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo));
        *b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi));
    } else {
        *a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
        *b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
    }
}

/* y[m0 + i, n] for i < MB: one weight row against MB padded activation rows. */
static inline __attribute__((always_inline)) void row_mb(const uint8_t *wr, int64_t n, int64_t m0,
                                                         const int MB, int64_t Kp, int64_t row_bytes,
                                                         int code, float offset, int64_t group,
                                                         int64_t G, const void *scale, int sk,
                                                         const void *zp, int zk, const float *lut,
                                                         const float *xp, const float *xs, float *out) {
    __m512 lv = lut ? _mm512_loadu_ps(lut) : _mm512_setzero_ps();
    __m512 tot[4];
    float corr[4];
    for (int i = 0; i < MB; i++) tot[i] = _mm512_setzero_ps();
    __m512 r1 = _mm512_setzero_ps(), r2 = r1, r3 = r1, r4 = r1; /* MB == 1 chains */
    int64_t nblk = Kp / BLK, per = group / BLK;
    for (int64_t g = 0; g < G; g++) {
        float s = scale_at(scale, sk, n * G + g);
        int64_t kb0 = g * per, kb1 = g == G - 1 ? nblk : kb0 + per;
        /* independent FMA chains: a/b halves, and for one row two blocks at a time (FMA latency) */
        __m512 acc[4], acc2[4];
        for (int i = 0; i < MB; i++) acc[i] = acc2[i] = _mm512_setzero_ps();
        int64_t kb = kb0;
        if (MB == 1) {
            /* one row: scale the codes, accumulate across groups in four chains (no per-group sums) */
            __m512 sv1 = _mm512_set1_ps(s);
            for (; kb < kb1; kb++) {
                __m512 a, b;
                load_block(wr, kb, row_bytes, code, lv, &a, &b);
                const float *xr = xp + m0 * Kp + kb * BLK;
                if (kb & 1) {
                    r3 = _mm512_fmadd_ps(_mm512_mul_ps(a, sv1), _mm512_loadu_ps(xr), r3);
                    r4 = _mm512_fmadd_ps(_mm512_mul_ps(b, sv1), _mm512_loadu_ps(xr + 16), r4);
                } else {
                    r1 = _mm512_fmadd_ps(_mm512_mul_ps(a, sv1), _mm512_loadu_ps(xr), r1);
                    r2 = _mm512_fmadd_ps(_mm512_mul_ps(b, sv1), _mm512_loadu_ps(xr + 16), r2);
                }
            }
            continue;
        }
        for (; kb < kb1; kb++) {
            __m512 a, b;
            load_block(wr, kb, row_bytes, code, lv, &a, &b);
            for (int i = 0; i < MB; i++) {
                const float *xr = xp + (m0 + i) * Kp + kb * BLK;
                acc[i] = _mm512_fmadd_ps(a, _mm512_loadu_ps(xr), acc[i]);
                acc2[i] = _mm512_fmadd_ps(b, _mm512_loadu_ps(xr + 16), acc2[i]);
            }
        }
        __m512 sv = _mm512_set1_ps(s);
        for (int i = 0; i < MB; i++) tot[i] = _mm512_fmadd_ps(_mm512_add_ps(acc[i], acc2[i]), sv, tot[i]);
    }
    if (MB == 1) tot[0] = _mm512_add_ps(_mm512_add_ps(r1, r2), _mm512_add_ps(r3, r4));
    zp_correction(n, m0, MB, G, scale, sk, zp, zk, offset, xs, corr);
    for (int i = 0; i < MB; i++) out[i] = _mm512_reduce_add_ps(tot[i]) - corr[i];
}

#include "lowbit_cpu_q4.c" /* 4-bit codes: a permute turns 16 nibbles into floats */
#else
static inline float code_at(const uint8_t *wr, int64_t k, int code, const float *lut) {
    if (code == CODE_L4) return lut[(wr[k / 2] >> ((k % 2) * 4)) & 15];
    if (code == CODE_U4) return (float)((wr[k / 2] >> ((k % 2) * 4)) & 15);
    if (code == CODE_S8) return (float)(int8_t)wr[k];
    return (float)wr[k];
}

static inline void row_mb(const uint8_t *wr, int64_t n, int64_t m0, const int MB, int64_t Kp,
                          int64_t row_bytes, int code, float offset, int64_t group, int64_t G,
                          const void *scale, int sk, const void *zp, int zk, const float *lut,
                          const float *xp, const float *xs, float *out) {
    int64_t K = nibbles(code) ? row_bytes * 2 : row_bytes;
    for (int i = 0; i < MB; i++) {
        const float *xr = xp + (m0 + i) * Kp;
        float tot = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            float s = scale_at(scale, sk, n * G + g), z = zp_at(zp, zk, n * G + g) - offset;
            int64_t k1 = (g + 1) * group < K ? (g + 1) * group : K;
            float acc = 0.0f;
            for (int64_t k = g * group; k < k1; k++) {
                int64_t pos = nibbles(code) ? k / BLK * BLK + (k % 2) * (BLK / 2) + (k % BLK) / 2 : k;
                acc += code_at(wr, k, code, lut) * xr[pos];
            }
            tot += s * (acc - z * xs[(m0 + i) * G + g]);
        }
        out[i] = tot;
    }
}
#endif

/* y (M, N) = x (M, K) @ W.T (+ bias). group: codes per scale along K (K for per-channel); it must be a
 * multiple of 32 unless it covers all of K. Returns 0, or -1 if a buffer could not be allocated. */
int lb_wo_gemm(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t row_bytes,
               int code, int offset, int64_t group, const void *scale, int sk, const void *zp, int zk,
               const float *lut, int64_t lut_stride, const float *bias, float *y, int nthreads) {
    int64_t Kp = round_up(K, BLK), Mp = round_up(M, 4), G = (K + group - 1) / group;
    if (group >= K) group = Kp;
#ifdef __AVX512F__
    if (nibbles(code))
        return wo_gemm_q4(x, M, K, w, N, row_bytes, code, offset, group, G, scale, sk, zp, zk, lut, lut_stride,
                          bias, y, nthreads);
#endif
    _Alignas(64) uint8_t stack[STACK_WS];
    void *heap;
    uint8_t *ws = workspace(round_up(4 * Mp * Kp, 64) + round_up(4 * Mp * G, 64), stack, &heap);
    if (!ws) return -1;
    float *xp = take(&ws, 4 * Mp * Kp), *xs = take(&ws, 4 * Mp * G);
    prepare_x(x, M, Mp, K, Kp, group, G, nibbles(code), xp, xs);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wr = w + n * row_bytes;
        const float *ln = lut ? lut + n * lut_stride : NULL;
        float out[4] = {0, 0, 0, 0};
        float bn = bias ? bias[n] : 0.0f;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            if (M - m0 == 1) {
                row_mb(wr, n, m0, 1, Kp, row_bytes, code, (float)offset, group, G, scale, sk, zp, zk,
                       ln, xp, xs, out);
            } else {
                row_mb(wr, n, m0, 4, Kp, row_bytes, code, (float)offset, group, G, scale, sk, zp, zk,
                       ln, xp, xs, out);
            }
            for (int64_t i = 0; i < 4 && m0 + i < M; i++) y[(m0 + i) * N + n] = out[i] + bn;
        }
    }
    free(heap);
    return 0;
}

/* out (n1 - n0, K) float32: rows n0..n1 of W dequantized (for large batches: tile, then sgemm). */
void lb_dequant_rows(const uint8_t *w, int64_t n0, int64_t n1, int64_t K, int64_t row_bytes, int code,
                     int offset, int64_t group, const void *scale, int sk, const void *zp, int zk,
                     const float *lut, int64_t lut_stride, float *out, int nthreads) {
    int64_t G = (K + group - 1) / group;
#ifdef __AVX512F__
    if (group % BLK == 0 || G == 1) {
        /* 32 codes a step: load_block's two halves (4-bit: even and odd codes, interleaved back) */
        const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t n = n0; n < n1; n++) {
            const uint8_t *wr = w + n * row_bytes;
            float *o = out + (n - n0) * K;
            __m512 lv = lut ? _mm512_loadu_ps(lut + n * lut_stride) : _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += BLK) {
                int64_t g = k / group;
                float s = scale_at(scale, sk, n * G + g), z = zp_at(zp, zk, n * G + g) - (float)offset;
                __m512 a, b, sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
                load_block(wr, k / BLK, row_bytes, code, lv, &a, &b);
                if (nibbles(code)) {
                    __m512 t = _mm512_permutex2var_ps(a, lo_idx, b);
                    b = _mm512_permutex2var_ps(a, hi_idx, b);
                    a = t;
                }
                int64_t left = K - k;
                __mmask16 m0 = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                __mmask16 m1 = left >= 32 ? (__mmask16)0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
                _mm512_mask_storeu_ps(o + k, m0, _mm512_mul_ps(_mm512_sub_ps(a, zv), sv)); /* as the reference */
                _mm512_mask_storeu_ps(o + k + 16, m1, _mm512_mul_ps(_mm512_sub_ps(b, zv), sv));
            }
        }
        return;
    }
#endif
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * row_bytes;
        float *o = out + (n - n0) * K;
        for (int64_t g = 0; g < G; g++) {
            float s = scale_at(scale, sk, n * G + g), z = zp_at(zp, zk, n * G + g) - (float)offset;
            int64_t k1 = (g + 1) * group < K ? (g + 1) * group : K;
            int64_t k0 = g * group;
            if (code == CODE_L4) {
                const float *ln = lut + n * lut_stride;
                for (int64_t k = k0; k < k1; k++) o[k] = (ln[(wr[k >> 1] >> ((k & 1) * 4)) & 15] - z) * s;
            } else if (code == CODE_U4) {
                for (int64_t k = k0; k < k1; k++) o[k] = ((float)((wr[k >> 1] >> ((k & 1) * 4)) & 15) - z) * s;
            } else if (code == CODE_S8) {
                const int8_t *ws = (const int8_t *)wr;
                for (int64_t k = k0; k < k1; k++) o[k] = ((float)ws[k] - z) * s;
            } else {
                for (int64_t k = k0; k < k1; k++) o[k] = ((float)wr[k] - z) * s;
            }
        }
    }
}

/* Per-row asymmetric uint8 qparams of x (K values), exactly as lowbit.core.primitives.choose_qparams
 * gives them for QuantSpec("uint8", symmetric=False, PerToken()): the range always holds 0; a constant
 * row c gets scale |c| (1 for zeros) and zero point 1 if c < 0 else 0; otherwise
 * scale = hi / 255 - lo / 255 and zero point -round(lo / scale), clamped to [0, 255]. */
static float row_qparams(const float *xr, int64_t K, int *zp_out) {
    float mn = xr[0], mx = xr[0];
    for (int64_t k = 1; k < K; k++) {
        mn = fminf(mn, xr[k]);
        mx = fmaxf(mx, xr[k]);
    }
    float s;
    int zp;
    if (mn == mx) {
        s = fabsf(mn);
        if (s == 0.0f) s = 1.0f;
        zp = mn < 0.0f ? 1 : 0;
    } else {
        float lo = fminf(mn, 0.0f), hi = fmaxf(mx, 0.0f);
        s = hi / 255.0f - lo / 255.0f;
        if (s == 0.0f) s = 1.0f;
    }
    if (s < 1.17549435e-38f) s = 1.17549435e-38f;
    if (mn != mx) {
        float z = -nearbyintf(fminf(mn, 0.0f) / s);
        zp = z < 0.0f ? 0 : (z > 255.0f ? 255 : (int)z);
    }
    *zp_out = zp;
    return s;
}

/* W8A8: x (M, K) float32 quantized per row to uint8 with a zero point (row_qparams; codes
 * clamp(round_half_even(x / s) + zp, 0, 255)), times int8 W (N, K) with one scale per row, int32
 * accumulation: y = (sum(xq * w) - zp * sum(w)) * s * w_scale + bias. xs_out (M) receives the scales. */
int lb_w8a8_gemm(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t N, const void *scale,
                 int sk, const float *bias, float *y, float *xs_out, int nthreads) {
    int64_t Kp = round_up(K, 64);
    _Alignas(64) uint8_t stack[STACK_WS];
    void *heap;
    uint8_t *ws = workspace(round_up(M * Kp, 64) + round_up(4 * M, 64), stack, &heap);
    if (!ws) return -1;
    uint8_t *xq = take(&ws, M * Kp);
    int32_t *zps = take(&ws, 4 * M);
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        int zp;
        float s = row_qparams(xr, K, &zp);
        xs_out[m] = s;
        zps[m] = zp;
        for (int64_t k = 0; k < K; k++) {
            float q = nearbyintf(xr[k] / s) + (float)zp;
            q = q < 0.0f ? 0.0f : (q > 255.0f ? 255.0f : q);
            xq[m * Kp + k] = (uint8_t)q;
        }
        for (int64_t k = K; k < Kp; k++) xq[m * Kp + k] = (uint8_t)zp; /* the real 0 (W is 0 there too) */
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wr = w + n * K;
        float sw = scale_at(scale, sk, n), bn = bias ? bias[n] : 0.0f;
        for (int64_t m = 0; m < M; m++) {
            const uint8_t *xr = xq + m * Kp;
            int32_t dot = 0, wsum = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
            __m512i acc = _mm512_setzero_si512(), sum = _mm512_setzero_si512();
            const __m512i ones = _mm512_set1_epi8(1);
            for (int64_t k = 0; k < K; k += 64) {
                int64_t left = K - k;
                __mmask64 mk = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
                __m512i wv = _mm512_maskz_loadu_epi8(mk, wr + k);
                __m512i xv = _mm512_loadu_si512((const void *)(xr + k));
                acc = _mm512_dpbusd_epi32(acc, xv, wv);
                sum = _mm512_dpbusd_epi32(sum, ones, wv);
            }
            dot = _mm512_reduce_add_epi32(acc);
            wsum = _mm512_reduce_add_epi32(sum);
#else
            for (int64_t k = 0; k < K; k++) {
                dot += (int32_t)xr[k] * (int32_t)wr[k];
                wsum += wr[k];
            }
#endif
            y[m * N + n] = (float)(dot - zps[m] * wsum) * (xs_out[m] * sw) + bn;
        }
    }
    free(heap);
    return 0;
}

#include "lowbit_cpu_a8.c" /* weight-only matmul on int8 activations (same translation unit) */
#include "lowbit_cpu_decode.c" /* tokens through every layer of a decoder in one call */
