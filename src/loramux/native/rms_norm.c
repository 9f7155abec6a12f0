/* RMSNorm of rows, as Hugging Face's LlamaRMSNorm computes it (loramux.native.rms_norm):
 *
 *   bf16:     y = w * bf16(x * rsqrt(mean(x^2) + eps))   (x in float32, the product rounded again)
 *   float32:  y = (x * rsqrt(mean(x^2) + eps)) * w
 *
 *   x, y: [rows, n] row-major, contiguous; w: [n]; everything in between in float32.
 * torch's `rms_norm` runs as eight small ops on CPU (about 45 us per call for 32 rows of 576);
 * this is one pass per row. Rows are split over torch's OpenMP threads when there are many.
 * Generic vectors (vec.h): built for AVX-512 or AVX2, whichever the CPU has.
 */
#include <math.h>
#include <stdint.h>

#include "vec.h"

#define PARALLEL_FROM 65536 /* elements: below it, one thread is faster than waking the other */

/* row r of x normed into y */
INLINE void norm_row(bool bf16, const void *x, const void *w, void *y, int64_t r, int64_t n, float eps) {
    vf acc = {0};
    for (int64_t i = 0; i < n; i += LANES) {
        const vf v = load_n(bf16, x, r * n + i, n - i);
        acc += v * v;
    }
    const float s = 1.0f / sqrtf(hsum(acc) / (float)n + eps);
    for (int64_t i = 0; i < n; i += LANES) {
        const vf normed = load_n(bf16, x, r * n + i, n - i) * s;
        if (bf16)
            store_bf16_n((uint16_t *)y + r * n + i, load_bf16_n((const uint16_t *)w + i, n - i) * round_bf16_v(normed), n - i);
        else
            store_f32_n((float *)y + r * n + i, normed * load_f32_n((const float *)w + i, n - i), n - i);
    }
}

INLINE void rms_norm(bool bf16, const void *x, const void *w, void *y, int64_t rows, int64_t n, float eps) {
    #pragma omp parallel for schedule(static) if (rows * n >= PARALLEL_FROM)
    for (int64_t r = 0; r < rows; r++) WITH_DTYPE(bf16, norm_row, x, w, y, r, n, eps);
}

void loramux_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t n, float eps) {
    rms_norm(true, x, w, y, rows, n, eps);
}

void loramux_rms_norm_f32(const float *x, const float *w, float *y, int64_t rows, int64_t n, float eps) {
    rms_norm(false, x, w, y, rows, n, eps);
}
