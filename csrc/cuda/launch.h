// Plain parameter struct and launchers of the CUDA kernels. Filled on the host
// (*_cuda.cpp, which owns every check and allocation) and passed by value; this
// header keeps ATen out of the .cu files so they compile in seconds.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mbx {

enum DType : int { kF64 = 0, kF32 = 1, kF16 = 2, kBF16 = 3 };

// One conv + BN + activation call. The output y is (N, C, Ho, Wo); for the
// pointwise op K = 1 and the conv output is given in `conv` (a GEMM result).
struct ConvLaunch {
  int N, C, H, W, Ho, Wo, K, stride, pad, dil, act;
  bool channels_last, training;
  int dtype;   // DType of x, weight, y, dy, dx, dc, conv, residual
  int chunks;  // pixel chunks of the reduction kernels (num_chunks)
  double eps;
  // tensors of dtype T (x's dtype), contiguous in x's memory format / (C, K*K)
  const void* x;
  const void* w;
  const void* conv;      // pointwise: conv output, laid out like y, in T (or A if conv_acc)
  bool conv_acc;
  const void* residual;  // pointwise: added after the activation, like y (or null)
  void* y;
  const void* dy;
  void* dx;
  void* dc;  // gradient at the conv output, laid out like y
  // per-channel tensors of the accumulation type A (fp64 for fp64 x, else fp32)
  const void* gamma;
  const void* beta;
  void* mean;
  void* invstd;
  void* scale;
  void* shift;
  void* dgamma;
  void* dbeta;
  void* dweight;  // depthwise: (C, K*K)
  void* coef;     // (3, C) workspace: BnBwdCoef a, b, d
  void* part;     // (chunks, max(3, K*K), C) workspace of block partials
  // depthwise, vector path only (dw_vec_geometry): the weights transposed to
  // (K*K, C) in T, and the same with the taps reversed (dx as a conv of dc)
  const void* wt;
  const void* wt_flip;
};

// The BatchNorm fold of one op call, per channel c < C, in the accumulation type A
// (acc: kF64 or kF32): with running statistics given (eval), mean = running_mean
// and invstd = bn_invstd(running_var, eps) are written; else mean and invstd are
// read. Then out (3, C) = scale, shift, gamma (BnFold). Inputs of any float DType.
struct BnFoldArgs {
  int64_t C;
  int acc;
  double eps;
  const void* running_mean;  // eval, or null
  const void* running_var;
  int rm_dtype, rv_dtype;
  const void* gamma;
  const void* beta;
  int gamma_dtype, beta_dtype;
  void* mean;    // (C) of A
  void* invstd;  // (C) of A
  void* out;     // (3, C) of A
};
cudaError_t bn_fold_launch(const BnFoldArgs& a, cudaStream_t stream);

// Depthwise: whether the vectorised channels_last kernels (vec_tile.cuh) take this
// geometry and dtype (the pointer alignment is checked at each launch); the host
// then sets wt and wt_flip. MOBILENET_EXT_VEC=0 turns the vector path off (both ops).
bool dw_vec_geometry(const ConvLaunch& p);

// Number of pixel chunks the reduction kernels split N*Ho*Wo into (sizes `part`).
int num_chunks(const ConvLaunch& p);
// num_chunks of the pointwise op (K == 1).
int pw_num_chunks(const ConvLaunch& p);

// The stages of the vectorised channels_last path (vec_tile.cuh).
enum VecStage : int { kVecStats, kVecApply, kVecBwdSums, kVecBwdDc, kVecDx };
// false when MOBILENET_EXT_VEC=0 (read on every call): the scalar kernels only.
bool vec_enabled();
// Depthwise: launches one stage on the vector path (kVecStats includes its
// finalize; kVecDx writes dx from dc); cudaErrorNotSupported where it does not
// apply (geometry, dtype, alignment, or a stage it lacks), for the caller to
// take the scalar kernels.
cudaError_t dw_vec_launch(VecStage stage, const ConvLaunch& p, cudaStream_t stream);
// num_chunks of dw_vec_launch's reductions.
int dw_vec_chunks(const ConvLaunch& p);
// Depthwise, dw_vec_launch's stages through a shared-memory input tile per block
// (dw_tile.cu; taken when MOBILENET_EXT_DW_TILE=1), for the geometries and pointers
// dw_vec_launch accepts, with the same outputs and partials (kVecStats includes its
// finalize; kVecBwdDc writes dc and the weight-gradient partials in one kernel, or in
// two at K = 3 with MOBILENET_EXT_DW_TILE_SPLIT=1); T in {float, __half,
// __nv_bfloat16}, K in {3, 5, 7}, S in {1, 2}. cudaErrorNotSupported for kVecDx at
// stride 2 or pad > K - 1, and where no tile fits, a grid would not, or the device
// refuses the shared memory: the caller takes the strip (or scalar) kernels.
template <typename T, int K, int S>
cudaError_t dw_tile_launch(VecStage stage, const ConvLaunch& p, cudaStream_t stream);
// The chunk count (p.chunks) for the tile kernels' reductions of p (sized by tiles, not
// strips), 0 where they do not apply; dw_vec_chunks takes it with MOBILENET_EXT_DW_TILE=1.
int dw_tile_chunks(const ConvLaunch& p);

// Depthwise: training batch statistics -> mean, invstd, scale, shift.
cudaError_t dw_stats_launch(const ConvLaunch& p, cudaStream_t stream);
// Depthwise: y = act(conv(x) * scale + shift).
cudaError_t dw_apply_launch(const ConvLaunch& p, cudaStream_t stream);
// Depthwise: dx, dweight, dgamma, dbeta from dy (needs mean, invstd, scale, shift, gamma).
cudaError_t dw_bwd_launch(const ConvLaunch& p, cudaStream_t stream);

// Pointwise, from the conv output `conv`: batch statistics (as dw_stats_launch).
cudaError_t pw_stats_launch(const ConvLaunch& p, cudaStream_t stream);
// Pointwise: y = act(conv * scale + shift) + residual; y may alias conv.
cudaError_t pw_apply_launch(const ConvLaunch& p, cudaStream_t stream);
// Pointwise: dgamma, dbeta and dc (the gradient at the conv output); dx and
// dweight are GEMMs of dc done by the caller.
cudaError_t pw_bwd_launch(const ConvLaunch& p, cudaStream_t stream);

}  // namespace mbx
