// Plain parameter struct and launchers of the depthwise CUDA kernels. Filled on
// the host (dw_conv_cuda.cpp, which owns every check and allocation) and passed
// by value; this header keeps ATen out of the .cu so it compiles in seconds.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mbx {

enum DType : int { kF64 = 0, kF32 = 1, kF16 = 2, kBF16 = 3 };

struct DwLaunch {
  int N, C, H, W, Ho, Wo, K, stride, pad, dil, act;
  bool channels_last, training;
  int dtype;   // DType of x, weight, y, dy, dx, dc
  int chunks;  // pixel chunks of the reduction kernels (dw_num_chunks)
  double eps;
  // tensors of dtype T (x's dtype), contiguous in x's memory format / (C, K*K)
  const void* x;
  const void* w;
  void* y;
  const void* dy;
  void* dx;
  void* dc;  // workspace: gradient at the conv output, y's shape and layout
  // per-channel tensors of the accumulation type A (fp64 for fp64 x, else fp32)
  const void* gamma;
  const void* beta;
  void* mean;
  void* invstd;
  void* scale;
  void* shift;
  void* dgamma;
  void* dbeta;
  void* dweight;  // (C, K*K)
  void* coef;     // (3, C) workspace: BnBwdCoef a, b, d
  void* part;     // (chunks, max(3, K*K), C) workspace of block partials
};

// Number of pixel chunks the reduction kernels split N*Ho*Wo into (sizes `part`).
int dw_num_chunks(const DwLaunch& p);
// Training: batch statistics of the conv output -> mean, invstd, scale, shift.
cudaError_t dw_stats_launch(const DwLaunch& p, cudaStream_t stream);
// y = act(conv(x) * scale + shift).
cudaError_t dw_apply_launch(const DwLaunch& p, cudaStream_t stream);
// dx, dweight, dgamma, dbeta from dy (needs mean, invstd, scale, shift, gamma).
cudaError_t dw_bwd_launch(const DwLaunch& p, cudaStream_t stream);

}  // namespace mbx
