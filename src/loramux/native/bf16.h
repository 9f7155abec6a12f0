/* bfloat16 <-> float32, rounding as torch rounds (to nearest, ties to even): scalar helpers for
 * any build, and their AVX-512 forms for the kernels built for it. */
#ifndef LORAMUX_BF16_H
#define LORAMUX_BF16_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline float scalar_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* the bf16 nearest to f; a NaN stays a (quiet) NaN */
static inline uint16_t scalar_round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u | 0x400000u) >> 16);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if defined __AVX512BW__ && defined __AVX512VL__

/* a mask of the first n of 16 lanes */
static inline __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* the bf16 nearest to f, as float32; a NaN stays a (quiet) NaN */
static inline __m512 round_bf16(__m512 f) {
    __m512i u = _mm512_castps_si512(f);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
}

static inline void store_bf16(uint16_t *p, __m512 f, __mmask16 m) {
    __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(round_bf16(f)), 16);
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(bits));
}

#endif
#endif
