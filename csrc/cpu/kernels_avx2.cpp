// The pointwise CPU kernels and the kernel table compiled for AVX2 + FMA (x86-64 with
// GCC; the depthwise ones are in kernels_avx2_dw.cpp), chosen at run time only
// on CPUs that have both. See isa.h.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MBX_ISA avx2
#define MBX_ISA_AVX2 1
#include "kernels_impl.h"
#else
#include "isa.h"
namespace mbx {
namespace cpu {
namespace avx2 {
const Kernels* table() { return nullptr; }
}  // namespace avx2
}  // namespace cpu
}  // namespace mbx
#endif
