/* lb_wo_gemm for 4-bit codes (CODE_U4 and CODE_L4) on AVX-512, any number of activation rows.
 *
 * Not compiled on its own: lowbit_cpu.c includes it inside its AVX-512 section (scale_at, scales16,
 * group_sums, zp_correction, workspace come from there).
 *
 * Weights go by chunks of 128 codes (64 bytes): dword lane i of a chunk holds codes 8i .. 8i+7, nibble k
 * being code 8i + k. One vpermps of a 16-float table (float(u) for CODE_U4, the row's table for CODE_L4)
 * indexed by the lanes shifted right 4k bits (vpermps reads the low 4 bits of each index) turns nibble k
 * of all 16 lanes into floats; they meet the activations reordered to match,
 *     xq[m, 128c + 16k + i] = x[m, 128c + 8i + k]   (zero past K),
 * in float32 FMAs, so every product is exact before accumulation and results agree with the float32
 * kernels to accumulation order. Up to 4 activation rows share one decoding of the weights. Groups are
 * multiples of 32 codes (or one group over all of K): lane quarter j of chunk c (codes 128c + 32j ..
 * 128c + 32j + 31) takes group (128c + 32j) / group; the zero-point term is zp_correction's.
 */
#define CQ 128 /* codes per chunk */

/* xq (M, nch * 128): x (M, K) reordered to the chunks' lane order. */
static void prepare_xq(const float *x, int64_t M, int64_t K, int64_t nch, float *xq) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < nch; c++)
            for (int k = 0; k < 8; k++)
                for (int i = 0; i < 16; i++) {
                    int64_t src = c * CQ + 8 * i + k;
                    xq[(m * nch + c) * CQ + 16 * k + i] = src < K ? x[m * K + src] : 0.0f;
                }
}

/* The 16 lanes' scales of chunk c of row n. */
static inline __m512 chunk_scales(const void *scale, int sk, int64_t n, int64_t G, int64_t group, int64_t c) {
    if (G == 1) return _mm512_set1_ps(scale_at(scale, sk, n));
    if (group % CQ == 0) return _mm512_set1_ps(scale_at(scale, sk, n * G + c * CQ / group));
    const __m512i quarter = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    if (group == 32 || group == 64) {
        int64_t g0 = c * CQ / group, have = G - g0 < CQ / group ? G - g0 : CQ / group;
        __m512 s = scales16(scale, sk, n * G + g0, (__mmask16)((1u << have) - 1));
        return _mm512_permutexvar_ps(group == 32 ? quarter : _mm512_srli_epi32(quarter, 1), s);
    }
    float s[4];
    for (int j = 0; j < 4; j++) {
        int64_t g = (c * CQ + 32 * j) / group;
        s[j] = scale_at(scale, sk, n * G + (g < G ? g : G - 1));
    }
    return _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(_mm_loadu_ps(s)));
}

/* y[m0 + i, n] for i < MB: weight row wr against MB reordered activation rows. */
static inline __attribute__((always_inline)) void row_q4(const uint8_t *wr, int64_t n, int64_t m0, const int MB,
                                                         int64_t nch, int64_t row_bytes, __m512 tbl,
                                                         int64_t group, int64_t G, const void *scale, int sk,
                                                         const void *zp, int zk, float offset, const float *xq,
                                                         const float *xs, float *out) {
    __m512 tot[4];
    float corr[4];
    for (int i = 0; i < MB; i++) tot[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nch; c++) {
        int64_t off = c * (CQ / 2), left = row_bytes - off;
        __m512i v = left >= 64 ? _mm512_loadu_si512(wr + off)
                               : _mm512_maskz_loadu_epi8(_cvtu64_mask64((1ull << left) - 1), wr + off);
        __m512 acc[4][4];
        for (int i = 0; i < MB; i++)
            for (int a = 0; a < 4; a++) acc[i][a] = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            __m512 wk = _mm512_permutexvar_ps(v, tbl);
            v = _mm512_srli_epi32(v, 4);
            for (int i = 0; i < MB; i++) {
                const float *xr = xq + ((m0 + i) * nch + c) * CQ + 16 * k;
                acc[i][k & 3] = _mm512_fmadd_ps(wk, _mm512_loadu_ps(xr), acc[i][k & 3]);
            }
        }
        __m512 sv = chunk_scales(scale, sk, n, G, group, c);
        for (int i = 0; i < MB; i++) {
            __m512 a = _mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3]));
            tot[i] = _mm512_fmadd_ps(a, sv, tot[i]);
        }
    }
    zp_correction(n, m0, MB, G, scale, sk, zp, zk, offset, xs, corr);
    for (int i = 0; i < MB; i++) out[i] = _mm512_reduce_add_ps(tot[i]) - corr[i];
}

static int wo_gemm_q4(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t row_bytes,
                      int code, int offset, int64_t group, int64_t G, const void *scale, int sk, const void *zp,
                      int zk, const float *lut, int64_t lut_stride, const float *bias, float *y, int nthreads) {
    int64_t nch = (K + CQ - 1) / CQ;
    _Alignas(64) uint8_t stack[STACK_WS];
    void *heap;
    uint8_t *ws = workspace(round_up(4 * M * nch * CQ, 64) + round_up(4 * M * G, 64), stack, &heap);
    if (!ws) return -1;
    float *xq = take(&ws, 4 * M * nch * CQ), *xs = take(&ws, 4 * M * G);
    prepare_xq(x, M, K, nch, xq);
    group_sums(x, M, K, group, G, xs);
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wr = w + n * row_bytes;
        __m512 tbl = code == CODE_L4 ? _mm512_loadu_ps(lut + n * lut_stride) : iota;
        float out[4], bn = bias ? bias[n] : 0.0f;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            int64_t mb = M - m0 < 4 ? M - m0 : 4;
            if (mb == 1)
                row_q4(wr, n, m0, 1, nch, row_bytes, tbl, group, G, scale, sk, zp, zk, offset, xq, xs, out);
            else if (mb == 2)
                row_q4(wr, n, m0, 2, nch, row_bytes, tbl, group, G, scale, sk, zp, zk, offset, xq, xs, out);
            else if (mb == 3)
                row_q4(wr, n, m0, 3, nch, row_bytes, tbl, group, G, scale, sk, zp, zk, offset, xq, xs, out);
            else
                row_q4(wr, n, m0, 4, nch, row_bytes, tbl, group, G, scale, sk, zp, zk, offset, xq, xs, out);
            for (int64_t i = 0; i < mb; i++) y[(m0 + i) * N + n] = out[i] + bn;
        }
    }
    free(heap);
    return 0;
}
