/* The CPU plan's kernels for x86-64 with AVX2 and FMA: a matmul of a few rows (first) and decode
 * attention over the paged KV cache (at the end).
 *
 * The matmul: y[m, n] = x[m, k] @ w[n, k]^T for weights in bf16, fp32 or int8 with a scale per row
 * (`--quantization int8`: y[., r] = scale[r] * sum_c x[., c] * q[r, c]), activations and results in
 * bf16 or fp32; for int8 weights also with the activations rounded to int8 (`int8_dot_matmul`,
 * after the float matmul).
 *
 * Loaded by model/cpu_avx2.py (ctypes), timed by the CPU plan against ATen's kernels. Decode reads
 * each weight once per step, so the speed limit is memory bandwidth; ATen's bf16 kernels on a
 * processor without native bf16 dot products stay well below it (one row at ~18 GB/s on an
 * AVX2-only EPYC that streams 26 GB/s here, 8 rows at 4x the time of one), and its weight-only int8
 * kernel is scalar code below AVX-512.
 *
 * How: the activations are upcast to fp32 once per call; a weight chunk of 8 values becomes 8 fp32
 * values (bf16: widened to 32 bits and shifted left by 16, bf16 being the top half of an fp32;
 * int8: sign-extended to 32 bits and converted), then one FMA per row it meets. One row: 4 weight
 * rows at a time, two accumulators each (two FMA chains in flight per row), and for bf16 and int8
 * weights the next 4 rows prefetched a cache line at a time (fp32 rows read faster without).
 * Several rows: 3 weight rows against 4 activation rows, so each converted weight chunk serves 4
 * rows from registers (12 accumulators, 3 weight vectors and one activation vector: all 16 ymm
 * registers; 7 loads per 12 FMAs, where 2 x 4 took 6 per 8 and ran 128 rows 1.16-1.46x slower on an
 * AVX2-only EPYC). Sums are fp32 in a fixed order, an int8 row's scale applied to its sum; bf16
 * results are rounded to nearest even, as torch rounds.
 *
 * The weight's type is a compile-time constant of each specialised copy (`always_inline` bodies
 * called with a literal inside each copy's own parallel loop: see MATMUL), so the inner loops carry
 * no branch on it.
 *
 * Every function that may run AVX2 instructions carries the `AVX2` target attribute and the file is
 * compiled without -mavx2, so `nanoserve_avx2_supported` (plain x86-64) can ask the processor first.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline))

/* Weight element types, as model/cpu_avx2.py passes them. */
/* W_I8_DOT: int8 weights as W_I8, the activations rounded to int8 too (`int8_dot_matmul` below). */
enum { W_BF16 = 0, W_F32 = 1, W_I8 = 2, W_I8_DOT = 3 };

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

INLINE int64_t weight_bytes(int kind) { return kind == W_F32 ? 4 : kind == W_BF16 ? 2 : 1; }

/* Weight elements [c, c + 8) of the row at `row`, as fp32. */
INLINE AVX2 __m256 load_weights(const char* row, int64_t c, int kind) {
    if (kind == W_BF16) return load8((const uint16_t*)row + c);
    if (kind == W_F32) return _mm256_loadu_ps((const float*)row + c);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + c))));
}

INLINE float weight_at(const char* row, int64_t c, int kind) {
    if (kind == W_BF16) return bf16_to_float(((const uint16_t*)row)[c]);
    if (kind == W_F32) return ((const float*)row)[c];
    return (float)((const int8_t*)row)[c];
}

/* The k % 8 tail of a dot product, in plain fp32. */
INLINE float tail_dot(const char* w, const float* x, int64_t from, int64_t k, int kind) {
    float sum = 0.0f;
    for (int64_t c = from; c < k; c++) sum += weight_at(w, c, kind) * x[c];
    return sum;
}

/* y[index] = sum (times the row's scale for int8), in the output's type. */
INLINE void store(void* y, int64_t index, float sum, const float* scale, int64_t r, int out_bf16) {
    if (scale) sum *= scale[r];
    if (out_bf16) ((uint16_t*)y)[index] = float_to_bf16(sum);
    else ((float*)y)[index] = sum;
}

