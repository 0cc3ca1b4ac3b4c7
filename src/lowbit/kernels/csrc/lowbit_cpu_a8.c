/* lowbit native CPU kernels, part 2: weight-only matmul on int8 activations ("a8"), llama.cpp's Q8_0 way.
 *
 * Not compiled on its own: lowbit_cpu.c includes it at its end (one translation unit, one library), so
 * it uses the code kinds, the scale readers and the workspace helpers defined there.
 *
 * The rule (tested against a torch reference in tests/kernels/test_cpu_native_a8.py):
 *   each activation row is cut into blocks of 32 along K (zero-padded past K); block b gets the scale
 *   d_b = max|x_b| / 127 and codes q = clamp(round_half_even(x * (1 / d_b)), -127, 127), as llama.cpp's
 *   Q8_0 (which rounds halves away from zero); a block whose d_b is below FLT_MIN (zero, subnormal) gets
 *   d_b = 0 and codes 0, one holding a NaN or an infinity d_b = NaN (its outputs are NaN);
 *   y[m, n] = sum_g s_g * sum_{b in g} d_b * (sum_k c_k q_k - (zp_g - offset) * sum_k q_k) + bias[n].
 * The group g of block b is b / (group / 32): groups must be multiples of 32, or one group the whole row.
 *
 * Evaluation: with z0 the code offset (-offset; 128 for int8, whose codes go in as c + 128), the
 * integer part sum_k (c_k - z0) q_k of every block is exact (int32); it is turned into float and scaled
 * by d_b s_g, and the stored zero point comes off once per group as s_g zp_g T_g, T_g = sum_b d_b sum_k q_k
 * (float; the float kernels do the same with their group sums). Float sums run in a different order
 * in the AVX-512 and the portable code (differences ~1e-7 relative).
 *
 * AVX-512 VNNI: weights go by units of 64 bytes (4-bit: 128 codes; 8-bit: 64 codes), one load each;
 * 4-bit units split into low nibbles (codes 2j) and high nibbles (codes 2j + 1) by an and and a GF(2)
 * affine shift. Each activation row is arranged once per call to match: per unit the codes meeting the
 * low and the high nibbles (64 bytes each; 8-bit: the 64 codes), d_b for each of the 16 int32 lanes of
 * vpdpbusd's result (every lane sums codes of one block) and the lanes' -z0 * sum q, the accumulator's
 * start. A unit is one (8-bit) or two (4-bit) vpdpbusd per activation row, one convert, one multiply by
 * d_b s_g, one FMA. A row's scales are turned into floats once; a unit within one group broadcasts its
 * scale, otherwise a permute picks each lane's. One activation row (decode) meets four weight rows at a
 * time (shared activation loads, one horizontal sum for four outputs); weights are prefetched ahead, and
 * workers take chunks of rows dynamically.
 *
 * Many activation rows (from A8_MANY_ROWS): workers take tiles of 32 weight rows and unpack each one's codes
 * once per call into u8 operands (per block, vector j holds codes 4j .. 4j + 3 of each row of a strip of 16
 * as its int32 lane). Four activation rows meet two strips at a time, a broadcast activation quad per
 * vpdpbusd; each lane ends a block with its exact sum, scaled by d_b into runs of up to 8 blocks, runs by
 * s_g into the total (outputs differ from the one-row path's by float rounding, ~1e-6 relative).
 */

#define A8_UNIT_W 64           /* weight bytes per unit */
#define A8_PF_ROWS 8           /* weights are prefetched this many rows ahead (two passes of four rows) */
#define A8_CHUNKS 8            /* row chunks per worker, taken dynamically: one that loses its core delays
                                  the call by a chunk, not by half of it */
#define PARALLEL_MIN (1 << 17) /* multiply-adds below which one thread runs the call (no fork/join) */
#ifdef _OPENMP
#define A8_WORKER omp_get_thread_num() /* 0 in the one-thread team a false if() clause makes */
#else
#define A8_WORKER 0
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define A8_SIMD 1
int lb_has_vnni(void) { return 1; }
#else
int lb_has_vnni(void) { return 0; }
#endif

