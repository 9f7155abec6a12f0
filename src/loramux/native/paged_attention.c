/* Decode attention read straight from the paged KV cache (loramux.native.paged_attention).
 *
 * For each decode row b and query head h, over the row's context (the positions j < C where
 * mask[b, j]; their K and V are in slot slots[b, j] of the layer's pools, at kv head h / (H / KV)):
 *
 *   out[b, h] = sum_j softmax_j(q[b, h] . k[slots[b, j], h / (H / KV)] / sqrt(D)) v[slots[b, j], h / (H / KV)]
 *
 *   q:     [B, H, D], rows q_stride elements apart (a view of the fused q/k/v rows)
 *   k, v:  [slots, KV, D], the layer's pools, contiguous
 *   slots: [B, C] int64; mask: [B, C] bool (false on the padding of shorter rows)
 *   out:   [B, H, D], contiguous
 *   float32 or bfloat16 (q, k, v and out alike); D a multiple of 16; everything in float32, out
 *   rounded once to nearest even.
 *
 * What `Attention._decode` computes by gathering every row's context into a padded buffer for one
 * masked SDPA call, without the gather. One work item per (row, kv head): its G = H / KV query
 * heads share every K and V row read. The context goes by in chunks of CHUNK positions under an
 * online softmax (per head a running max and sum; what was accumulated is rescaled when a chunk
 * raises the max), so nothing of length C is kept; each chunk's K and V rows are fetched ahead of
 * their use, since a sequence's blocks lie anywhere in the pool. A head's scores come LANES
 * positions at a time: each position's products summed to one vector, then LANES such vectors
 * folded pairwise into one vector of their sums (`fold`), instead of one horizontal sum per
 * position. Work items run on torch's OpenMP threads.
 *
 * The work item's code is compiled for each dtype and, for the usual head shapes, with D and G as
 * constants, so that a work item's queries, sums and folds stay in registers; other shapes take
 * the same code with D and G as they come.
 *
 * Written with the compiler's generic vectors (GCC's and Clang's vector extensions) as wide as a
 * register, so the same source is built for AVX-512 and for AVX2, and the loader takes the build
 * this CPU runs (loramux.native.library).
 */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "vec.h"

#define CHUNK 64                /* context positions scored before their V rows are added */
#define AHEAD 8                 /* K rows are asked for this many positions ahead (V rows as their K is scored) */
#define PARALLEL_FROM (1 << 16) /* padded K elements: below it, one thread is faster than waking the others */

/* lanes of a where `pick` is set (-1), else of b */
INLINE vf blend(vi pick, vf a, vf b) { return (vf)((pick & (vi)a) | (~pick & (vi)b)); }

/* e^x of lanes x <= 0 (a softmax's exponents), within about 1 float32 ulp: x = n ln2 + r with
 * |r| <= ln2 / 2, e^r by Cephes' polynomial, 2^n put in the exponent; 0 below -87 (e^-87 < 2^-125),
 * NaN stays NaN. */
INLINE vf exp_lanes(vf x) {
    const vi tiny = x < -87.0f;
    x = blend(tiny, (vf){0}, x);
    const vi n = -__builtin_convertvector(0.5f - x * 1.44269504f, vi); /* x / ln2, rounded */
    const vf nf = __builtin_convertvector(n, vf);
    const vf r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
    vf p = 1.9875691500e-4f + (vf){0};
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return blend(tiny, (vf){0}, p * (vf)((n + 127) << 23));
}

/* asks the caches for row [offset, offset + D) of a float32 or bf16 pool */
INLINE void prefetch_row(bool bf16, const void *p, int64_t offset, int64_t D) {
    const char *at = (const char *)p + offset * (bf16 ? 2 : 4);
    for (int64_t byte = 0; byte < D * (bf16 ? 2 : 4); byte += 64) __builtin_prefetch(at + byte, 0, 3);
}

/* lane o of the result: its first or second half of each w-lane segment of the concatenation of a
 * and b (`fold`'s two operands) */
