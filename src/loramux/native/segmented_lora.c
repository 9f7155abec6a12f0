/* The segmented multi-LoRA matmul for inference rows (loramux.lora.segmented_lora).
 *
 * For every segment (start, end, w):   y[start:end] += (x[start:end] @ A[w]) @ B[w]
 *
 *   x: [T, in], y: [T, out]     row-major, contiguous
 *   A: [S, in, R]               contiguous: every slot's A, read at slot w
 *   B: [S, b_stride]            contiguous: every slot's B, packed by block
 *   blocks: n_blocks x (k0, k1, c0, c1, off): B[w] is block-diagonal (a fused group's projections)
 *           and only its blocks are stored: rows k0..k1 x columns c0..c1 of B[w] lie row-major,
 *           (k1 - k0) x (c1 - c0), at B + w * b_stride + off
 *   h: [T, R] float32 scratch
 *   x, y, A and B all bfloat16 (`_bf16`) or all float32 (`_f32`).
 *
 * Everything is computed in float32; bf16 y is rounded once, to nearest even as torch rounds.
 * Both phases run on OpenMP threads: the library links libgomp.so.1, which resolves to the copy
 * torch has already loaded, so it shares torch's thread pool and thread count.
 *
 * Written with the compiler's generic vectors (GCC's and Clang's vector extensions) as wide as a
 * register, so the same source is built for AVX-512 and for AVX2, and the loader takes the build
 * this CPU runs (loramux.native.library).
 */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "vec.h"

/* how many rank vectors of accumulators, ROWS rows each, fit the registers (32 with AVX-512, 16
 * with AVX2) beside the operands */
#if LANES == 16
#define KVECS 3
#else
#define KVECS 1
#endif
#define ROWS 8            /* rows computed together */
#define PIECE (4 * LANES) /* output columns per work item of the expand */
#define XBLOCK 256        /* elements of a bf16 x row converted to float32 at a time */

/* h[r0 + r, k + j * LANES ...] = x[r0 + r] @ A[:, k + j * LANES ...] for r < n rows and j < nk
 * vectors of rank columns; `full`: all nk vectors lie inside R (plain loads, no tail). Loops over
 * rows run to ROWS (those past n skipped) so that the accumulators stay in registers. */
INLINE void shrink(bool bf16, const void *x, const void *a, float *h, int64_t in, int64_t R, int64_t r0, int n, int64_t k,
                   int nk, bool full) {
    vf acc[ROWS][KVECS];
    float xs[ROWS][XBLOCK]; /* bf16 rows: XBLOCK elements of each row as float32, converted a vector at a time */
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < KVECS; j++) acc[r][j] = (vf){0};
    for (int64_t i0 = 0; i0 < in; i0 += XBLOCK) {
        const int64_t m = min64(XBLOCK, in - i0);
        if (bf16)
            for (int r = 0; r < n; r++)
                for (int64_t i = 0; i < m; i += LANES)
                    store_f32_n(xs[r] + i, load_bf16_n((const uint16_t *)x + (r0 + r) * in + i0 + i, m - i), LANES);
        for (int64_t i = 0; i < m; i++) {
            vf av[KVECS];
            for (int j = 0; j < nk; j++)
                av[j] = load_n(bf16, a, (i0 + i) * R + k + LANES * j, full ? LANES : R - k - LANES * j);
            for (int r = 0; r < ROWS && r < n; r++) {
                const float xv = bf16 ? xs[r][i] : ((const float *)x)[(r0 + r) * in + i0 + i];
                for (int j = 0; j < nk; j++) acc[r][j] += xv * av[j];
            }
        }
    }
    for (int r = 0; r < n; r++)
        for (int j = 0; j < nk; j++) store_f32_n(h + (r0 + r) * R + k + LANES * j, acc[r][j], R - k - LANES * j);
}

/* h[r0 .. r0 + n) = x[r0 .. r0 + n) @ A[w] for the chunk of n <= ROWS rows of segment (start, end, w) */
INLINE void shrink_chunk(bool bf16, const void *x, const void *A, float *h, int64_t in, int64_t R, const int64_t *segment,
                         int64_t r0) {
    const int n = (int)min64(segment[1] - r0, ROWS);
    const char *a = (const char *)A + segment[2] * in * R * (bf16 ? 2 : 4);
    for (int64_t k = 0; k < R; k += KVECS * LANES) {
        if (R - k >= KVECS * LANES)
            shrink(bf16, x, a, h, in, R, r0, n, k, KVECS, true);
        else
            shrink(bf16, x, a, h, in, R, r0, n, k, (int)((R - k + LANES - 1) / LANES), false);
    }
}

/* y[r0 .. r0 + n, col0 .. col1) += h[r0 .. r0 + n, k0 .. k1) @ B[w]'s block blk (k0, k1, c0, c1, off)
 * for the chunk of n <= ROWS rows of segment (start, end, w) */
