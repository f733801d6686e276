// Run-time choice of the CPU kernel build (see isa.h).
#include "isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace mbx {
namespace cpu {

namespace {
bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}
}  // namespace

const Kernels& kernels() {
  const char* env = std::getenv("MOBILENET_EXT_CPU_ISA");
  const bool forced = env != nullptr && *env != '\0' && std::strcmp(env, "auto") != 0;
  if (forced) {
    if (std::strcmp(env, "base") == 0) return *base::table();
    TORCH_CHECK_VALUE(std::strcmp(env, "avx2") == 0, "MOBILENET_EXT_CPU_ISA must be auto, base "
                      "or avx2, got '", env, "'");
    TORCH_CHECK(avx2::table() != nullptr, "MOBILENET_EXT_CPU_ISA=avx2: this build has no AVX2 "
                "kernels (x86-64 with GCC only)");
    TORCH_CHECK(cpu_has_avx2(), "MOBILENET_EXT_CPU_ISA=avx2: this CPU lacks AVX2/FMA");
    return *avx2::table();
  }
  if (avx2::table() != nullptr && cpu_has_avx2()) return *avx2::table();
  return *base::table();
}

}  // namespace cpu
}  // namespace mbx