/* One activation row against weight rows [r, r + rows), rows <= 4 (fewer only at the end). */
INLINE AVX2 void one_row_block(const char* w, const float* scale, const float* x, void* y, int64_t r, int rows,
                               int64_t n, int64_t k, int kind, int out_bf16) {
    const int64_t stride = k * weight_bytes(kind);
    const char* row[4];
    for (int j = 0; j < 4; j++) row[j] = w + (r + (j < rows ? j : 0)) * stride;
    const char* ahead = w + (r + 4 < n ? r + 4 : r) * stride;  /* the next block's rows, contiguous */
    __m256 a[4][2];
    for (int j = 0; j < 4; j++) a[j][0] = a[j][1] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) {
        /* a cache line of each of the next rows; not for fp32, whose rows the hardware's prefetcher follows
         * better alone (measured on an AVX2-only EPYC: 22.6 -> 24.8 GB/s without, where bf16 drops 21 -> 14) */
        if (kind != W_F32 && (c * weight_bytes(kind)) % 64 == 0)
            for (int j = 0; j < 4; j++) _mm_prefetch(ahead + j * stride + c * weight_bytes(kind), _MM_HINT_T0);
        __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
        for (int j = 0; j < 4; j++) {
            a[j][0] = _mm256_fmadd_ps(load_weights(row[j], c, kind), x0, a[j][0]);
            a[j][1] = _mm256_fmadd_ps(load_weights(row[j], c + 8, kind), x1, a[j][1]);
        }
    }
    for (; c + 8 <= k; c += 8) {
        __m256 x0 = _mm256_loadu_ps(x + c);
        for (int j = 0; j < 4; j++) a[j][0] = _mm256_fmadd_ps(load_weights(row[j], c, kind), x0, a[j][0]);
    }
    for (int j = 0; j < rows; j++)
        store(y, r + j, hsum(_mm256_add_ps(a[j][0], a[j][1])) + tail_dot(row[j], x, c, k, kind), scale, r + j, out_bf16);
}

/* Activation rows [i, i + count), count <= 4, against weight rows [r, r + wrows), wrows <= 3. */
INLINE AVX2 void rows_block(const char* w, const float* scale, const float* x, void* y, int64_t r, int wrows,
                            int64_t i, int count, int64_t n, int64_t k, int kind, int out_bf16) {
    const int64_t stride = k * weight_bytes(kind);
    const char* wr[3];
    for (int u = 0; u < 3; u++) wr[u] = w + (r + (u < wrows ? u : 0)) * stride;
    const float* xs[4];
    for (int j = 0; j < 4; j++) xs[j] = x + (i + (j < count ? j : 0)) * k;
    __m256 a[3][4];
    for (int u = 0; u < 3; u++) for (int j = 0; j < 4; j++) a[u][j] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= k; c += 8) {
        __m256 v0 = load_weights(wr[0], c, kind), v1 = load_weights(wr[1], c, kind), v2 = load_weights(wr[2], c, kind);
        for (int j = 0; j < 4; j++) {
            __m256 xv = _mm256_loadu_ps(xs[j] + c);
            a[0][j] = _mm256_fmadd_ps(v0, xv, a[0][j]);
            a[1][j] = _mm256_fmadd_ps(v1, xv, a[1][j]);
            a[2][j] = _mm256_fmadd_ps(v2, xv, a[2][j]);
        }
    }
    for (int j = 0; j < count; j++)
        for (int u = 0; u < wrows; u++)
            store(y, (i + j) * n + r + u, hsum(a[u][j]) + tail_dot(wr[u], xs[j], c, k, kind), scale, r + u, out_bf16);
}

/* One specialised copy per weight type and output type. The parallel loops are written out in each
 * (a macro, not an inlined function): OpenMP outlines a loop's body before inlining, so a loop in a
 * shared function runs its blocks with the weight type as a variable and a branch on it in every
 * load, which on an AVX2-only EPYC cost the fp32 8-row matmul a third of its speed (23.5 GMAC/s,
 * 31-32 as written here). */
#define MATMUL(name, kind, out_bf16) \
    static AVX2 void name(const char* w, const float* scale, const float* x, void* y, int64_t m, int64_t n, int64_t k, \
                          int threads) { \
        if (m == 1) { \
            _Pragma("omp parallel for num_threads(threads) schedule(static)") \
            for (int64_t r = 0; r < n; r += 4) \
                one_row_block(w, scale, x, y, r, n - r < 4 ? (int)(n - r) : 4, n, k, kind, out_bf16); \
        } else { \
            _Pragma("omp parallel for num_threads(threads) schedule(static)") \
            for (int64_t r = 0; r < n; r += 3) \
                for (int64_t i = 0; i < m; i += 4) \
                    rows_block(w, scale, x, y, r, n - r < 3 ? (int)(n - r) : 3, i, m - i < 4 ? (int)(m - i) : 4, n, k, \
                               kind, out_bf16); \
        } \
    }
MATMUL(matmul_bf16_bf16, W_BF16, 1)
MATMUL(matmul_bf16_f32, W_BF16, 0)
MATMUL(matmul_f32_bf16, W_F32, 1)
MATMUL(matmul_f32_f32, W_F32, 0)
MATMUL(matmul_i8_bf16, W_I8, 1)
MATMUL(matmul_i8_f32, W_I8, 0)