enum { A8_ONE, A8_UNIT, A8_LANES }; /* one group; each unit within one group; groups vary across lanes */

/* Shapes of one call: blocks per unit, units, padded blocks, blocks per group, bytes per arranged unit,
 * floats per row of scales in a worker's buffer (whole 64-byte stores, and a 32-group window past any). */
typedef struct {
    int nib, bpu, z0, mode;
    int64_t K, G, U, nbp, per, ub, gp;
} a8_shape;

static a8_shape a8_shape_of(int64_t K, int code, int offset, int64_t group) {
    a8_shape s;
    s.nib = code == CODE_U4;
    s.bpu = s.nib ? 4 : 2;
    s.z0 = (code == CODE_S8 ? 128 : 0) - offset;
    s.K = K;
    s.G = (K + group - 1) / group;
    s.U = (K + s.bpu * BLK - 1) / (s.bpu * BLK);
    s.nbp = s.U * s.bpu;
    s.per = s.G == 1 ? s.nbp : group / BLK;
    s.ub = (s.nib ? 128 : 64) + 128; /* codes, 16 float d, 16 int32 -z0 * sum q */
    s.gp = round_up(s.G, 16) + 16;
    s.mode = s.G == 1 ? A8_ONE : s.per % s.bpu == 0 ? A8_UNIT : A8_LANES;
    return s;
}

/* The a8 rule for one row x (K): q (nbp * 32 codes, natural order), d (nbp) and block sums qs (nbp).
 * Both code paths compute x * (1 / d_b) and round half to even, so they give the same codes. */
static void a8_quantize(const float *x, int64_t K, int64_t nbp, int8_t *q, float *d, int32_t *qs) {
    for (int64_t b = 0; b < nbp; b++) {
        int64_t k0 = b * BLK, left = K - k0;
#ifdef A8_SIMD
        __mmask16 m0 = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        __mmask16 m1 = left >= 32 ? (__mmask16)0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
        __m512 a = _mm512_maskz_loadu_ps(m0, x + k0), c = _mm512_maskz_loadu_ps(m1, x + k0 + 16);
        __m512 aa = _mm512_abs_ps(a), ac = _mm512_abs_ps(c), inf = _mm512_set1_ps(INFINITY);
        int bad = (_mm512_cmp_ps_mask(aa, inf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(ac, inf, _CMP_NLT_UQ)) != 0;
        float db = bad ? NAN : _mm512_reduce_max_ps(_mm512_max_ps(aa, ac)) / 127.0f;
        d[b] = db >= FLT_MIN || bad ? db : 0.0f;
        if (!(db >= FLT_MIN)) {
            memset(q + k0, 0, BLK);
            qs[b] = 0;
            continue;
        }
        const __m512 id = _mm512_set1_ps(1.0f / db), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
        __m512i qa = _mm512_cvt_roundps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(a, id), lo), hi),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512i qc = _mm512_cvt_roundps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(c, id), lo), hi),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(q + k0), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(q + k0 + 16), _mm512_cvtepi32_epi8(qc));
        qs[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
#else
        int64_t n = left >= BLK ? BLK : left > 0 ? left : 0;
        float amax = 0.0f;
        int bad = 0;
        for (int64_t k = 0; k < n; k++) {
            amax = fmaxf(amax, fabsf(x[k0 + k]));
            bad |= !isfinite(x[k0 + k]);
        }
        float db = bad ? NAN : amax / 127.0f, id = db >= FLT_MIN ? 1.0f / db : 0.0f;
        int32_t sum = 0;
        d[b] = db >= FLT_MIN || bad ? db : 0.0f;
        memset(q + k0, 0, BLK);
        for (int64_t k = 0; k < n && db >= FLT_MIN; k++) {
            float r = fminf(fmaxf(x[k0 + k] * id, -127.0f), 127.0f);
            q[k0 + k] = (int8_t)nearbyintf(r);
            sum += q[k0 + k];
        }
        qs[b] = sum;
#endif
    }
}