#if LANES == 16
#define HALVES(w, h) \
    SEG(w, h, 0), SEG(w, h, 1), SEG(w, h, 2), SEG(w, h, 3), SEG(w, h, 4), SEG(w, h, 5), SEG(w, h, 6), SEG(w, h, 7), \
    SEG(w, h, 8), SEG(w, h, 9), SEG(w, h, 10), SEG(w, h, 11), SEG(w, h, 12), SEG(w, h, 13), SEG(w, h, 14), SEG(w, h, 15)
#else
#define HALVES(w, h) SEG(w, h, 0), SEG(w, h, 1), SEG(w, h, 2), SEG(w, h, 3), SEG(w, h, 4), SEG(w, h, 5), SEG(w, h, 6), SEG(w, h, 7)
#endif
#define SEG(w, h, o) (((o) / ((w) / 2)) * (w) + (h) * ((w) / 2) + (o) % ((w) / 2))

/* a and b each hold LANES / w positions' partial sums, w lanes each: the result holds a's positions
 * then b's, w / 2 lanes each (pairs of lanes summed). After log2(LANES) folds of a pairwise tree, a
 * vector holds LANES positions' complete sums, in order. */
INLINE vf fold(vf a, vf b, int w) {
    switch (w) {
#if LANES == 16
    case 16: return __builtin_shufflevector(a, b, HALVES(16, 0)) + __builtin_shufflevector(a, b, HALVES(16, 1));
#endif
    case 8: return __builtin_shufflevector(a, b, HALVES(8, 0)) + __builtin_shufflevector(a, b, HALVES(8, 1));
    case 4: return __builtin_shufflevector(a, b, HALVES(4, 0)) + __builtin_shufflevector(a, b, HALVES(4, 1));
    default: return __builtin_shufflevector(a, b, HALVES(2, 0)) + __builtin_shufflevector(a, b, HALVES(2, 1));
    }
}

#if LANES == 16
#define LOG_LANES 4
#else
#define LOG_LANES 3
#endif

/* row b's attention for kv head kh's G query heads (the top of this file); a chunk's scores go by
 * LANES positions at a time, each position's products folded into the head's tree (`fold`): the
 * position at index l of the group folds with the pending vector of every level whose bit l has
 * set, so a full group leaves one vector of its LANES sums, in order */
