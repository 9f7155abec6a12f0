/* Rotary position embedding of the q and k heads of fused q/k/v rows, in place, and each row's k
 * and v heads written to its slot of the layer's KV pools (loramux.native.rotary):
 *
 *   qkv:   [T, H + 2 KV, D], rows `stride` elements apart (heads of q, then k, then v)
 *   cos, sin: [T, D], contiguous (model/rope.rotary_tables)
 *   heads h < H + KV of row t:  x = x * cos[t] + rotate_half(x) * sin[t],
 *                               rotate_half(x) = [-x[D/2:], x[:D/2]]
 *   slots: [T] int64, or NULL: row t's k (rotated) and v heads go to slot slots[t] of
 *   k_pool, v_pool: [slots, KV, D], contiguous
 *   float32 or bfloat16 (qkv, cos, sin and the pools alike); D even.
 *
 * What `model.rope.apply_rotary` and `PagedKVCache.write` compute with seven PyTorch ops a layer,
 * bit for bit: bf16 products and their sum rounded to bf16 as torch's bf16 ops round them; in
 * float32 the products are kept apart from the sum (no fused multiply-add, which rounds once
 * instead of twice). Rows are split over torch's OpenMP threads when there are many.
 */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "vec.h"

#define PARALLEL_FROM (1 << 16) /* elements rotated: below it, one thread is faster than waking the other */

/* v as it is, but opaque to the compiler: a product passed through it is rounded on its own, never
 * fused into a following add */
INLINE vf opaque(vf v) {
    __asm__("" : "+v"(v));
    return v;
}

/* a * b rounded to the dtype, as torch's elementwise product of two tensors of that dtype */
INLINE vf product(bool bf16, vf a, vf b) { return bf16 ? round_bf16_v(a * b) : opaque(a * b); }

/* row t: its q and k heads rotated in place; its k and v heads copied to slot slots[t] */
INLINE void rotate_row(bool bf16, void *qkv, int64_t stride, const void *cos, const void *sin, const int64_t *slots,
                       void *k_pool, void *v_pool, int64_t t, int64_t H, int64_t KV, int64_t D) {
    const int64_t half = D / 2, size = bf16 ? 2 : 4;
    for (int64_t i = 0; i < half; i += LANES) { /* the row's tables read once for all its heads */
        const int64_t n = half - i;
        const vf c1 = load_n(bf16, cos, t * D + i, n), c2 = load_n(bf16, cos, t * D + half + i, n);
        const vf s1 = load_n(bf16, sin, t * D + i, n), s2 = load_n(bf16, sin, t * D + half + i, n);
        for (int64_t h = 0; h < H + KV; h++) {
            const int64_t x = t * stride + h * D; /* the head's first element */
            const vf x1 = load_n(bf16, qkv, x + i, n), x2 = load_n(bf16, qkv, x + half + i, n);
            store_n(bf16, qkv, x + i, product(bf16, x1, c1) - product(bf16, x2, s1), n);
            store_n(bf16, qkv, x + half + i, product(bf16, x2, c2) + product(bf16, x1, s2), n);
        }
    }
    if (slots) {
        const char *row = (const char *)qkv + t * stride * size;
        memcpy((char *)k_pool + slots[t] * KV * D * size, row + H * D * size, (size_t)(KV * D * size));
        memcpy((char *)v_pool + slots[t] * KV * D * size, row + (H + KV) * D * size, (size_t)(KV * D * size));
    }
}

INLINE void rotary(bool bf16, void *qkv, int64_t stride, const void *cos, const void *sin, const int64_t *slots,
                   void *k_pool, void *v_pool, int64_t T, int64_t H, int64_t KV, int64_t D) {
    #pragma omp parallel for schedule(static) if (T * (H + KV) * D >= PARALLEL_FROM)
    for (int64_t t = 0; t < T; t++) WITH_DTYPE(bf16, rotate_row, qkv, stride, cos, sin, slots, k_pool, v_pool, t, H, KV, D);
}

void loramux_rotary_f32(float *qkv, int64_t stride, const float *cos, const float *sin, const int64_t *slots,
                        float *k_pool, float *v_pool, int64_t T, int64_t H, int64_t KV, int64_t D) {
    rotary(false, qkv, stride, cos, sin, slots, k_pool, v_pool, T, H, KV, D);
}

void loramux_rotary_bf16(uint16_t *qkv, int64_t stride, const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                         uint16_t *k_pool, uint16_t *v_pool, int64_t T, int64_t H, int64_t KV, int64_t D) {
    rotary(true, qkv, stride, cos, sin, slots, k_pool, v_pool, T, H, KV, D);
}