/* T (G) for one row: T_g = sum_{b in g} d_b qs_b, the factor of the stored zero point of group g (the last
 * group also takes the padding blocks). */
static void a8_zp_sums(const a8_shape *s, const float *d, const int32_t *qs, float *T) {
    for (int64_t g = 0, b = 0; g < s->G; g++)
        for (T[g] = 0.0f; b < (g == s->G - 1 ? s->nbp : (g + 1) * s->per); b++) T[g] += d[b] * (float)qs[b];
}

#ifdef A8_SIMD
/* One row's units (see the top of the file) from its natural-order codes q and block scales d. */
static void a8_arrange(const a8_shape *s, const int8_t *q, const float *d, uint8_t *xa) {
    const __m512i ones = _mm512_set1_epi8(1), neg_z0 = _mm512_set1_epi32(-s->z0);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i blk = _mm512_srli_epi32(lane, s->nib ? 2 : 3); /* the block of each lane in its unit */
    for (int64_t u = 0; u < s->U; u++) {
        uint8_t *xu = xa + u * s->ub;
        __m512i sums;
        if (s->nib) {
            const int8_t *qu = q + u * 128;
            __m512i lo, hi;
#ifdef __AVX512VBMI__
            const __m512i ev = _mm512_set_epi8(126, 124, 122, 120, 118, 116, 114, 112, 110, 108, 106, 104, 102,
                100, 98, 96, 94, 92, 90, 88, 86, 84, 82, 80, 78, 76, 74, 72, 70, 68, 66, 64, 62, 60, 58, 56,
                54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8,
                6, 4, 2, 0);
            __m512i a = _mm512_loadu_si512(qu), b = _mm512_loadu_si512(qu + 64);
            lo = _mm512_permutex2var_epi8(a, ev, b);
            hi = _mm512_permutex2var_epi8(a, _mm512_add_epi8(ev, ones), b);
#else
            int8_t t[128];
            for (int j = 0; j < 64; j++) t[j] = qu[2 * j], t[64 + j] = qu[2 * j + 1];
            lo = _mm512_loadu_si512(t);
            hi = _mm512_loadu_si512(t + 64);
#endif
            _mm512_storeu_si512(xu, lo);
            _mm512_storeu_si512(xu + 64, hi);
            sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, lo), ones, hi);
        } else {
            __m512i v = _mm512_loadu_si512(q + u * 64);
            _mm512_storeu_si512(xu, v);
            sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, v);
        }
        __m512 dl = _mm512_permutexvar_ps(blk, _mm512_maskz_loadu_ps((__mmask16)((1u << s->bpu) - 1), d + u * s->bpu));
        int64_t qb = s->nib ? 128 : 64;
        _mm512_storeu_ps(xu + qb, dl);
        _mm512_storeu_si512(xu + qb + 64, _mm512_mullo_epi32(sums, neg_z0));
    }
}

/* wb (U): the group of each unit (A8_UNIT), or the first of the 32 groups its lanes pick their scales
 * from (A8_LANES: a multiple of 16, so that both halves are whole stores of a8_row_scales);
 * gidx (U, 16): each lane's group less wb. */
static void a8_groups(const a8_shape *s, int32_t *gidx, int32_t *wb) {
    int lpb = 16 / s->bpu;
    for (int64_t u = 0; u < s->U; u++)
        for (int l = 0; l < 16; l++) {
            int64_t b = u * s->bpu + l / lpb, g = b / s->per < s->G ? b / s->per : s->G - 1;
            if (l == 0) wb[u] = (int32_t)(s->mode == A8_LANES ? g & ~(int64_t)15 : g);
            gidx[u * 16 + l] = (int32_t)(g - wb[u]);
        }
}

#endif /* A8_SIMD */

