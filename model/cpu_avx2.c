/* The CPU plan's kernels for x86-64 with AVX2 and FMA: a bf16 matmul of a few rows (first) and decode
 * attention over the paged KV cache (at the end).
 *
 * The matmul: bf16 weights times a few bf16 rows, y[m, n] = x[m, k] @ w[n, k]^T.
 *
 * Loaded by model/cpu_avx2.py (ctypes), timed by the CPU plan against ATen's kernels. Decode reads
 * each weight once per step, so the speed limit is memory bandwidth; ATen's bf16 kernels on a
 * processor without native bf16 dot products stay well below it (one row at ~18 GB/s on an
 * AVX2-only EPYC that streams 26 GB/s here, 8 rows at 4x the time of one).
 *
 * How: the activations are upcast to fp32 once per call; a weight chunk of 8 bf16 values becomes 8
 * fp32 values by widening to 32 bits and shifting left by 16 (bf16 is the top half of an fp32), then
 * one FMA per row it meets. One row: 4 weight rows at a time, two accumulators each (two FMA chains
 * in flight per row), and the next 4 rows prefetched a cache line at a time. Several rows: 3 weight
 * rows against 4 activation rows, so each converted weight chunk serves 4 rows from registers
 * (12 accumulators, 3 weight vectors and one activation vector: all 16 ymm registers; 7 loads per
 * 12 FMAs, where 2 x 4 took 6 per 8 and ran 128 rows 1.16-1.46x slower on an AVX2-only EPYC). Sums are fp32
 * in a fixed order; results are rounded to bf16 to nearest even, as torch rounds.
 *
 * Every function that may run AVX2 instructions carries the `AVX2` target attribute and the file is
 * compiled without -mavx2, so `nanoserve_avx2_supported` (plain x86-64) can ask the processor first.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#define AVX2 __attribute__((target("avx2,fma")))

int nanoserve_avx2_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static inline float bf16_to_float(uint16_t v) {
    union { uint32_t u; float f; } bits = {(uint32_t)v << 16};
    return bits.f;
}

static inline uint16_t float_to_bf16(float f) {
    union { float f; uint32_t u; } bits = {f};
    if ((bits.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits.u >> 16) | 0x40u);  /* NaN stays NaN */
    return (uint16_t)((bits.u + 0x7fffu + ((bits.u >> 16) & 1u)) >> 16);
}

static inline AVX2 __m256 load8(const uint16_t* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static inline AVX2 float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The k % 8 tail of a dot product, in plain fp32. */
static inline float tail_dot(const uint16_t* w, const float* x, int64_t from, int64_t k) {
    float sum = 0.0f;
    for (int64_t c = from; c < k; c++) sum += bf16_to_float(w[c]) * x[c];
    return sum;
}

/* One activation row against weight rows [r, r + rows), rows <= 4 (fewer only at the end). */
static inline AVX2 void one_row_block(const uint16_t* w, const float* x, uint16_t* y, int64_t r, int rows,
                                      int64_t n, int64_t k) {
    const uint16_t* row[4];
    for (int j = 0; j < 4; j++) row[j] = w + (r + (j < rows ? j : 0)) * k;
    const char* ahead = (const char*)(w + (r + 4 < n ? r + 4 : r) * k);  /* the next block's rows, contiguous */
    __m256 a[4][2];
    for (int j = 0; j < 4; j++) a[j][0] = a[j][1] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) {
        if (c % 32 == 0)
            for (int j = 0; j < 4; j++) _mm_prefetch(ahead + 2 * (j * k + c), _MM_HINT_T0);
        __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
        for (int j = 0; j < 4; j++) {
            a[j][0] = _mm256_fmadd_ps(load8(row[j] + c), x0, a[j][0]);
            a[j][1] = _mm256_fmadd_ps(load8(row[j] + c + 8), x1, a[j][1]);
        }
    }
    for (; c + 8 <= k; c += 8) {
        __m256 x0 = _mm256_loadu_ps(x + c);
        for (int j = 0; j < 4; j++) a[j][0] = _mm256_fmadd_ps(load8(row[j] + c), x0, a[j][0]);
    }
    for (int j = 0; j < rows; j++) y[r + j] = float_to_bf16(hsum(_mm256_add_ps(a[j][0], a[j][1])) + tail_dot(row[j], x, c, k));
}

