// Math shared by the C++ (CPU) and CUDA kernels: activations, the BatchNorm
// epilogue, Welford statistics and convolution index math. Both compilers
// include this file, so the CPU tests exercise the very code the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MBX_HD __host__ __device__ __forceinline__
#else
#define MBX_HD inline
#endif

namespace mbx {

// Order matches mobilenet_ext/ops.py::_ACTS; the runtime switch lives in the epilogue.
enum Act : int { kReLU6 = 0, kReLU = 1, kIdentity = 2, kHardSwish = 3, kSiLU = 4, kNumActs = 5 };

template <typename T>
MBX_HD T exp_(T v) {
  return exp(v);  // float and double overloads exist on host and device
}

template <typename T>
MBX_HD T act_fwd(int act, T z) {
  switch (act) {
    case kReLU6: return z < T(0) ? T(0) : (z > T(6) ? T(6) : z);
    case kReLU: return z < T(0) ? T(0) : z;
    case kHardSwish: {
      T r = z + T(3);
      r = r < T(0) ? T(0) : (r > T(6) ? T(6) : r);
      return z * r / T(6);
    }
    case kSiLU: return z / (T(1) + exp_(-z));
    default: return z;
  }
}

// dL/dz given dL/dy; derivatives at the kinks follow PyTorch's eager kernels
// (hardtanh_backward, threshold_backward, hardswish_backward, silu_backward).
template <typename T>
MBX_HD T act_bwd(int act, T z, T dy) {
  switch (act) {
    // & not &&: no short circuit, so the CPU loops if-convert and vectorise
    case kReLU6: return ((z > T(0)) & (z < T(6))) ? dy : T(0);
    case kReLU: return z > T(0) ? dy : T(0);
    case kHardSwish:  // as hardswish_backward: 0 at -3, dy at 3
      if (z <= T(-3)) return T(0);
      if (z < T(3)) return dy * (z / T(3) + T(0.5));
      return dy;
    case kSiLU: {
      T s = T(1) / (T(1) + exp_(-z));
      return dy * s * (T(1) + z * (T(1) - s));
    }
    default: return dy;
  }
}

// Output size of a convolution along one spatial dim.
MBX_HD int conv_out_size(int in, int k, int stride, int pad, int dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

// Streaming mean / M2 (Welford) with Chan's parallel combine: batch statistics of
// the conv output over N*H*W without the cancellation of sum / sum-of-squares.
template <typename T>
struct Welford {
  T mean = T(0);
  T m2 = T(0);
  T n = T(0);
  MBX_HD void push(T v) {
    n += T(1);
    T d = v - mean;
    mean += d / n;
    m2 += d * (v - mean);
  }
  MBX_HD void merge(T omean, T om2, T on) {
    if (on == T(0)) return;
    T tot = n + on;
    T d = omean - mean;
    T w = on / tot;
    mean += d * w;
    m2 += om2 + d * d * n * w;
    n = tot;
  }
};

// BatchNorm for one channel as y = c*scale + shift: invstd = 1/sqrt(var + eps),
// scale = gamma*invstd, shift = beta - mean*scale. The CPU loops (host.cpp, cpu/epilogue.h) and the CUDA kernels
// (epilogue.cuh, bn_fold.cu) all fold through these.
template <typename A>
MBX_HD A bn_invstd(A var, A eps) {
#if defined(__CUDA_ARCH__)
  return A(1) / sqrt(var + eps);
#else
  return A(1) / std::sqrt(var + eps);
#endif
}

// a*b rounded, never contracted into an FMA with a following add (nvcc contracts
// across statements by default; the CPU build of host.cpp has no FMA): the CPU and
// CUDA folds give the same bits.
MBX_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

MBX_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

template <typename A>
struct BnFold {
  A scale, shift;
  MBX_HD static BnFold make(A gamma, A beta, A mean, A invstd) {
    BnFold f;
    f.scale = mul_rn(gamma, invstd);
    f.shift = beta - mul_rn(mean, f.scale);
    return f;
  }
};

// BatchNorm backward for one channel, written as dc = a*dz + b*c + d, where c is
// the conv output, dz the gradient at the BN output and (mean, invstd) the
// statistics used in the forward. In training the batch statistics depend on
// c, which adds the b and d terms; in eval only a = gamma*invstd remains.
template <typename T>
struct BnBwdCoef {
  T a, b, d;
  MBX_HD static BnBwdCoef make(bool training, T gamma, T mean, T invstd, T sum_dz,
                               T sum_dz_xhat, T count) {
    BnBwdCoef k;
    k.a = gamma * invstd;
    if (training) {
      T m_dbeta = sum_dz / count;
      T m_dgamma = sum_dz_xhat / count;
      // dc = a*(dz - mean(dz) - xhat*mean(dz*xhat)), xhat = (c - mean)*invstd
      k.b = -k.a * invstd * m_dgamma;
      k.d = -k.a * m_dbeta + k.a * invstd * m_dgamma * mean;
    } else {
      k.b = T(0);
      k.d = T(0);
    }
    return k;
  }
  MBX_HD T operator()(T dz, T c) const { return a * dz + b * c + d; }
};

}  // namespace mbx

namespace mbx {

// Range [lo, hi) of output positions o for which the tap at input offset
// o*stride + off lies inside [0, in). Used by the row-wise CPU kernels for both
// the forward gather and the transposed (dx) scatter.
MBX_HD void tap_range(int off, int stride, int in, int out, int* lo, int* hi) {
  int l = off >= 0 ? 0 : (-off + stride - 1) / stride;
  int h = (in - 1 - off) >= 0 ? (in - 1 - off) / stride + 1 : 0;
  *lo = l;
  *hi = h < out ? h : out;
}

}  // namespace mbx

namespace mbx {

// Calls f(std::integral_constant<int, act>) so that act_fwd/act_bwd see a
// compile-time activation inside hot loops (the CPU benchmark shows the runtime
// switch per element costs more than the convolution there).
template <typename F>
inline void with_act(int act, F&& f) {
  switch (act) {
    case kReLU6: f(std::integral_constant<int, kReLU6>()); break;
    case kReLU: f(std::integral_constant<int, kReLU>()); break;
    case kHardSwish: f(std::integral_constant<int, kHardSwish>()); break;
    case kSiLU: f(std::integral_constant<int, kSiLU>()); break;
    default: f(std::integral_constant<int, kIdentity>()); break;
  }
}

}  // namespace mbx
