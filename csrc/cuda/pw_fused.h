// Single-kernel pointwise (1x1) conv GEMM + folded BatchNorm + activation
// (+ residual) for the eval forward, fp16/bf16, channels_last (pw_fused.cu).
// Plain C++ so that the .cu file needs no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mbx {

// Every tensor is a dense row-major matrix; all pointers are device pointers.
struct PwFusedArgs {
  const void* x;         // [P, Cin]  (channels_last x), T
  const void* w;         // [Cout, Cin], T
  const float* scale;    // [Cout]: gamma * invstd
  const float* shift;    // [Cout]: beta - mean * scale
  const void* residual;  // [P, Cout] (channels_last), T, or nullptr
  void* y;               // [P, Cout] (channels_last), T
  int64_t P;             // N * H * W
  int Cin, Cout, act;    // act: mbx::Act
};

// Whether the fused kernel can run on the current CUDA device: the binary that
// device runs was compiled for sm_80 or newer (bf16 WMMA, cp.async). Cached per device.
bool pw_fused_supported();

// y[p, c] = T(act(sum_k x[p, k] * w[c, k] * scale[c] + shift[c]) + residual[p, c]),
// accumulated in fp32. T is bf16 if `bf16` else fp16. Any P >= 0, Cin >= 0,
// Cout >= 0; nothing is launched when P == 0 or Cout == 0. Launch errors are
// left for the caller's cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK).
void pw_fused_launch(const PwFusedArgs& a, bool bf16, cudaStream_t stream);

}  // namespace mbx