/* What the workers of one call share. */
typedef struct {
    a8_shape s;
    const uint8_t *w;
    int64_t M, row_bytes;
    int code, sk, zk;
    const void *scale, *zp;
    const float *bias;
    float *y;
    int64_t N;
    const int8_t *q;     /* (M, nbp * 32) codes, natural order */
    const float *d, *T;  /* (M, nbp) block scales; (M, G) zero-point factors */
    const int32_t *qs;   /* (M, nbp) block sums of the codes */
    const uint8_t *xa;   /* (M, U * ub) arranged units (AVX-512) */
    const int32_t *gidx; /* (U, 16) lane groups less wb (U), the group of each unit's first lane */
    const int32_t *wb;
    float *sf;           /* (threads, 4, gp): each worker's current rows of scales as floats */
} a8_call;

#ifdef A8_SIMD

/* The u8 operands of one unit of weights v: 4-bit low nibbles in *lo, high nibbles in *hi; 8-bit codes
 * in *lo (int8 codes + 128: flip is 0x80 in every byte for them, else 0). */
static inline __attribute__((always_inline)) void a8_split(__m512i v, __m512i flip, const int NIB, __m512i *lo,
                                                           __m512i *hi) {
    const __m512i m4 = _mm512_set1_epi8(15);
    *lo = *hi = NIB ? _mm512_and_si512(v, m4) : _mm512_xor_si512(v, flip);
#ifdef __GFNI__
    if (NIB) *hi = _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020408000000000LL), 0); /* v >> 4 */
#else
    if (NIB) *hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
#endif
}

/* One unit of weights v (64 bytes) against MB arranged activation units xu + i * xst, into tot[i]:
 * tot += float(sum (c - z0) q per lane) * d_lane * s_lane (A8_ONE: without s). */
static inline __attribute__((always_inline)) void a8_unit(__m512i v, __m512i flip, const uint8_t *xu,
                                                          int64_t xst, __m512 sv, const int MB, const int NIB,
                                                          const int MODE, __m512 *tot) {
    const int64_t qb = NIB ? 128 : 64;
    __m512i lo, hi;
    a8_split(v, flip, NIB, &lo, &hi);
    for (int i = 0; i < MB; i++) {
        const uint8_t *x = xu + i * xst;
        __m512i acc = _mm512_dpbusd_epi32(_mm512_loadu_si512(x + qb + 64), lo, _mm512_loadu_si512(x));
        if (NIB) acc = _mm512_dpbusd_epi32(acc, hi, _mm512_loadu_si512(x + 64));
        __m512 dv = _mm512_loadu_ps(x + qb);
        tot[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), MODE == A8_ONE ? dv : _mm512_mul_ps(dv, sv), tot[i]);
    }
}

/* The scales of unit u's lanes, from the row's float scales sf. */
static inline __attribute__((always_inline)) __m512 a8_lane_scales(const a8_call *c, const float *sf, int64_t u,
                                                                   const int MODE) {
    if (MODE == A8_UNIT) return _mm512_set1_ps(sf[c->wb[u]]);
    if (MODE == A8_LANES)
        return _mm512_permutex2var_ps(_mm512_loadu_ps(sf + c->wb[u]), _mm512_loadu_si512(c->gidx + u * 16),
                                      _mm512_loadu_ps(sf + c->wb[u] + 16));
    return _mm512_setzero_ps();
}

/* y[m0 + i, n] for i < MB, row n's scales in sf. NIB: 4-bit codes. Units alternate between two sets of
 * accumulators (FMA latency); the zero-point term comes off the lanes before the one horizontal sum. */
