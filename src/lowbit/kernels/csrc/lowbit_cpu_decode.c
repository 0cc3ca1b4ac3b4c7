/* lb_decode_tokens: tokens through a Llama-type decoder (pre-norm, rotary q/k, grouped-query attention
 * over a static KV cache, gated MLP), every linear on lowbit's kernels (lb_wo_gemm or lb_wo_gemm_a8), in
 * one call: no Python, no framework dispatch between the ~4 linears of a layer. One token is a decode
 * step; M tokens (a prompt, or a chunk of one) run each linear once on M rows, attention causal.
 *
 * Not compiled on its own: lowbit_cpu.c includes it at its end. Everything is float32, row-major.
 *   hidden h (H) per token, RMS norms  y = x / sqrt(mean(x^2) + eps) * w        (norm_kind 0: Llama, Qwen2)
 *                                      y = x / sqrt(mean(x^2) + eps) * (1 + w)  (norm_kind 1: Gemma)
 *   q/k/v = x @ Wqkv.T (+ bias): q (heads, D), k and v (kv_heads, D); rotary at position p on q and k:
 *       out[i] = v[i] cos[p,i] - v[i+D/2] sin[p,i],  out[i+D/2] = v[i+D/2] cos[p,i+D/2] + v[i] sin[p,i+D/2]
 *   caches k_cache, v_cache (kv_heads, cache_len, D): slot p takes k, v; head j reads kv head
 *       j / (heads / kv_heads) over slots 0..p, softmax(q.k * scaling), o = sum p_t v_t
 *   h += o @ Wo.T;  h += down(act(gate(x)) * up(x)) with x = norm2(h); act 0 silu, 1 gelu (tanh form)
 *   logits (V) = head(final_norm(h)) of the last token.
 * q/k/v (and gate/up) are one stacked linear (n_qkv = 1, rows q|k|v) or separate ones.
 */

typedef struct {
    const uint8_t *w;
    const void *scale, *zp;
    const float *lut, *bias;
    int64_t N, K, row_bytes, group, lut_stride;
    int32_t code, offset, sk, zk, a8, pad;
} lb_lin;

typedef struct {
    const float *norm1, *norm2;
    float *k_cache, *v_cache;
    lb_lin qkv[3], gu[2], o, down;
    int32_t n_qkv, n_gu;
} lb_dlayer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, inter, cache_len;
    float scaling, eps;
    int32_t norm_kind, act;
    const float *rope_cos, *rope_sin; /* (cache_len, head_dim) */
    const float *final_norm;
    lb_lin head;
    const lb_dlayer *layer;
} lb_decoder;

int lb_decode_sizes(int64_t *out) { /* the struct sizes, for the caller's layout check */
    out[0] = sizeof(lb_lin), out[1] = sizeof(lb_dlayer), out[2] = sizeof(lb_decoder);
    return 0;
}

static int lin_run(const lb_lin *l, int64_t M, const float *x, float *y, int nt) {
    if (l->a8)
        return lb_wo_gemm_a8(x, M, l->K, l->w, l->N, l->row_bytes, l->code, l->offset, l->group, l->scale, l->sk,
                             l->zp, l->zk, l->bias, y, nt);
    return lb_wo_gemm(x, M, l->K, l->w, l->N, l->row_bytes, l->code, l->offset, l->group, l->scale, l->sk, l->zp,
                      l->zk, l->lut, l->lut_stride, l->bias, y, nt);
}

/* Outputs of n linears sharing input x (M rows): one stacked linear writes rows of all its parts side by
 * side; separate ones write their (M, N_i) blocks one after another. part[i] / stride[i] locate part i of
 * the stacked rows, where `sizes` gives the parts' widths (the stacked linear's rows in that order). */
typedef struct {
    float *part[3];
    int64_t stride[3];
} lb_parts;