INLINE void expand_piece(bool bf16, void *y, const void *B, const float *h, int64_t out, int64_t R, int64_t b_stride,
                         const int64_t *blk, const int64_t *segment, int64_t r0, int64_t col0) {
    const int64_t col1 = min64(col0 + PIECE, blk[3]), width = blk[3] - blk[2];
    const int n = (int)min64(segment[1] - r0, ROWS);
    const char *b0 = (const char *)B + (segment[2] * b_stride + blk[4] - blk[2]) * (bf16 ? 2 : 4); /* + ((k - k0) * width + col) elements */
    for (int64_t col = col0; col < col1; col += LANES) {
        const int64_t m = col1 - col;
        vf acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = (vf){0};
        if (m >= LANES)
            for (int64_t k = blk[0]; k < blk[1]; k++) {
                const vf bv = load_n(bf16, b0, (k - blk[0]) * width + col, LANES);
                for (int r = 0; r < ROWS; r++)
                    if (r < n) acc[r] += h[(r0 + r) * R + k] * bv;
            }
        else
            for (int64_t k = blk[0]; k < blk[1]; k++) {
                const vf bv = load_n(bf16, b0, (k - blk[0]) * width + col, m);
                for (int r = 0; r < ROWS; r++)
                    if (r < n) acc[r] += h[(r0 + r) * R + k] * bv;
            }
        for (int r = 0; r < n; r++) {
            const int64_t at = (r0 + r) * out + col;
            store_n(bf16, y, at, load_n(bf16, y, at, m) + acc[r], m);
        }
    }
}

INLINE void add_lora_segments(bool bf16, const void *x, void *y, int64_t in, int64_t out, const void *A, const void *B,
                              int64_t R, int64_t b_stride, const int64_t *blocks, int64_t n_blocks,
                              const int64_t *segments, int64_t n_segments, float *h) {
    /* work items: ROWS-row chunks of the segments; the expand also splits columns in PIECEs */
    int64_t n_chunks = 0;
    for (int64_t s = 0; s < n_segments; s++) n_chunks += (segments[3 * s + 1] - segments[3 * s] + ROWS - 1) / ROWS;
    if (n_chunks == 0 || R == 0) return;
    int64_t chunk_segment[n_chunks], chunk_row[n_chunks];
    for (int64_t s = 0, c = 0; s < n_segments; s++)
        for (int64_t r = segments[3 * s]; r < segments[3 * s + 1]; r += ROWS) { chunk_segment[c] = s; chunk_row[c++] = r; }

    /* h = x @ A: each chunk streams its A once, KVECS vectors of rank columns at a time */
    #pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n_chunks; c++)
        WITH_DTYPE(bf16, shrink_chunk, x, A, h, in, R, segments + 3 * chunk_segment[c], chunk_row[c]);

    /* y += h @ B, block by block, PIECE output columns per work item */
    int64_t n_pieces = 0;
    for (int64_t b = 0; b < n_blocks; b++) n_pieces += (blocks[5 * b + 3] - blocks[5 * b + 2] + PIECE - 1) / PIECE;
    int64_t piece_block[n_pieces > 0 ? n_pieces : 1], piece_col[n_pieces > 0 ? n_pieces : 1];
    for (int64_t b = 0, p = 0; b < n_blocks; b++)
        for (int64_t col = blocks[5 * b + 2]; col < blocks[5 * b + 3]; col += PIECE) { piece_block[p] = b; piece_col[p++] = col; }
    #pragma omp parallel for schedule(static)
    for (int64_t it = 0; it < n_chunks * n_pieces; it++) {
        const int64_t c = it / n_pieces, p = it % n_pieces;
        WITH_DTYPE(bf16, expand_piece, y, B, h, out, R, b_stride, blocks + 5 * piece_block[p], segments + 3 * chunk_segment[c],
                   chunk_row[c], piece_col[p]);
    }
}

void loramux_add_lora_segments_bf16(const uint16_t *x, uint16_t *y, int64_t in, int64_t out, const uint16_t *A,
                                    const uint16_t *B, int64_t R, int64_t b_stride, const int64_t *blocks,
                                    int64_t n_blocks, const int64_t *segments, int64_t n_segments, float *h) {
    add_lora_segments(true, x, y, in, out, A, B, R, b_stride, blocks, n_blocks, segments, n_segments, h);
}

void loramux_add_lora_segments_f32(const float *x, float *y, int64_t in, int64_t out, const float *A, const float *B,
                                   int64_t R, int64_t b_stride, const int64_t *blocks, int64_t n_blocks,
                                   const int64_t *segments, int64_t n_segments, float *h) {
    add_lora_segments(false, x, y, in, out, A, B, R, b_stride, blocks, n_blocks, segments, n_segments, h);
}