INLINE void attend(bool bf16, const void *q, int64_t q_stride, const void *k, const void *v, const int64_t *slots,
                   const bool *mask, void *out, int64_t C, int64_t H, int64_t KV, int64_t b, int64_t kh,
                   const int64_t D, const int64_t G) {
    const int64_t W = D / LANES; /* vectors per head */
    const float scale = 1.0f / sqrtf((float)D);
    vf qv[G][W], acc[G][W], row[W];
    vf p[G][CHUNK / LANES]; /* the chunk's scores, then their weights */
    float top[G], sum[G];
    int64_t at[CHUNK]; /* where the chunk's K and V rows start in the pools */
    for (int64_t g = 0; g < G; g++) {
        for (int64_t w = 0; w < W; w++) {
            qv[g][w] = scale * load_n(bf16, q, b * q_stride + (kh * G + g) * D + LANES * w, LANES);
            acc[g][w] = (vf){0};
        }
        top[g] = -INFINITY;
        sum[g] = 0.0f;
    }
    for (int64_t j = 0; j < C;) {
        int n = 0;
        for (; j < C && n < CHUNK; j++)
            if (mask[b * C + j]) at[n++] = (slots[b * C + j] * KV + kh) * D;
        if (n == 0) break; /* only padding was left */
        for (int i = 0; i < AHEAD && i < n; i++) prefetch_row(bf16, k, at[i], D);
        for (int c = 0; c < (n + LANES - 1) / LANES; c++) {
            vf tree[G][LOG_LANES];
            for (int l = 0; l < LANES; l++) {
                const int i = c * LANES + l;
                if (i < n) {
                    if (i + AHEAD < n) prefetch_row(bf16, k, at[i + AHEAD], D);
                    prefetch_row(bf16, v, at[i], D);
                    for (int64_t w = 0; w < W; w++) row[w] = load_n(bf16, k, at[i] + LANES * w, LANES);
                } else
                    for (int64_t w = 0; w < W; w++) row[w] = (vf){0};
                for (int64_t g = 0; g < G; g++) {
                    vf s = qv[g][0] * row[0];
                    for (int64_t w = 1; w < W; w++) s += qv[g][w] * row[w];
                    int level = 0, width = LANES;
                    for (int m = l; m & 1; m >>= 1, level++, width /= 2) s = fold(tree[g][level], s, width);
                    if (level < LOG_LANES) tree[g][level] = s; else p[g][c] = s;
                }
            }
        }
        for (int64_t g = 0; g < G; g++) {
            for (int i = n; i % LANES; i++) p[g][i / LANES][i % LANES] = -INFINITY; /* lanes past the context weigh 0 */
            vf mv = p[g][0];
            for (int c = 1; c < (n + LANES - 1) / LANES; c++) mv = blend(p[g][c] > mv, p[g][c], mv);
            float m = top[g];
            for (int l = 0; l < LANES; l++) m = mv[l] > m ? mv[l] : m;
            if (m > top[g]) { /* a new max: what was summed so far shrinks by e^(old - new) */
                const float shrink = expf(top[g] - m);
                sum[g] *= shrink;
                for (int64_t w = 0; w < W; w++) acc[g][w] *= shrink;
                top[g] = m;
            }
            vf added = {0};
            for (int c = 0; c < (n + LANES - 1) / LANES; c++) added += p[g][c] = exp_lanes(p[g][c] - m);
            sum[g] += hsum(added);
        }
        for (int i = 0; i < n; i++) {
            for (int64_t w = 0; w < W; w++) row[w] = load_n(bf16, v, at[i] + LANES * w, LANES);
            for (int64_t g = 0; g < G; g++)
                for (int64_t w = 0; w < W; w++) acc[g][w] += p[g][i / LANES][i % LANES] * row[w];
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const float r = 1.0f / sum[g];
        for (int64_t w = 0; w < W; w++) store_n(bf16, out, (b * H + kh * G + g) * D + LANES * w, acc[g][w] * r, LANES);
    }
}

/* One work item per (row, kv head). `attend` gets the dtype, and the usual head shapes (D, G), as
 * constants: head_dim 64 with 3 query heads per kv head (SmolLM2-135M and -360M) or 4
 * (Llama-3.2-1B), head_dim 128 with 4 (Llama-3-8B, Mistral-7B); other shapes as they come. */
INLINE void paged_attention(bool bf16, const void *q, int64_t q_stride, const void *k, const void *v,
                            const int64_t *slots, const bool *mask, void *out, int64_t B, int64_t C, int64_t H,
                            int64_t KV, int64_t D) {
    const int64_t G = H / KV;
    #pragma omp parallel for schedule(dynamic) if (B * C * KV * D >= PARALLEL_FROM)
    for (int64_t item = 0; item < B * KV; item++) {
        const int64_t b = item / KV, kh = item % KV;
        if (D == 64 && G == 3)
            WITH_DTYPE(bf16, attend, q, q_stride, k, v, slots, mask, out, C, H, KV, b, kh, 64, 3);
        else if (D == 64 && G == 4)
            WITH_DTYPE(bf16, attend, q, q_stride, k, v, slots, mask, out, C, H, KV, b, kh, 64, 4);
        else if (D == 128 && G == 4)
            WITH_DTYPE(bf16, attend, q, q_stride, k, v, slots, mask, out, C, H, KV, b, kh, 128, 4);
        else
            WITH_DTYPE(bf16, attend, q, q_stride, k, v, slots, mask, out, C, H, KV, b, kh, D, G);
    }
}

void loramux_paged_attention_f32(const float *q, int64_t q_stride, const float *k, const float *v,
                                 const int64_t *slots, const bool *mask, float *out,
                                 int64_t B, int64_t C, int64_t H, int64_t KV, int64_t D) {
    paged_attention(false, q, q_stride, k, v, slots, mask, out, B, C, H, KV, D);
}

void loramux_paged_attention_bf16(const uint16_t *q, int64_t q_stride, const uint16_t *k, const uint16_t *v,
                                  const int64_t *slots, const bool *mask, uint16_t *out,
                                  int64_t B, int64_t C, int64_t H, int64_t KV, int64_t D) {
    paged_attention(true, q, q_stride, k, v, slots, mask, out, B, C, H, KV, D);
}