static int lins_run(const lb_lin *l, int n, int64_t M, const float *x, float *y, const int64_t *sizes, int k,
                    lb_parts *out, int nt) {
    int rc;
    if (n == 1) {
        if ((rc = lin_run(l, M, x, y, nt))) return rc;
        int64_t off = 0;
        for (int i = 0; i < k; off += sizes[i], i++) out->part[i] = y + off, out->stride[i] = l->N;
        return 0;
    }
    for (int i = 0; i < n; i++) {
        if ((rc = lin_run(l + i, M, x, y, nt))) return rc;
        out->part[i] = y, out->stride[i] = l[i].N;
        y += M * l[i].N;
    }
    return 0;
}

static void rms_norm(const float *x, const float *w, int64_t n, float eps, int kind, float *out) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    if (kind)
        for (int64_t i = 0; i < n; i++) out[i] = (x[i] * r) * (1.0f + w[i]);
    else
        for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

static void rotate(float *v, int64_t heads, int64_t D, const float *c, const float *s) {
    const int64_t half = D / 2;
    for (int64_t j = 0; j < heads; j++, v += D)
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * c[i] - b * s[i];
            v[i + half] = b * c[i + half] + a * s[i + half];
        }
}

/* o_j (D) = attention of head j's query q_j over cache slots 0..p; sc: scratch of p + 1 scores. */
static void attend_head(const lb_decoder *d, const lb_dlayer *L, const float *qj, int64_t j, int64_t p, float *sc,
                        float *oj) {
    const int64_t D = d->head_dim, kvh = j / (d->heads / d->kv_heads);
    const float *kc = L->k_cache + kvh * d->cache_len * D, *vc = L->v_cache + kvh * d->cache_len * D;
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t <= p; t++) {
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < D; i++) dot += qj[i] * kc[t * D + i];
        sc[t] = dot * d->scaling;
        mx = sc[t] > mx ? sc[t] : mx;
    }
    for (int64_t t = 0; t <= p; t++) sum += (sc[t] = expf(sc[t] - mx));
    for (int64_t i = 0; i < D; i++) oj[i] = 0.0f;
    for (int64_t t = 0; t <= p; t++) {
        const float w = sc[t] / sum;
#pragma omp simd
        for (int64_t i = 0; i < D; i++) oj[i] += w * vc[t * D + i];
    }
}

/* Rows 0..M-1 at positions p0..p0+M-1: rotary on q and k, k and v into the caches, causal attention into
 * o (M, heads * D); sc: nt * cache_len scratch floats. */
static void attend(const lb_decoder *d, const lb_dlayer *L, const lb_parts *qkv, int64_t p0, int64_t M, float *sc,
                   float *o, int nt) {
    const int64_t D = d->head_dim, H = d->heads, KV = d->kv_heads;
    for (int64_t m = 0; m < M; m++) {
        const int64_t p = p0 + m;
        float *k = qkv->part[1] + m * qkv->stride[1], *v = qkv->part[2] + m * qkv->stride[2];
        rotate(qkv->part[0] + m * qkv->stride[0], H, D, d->rope_cos + p * D, d->rope_sin + p * D);
        rotate(k, KV, D, d->rope_cos + p * D, d->rope_sin + p * D);
        for (int64_t j = 0; j < KV; j++) {
            memcpy(L->k_cache + (j * d->cache_len + p) * D, k + j * D, sizeof(float) * D);
            memcpy(L->v_cache + (j * d->cache_len + p) * D, v + j * D, sizeof(float) * D);
        }
    }
    const int par = nt > 1 && M * H * (p0 + M) * D >= (1 << 15);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (par)
    for (int64_t mj = 0; mj < M * H; mj++) {
        const int64_t m = mj / H, j = mj % H;
        float *scr = sc + (par ? omp_get_thread_num() : 0) * d->cache_len;
        attend_head(d, L, qkv->part[0] + m * qkv->stride[0] + j * D, j, p0 + m, scr, o + m * H * D + j * D);
    }
}

