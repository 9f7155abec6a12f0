/* RMSNorm of rows, as Hugging Face's LlamaRMSNorm computes it (loramux.native.rms_norm):
 *
 *   bf16:     y = w * bf16(x * rsqrt(mean(x^2) + eps))   (x in float32, the product rounded again)
 *   float32:  y = (x * rsqrt(mean(x^2) + eps)) * w
 *
 *   x, y: [rows, n] row-major, contiguous; w: [n]; everything in between in float32.
 * torch's `rms_norm` runs as eight small ops on CPU (about 45 us per call for 32 rows of 576);
 * this is one pass per row. Rows are split over torch's OpenMP threads when there are many.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

#define PARALLEL_FROM 65536 /* elements: below it, one thread is faster than waking the other */

static inline __m512 load(int bf16, const void *p, int64_t i, __mmask16 m) {
    return bf16 ? load_bf16((const uint16_t *)p + i, m) : _mm512_maskz_loadu_ps(m, (const float *)p + i);
}

static void rms_norm(int bf16, const void *x, const void *w, void *y, int64_t rows, int64_t n, float eps) {
    #pragma omp parallel for schedule(static) if (rows * n >= PARALLEL_FROM)
    for (int64_t r = 0; r < rows; r++) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            const __m512 v = load(bf16, x, r * n + i, lanes(n - i));
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        const __m512 s = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps));
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 m = lanes(n - i);
            const __m512 normed = _mm512_mul_ps(load(bf16, x, r * n + i, m), s);
            if (bf16)
                store_bf16((uint16_t *)y + r * n + i, _mm512_mul_ps(load_bf16((const uint16_t *)w + i, m), round_bf16(normed)), m);
            else
                _mm512_mask_storeu_ps((float *)y + r * n + i, m, _mm512_mul_ps(normed, _mm512_maskz_loadu_ps(m, (const float *)w + i)));
        }
    }
}

void loramux_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t n, float eps) {
    rms_norm(1, x, w, y, rows, n, eps);
}

void loramux_rms_norm_f32(const float *x, const float *w, float *y, int64_t rows, int64_t n, float eps) {
    rms_norm(0, x, w, y, rows, n, eps);
}
