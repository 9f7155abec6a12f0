/* Whether this CPU runs the kernels of this library (they are compiled for AVX-512 F/BW/VL). */
int loramux_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