/* ---- int8 weights times int8 activations (`int8 avx2 dynamic`). ----
 *
 * Widening each int8 weight to fp32 (above) costs about 4 instructions per 8 weights, which at one
 * row keeps the kernel from the memory's speed. Here each activation row is rounded to int8 at its
 * own scale (absmax / 127, times its fp32 reciprocal and to nearest even), and 32 products at
 * a time are summed exactly in integers: maddubs multiplies |w| (unsigned) by x with w's sign
 * moved onto it (`sign_epi8`) and adds pairs into 16 bits (at most 2 * 127 * 127, no saturation, as
 * neither side is ever -128), madd adds those pairs into 32 bits. A row's sum is then scaled once by
 * the two scales. Each activation row has its own scale, so a sequence's result does not depend on
 * the other rows of its step. */

/* Rounds x [k] to q [k] at absmax / 127 and returns that scale (1 for an all-zero row). */
static AVX2 float quantize_activations(const float* x, int8_t* q, int64_t k) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= k; c += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(x + c)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float absmax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (int64_t t = c; t < k; t++) absmax = fabsf(x[t]) > absmax ? fabsf(x[t]) : absmax;
    const float scale = absmax > 0.0f ? absmax / 127.0f : 1.0f;
    const __m256 inv = _mm256_set1_ps(1.0f / scale);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    c = 0;
    for (; c + 32 <= k; c += 32) {  /* 4 x 8 values -> 32 int8 (cvtps rounds to nearest even) */
        __m256i v[4];
        for (int j = 0; j < 4; j++) {
            __m256 r = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(x + c + 8 * j), inv),
                                                   _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
            v[j] = _mm256_cvtps_epi32(r);
        }
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256((__m256i*)(q + c), _mm256_permutevar8x32_epi32(packed, order));
    }
    for (; c < k; c++) {
        float r = nearbyintf(x[c] * (1.0f / scale));
        q[c] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
    }
    return scale;
}

/* 8 int32 partial sums of w . x over 32 int8 pairs; `w_abs` is |w|. */
INLINE AVX2 __m256i dot32(__m256i w, __m256i w_abs, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}

INLINE AVX2 int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

INLINE int32_t tail_dot_i8(const int8_t* w, const int8_t* x, int64_t from, int64_t k) {
    int32_t sum = 0;
    for (int64_t c = from; c < k; c++) sum += (int32_t)w[c] * x[c];
    return sum;
}

/* Activation rows [i, i + count), count <= XROWS, against weight rows [r, r + wrows), wrows <= WROWS.
 * One activation row: one weight row at a time, so that each thread reads one contiguous stream,
 * prefetched 4 rows ahead (on an AVX2-only EPYC, 1,024-byte rows read at 22-27 GB/s so, at 16-19
 * interleaving 4 or 8 rows, and below fbgemm's 1-row kernel on the LM head). Several: 2 weight
 * rows by 4 activation rows (8 accumulators, each weight chunk and its |w| serving 4 rows from
 * registers). */
INLINE AVX2 void int8_dot_block(const int8_t* w, const float* w_scale, const int8_t* xq, const float* x_scale,
                                void* y, int64_t r, int wrows, int64_t i, int count, int64_t n, int64_t k,
                                int out_bf16, const int WROWS, const int XROWS) {
    const int8_t* wr[2];
    for (int u = 0; u < WROWS; u++) wr[u] = w + (r + (u < wrows ? u : 0)) * k;
    const int8_t* xs[4];
    for (int j = 0; j < XROWS; j++) xs[j] = xq + (i + (j < count ? j : 0)) * k;
    __m256i a[2][4];
    for (int u = 0; u < WROWS; u++) for (int j = 0; j < XROWS; j++) a[u][j] = _mm256_setzero_si256();
    const int8_t* ahead = w + (r + 4 < n ? r + 4 : r) * k;  /* one row: the row 4 ahead in the thread's stream */
    int64_t c = 0;
    for (; c + 32 <= k; c += 32) {
        if (XROWS == 1 && c % 64 == 0) _mm_prefetch((const char*)(ahead + c), _MM_HINT_T0);
        __m256i wv[2], wa[2];
        for (int u = 0; u < WROWS; u++) {
            wv[u] = _mm256_loadu_si256((const __m256i*)(wr[u] + c));
            wa[u] = _mm256_abs_epi8(wv[u]);
        }
        for (int j = 0; j < XROWS; j++) {
            __m256i xv = _mm256_loadu_si256((const __m256i*)(xs[j] + c));
            for (int u = 0; u < WROWS; u++) a[u][j] = _mm256_add_epi32(a[u][j], dot32(wv[u], wa[u], xv));
        }
    }
    for (int j = 0; j < count; j++)
        for (int u = 0; u < wrows; u++) {
            float sum = (float)(hsum_i32(a[u][j]) + tail_dot_i8(wr[u], xs[j], c, k));
            store(y, (i + j) * n + r + u, sum * x_scale[i + j], w_scale, r + u, out_bf16);
        }
}

