/* bfloat16 <-> float32 for one value, rounding as torch rounds (to nearest, ties to even); the
 * vector forms are in vec.h. */
#ifndef LORAMUX_BF16_H
#define LORAMUX_BF16_H

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

#endif
