/* The compiler's generic vectors (GCC's and Clang's vector extensions) as wide as a register, so
 * that one kernel source builds for AVX-512 and for AVX2 (loramux.native builds each for the best
 * of them the CPU has), and the bf16 conversions the kernels share. */
#ifndef LORAMUX_VEC_H
#define LORAMUX_VEC_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline)) /* vectors passed to helpers stay in registers */

/* float32 lanes of a vector register: 16 with AVX-512, 8 with AVX2 (wider generic vectors would be
 * split and shuffled through memory) */
#ifdef __AVX512F__
#define LANES 16
#else
#define LANES 8
#endif
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

/* f(bf16, ...) with bf16 as a constant. For calls inside an OpenMP loop: the loop's body is compiled
 * as one function for every caller of the function that holds the loop, so a dtype that is a
 * constant in each caller is not one there. */
#define WITH_DTYPE(bf16, f, ...) \
    do {                           \
        if (bf16)                  \
            f(true, __VA_ARGS__);  \
        else                       \
            f(false, __VA_ARGS__); \
    } while (0)

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

INLINE float hsum(vf v) {
#if LANES == 16
    const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    const f32x8 a = v;
#endif
    const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* LANES bf16 elements at p as float32 */
INLINE vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

/* the first n bf16 elements at p (all LANES if n >= LANES) as float32, zeros past them */
INLINE vf load_bf16_n(const uint16_t *p, int64_t n) {
    if (n >= LANES) return load_bf16(p);
    vh h = {0};
    memcpy(&h, p, (size_t)n * 2);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

/* the first n float32 elements at p (all LANES if n >= LANES), zeros past them */
INLINE vf load_f32_n(const float *p, int64_t n) {
    vf v = {0};
    if (n >= LANES)
        memcpy(&v, p, sizeof v);
    else
        memcpy(&v, p, (size_t)n * 4);
    return v;
}

/* the first n float32 or bf16 elements at p + i (all LANES if n >= LANES), as float32 */
INLINE vf load_n(bool bf16, const void *p, int64_t i, int64_t n) {
    return bf16 ? load_bf16_n((const uint16_t *)p + i, n) : load_f32_n((const float *)p + i, n);
}

/* the first n lanes of v (all if n >= LANES) into p */
INLINE void store_f32_n(float *p, vf v, int64_t n) {
    if (n >= LANES)
        memcpy(p, &v, sizeof v);
    else
        memcpy(p, &v, (size_t)n * 4);
}

/* each lane's nearest bf16 (ties to even, as torch rounds; a NaN stays a quiet NaN), as its upper
 * 16 bits */
INLINE vu bf16_bits(vf v) {
    const vu u = (vu)v, nan = (vu)(v != v);
    const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (nan & ((u | 0x400000u) >> 16)) | (~nan & rounded);
}

/* v rounded to bf16, as float32 */
INLINE vf round_bf16_v(vf v) { return (vf)(bf16_bits(v) << 16); }

/* the first n lanes of v (all if n >= LANES) rounded to bf16 into p */
INLINE void store_bf16_n(uint16_t *p, vf v, int64_t n) {
    const vh h = __builtin_convertvector(bf16_bits(v), vh);
    if (n >= LANES)
        memcpy(p, &h, sizeof h);
    else
        memcpy(p, &h, (size_t)n * 2);
}

/* the first n lanes of v (all if n >= LANES) into p + i, as float32 or rounded to bf16 */
INLINE void store_n(bool bf16, void *p, int64_t i, vf v, int64_t n) {
    if (bf16)
        store_bf16_n((uint16_t *)p + i, v, n);
    else
        store_f32_n((float *)p + i, v, n);
}

#endif