static inline __attribute__((always_inline)) void a8_row(const a8_call *c, const float *sf, int64_t n, int64_t m0,
                                                         const int MB, const int NIB, const int MODE) {
    const a8_shape *s = &c->s;
    const int64_t ub = s->ub, xst = s->U * ub, U = s->U, full = c->row_bytes / A8_UNIT_W, G = s->G;
    const uint8_t *wr = c->w + n * c->row_bytes, *xa = c->xa + m0 * xst;
    const __m512i flip = _mm512_set1_epi8(c->code == CODE_S8 ? (char)0x80 : 0);
    __m512 t0[4], t1[4];
    for (int i = 0; i < MB; i++) t0[i] = t1[i] = _mm512_setzero_ps();
    int64_t u = 0;
    for (; u + 2 <= full; u += 2) {
        _mm_prefetch((const char *)wr + A8_PF_ROWS * c->row_bytes + u * A8_UNIT_W, _MM_HINT_T0);
        _mm_prefetch((const char *)wr + A8_PF_ROWS * c->row_bytes + (u + 1) * A8_UNIT_W, _MM_HINT_T0);
        a8_unit(_mm512_loadu_si512(wr + u * A8_UNIT_W), flip, xa + u * ub, xst, a8_lane_scales(c, sf, u, MODE),
                MB, NIB, MODE, t0);
        a8_unit(_mm512_loadu_si512(wr + (u + 1) * A8_UNIT_W), flip, xa + (u + 1) * ub, xst,
                a8_lane_scales(c, sf, u + 1, MODE), MB, NIB, MODE, t1);
    }
    for (; u < U; u++) {
        int64_t left = c->row_bytes - u * A8_UNIT_W;
        __mmask64 mk = left >= A8_UNIT_W ? ~(__mmask64)0 : ((__mmask64)1 << left) - 1;
        a8_unit(_mm512_maskz_loadu_epi8(mk, wr + u * A8_UNIT_W), flip, xa + u * ub, xst,
                a8_lane_scales(c, sf, u, MODE), MB, NIB, MODE, t0);
    }
    for (int i = 0; i < MB; i++) t0[i] = _mm512_add_ps(t0[i], t1[i]);
    if (MODE == A8_ONE)
        for (int i = 0; i < MB; i++) t0[i] = _mm512_mul_ps(t0[i], _mm512_set1_ps(sf[0]));
    for (int64_t g = 0; c->zk != ZP_NONE && g < G; g += 16) { /* - s_g zp_g T_g */
        __mmask16 mk = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
        __m128i zb = _mm_maskz_loadu_epi8(mk, (const uint8_t *)c->zp + n * G + g);
        __m512i zi = c->zk == ZP_S8 ? _mm512_cvtepi8_epi32(zb) : _mm512_cvtepu8_epi32(zb);
        __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, sf + g), _mm512_cvtepi32_ps(zi));
        for (int i = 0; i < MB; i++)
            t0[i] = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(mk, c->T + (m0 + i) * G + g), t0[i]);
    }
    float bn = c->bias ? c->bias[n] : 0.0f;
    for (int i = 0; i < MB; i++) c->y[(m0 + i) * c->N + n] = _mm512_reduce_add_ps(t0[i]) + bn;
}

/* sf + i * gp (i < r): the scales of row n + i as floats, 16 at a time (whole stores: later loads of
 * them are forwarded from one store, never stalled on two). */
static inline void a8_row_scales(const a8_call *c, int64_t n, int64_t r, float *sf) {
    const int64_t G = c->s.G;
    for (int64_t i = 0; i < r; i++)
        for (int64_t g = 0; g < G; g += 16) {
            __mmask16 mk = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
            _mm512_storeu_ps(sf + i * c->s.gp + g, scales16(c->scale, c->sk, (n + i) * G + g, mk));
        }
}