static AVX2 void int8_dot_matmul(const int8_t* w, const float* w_scale, const int8_t* xq, const float* x_scale,
                                 void* y, int64_t m, int64_t n, int64_t k, int threads, int out_bf16) {
    if (m == 1) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < n; r++)
            int8_dot_block(w, w_scale, xq, x_scale, y, r, 1, 0, 1, n, k, out_bf16, 1, 1);
    } else {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < n; r += 2)
            for (int64_t i = 0; i < m; i += 4)
                int8_dot_block(w, w_scale, xq, x_scale, y, r, n - r < 2 ? (int)(n - r) : 2, i,
                               m - i < 4 ? (int)(m - i) : 4, n, k, out_bf16, 2, 4);
    }
}

/* y = x @ w^T for contiguous w [n, k] of type `kind` (W_BF16, W_F32, W_I8: then times scale[n], fp32;
 * W_I8_DOT: as W_I8, each row of x rounded to int8 first),
 * x [m, k] and y [m, n] in bf16 (`io_bf16`) or fp32, on `threads` OpenMP threads.
 * Returns 0, or 1 when the processor lacks AVX2/FMA (checked before any AVX2 instruction runs),
 * 2 when scratch memory cannot be had, 3 for an unknown weight type. */
int nanoserve_linear(const void* w, int kind, const float* scale, const void* x, void* y, int io_bf16, int64_t m,
                     int64_t n, int64_t k, int threads) {
    static void (*const kernels[3][2])(const char*, const float*, const float*, void*, int64_t, int64_t, int64_t, int) = {
        {matmul_bf16_f32, matmul_bf16_bf16}, {matmul_f32_f32, matmul_f32_bf16}, {matmul_i8_f32, matmul_i8_bf16}};
    if (!nanoserve_avx2_supported()) return 1;
    if (kind < 0 || kind > 3) return 3;
    const float* xf = (const float*)x;
    float* upcast = NULL;
    if (io_bf16) {
        upcast = malloc((size_t)(m * k > 0 ? m * k : 1) * sizeof(float));
        if (upcast == NULL) return 2;
        for (int64_t e = 0; e < m * k; e++) upcast[e] = bf16_to_float(((const uint16_t*)x)[e]);
        xf = upcast;
    }
    if (kind == W_I8_DOT) {
        float* x_scale = malloc((size_t)(m > 0 ? m : 1) * sizeof(float) + (size_t)(m * k));  /* then the int8 rows */
        if (x_scale == NULL) { free(upcast); return 2; }
        int8_t* xq = (int8_t*)(x_scale + m);
        for (int64_t i = 0; i < m; i++) x_scale[i] = quantize_activations(xf + i * k, xq + i * k, k);
        int8_dot_matmul((const int8_t*)w, scale, xq, x_scale, y, m, n, k, threads, io_bf16 != 0);
        free(x_scale);
    } else {
        kernels[kind][io_bf16 != 0]((const char*)w, kind == W_I8 ? scale : NULL, xf, y, m, n, k, threads);
    }
    free(upcast);
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

/* 8 values of the dtype (bf16 or fp32) at p + i, as fp32: K/V here, the small ops' rows below. */
INLINE AVX2 __m256 load_as_float(const void* p, int64_t i, int bf16) {
    return bf16 ? load8((const uint16_t*)p + i) : _mm256_loadu_ps((const float*)p + i);
}

/* exp(x) of 8 values x <= 0 (scores less their maximum), as Cephes' expf: x = n ln2 + r with
 * |r| <= ln2 / 2, exp(r) by its degree-7 polynomial, times 2^n built in the exponent bits; within
 * 2 ulp of expf. Below -87.3 (where 2^n would leave the normal range) it returns exp(-87.3), 1e-38:
 * beside the maximum's exp(0) = 1 that is a zero. */
INLINE AVX2 __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507e-3f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073e-3f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894e-2f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201e-1f));
    poly = _mm256_fmadd_ps(_mm256_mul_ps(poly, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(poly, _mm256_castsi256_ps(two_n));
}

/* A token's K or V row of one head is `bytes` (dim values) inside every kv_heads * dim of the cache,
 * and its block anywhere: for bf16 the kernel asks for the row PREFETCH_TOKENS tokens ahead (on an
 * AVX2-only EPYC, 8 sequences of 128 and 1,024 tokens 10-15% faster so); for fp32 it took as long
 * or 10-30% longer, as the gemv's fp32 prefetch did, so fp32 rows are left to the hardware. */
#define PREFETCH_TOKENS 8
INLINE AVX2 void prefetch_row(const void* cache, int64_t row, int64_t elem, int64_t bytes) {
    const char* start = (const char*)cache + row * elem;  /* `row`: the row's first element */
    for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(start + line, _MM_HINT_T0);
}

/* The softmax of s [len] in place, in fp32; s has room for `padded` (len rounded up to 8) values. */
INLINE AVX2 void softmax(float* s, int64_t len, int64_t padded) {
    float top = s[0];
    for (int64_t t = 1; t < len; t++) top = s[t] > top ? s[t] : top;
    for (int64_t t = len; t < padded; t++) s[t] = top;  /* padding, zeroed after the exp */
    __m256 total = _mm256_setzero_ps();
    for (int64_t t = 0; t < padded; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(top)));
        if (t + 8 > len) {  /* the last vector: lanes past len are padding */
            const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(len - t)), lane)));
        }
        _mm256_storeu_ps(s + t, e);
        total = _mm256_add_ps(total, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum(total));
    for (int64_t t = 0; t < padded; t += 8) _mm256_storeu_ps(s + t, _mm256_mul_ps(_mm256_loadu_ps(s + t), inv));
}