/* Activation rows [i, i + count), count <= 4, against weight rows [r, r + wrows), wrows <= 3. */
static inline AVX2 void rows_block(const uint16_t* w, const float* x, uint16_t* y, int64_t r, int wrows, int64_t i,
                                   int count, int64_t n, int64_t k) {
    const uint16_t* wr[3];
    for (int u = 0; u < 3; u++) wr[u] = w + (r + (u < wrows ? u : 0)) * k;
    const float* xs[4];
    for (int j = 0; j < 4; j++) xs[j] = x + (i + (j < count ? j : 0)) * k;
    __m256 a[3][4];
    for (int u = 0; u < 3; u++) for (int j = 0; j < 4; j++) a[u][j] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= k; c += 8) {
        __m256 v0 = load8(wr[0] + c), v1 = load8(wr[1] + c), v2 = load8(wr[2] + c);
        for (int j = 0; j < 4; j++) {
            __m256 xv = _mm256_loadu_ps(xs[j] + c);
            a[0][j] = _mm256_fmadd_ps(v0, xv, a[0][j]);
            a[1][j] = _mm256_fmadd_ps(v1, xv, a[1][j]);
            a[2][j] = _mm256_fmadd_ps(v2, xv, a[2][j]);
        }
    }
    for (int j = 0; j < count; j++)
        for (int u = 0; u < wrows; u++)
            y[(i + j) * n + r + u] = float_to_bf16(hsum(a[u][j]) + tail_dot(wr[u], xs[j], c, k));
}

static AVX2 void gemv(const uint16_t* w, const float* x, uint16_t* y, int64_t m, int64_t n, int64_t k, int threads) {
    if (m == 1) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < n; r += 4) one_row_block(w, x, y, r, n - r < 4 ? (int)(n - r) : 4, n, k);
    } else {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < n; r += 3)
            for (int64_t i = 0; i < m; i += 4)
                rows_block(w, x, y, r, n - r < 3 ? (int)(n - r) : 3, i, m - i < 4 ? (int)(m - i) : 4, n, k);
    }
}

/* y = x @ w^T for contiguous bf16 w [n, k], x [m, k], y [m, n], on `threads` OpenMP threads.
 * Returns 0, or 1 when the processor lacks AVX2/FMA (checked before any AVX2 instruction runs),
 * 2 when scratch memory cannot be had. */
int nanoserve_gemv_bf16(const uint16_t* w, const uint16_t* x, uint16_t* y, int64_t m, int64_t n, int64_t k,
                        int threads) {
    if (!nanoserve_avx2_supported()) return 1;
    float* xf = malloc((size_t)(m * k > 0 ? m * k : 1) * sizeof(float));
    if (xf == NULL) return 2;
    for (int64_t e = 0; e < m * k; e++) xf[e] = bf16_to_float(x[e]);
    gemv(w, xf, y, m, n, k, threads);
    free(xf);
    return 0;
}

/* ---- Decode attention over the paged KV cache: one new query token per sequence. ----
 *
 * ATen's candidates gather the context's blocks into a new tensor, copy the keys transposed, and
 * run several small ops per layer: 0.7 ms a layer at 128 tokens on an AVX2-only EPYC, where the
 * K/V read are 0.5 MB. Here one task per (sequence, kv head) reads its keys and values once,
 * straight from their blocks: pass 1 takes the scores of the group's query heads (fp32 dot
 * products), then a softmax in fp32, pass 2 sums the values weighted by the probabilities.
 * K/V in bf16 (widened as above) or fp32; q and the output in the cache's dtype. */

static inline AVX2 __m256 load_kv(const void* p, int64_t index, int bf16) {
    return bf16 ? load8((const uint16_t*)p + index) : _mm256_loadu_ps((const float*)p + index);
}