/* Unit u of weight rows n .. n + 3 (MASKED: the last, partial unit) against activation row 0, into t[r]. */
static inline __attribute__((always_inline)) void a8_quad_unit(const a8_call *c, const float *sf, int64_t n,
                                                               int64_t u, const int NIB, const int MODE,
                                                               const int MASKED, __m512 *t) {
    const a8_shape *s = &c->s;
    const int64_t qb = NIB ? 128 : 64, left = c->row_bytes - u * A8_UNIT_W, gp = s->gp;
    const uint8_t *xu = c->xa + u * s->ub, *wu = c->w + n * c->row_bytes + u * A8_UNIT_W;
    const __m512i flip = _mm512_set1_epi8(c->code == CODE_S8 ? (char)0x80 : 0);
    const __mmask64 mk = MASKED ? ((__mmask64)1 << left) - 1 : ~(__mmask64)0;
    __m512i ql = _mm512_loadu_si512(xu), qh = _mm512_loadu_si512(xu + (NIB ? 64 : 0));
    const __m512i gi = MODE == A8_LANES ? _mm512_loadu_si512(c->gidx + u * 16) : _mm512_setzero_si512();
    const float *su = sf + c->wb[u];
    __m512 dv = _mm512_loadu_ps(xu + qb);
    for (int r = 0; r < 4; r++) {
        const uint8_t *wr = wu + r * c->row_bytes;
        _mm_prefetch((const char *)wr + A8_PF_ROWS * c->row_bytes, _MM_HINT_T0);
        __m512i lo, hi;
        a8_split(MASKED ? _mm512_maskz_loadu_epi8(mk, wr) : _mm512_loadu_si512(wr), flip, NIB, &lo, &hi);
        __m512i acc = _mm512_dpbusd_epi32(_mm512_loadu_si512(xu + qb + 64), lo, ql);
        if (NIB) acc = _mm512_dpbusd_epi32(acc, hi, qh);
        __m512 sv = MODE == A8_UNIT ? _mm512_set1_ps(su[r * gp])
                    : MODE == A8_LANES
                        ? _mm512_permutex2var_ps(_mm512_loadu_ps(su + r * gp), gi, _mm512_loadu_ps(su + r * gp + 16))
                        : dv;
        t[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), MODE == A8_ONE ? dv : _mm512_mul_ps(dv, sv), t[r]);
    }
}

/* y[0, n .. n + 3] for one activation row: four weight rows share the activation loads and one
 * horizontal sum (4 vectors -> 4 floats, then one store). sf: the four rows' scales. */
static inline __attribute__((always_inline)) void a8_quad(const a8_call *c, const float *sf, int64_t n,
                                                          const int NIB, const int MODE) {
    const int64_t G = c->s.G, gp = c->s.gp, full = c->row_bytes / A8_UNIT_W;
    __m512 t[4];
    for (int r = 0; r < 4; r++) t[r] = _mm512_setzero_ps();
    int64_t u = 0;
    for (; u < full; u++) a8_quad_unit(c, sf, n, u, NIB, MODE, 0, t);
    if (u < c->s.U) a8_quad_unit(c, sf, n, u, NIB, MODE, 1, t);
    for (int r = 0; r < 4 && MODE == A8_ONE; r++) t[r] = _mm512_mul_ps(t[r], _mm512_set1_ps(sf[r * gp]));
    for (int64_t g = 0; c->zk != ZP_NONE && g < G; g += 16) { /* - s_g zp_g T_g (rows innermost: t stays in
                                                                 registers) */
        __mmask16 mk = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
        __m512 tg = _mm512_maskz_loadu_ps(mk, c->T + g);
        for (int r = 0; r < 4; r++) {
            __m128i zb = _mm_maskz_loadu_epi8(mk, (const uint8_t *)c->zp + (n + r) * G + g);
            __m512i zi = c->zk == ZP_S8 ? _mm512_cvtepi8_epi32(zb) : _mm512_cvtepu8_epi32(zb);
            __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, sf + r * gp + g), _mm512_cvtepi32_ps(zi));
            t[r] = _mm512_fnmadd_ps(sz, tg, t[r]);
        }
    }
    /* [t0 | t1] 256-bit halves added, then 128-bit quarters: one 128-bit lane per row, then within lanes */
    __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x44), _mm512_shuffle_f32x4(t[0], t[1], 0xEE));
    __m512 b = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], 0x44), _mm512_shuffle_f32x4(t[2], t[3], 0xEE));
    __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
    q = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4E));
    q = _mm512_add_ps(q, _mm512_permute_ps(q, 0xB1));
    __m128 y4 = _mm512_castps512_ps128(
        _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), q));
    if (c->bias) y4 = _mm_add_ps(y4, _mm_loadu_ps(c->bias + n));
    _mm_storeu_ps(c->y + n, y4);
}

