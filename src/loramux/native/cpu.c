/* Which instruction sets this CPU has, of those the kernels are built for (loramux.native.cpu_isa).
 * Built on its own, for the baseline x86-64, so that asking runs no instruction the CPU may lack. */
int loramux_cpu_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

int loramux_cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