/* 8 fp32 values to out[index...] in the output's dtype. */
INLINE AVX2 void store_row8(void* out, int64_t index, __m256 v, int bf16) {
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    for (int e = 0; e < 8; e++) {
        if (bf16) ((uint16_t*)out)[index + e] = float_to_bf16(lanes[e]);
        else ((float*)out)[index + e] = lanes[e];
    }
}

/* One (sequence, kv head): its `group` query heads q [group][dim] over `len` cached tokens. `rows`
 * [len] and `scores` [group][padded] are scratch, padded = len rounded up to 8.
 *
 * Each pass keeps several independent chains in registers, for two query heads at once (so each
 * K and V value is loaded once for both): scores 4 tokens at a time, the softmax's exp 8 at a time,
 * the weighted sum of V 32 dimensions (4 accumulators a head) over all tokens.
 * One chain per dot product, a scalar expf, the weighted sum's accumulators in memory and one query
 * head at a time made the kernel wait on latencies: on an AVX2-only EPYC (16 query heads over 8 of
 * 128 dims) 8 sequences of 1,024 tokens took 12.1 ms so in fp32 and take 6.2 now (bf16: 10.3 and
 * 4.2), one of 1,024 1.61 and 0.86 ms, 8 of 128 1.43 and 0.81 ms. */
INLINE AVX2 void attend(const void* q, const void* k_cache, const void* v_cache, const int32_t* table,
                        int64_t len, int64_t block_size, int64_t kv_heads, int64_t head, int64_t group,
                        int64_t dim, float scale, int bf16, float* qf, float* scores, int64_t* rows, void* out) {
    const int64_t padded = (len + 7) / 8 * 8, elem = bf16 ? 2 : 4;
    for (int64_t e = 0; e < group * dim; e++)
        qf[e] = bf16 ? bf16_to_float(((const uint16_t*)q)[e]) : ((const float*)q)[e];
    for (int64_t t = 0; t < len; t++)
        rows[t] = (((int64_t)table[t / block_size] * block_size + t % block_size) * kv_heads + head) * dim;
    /* Query heads two at a time (a pair shares each K and V load; an odd last head is paired with itself). */
    for (int64_t g = 0; g < group; g += 2) {
        const int pair = g + 1 < group;
        const float *q0 = qf + g * dim, *q1 = pair ? q0 + dim : q0;
        float *s0 = scores + g * padded, *s1 = pair ? s0 + padded : s0;
        int64_t t = 0;
        for (; t + 4 <= len; t += 4) {
            if (bf16 && g == 0 && t + PREFETCH_TOKENS + 4 <= len)
                for (int j = 0; j < 4; j++) prefetch_row(k_cache, rows[t + PREFETCH_TOKENS + j], elem, dim * elem);
            __m256 sum0[4], sum1[4];
            for (int j = 0; j < 4; j++) sum0[j] = sum1[j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += 8) {
                const __m256 q0v = _mm256_loadu_ps(q0 + d), q1v = _mm256_loadu_ps(q1 + d);
                for (int j = 0; j < 4; j++) {
                    const __m256 kv = load_as_float(k_cache, rows[t + j] + d, bf16);
                    sum0[j] = _mm256_fmadd_ps(kv, q0v, sum0[j]);
                    sum1[j] = _mm256_fmadd_ps(kv, q1v, sum1[j]);
                }
            }
            for (int j = 0; j < 4; j++) {
                s0[t + j] = hsum(sum0[j]) * scale;
                s1[t + j] = hsum(sum1[j]) * scale;
            }
        }
        for (; t < len; t++) {
            __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += 8) {
                const __m256 kv = load_as_float(k_cache, rows[t] + d, bf16);
                sum0 = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q0 + d), sum0);
                sum1 = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q1 + d), sum1);
            }
            s0[t] = hsum(sum0) * scale;
            s1[t] = hsum(sum1) * scale;
        }
        for (int64_t h = g; h < g + 1 + pair; h++) softmax(scores + h * padded, len, padded);
        for (int64_t d = 0; d < dim;) {
            const int width = dim - d >= 32 ? 4 : 1;  /* vectors of 8 at a time: 4, or 1 for a dim % 32 tail */
            __m256 acc0[4], acc1[4];
            for (int j = 0; j < 4; j++) acc0[j] = acc1[j] = _mm256_setzero_ps();
            if (width == 4) {
                for (t = 0; t < len; t++) {
                    if (bf16 && g == 0 && d == 0 && t + PREFETCH_TOKENS < len)
                        prefetch_row(v_cache, rows[t + PREFETCH_TOKENS], elem, dim * elem);
                    const __m256 p0 = _mm256_set1_ps(s0[t]), p1 = _mm256_set1_ps(s1[t]);
                    for (int j = 0; j < 4; j++) {
                        const __m256 vv = load_as_float(v_cache, rows[t] + d + 8 * j, bf16);
                        acc0[j] = _mm256_fmadd_ps(p0, vv, acc0[j]);
                        acc1[j] = _mm256_fmadd_ps(p1, vv, acc1[j]);
                    }
                }
            } else {
                for (t = 0; t < len; t++) {
                    const __m256 vv = load_as_float(v_cache, rows[t] + d, bf16);
                    acc0[0] = _mm256_fmadd_ps(_mm256_set1_ps(s0[t]), vv, acc0[0]);
                    acc1[0] = _mm256_fmadd_ps(_mm256_set1_ps(s1[t]), vv, acc1[0]);
                }
            }
            for (int j = 0; j < width; j++) {
                store_row8(out, g * dim + d + 8 * j, acc0[j], bf16);
                if (pair) store_row8(out, (g + 1) * dim + d + 8 * j, acc1[j], bf16);
            }
            d += 8 * width;
        }
    }
}

