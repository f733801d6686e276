// The depthwise CPU kernels compiled for AVX2 + FMA (x86-64 with GCC), chosen at run
// time only on CPUs that have both. See isa.h and kernels_impl.h.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MBX_ISA avx2
#define MBX_ISA_AVX2 1
#define MBX_PART_DW 1
#include "kernels_impl.h"
#endif
