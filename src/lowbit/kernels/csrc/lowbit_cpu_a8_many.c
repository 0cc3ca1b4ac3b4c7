/* lb_wo_gemm_a8 for many activation rows (M >= A8_MANY_ROWS, a prompt): weight tiles unpacked once per call
 * into vpdpbusd operands, four activation rows per pass. Not compiled on its own: lowbit_cpu_a8.c includes
 * it (same translation unit, after the one-row path's helpers); see that file's header for the rule.
 */
#ifdef A8_SIMD
#define A8_MANY_ROWS 5      /* activation rows from which the tiled path below runs */
#define A8_TN 32            /* weight rows per tile: two strips of 16, one int32 lane each */
#define A8_MR 4             /* activation rows per pass over a tile */
#define A8_RUN 8            /* blocks summed before their group's scale is applied */
#define A8_TB (A8_TN * BLK) /* bytes of one block of a tile */

typedef struct {
    int64_t n0;    /* the tile's first weight row, -1 before the first */
    uint8_t *w;    /* (nb, 8, A8_TN, 4): block, quad j, row, codes 4j .. 4j + 3 as u8 operands */
    float *s, *sz; /* (G, A8_TN) scales, scales times zero points; tmp: (2, A8_TN, gp) the same row by row */
    float *tmp;
} a8_tile;

/* Bytes [off, off + 16) of rows i, 4 + i, 8 + i, 12 + i of p, one row per 128-bit lane (mk: the bytes
 * inside the rows; off is 0 where none is). */
static inline __m512i a8_lanes(const uint8_t *const *p, int i, int64_t off, __mmask16 mk) {
    __m512i z = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(mk, p[i] + off));
    z = _mm512_inserti32x4(z, _mm_maskz_loadu_epi8(mk, p[4 + i] + off), 1);
    z = _mm512_inserti32x4(z, _mm_maskz_loadu_epi8(mk, p[8 + i] + off), 2);
    return _mm512_inserti32x4(z, _mm_maskz_loadu_epi8(mk, p[12 + i] + off), 3);
}

/* Block b of the 16 weight rows p as u8 operands at o (bytes past the rows' read as 0): a[h][i] gets quads
 * 4h .. 4h + 3 of row 4l + i in 128-bit lane l, then 4x4 int32 transposes within lanes put quad j of the
 * 16 rows, in row order, at o + j * 128. */
static void a8_pack_block(const a8_call *c, const uint8_t *const *p, int64_t b, uint8_t *o) {
    const __m512i m4 = _mm512_set1_epi8(15), flip = _mm512_set1_epi8(c->code == CODE_S8 ? (char)0x80 : 0);
    int64_t off = b * (c->s.nib ? 16 : 32), v[2];
    __mmask16 mk[2];
    for (int h = 0; h < 2; h++) {
        v[h] = c->row_bytes - off - 16 * h < 0 ? 0 : c->row_bytes - off - 16 * h;
        mk[h] = v[h] >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << v[h]) - 1);
    }
    __m512i a[2][4];
    for (int i = 0; i < 4; i++) {
        if (c->s.nib) { /* code 2j in the low nibble of byte j: interleaved back into k order */
            __m512i z = a8_lanes(p, i, v[0] ? off : 0, mk[0]), l4 = _mm512_and_si512(z, m4);
            __m512i h4 = _mm512_and_si512(_mm512_srli_epi16(z, 4), m4);
            a[0][i] = _mm512_unpacklo_epi8(l4, h4), a[1][i] = _mm512_unpackhi_epi8(l4, h4);
        } else
            for (int h = 0; h < 2; h++)
                a[h][i] = _mm512_xor_si512(a8_lanes(p, i, v[h] ? off + 16 * h : 0, mk[h]), flip);
    }
    for (int h = 0; h < 2; h++, o += 16 * A8_TN) {
        __m512i t0 = _mm512_unpacklo_epi32(a[h][0], a[h][1]), t1 = _mm512_unpackhi_epi32(a[h][0], a[h][1]);
        __m512i t2 = _mm512_unpacklo_epi32(a[h][2], a[h][3]), t3 = _mm512_unpackhi_epi32(a[h][2], a[h][3]);
        _mm512_store_si512(o, _mm512_unpacklo_epi64(t0, t2));
        _mm512_store_si512(o + 4 * A8_TN, _mm512_unpackhi_epi64(t0, t2));
        _mm512_store_si512(o + 8 * A8_TN, _mm512_unpacklo_epi64(t1, t3));
        _mm512_store_si512(o + 12 * A8_TN, _mm512_unpackhi_epi64(t1, t3));
    }
}

/* Tile t <- weight rows n0 .. n0 + A8_TN - 1: codes strip by strip; scales and scales times zero points
 * row by row into tmp, then gathered group-major. Rows past N repeat row N - 1 (their lanes are never
 * stored). */