/* One copy per dtype, called from the parallel loop (see MATMUL: the loop's body would otherwise
 * carry the dtype as a variable into every load). */
#define ATTEND(name, is_bf16) \
    static AVX2 void name(const void* q, const void* k_cache, const void* v_cache, const int32_t* table, int64_t len, \
                          int64_t block_size, int64_t kv_heads, int64_t head, int64_t group, int64_t dim, float scale, \
                          float* qf, float* scores, int64_t* rows, void* out) { \
        attend(q, k_cache, v_cache, table, len, block_size, kv_heads, head, group, dim, scale, is_bf16, qf, scores, \
               rows, out); }
ATTEND(attend_bf16, 1)
ATTEND(attend_f32, 0)

static AVX2 int decode_attention(const void* q, const void* k_cache, const void* v_cache, const int32_t* tables,
                                 const int32_t* lens, void* out, int64_t batch, int64_t heads, int64_t kv_heads,
                                 int64_t dim, int64_t block_size, int64_t width, float scale, int bf16, int threads) {
    int64_t group = heads / kv_heads, elem = bf16 ? 2 : 4;
    int failed = 0;
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(dynamic)
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t h = 0; h < kv_heads; h++) {
            int64_t len = lens[b] > 0 ? lens[b] : 0;
            int64_t offset = (b * heads + h * group) * dim * elem;  /* the group's query heads are adjacent */
            if (len == 0) {  /* nothing to attend to: zeros */
                for (int64_t e = 0; e < group * dim * elem; e++) ((char*)out)[offset + e] = 0;
                continue;
            }
            /* rows [len] int64, then q [group][dim] and scores [group][len rounded up to 8] fp32 */
            int64_t* rows = malloc((size_t)len * sizeof(int64_t)
                                   + (size_t)(group * dim + group * ((len + 7) / 8 * 8)) * sizeof(float));
            if (rows == NULL) { failed = 1; continue; }
            float* qf = (float*)(rows + len);
            (bf16 ? attend_bf16 : attend_f32)((const char*)q + offset, k_cache, v_cache, tables + b * width, len,
                                              block_size, kv_heads, h, group, dim, scale, qf, qf + group * dim, rows,
                                              (char*)out + offset);
            free(rows);
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

/* ---- A layer's small ops: RMSNorm (with the residual add) and the attention front-end. ----
 *
 * At decode sizes these cost a few hundred bytes of arithmetic each, and ATen spends its time on
 * dispatch and on waking its thread pool: per layer a fused add + RMSNorm is 5 torch ops and the
 * front-end (q/k head norms, rotation, cache write) about 15; on an AVX2-only EPYC they took 26 ms
 * of a 120 ms bf16 batch-1 step over 28 layers. Here each is one pass over its rows, in the
 * references' arithmetic (`nanoserve_kernels.rms_norm`, `.rope`, `.attention_frontend`): the norm
 * in fp32 (the sum of squares over 8 lanes, as ATen's vectorised sum), rounded to the dtype, then times the weight and rounded
 * again; the rotation in fp32 from those rounded values, products and sums rounded one at a time
 * (the file is compiled with -ffp-contract=off, so that no FMA merges them), then rounded to the
 * dtype. Rows run on the OpenMP threads only from SMALL_OPS_PARALLEL_ROWS rows: one decode row is
 * a microsecond of work, less than a wake-up of the team. */

#define SMALL_OPS_PARALLEL_ROWS 8

/* 8 fp32 values rounded to bf16 as `float_to_bf16` rounds them (nearest even, NaN stays NaN). */
INLINE AVX2 __m256i bf16_bits(__m256 v) {  /* the rounded bf16 in the top half of each lane, zeros below */
    __m256i b = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_and_si256(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)),
                                       _mm256_set1_epi32((int)0xffff0000u));
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    __m256i quiet = _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32((int)0xffff0000u)), _mm256_set1_epi32(0x400000));
    return _mm256_blendv_epi8(rounded, quiet, nan);
}