/* Rows n0 .. n1 - 1 of y for every activation row: one activation row four weight rows at a time,
 * else 4, 2 and 1 activation rows at a time; sf: this worker's buffer for four rows of scales. */
static inline __attribute__((always_inline)) void a8_span_of(const a8_call *c, float *sf, int64_t n0, int64_t n1,
                                                             const int NIB, const int MODE) {
    int64_t n = n0;
    for (; c->M == 1 && n + 4 <= n1; n += 4) {
        a8_row_scales(c, n, 4, sf);
        a8_quad(c, sf, n, NIB, MODE);
    }
    for (; n < n1; n++) {
        a8_row_scales(c, n, 1, sf);
        int64_t m0 = 0;
        for (; m0 + 4 <= c->M; m0 += 4) a8_row(c, sf, n, m0, 4, NIB, MODE);
        if (c->M - m0 >= 2) {
            a8_row(c, sf, n, m0, 2, NIB, MODE);
            m0 += 2;
        }
        if (m0 < c->M) a8_row(c, sf, n, m0, 1, NIB, MODE);
    }
}

/* Rows n0 .. n1 - 1 of y, by worker t. */
static void a8_span(const a8_call *c, int t, int64_t n0, int64_t n1) {
    const a8_shape *s = &c->s;
    float *sf = c->sf + t * 4 * s->gp;
    const int mode = s->mode;
    if (s->nib) {
        if (mode == A8_ONE) a8_span_of(c, sf, n0, n1, 1, A8_ONE);
        else if (mode == A8_UNIT) a8_span_of(c, sf, n0, n1, 1, A8_UNIT);
        else a8_span_of(c, sf, n0, n1, 1, A8_LANES);
    } else {
        if (mode == A8_ONE) a8_span_of(c, sf, n0, n1, 0, A8_ONE);
        else if (mode == A8_UNIT) a8_span_of(c, sf, n0, n1, 0, A8_UNIT);
        else a8_span_of(c, sf, n0, n1, 0, A8_LANES);
    }
}
#else
/* Rows n0 .. n1 - 1 of y, block by block from the natural-order codes (exact integer sums per block). */
static void a8_span(const a8_call *c, int t, int64_t n0, int64_t n1) {
    (void)t;
    const a8_shape *s = &c->s;
    int64_t nblk = (s->K + BLK - 1) / BLK, G = s->G;
    int32_t z0 = s->z0 - (c->code == CODE_S8 ? 128 : 0); /* the codes are read signed here */
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = c->w + n * c->row_bytes;
        for (int64_t m = 0; m < c->M; m++) {
            const int8_t *qm = c->q + m * s->nbp * BLK;
            float tot = 0.0f;
            for (int64_t b = 0; b < nblk; b++) {
                int64_t g = b / s->per < G ? b / s->per : G - 1, k1 = (b + 1) * BLK < s->K ? (b + 1) * BLK : s->K;
                int32_t acc = -z0 * c->qs[m * s->nbp + b];
                for (int64_t k = b * BLK; k < k1; k++) {
                    int32_t code = c->code == CODE_U4 ? (wr[k / 2] >> ((k % 2) * 4)) & 15
                                 : c->code == CODE_S8 ? (int32_t)(int8_t)wr[k] : (int32_t)wr[k];
                    acc += code * qm[k];
                }
                tot += (float)acc * (c->d[m * s->nbp + b] * scale_at(c->scale, c->sk, n * G + g));
            }
            for (int64_t g = 0; g < G; g++) /* - s_g zp_g T_g */
                tot -= scale_at(c->scale, c->sk, n * G + g) * zp_at(c->zp, c->zk, n * G + g) * c->T[m * G + g];
            c->y[m * c->N + n] = tot + (c->bias ? c->bias[n] : 0.0f);
        }
    }
}
#endif