static void a8_pack(const a8_call *c, int64_t n0, a8_tile *t) {
    const int64_t nb = (c->s.K + BLK - 1) / BLK, G = c->s.G, gp = c->s.gp;
    const int64_t rows = c->N - n0 < A8_TN ? c->N - n0 : A8_TN;
    const uint8_t *p[A8_TN];
    for (int r = 0; r < A8_TN; r++) p[r] = c->w + (n0 + (r < rows ? r : rows - 1)) * c->row_bytes;
    for (int64_t b = 0; b < nb; b++)
        for (int h = 0; h < 2; h++) a8_pack_block(c, p + 16 * h, b, t->w + b * A8_TB + 64 * h);
    float *ts = t->tmp, *tz = t->tmp + A8_TN * gp;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0, i = (n0 + r) * G; g < G; g += 16) {
            __mmask16 mk = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
            __m512 sv = scales16(c->scale, c->sk, i + g, mk), zv = _mm512_setzero_ps();
            if (c->zk != ZP_NONE) {
                __m128i zb = _mm_maskz_loadu_epi8(mk, (const uint8_t *)c->zp + i + g);
                zv = _mm512_cvtepi32_ps(c->zk == ZP_S8 ? _mm512_cvtepi8_epi32(zb) : _mm512_cvtepu8_epi32(zb));
            }
            _mm512_storeu_ps(ts + r * gp + g, sv);
            _mm512_storeu_ps(tz + r * gp + g, _mm512_mul_ps(sv, zv));
        }
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int h = 0; h < 2; h++) { /* at: where row 16h + lane's scales start in tmp */
        __m512i r = _mm512_add_epi32(lane, _mm512_set1_epi32(16 * h));
        __m512i at = _mm512_mullo_epi32(_mm512_min_epi32(r, _mm512_set1_epi32((int)rows - 1)), _mm512_set1_epi32((int)gp));
        for (int64_t g = 0; g < G; g++) {
            _mm512_store_ps(t->s + g * A8_TN + 16 * h, _mm512_i32gather_ps(at, ts + g, 4));
            _mm512_store_ps(t->sz + g * A8_TN + 16 * h, _mm512_i32gather_ps(at, tz + g, 4));
        }
    }
    t->n0 = n0;
}

/* Block b of activation rows m0 + i (i < MB) against tile t, into ga[i]: d_b times the exact block sums
 * (one lane per weight row), started at qz = -z0 * sum q. q4: row m0's codes as quads. */
static inline __attribute__((always_inline)) void a8_tile_block(const a8_call *c, const a8_tile *t,
                                                                const int32_t *qz, const int32_t *q4, int64_t m0,
                                                                int64_t b, const int MB, __m512 (*ga)[2]) {
    const int64_t nbp = c->s.nbp;
    const uint8_t *wb = t->w + b * A8_TB;
    __m512i acc[A8_MR][2];
    for (int i = 0; i < MB; i++) acc[i][0] = acc[i][1] = _mm512_set1_epi32(qz[(m0 + i) * nbp + b]);
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
        __m512i w0 = _mm512_load_si512(wb + j * 4 * A8_TN), w1 = _mm512_load_si512(wb + j * 4 * A8_TN + 64);
        for (int i = 0; i < MB; i++) {
            __m512i a = _mm512_set1_epi32(q4[i * nbp * 8 + b * 8 + j]);
            acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], w0, a);
            acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], w1, a);
        }
    }
    for (int i = 0; i < MB; i++) {
        __m512 dv = _mm512_set1_ps(c->d[(m0 + i) * nbp + b]);
        ga[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), dv, ga[i][0]);
        ga[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), dv, ga[i][1]);
    }
}

/* y[m0 + i, t->n0 ...] for i < MB against tile t: per group, runs of up to A8_RUN blocks summed into ga,
 * each run added to the total times s_g, then - s_g zp_g T_g; then the bias. */