INLINE AVX2 __m256 round_to(__m256 v, int bf16) { return bf16 ? _mm256_castsi256_ps(bf16_bits(v)) : v; }

INLINE AVX2 void store_from_float(void* p, int64_t i, __m256 v, int bf16) {
    if (!bf16) { _mm256_storeu_ps((float*)p + i, v); return; }
    __m256i top = _mm256_srli_epi32(bf16_bits(v), 16);
    _mm_storeu_si128((__m128i*)((uint16_t*)p + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1)));
}

/* The fp32 factor that RMSNorm scales the n values at p + i by (n % 8 == 0). */
INLINE AVX2 float rms_factor(const void* p, int64_t i, int64_t n, float eps, int bf16) {
    __m256 squares = _mm256_setzero_ps();
    for (int64_t c = 0; c < n; c += 8) {
        __m256 v = load_as_float(p, i + c, bf16);
        squares = _mm256_add_ps(squares, _mm256_mul_ps(v, v));
    }
    return 1.0f / sqrtf(hsum(squares) / (float)n + eps);
}

/* weight * round(values * factor), both rounded to the dtype: the normed values [c, c + 8). */
INLINE AVX2 __m256 normed(const void* p, int64_t i, const void* weight, int64_t c, __m256 factor, int bf16) {
    return round_to(_mm256_mul_ps(load_as_float(weight, c, bf16), round_to(_mm256_mul_ps(load_as_float(p, i + c, bf16),
                                                                                         factor), bf16)), bf16);
}

INLINE AVX2 void add_rms_norm(const void* x, const void* residual, const void* weight, void* out, void* residual_out,
                              int64_t rows, int64_t n, float eps, int bf16, int threads) {
    #pragma omp parallel for num_threads(threads) if (rows >= SMALL_OPS_PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        const void* s = x;
        if (residual != NULL) {
            for (int64_t c = 0; c < n; c += 8)
                store_from_float(residual_out, r * n + c, _mm256_add_ps(load_as_float(x, r * n + c, bf16),
                                                                        load_as_float(residual, r * n + c, bf16)), bf16);
            s = residual_out;
        }
        __m256 factor = _mm256_set1_ps(rms_factor(s, r * n, n, eps, bf16));
        for (int64_t c = 0; c < n; c += 8) store_from_float(out, r * n + c, normed(s, r * n, weight, c, factor, bf16), bf16);
    }
}

/* One specialised copy per dtype (the `bf16` argument is then ignored), as for the matmul. */
#define ADD_RMS_NORM(name, is_bf16) \
    static AVX2 void name(const void* x, const void* residual, const void* weight, void* out, void* residual_out, \
                          int64_t rows, int64_t n, float eps, int bf16, int threads) { \
        (void)bf16; add_rms_norm(x, residual, weight, out, residual_out, rows, n, eps, is_bf16, threads); }
ADD_RMS_NORM(add_rms_norm_bf16, 1)
ADD_RMS_NORM(add_rms_norm_f32, 0)

/* out = weight * rms_norm(s) with s = x + residual (stored to residual_out) or s = x (residual NULL);
 * all [rows, n] in the dtype (bf16 or fp32), weight [n]; n % 8 == 0. Returns 0, or 1 without AVX2. */
int nanoserve_add_rms_norm(const void* x, const void* residual, const void* weight, void* out, void* residual_out,
                           int64_t rows, int64_t n, float eps, int bf16, int threads) {
    if (!nanoserve_avx2_supported()) return 1;
    (bf16 ? add_rms_norm_bf16 : add_rms_norm_f32)(x, residual, weight, out, residual_out, rows, n, eps, bf16, threads);
    return 0;
}