static void gated(const lb_parts *gu, int64_t M, int64_t n, int act, float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *g = gu->part[0] + m * gu->stride[0], *u = gu->part[1] + m * gu->stride[1];
        float *y = out + m * n;
        if (act == 0)
            for (int64_t i = 0; i < n; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        else
            for (int64_t i = 0; i < n; i++) {
                const float x = g[i];
                y[i] = 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))) * u[i];
            }
    }
}

/* Floats of lb_decode_tokens' workspace for M rows. */
static int64_t decode_workspace(const lb_decoder *d, int64_t M, int nt) {
    const int64_t qkv_n = (d->heads + 2 * d->kv_heads) * d->head_dim;
    return M * (d->hidden + qkv_n + d->heads * d->head_dim + 3 * d->inter) + nt * d->cache_len;
}

static int layer_rows(const lb_decoder *d, const lb_dlayer *L, int64_t p0, int64_t M, float *h, float *ws, int nt) {
    const int64_t Hd = d->hidden, D = d->head_dim, I = d->inter;
    const int64_t qkv_sizes[3] = {d->heads * D, d->kv_heads * D, d->kv_heads * D}, gu_sizes[2] = {I, I};
    float *x = ws, *qkv = x + M * Hd, *o = qkv + M * (d->heads + 2 * d->kv_heads) * D;
    float *gu = o + M * d->heads * D, *a = gu + 2 * M * I, *sc = a + M * I, *tmp = x; /* x is free after use */
    lb_parts q, g;
    int rc;
    for (int64_t m = 0; m < M; m++) rms_norm(h + m * Hd, L->norm1, Hd, d->eps, d->norm_kind, x + m * Hd);
    if ((rc = lins_run(L->qkv, L->n_qkv, M, x, qkv, qkv_sizes, 3, &q, nt))) return rc;
    attend(d, L, &q, p0, M, sc, o, nt);
    if ((rc = lin_run(&L->o, M, o, tmp, nt))) return rc;
    for (int64_t i = 0; i < M * Hd; i++) h[i] += tmp[i];
    for (int64_t m = 0; m < M; m++) rms_norm(h + m * Hd, L->norm2, Hd, d->eps, d->norm_kind, x + m * Hd);
    if ((rc = lins_run(L->gu, L->n_gu, M, x, gu, gu_sizes, 2, &g, nt))) return rc;
    gated(&g, M, I, d->act, a);
    if ((rc = lin_run(&L->down, M, a, tmp, nt))) return rc;
    for (int64_t i = 0; i < M * Hd; i++) h[i] += tmp[i];
    return 0;
}

/* M tokens at positions p0 .. p0+M-1 (all below cache_len; slots before p0 hold earlier tokens' keys and
 * values): h (M, hidden) holds their embeddings and ends as the last layer's output; logits (head.N)
 * receive head(final_norm(h[M-1])), the last token's. Returns 0, -1 if the workspace could not be
 * allocated, -3 for positions outside the cache, or a kernel's own refusal code. */
int lb_decode_tokens(const lb_decoder *d, int64_t p0, int64_t M, float *h, float *logits, int nthreads) {
    if (p0 < 0 || M < 1 || p0 + M > d->cache_len) return -3;
    const int nt = nthreads > 1 ? nthreads : 1;
    float *ws = malloc(sizeof(float) * decode_workspace(d, M, nt));
    if (!ws) return -1;
    int rc = 0;
    for (int64_t l = 0; l < d->layers && !rc; l++) rc = layer_rows(d, d->layer + l, p0, M, h, ws, nt);
    if (!rc) {
        rms_norm(h + (M - 1) * d->hidden, d->final_norm, d->hidden, d->eps, d->norm_kind, ws);
        rc = lin_run(&d->head, 1, ws, logits, nt);
    }
    free(ws);
    return rc;
}