static inline __attribute__((always_inline)) void a8_tile_rows(const a8_call *c, const a8_tile *t,
                                                               const int32_t *qz, int64_t m0, const int MB) {
    const a8_shape *s = &c->s;
    const int64_t nb = (s->K + BLK - 1) / BLK, G = s->G;
    const int32_t *q4 = (const int32_t *)(c->q + m0 * s->nbp * BLK);
    __m512 f[A8_MR][2], ga[A8_MR][2];
    for (int i = 0; i < MB; i++) f[i][0] = f[i][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const __m512 s0 = _mm512_load_ps(t->s + g * A8_TN), s1 = _mm512_load_ps(t->s + g * A8_TN + 16);
        for (int64_t b = g * s->per, b1 = g == G - 1 ? nb : b + s->per; b < b1;) {
            for (int i = 0; i < MB; i++) ga[i][0] = ga[i][1] = _mm512_setzero_ps();
            for (int64_t r = b + A8_RUN < b1 ? b + A8_RUN : b1; b < r; b++)
                a8_tile_block(c, t, qz, q4, m0, b, MB, ga);
            for (int i = 0; i < MB; i++) {
                f[i][0] = _mm512_fmadd_ps(ga[i][0], s0, f[i][0]);
                f[i][1] = _mm512_fmadd_ps(ga[i][1], s1, f[i][1]);
            }
        }
        const __m512 z0 = _mm512_load_ps(t->sz + g * A8_TN), z1 = _mm512_load_ps(t->sz + g * A8_TN + 16);
        for (int i = 0; i < MB && c->zk != ZP_NONE; i++) {
            __m512 tg = _mm512_set1_ps(c->T[(m0 + i) * G + g]);
            f[i][0] = _mm512_fnmadd_ps(z0, tg, f[i][0]);
            f[i][1] = _mm512_fnmadd_ps(z1, tg, f[i][1]);
        }
    }
    for (int h = 0; h < 2; h++) {
        int64_t n = t->n0 + 16 * h, left = c->N - n;
        __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        __m512 bv = c->bias ? _mm512_maskz_loadu_ps(mk, c->bias + n) : _mm512_setzero_ps();
        for (int i = 0; i < MB; i++)
            _mm512_mask_storeu_ps(c->y + (m0 + i) * c->N + n, mk, _mm512_add_ps(f[i][h], bv));
    }
}

/* y rows m0 .. m1 - 1 against tile t, A8_MR rows at a time. */
static void a8_tile_span(const a8_call *c, const a8_tile *t, const int32_t *qz, int64_t m0, int64_t m1) {
    for (; m0 + A8_MR <= m1; m0 += A8_MR) a8_tile_rows(c, t, qz, m0, A8_MR);
    if (m1 - m0 == 3) a8_tile_rows(c, t, qz, m0, 3);
    if (m1 - m0 == 2) a8_tile_rows(c, t, qz, m0, 2);
    if (m1 - m0 == 1) a8_tile_rows(c, t, qz, m0, 1);
}

/* lb_wo_gemm_a8 for M >= A8_MANY_ROWS: every row's codes, scales, zero-point factors and lane starts qz,
 * then items (a tile of weight rows, a chunk of activation rows) taken dynamically in tile order; a worker
 * packs the item's tile unless it holds it already. */
static __attribute__((noinline)) int a8_many(a8_call *c, const float *x, int nt) {
    const a8_shape *s = &c->s;
    const int64_t M = c->M, nbp = s->nbp, nb = (s->K + BLK - 1) / BLK, ts = 4 * s->G * A8_TN;
    int64_t bytes = round_up(M * nbp * BLK, 64) + 3 * round_up(4 * M * nbp, 64) + round_up(4 * M * s->G, 64) +
                    nt * (64 + nb * A8_TB + 2 * round_up(ts, 64) + round_up(8 * A8_TN * s->gp, 64));
    _Alignas(64) uint8_t stack[STACK_WS];
    void *heap;
    uint8_t *ws = workspace((size_t)bytes, stack, &heap);
    if (!ws) return -1;
    int8_t *q = take(&ws, M * nbp * BLK);
    float *d = take(&ws, 4 * M * nbp), *T = take(&ws, 4 * M * s->G);
    int32_t *qs = take(&ws, 4 * M * nbp), *qz = take(&ws, 4 * M * nbp);
    a8_tile *tiles = take(&ws, nt * (int64_t)sizeof(a8_tile));
    for (int t = 0; t < nt; t++)
        tiles[t] = (a8_tile){-1, take(&ws, nb * A8_TB), take(&ws, ts), take(&ws, ts), take(&ws, 8 * A8_TN * s->gp)};
    c->q = q, c->d = d, c->T = T, c->qs = qs;
    const int64_t ntile = (c->N + A8_TN - 1) / A8_TN, split = ntile >= 4 * nt ? 1 : (4 * nt + ntile - 1) / ntile;
    const int64_t rows = round_up((M + split - 1) / split, A8_MR), chunks = (M + rows - 1) / rows;
#pragma omp parallel num_threads(nt) if (c->N * s->K * M >= PARALLEL_MIN)
    {
#pragma omp for schedule(dynamic, 4)
        for (int64_t m = 0; m < M; m++) {
            a8_quantize(x + m * s->K, s->K, nbp, q + m * nbp * BLK, d + m * nbp, qs + m * nbp);
            a8_zp_sums(s, d + m * nbp, qs + m * nbp, T + m * s->G);
            for (int64_t b = 0; b < nbp; b++) qz[m * nbp + b] = -s->z0 * qs[m * nbp + b];
        }
        a8_tile *t = &tiles[A8_WORKER];
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t it = 0; it < ntile * chunks; it++) {
            int64_t n0 = it / chunks * A8_TN, m0 = it % chunks * rows;
            if (t->n0 != n0) a8_pack(c, n0, t);
            a8_tile_span(c, t, qz, m0, m0 + rows < M ? m0 + rows : M);
        }
    }
    free(heap);
    return 0;
}
#endif /* A8_SIMD */