static AVX2 void attend(const void* q, const void* k_cache, const void* v_cache, const int32_t* table,
                        int64_t len, int64_t block_size, int64_t kv_heads, int64_t head, int64_t group,
                        int64_t dim, float scale, int bf16, float* scratch, void* out) {
    float* qf = scratch;                    /* [group][dim] */
    float* acc = qf + group * dim;          /* [group][dim] */
    float* scores = acc + group * dim;      /* [group][len] */
    for (int64_t e = 0; e < group * dim; e++) {
        qf[e] = bf16 ? bf16_to_float(((const uint16_t*)q)[e]) : ((const float*)q)[e];
        acc[e] = 0.0f;
    }
    for (int64_t t = 0; t < len; t++) {
        int64_t row = (((int64_t)table[t / block_size] * block_size + t % block_size) * kv_heads + head) * dim;
        for (int64_t g = 0; g < group; g++) {
            __m256 sum = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += 8)
                sum = _mm256_fmadd_ps(load_kv(k_cache, row + d, bf16), _mm256_loadu_ps(qf + g * dim + d), sum);
            scores[g * len + t] = hsum(sum) * scale;
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float* s = scores + g * len;
        float top = s[0], total = 0.0f;
        for (int64_t t = 1; t < len; t++) top = s[t] > top ? s[t] : top;
        for (int64_t t = 0; t < len; t++) total += (s[t] = expf(s[t] - top));
        for (int64_t t = 0; t < len; t++) s[t] /= total;
    }
    for (int64_t t = 0; t < len; t++) {
        int64_t row = (((int64_t)table[t / block_size] * block_size + t % block_size) * kv_heads + head) * dim;
        for (int64_t g = 0; g < group; g++) {
            __m256 p = _mm256_set1_ps(scores[g * len + t]);
            for (int64_t d = 0; d < dim; d += 8) {
                float* a = acc + g * dim + d;
                _mm256_storeu_ps(a, _mm256_fmadd_ps(p, load_kv(v_cache, row + d, bf16), _mm256_loadu_ps(a)));
            }
        }
    }
    for (int64_t e = 0; e < group * dim; e++) {
        if (bf16) ((uint16_t*)out)[e] = float_to_bf16(acc[e]);
        else ((float*)out)[e] = acc[e];
    }
}

static AVX2 int decode_attention(const void* q, const void* k_cache, const void* v_cache, const int32_t* tables,
                                 const int32_t* lens, void* out, int64_t batch, int64_t heads, int64_t kv_heads,
                                 int64_t dim, int64_t block_size, int64_t width, float scale, int bf16, int threads) {
    int64_t group = heads / kv_heads, elem = bf16 ? 2 : 4;
    int failed = 0;
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(dynamic)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t h = 0; h < kv_heads; h++) {
            int64_t len = lens[b] > 0 ? lens[b] : 0;
            float* scratch = malloc((size_t)(2 * group * dim + group * (len > 0 ? len : 1)) * sizeof(float));
            if (scratch == NULL) { failed = 1; continue; }
            int64_t offset = (b * heads + h * group) * dim * elem;  /* the group's query heads are adjacent */
            if (len == 0) {  /* nothing to attend to: zeros */
                for (int64_t e = 0; e < group * dim * elem; e++) ((char*)out)[offset + e] = 0;
            } else {
                attend((const char*)q + offset, k_cache, v_cache, tables + b * width, len, block_size, kv_heads, h,
                       group, dim, scale, bf16, scratch, (char*)out + offset);
            }
            free(scratch);
        }
    }
    return failed ? 2 : 0;
}

/* out[B, H, D] = attention of q[B, H, D] over each sequence's first lens[b] cached tokens; caches
 * [blocks, block_size, kv_heads, D], tables [B, width] int32; dim % 8 == 0, heads % kv_heads == 0.
 * Returns 0, 1 when the processor lacks AVX2/FMA, 2 when scratch memory cannot be had. */
int nanoserve_decode_attention(const void* q, const void* k_cache, const void* v_cache, const int32_t* tables,
                               const int32_t* lens, void* out, int64_t batch, int64_t heads, int64_t kv_heads,
                               int64_t dim, int64_t block_size, int64_t width, float scale, int bf16, int threads) {
    if (!nanoserve_avx2_supported()) return 1;
    return decode_attention(q, k_cache, v_cache, tables, lens, out, batch, heads, kv_heads, dim, block_size, width,
                            scale, bf16, threads);
}
