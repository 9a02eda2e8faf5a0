/* Make oneMKL take the code paths it takes on an Intel CPU (LD_PRELOAD this library).
 *
 * MKL picks its GEMM kernels by CPU vendor: on AMD it runs generic ones even where the CPU has
 * AVX-512, on Intel it runs AVX-512 ones -- and the two sum in different orders. torch's CPU
 * wheel links MKL into libtorch_cpu.so and exports these two queries, so a preloaded definition
 * answers them: an AMD machine then rounds as an Intel one does, and a tolerance that only held
 * for one CPU vendor's kernels fails here too (tools/kernel_variants.py). On an Intel CPU it
 * changes nothing. Never used outside tests. */
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
