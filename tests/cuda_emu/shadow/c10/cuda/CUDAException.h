// Emulation stand-in (tests/cuda_emu): C10_CUDA_CHECK on the emulated runtime.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>
namespace emu {
// the emulated runtime's cudaGetLastError, for units compiled without emu.h (the
// *_cuda.cpp files: their cudaGetLastError would be the real runtime's)
cudaError_t last_error_extern();
}  // namespace emu
#define C10_CUDA_CHECK(EXPR)                                                       \
  do {                                                                             \
    const cudaError_t e_ = (EXPR);                                                 \
    TORCH_CHECK(e_ == cudaSuccess, "emulated CUDA error ", int(e_), " from " #EXPR); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(::emu::last_error_extern())