#include "lowbit_cpu_a8_many.c" /* the many-row path: a8_many */

/* Bytes of the workspace of one call with nt workers, piece by piece as lb_wo_gemm_a8 takes them. */
static int64_t a8_workspace(const a8_shape *s, int64_t M, int nt) {
    (void)nt;
    int64_t b = round_up(M * s->nbp * BLK, 64) + 2 * round_up(4 * M * s->nbp, 64) + round_up(4 * M * s->G, 64);
#ifdef A8_SIMD
    b += round_up(M * s->U * s->ub, 64) + round_up(s->U * 64, 64) + round_up(s->U * 4, 64);
    b += round_up(4 * nt * 4 * s->gp, 64);
#endif
    return b;
}

/* y (M, N) = x (M, K) @ W.T (+ bias) by the a8 rule above, for integer codes (CODE_S8, CODE_U8,
 * CODE_U4). group: codes per scale along K (K for per-channel), a multiple of 32 unless it covers all of K.
 * Returns 0, -1 if the workspace could not be allocated, -2 for codes or groups it does not take. */
int lb_wo_gemm_a8(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t row_bytes,
                  int code, int offset, int64_t group, const void *scale, int sk, const void *zp, int zk,
                  const float *bias, float *y, int nthreads) {
    if (code == CODE_L4 || group < 1 || (group < K && group % BLK != 0)) return -2;
    a8_call c = {.s = a8_shape_of(K, code, offset, group), .w = w, .M = M, .row_bytes = row_bytes, .code = code,
                 .sk = sk, .zk = zk, .scale = scale, .zp = zp, .bias = bias, .y = y, .N = N};
    const a8_shape *s = &c.s;
    int nt = nthreads > 1 ? nthreads : 1;
#ifdef A8_SIMD
    if (M >= A8_MANY_ROWS) return a8_many(&c, x, nt);
#endif
    _Alignas(64) uint8_t stack[STACK_WS];
    void *heap;
    uint8_t *ws = workspace((size_t)a8_workspace(s, M, nt), stack, &heap);
    if (!ws) return -1;
    int8_t *q = take(&ws, M * s->nbp * BLK);
    float *d = take(&ws, 4 * M * s->nbp), *T = take(&ws, 4 * M * s->G);
    int32_t *qs = take(&ws, 4 * M * s->nbp);
    for (int64_t m = 0; m < M; m++) {
        a8_quantize(x + m * K, K, s->nbp, q + m * s->nbp * BLK, d + m * s->nbp, qs + m * s->nbp);
        a8_zp_sums(s, d + m * s->nbp, qs + m * s->nbp, T + m * s->G);
    }
    c.q = q, c.d = d, c.T = T, c.qs = qs;
#ifdef A8_SIMD
    uint8_t *xa = take(&ws, M * s->U * s->ub);
    int32_t *gidx = take(&ws, s->U * 64), *wb = take(&ws, s->U * 4);
    for (int64_t m = 0; m < M; m++) a8_arrange(s, q + m * s->nbp * BLK, d + m * s->nbp, xa + m * s->U * s->ub);
    a8_groups(s, gidx, wb);
    c.xa = xa, c.gidx = gidx, c.wb = wb, c.sf = take(&ws, 4 * nt * 4 * s->gp);
    memset(c.sf, 0, sizeof(float) * nt * 4 * s->gp); /* the window past a row's scales reads zeros */
#endif
    int64_t rows = round_up((N + nt * A8_CHUNKS - 1) / (nt * A8_CHUNKS) + 1, 4), chunks = (N + rows - 1) / rows;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (N * K * M >= PARALLEL_MIN)
    for (int64_t ch = 0; ch < chunks; ch++)
        a8_span(&c, A8_WORKER, ch * rows, ch * rows + rows < N ? ch * rows + rows : N);
    free(heap);
    return 0;
}
