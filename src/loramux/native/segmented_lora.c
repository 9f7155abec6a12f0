/* The segmented multi-LoRA matmul for bf16 inference rows (loramux.lora.segmented_lora).
 *
 * For every segment (start, end, w):   y[start:end] += (x[start:end] @ A[w]) @ B[w]
 *
 *   x: [T, in], y: [T, out]     bfloat16, row-major, contiguous
 *   A: [S, in, R]               bfloat16, contiguous: every slot's A, read at slot w
 *   B: [S, b_stride]            bfloat16, contiguous: every slot's B, packed by block
 *   blocks: n_blocks x (k0, k1, c0, c1, off): B[w] is block-diagonal (a fused group's projections)
 *           and only its blocks are stored: rows k0..k1 x columns c0..c1 of B[w] lie row-major,
 *           (k1 - k0) x (c1 - c0), at B + w * b_stride + off
 *   h: [T, R] float32 scratch
 *
 * Everything is computed in float32 and y rounded once, to nearest even as torch rounds.
 * Both phases run on OpenMP threads: the library links libgomp.so.1, which resolves to the copy
 * torch has already loaded, so it shares torch's thread pool and thread count.
 */
#include <stdint.h>

#include "bf16.h"

#define ROWS 8 /* rows computed together: ROWS x 4 float32 accumulators fit the 32 registers */

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

void loramux_add_lora_segments(const uint16_t *x, uint16_t *y, int64_t in, int64_t out,
                               const uint16_t *A, const uint16_t *B, int64_t R, int64_t b_stride,
                               const int64_t *blocks, int64_t n_blocks,
                               const int64_t *segments, int64_t n_segments, float *h) {
    /* work items: ROWS-row chunks of the segments; the expand also splits columns in 64s */
    int64_t n_chunks = 0;
    for (int64_t s = 0; s < n_segments; s++) n_chunks += (segments[3 * s + 1] - segments[3 * s] + ROWS - 1) / ROWS;
    if (n_chunks == 0 || R == 0) return;
    int64_t chunk_segment[n_chunks], chunk_row[n_chunks];
    for (int64_t s = 0, c = 0; s < n_segments; s++)
        for (int64_t r = segments[3 * s]; r < segments[3 * s + 1]; r += ROWS) { chunk_segment[c] = s; chunk_row[c++] = r; }

    /* h = x @ A: each chunk streams its A once, 64 rank columns at a time */
    #pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t s = chunk_segment[c], r0 = chunk_row[c];
        const int n = (int)min64(segments[3 * s + 1] - r0, ROWS);
        const int64_t a0 = segments[3 * s + 2] * in * R;
        for (int64_t k = 0; k < R; k += 64) {
            const int nk = (int)min64((R - k + 15) / 16, 4);
            __mmask16 m[4];
            __m512 acc[ROWS][4];
            for (int j = 0; j < 4; j++) m[j] = j < nk ? lanes(R - k - 16 * j) : 0;
            for (int r = 0; r < ROWS; r++)
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
            for (int64_t i = 0; i < in; i++) {
                __m512 a[4];
                for (int j = 0; j < nk; j++) a[j] = load_bf16(A + a0 + i * R + k + 16 * j, m[j]);
                for (int r = 0; r < n; r++) {
                    const __m512 xv = _mm512_set1_ps(scalar_bf16(x[(r0 + r) * in + i]));
                    for (int j = 0; j < nk; j++) acc[r][j] = _mm512_fmadd_ps(xv, a[j], acc[r][j]);
                }
            }
            for (int r = 0; r < n; r++)
                for (int j = 0; j < nk; j++) _mm512_mask_storeu_ps(h + (r0 + r) * R + k + 16 * j, m[j], acc[r][j]);
        }
    }

    /* y += h @ B, block by block, 64 output columns per work item */
    int64_t n_pieces = 0;
    for (int64_t b = 0; b < n_blocks; b++) n_pieces += (blocks[5 * b + 3] - blocks[5 * b + 2] + 63) / 64;
    int64_t piece_block[n_pieces > 0 ? n_pieces : 1], piece_col[n_pieces > 0 ? n_pieces : 1];
    for (int64_t b = 0, p = 0; b < n_blocks; b++)
        for (int64_t col = blocks[5 * b + 2]; col < blocks[5 * b + 3]; col += 64) { piece_block[p] = b; piece_col[p++] = col; }
    #pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < n_chunks * n_pieces; it++) {
        const int64_t c = it / n_pieces, s = chunk_segment[c], r0 = chunk_row[c];
        const int64_t *blk = blocks + 5 * piece_block[it % n_pieces];
        const int64_t col0 = piece_col[it % n_pieces], col1 = min64(col0 + 64, blk[3]);
        const int n = (int)min64(segments[3 * s + 1] - r0, ROWS);
        const int64_t width = blk[3] - blk[2];
        const uint16_t *b0 = B + segments[3 * s + 2] * b_stride + blk[4] - blk[2]; /* + (k - k0) * width + col */
        for (int64_t col = col0; col < col1; col += 16) {
            const __mmask16 m = lanes(col1 - col);
            __m512 acc[ROWS];
            for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t k = blk[0]; k < blk[1]; k++) {
                const __m512 bv = load_bf16(b0 + (k - blk[0]) * width + col, m);
                for (int r = 0; r < n; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(h[(r0 + r) * R + k]), bv, acc[r]);
            }
            for (int r = 0; r < n; r++) {
                uint16_t *at = y + (r0 + r) * out + col;
                store_bf16(at, _mm512_add_ps(load_bf16(at, m), acc[r]), m);
            }
        }
    }
}