INLINE AVX2 void attention_front(const void* qkv, const void* q_weight, const void* k_weight, float eps,
                                 const int64_t* positions, const float* cos_sin, void* k_cache, void* v_cache,
                                 const int64_t* slots, void* q_out, void* k_out, int64_t tokens, int64_t q_heads,
                                 int64_t kv_heads, int64_t dim, int bf16, int threads) {
    const int64_t row = (q_heads + 2 * kv_heads) * dim, half = dim / 2, kv_row = kv_heads * dim, elem = bf16 ? 2 : 4;
    #pragma omp parallel for num_threads(threads) if (tokens >= SMALL_OPS_PARALLEL_ROWS)
    for (int64_t t = 0; t < tokens; t++) {
        const float* cos = cos_sin + positions[t] * dim;
        const float* sin = cos + half;
        for (int64_t h = 0; h < q_heads + kv_heads; h++) {
            int is_k = h >= q_heads;
            const void* w = is_k ? k_weight : q_weight;
            const int64_t in = t * row + h * dim;
            void* dst = is_k ? k_out : q_out;
            const int64_t at = is_k ? t * kv_row + (h - q_heads) * dim : (t * q_heads + h) * dim;
            const __m256 factor = _mm256_set1_ps(rms_factor(qkv, in, dim, eps, bf16));
            for (int64_t i = 0; i < half; i += 8) {
                __m256 x1 = normed(qkv, in, w, i, factor, bf16), x2 = normed(qkv, in, w, i + half, factor, bf16);
                __m256 c = _mm256_loadu_ps(cos + i), s = _mm256_loadu_ps(sin + i);
                store_from_float(dst, at + i, _mm256_sub_ps(_mm256_mul_ps(x1, c), _mm256_mul_ps(x2, s)), bf16);
                store_from_float(dst, at + i + half, _mm256_add_ps(_mm256_mul_ps(x2, c), _mm256_mul_ps(x1, s)), bf16);
            }
        }
        if (slots[t] >= 0) {
            memcpy((char*)k_cache + slots[t] * kv_row * elem, (const char*)k_out + t * kv_row * elem, (size_t)(kv_row * elem));
            memcpy((char*)v_cache + slots[t] * kv_row * elem, (const char*)qkv + (t * row + (q_heads + kv_heads) * dim) * elem,
                   (size_t)(kv_row * elem));
        }
    }
}

#define ATTENTION_FRONT(name, is_bf16) \
    static AVX2 void name(const void* qkv, const void* q_weight, const void* k_weight, float eps, \
                          const int64_t* positions, const float* cos_sin, void* k_cache, void* v_cache, \
                          const int64_t* slots, void* q_out, void* k_out, int64_t tokens, int64_t q_heads, \
                          int64_t kv_heads, int64_t dim, int bf16, int threads) { \
        (void)bf16; attention_front(qkv, q_weight, k_weight, eps, positions, cos_sin, k_cache, v_cache, slots, q_out, \
                                    k_out, tokens, q_heads, kv_heads, dim, is_bf16, threads); }
ATTENTION_FRONT(attention_front_bf16, 1)
ATTENTION_FRONT(attention_front_f32, 0)

/* The attention front-end of `tokens` rows of qkv [tokens, (q_heads + 2 kv_heads) * dim]: each q
 * and k head RMS-normed with its weight [dim], rotated by cos_sin[positions[t]] ([*, dim]: cos in the
 * first half, sin in the second; fp32) over its two halves, into q_out [tokens, q_heads, dim] and
 * k_out [tokens, kv_heads, dim]; k and v (v as it is in qkv) also written to the caches
 * [num_slots, kv_heads, dim] at slots[t], a negative slot (padding) skipped. dim % 16 == 0.
 * Returns 0, 1 without AVX2, 4 (and nothing written) for a position outside [0, max_positions) or a
 * slot past num_slots. */
int nanoserve_attention_front(const void* qkv, const void* q_weight, const void* k_weight, float eps,
                              const int64_t* positions, const float* cos_sin, void* k_cache, void* v_cache,
                              const int64_t* slots, void* q_out, void* k_out, int64_t tokens, int64_t q_heads,
                              int64_t kv_heads, int64_t dim, int64_t max_positions, int64_t num_slots, int bf16,
                              int threads) {
    if (!nanoserve_avx2_supported()) return 1;
    for (int64_t t = 0; t < tokens; t++)  /* every read and write stays inside its tensor */
        if (positions[t] < 0 || positions[t] >= max_positions || slots[t] >= num_slots) return 4;
    (bf16 ? attention_front_bf16 : attention_front_f32)(qkv, q_weight, k_weight, eps, positions, cos_sin, k_cache,
                                                        v_cache, slots, q_out, k_out, tokens, q_heads, kv_heads, dim,
                                                        bf16, threads);
    return 0;
}
