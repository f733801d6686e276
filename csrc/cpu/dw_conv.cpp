// CPU kernels of the fused depthwise conv + BatchNorm + activation. The conv is
// computed one output row at a time (see OutRows in epilogue.h) and fed to the
// shared epilogue passes; only the conv itself, its weight gradient and dx live
// here.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "../host.h"
#include "epilogue.h"

namespace mbx {
namespace {

// Output rows plus the depthwise geometry.
struct DwRows : OutRows {
  DwGeom g;
  int lo[8], hi[8];  // output columns [lo[j], hi[j]) whose tap j lies inside the input row
  explicit DwRows(const DwGeom& geom)
      : OutRows(geom.N, geom.C, geom.Ho, geom.Wo, geom.channels_last), g(geom) {
    for (int j = 0; j < g.K; ++j)
      tap_range(off(j), g.stride, static_cast<int>(g.W), static_cast<int>(g.Wo), &lo[j], &hi[j]);
  }
  int off(int j) const { return j * g.dil - g.pad; }
  int64_t in_row(int64_t pl, int64_t h) const { return (pl * g.H + h) * g.W * Cr; }
  // Input row h that tap row i of output row ho reads, or -1 when it is padding.
  int in_h(int64_t ho, int i) const {
    const int h = static_cast<int>(ho) * g.stride - g.pad + i * g.dil;
    return (h < 0 || h >= g.H) ? -1 : h;
  }

  // f(output index, input index, channel offset) over the columns of tap j: the
  // shared inner loop of the conv (NCHW), the dweight reduction and the dx scatter.
  template <typename F>
  void tap(int j, F&& f) const {
    const int o = off(j), s = g.stride;
    if (Cr == 1) {
      for (int64_t wo = lo[j]; wo < hi[j]; ++wo) f(wo, wo * s + o, int64_t(0));
    } else {
      for (int64_t wo = lo[j]; wo < hi[j]; ++wo) {
        const int64_t eo = wo * Cr, ei = (wo * s + o) * Cr;
        for (int64_t c = 0; c < Cr; ++c) f(eo + c, ei + c, c);
      }
    }
  }
};

// acc[wo*Cr + c] = sum over taps of wt[tap*C + c0 + c] * x(hi, wo*s - p + j*d, c).
// NCHW (Cr == 1): tap-major, vectorised over w. channels_last: pixel-major, so one
// pixel's C accumulators stay in L1 across all taps, vectorised over c.
template <typename T, typename A>
void conv_row(const DwRows& rw, const T* __restrict__ x, const A* __restrict__ wt, int64_t r,
              A* __restrict__ acc) {
  const DwGeom& g = rw.g;
  const int64_t pl = rw.plane(r), c0 = rw.c0(r), Cr = rw.Cr, ho = rw.ho(r);
  std::fill(acc, acc + rw.row_len, A(0));
  for (int i = 0; i < g.K; ++i) {
    const int hi = rw.in_h(ho, i);
    if (hi < 0) continue;
    const T* __restrict__ xr = x + rw.in_row(pl, hi);
    if (Cr == 1) {
      for (int j = 0; j < g.K; ++j) {
        const A wv = wt[(i * g.K + j) * g.C + c0];
        rw.tap(j, [&](int64_t eo, int64_t ei, int64_t) { acc[eo] += wv * static_cast<A>(xr[ei]); });
      }
      continue;
    }
    for (int64_t wo = 0; wo < g.Wo; ++wo) {
      A* __restrict__ ap = acc + wo * Cr;
      for (int j = 0; j < g.K; ++j) {
        if (wo < rw.lo[j] || wo >= rw.hi[j]) continue;
        const T* __restrict__ xp = xr + (wo * g.stride + rw.off(j)) * Cr;
        const A* __restrict__ wp = wt + (i * g.K + j) * g.C;
        for (int64_t c = 0; c < Cr; ++c) ap[c] += wp[c] * static_cast<A>(xp[c]);
      }
    }
  }
}

// Weight (C,1,K,K) -> [K*K][C] in the accumulation type, so that the channel loop
// of channels_last rows reads it contiguously.
at::Tensor weight_taps(const at::Tensor& weight, at::ScalarType acc) {
  return weight.reshape({weight.size(0), -1}).t().to(acc).contiguous();
}

template <typename T>
void dw_fwd_cpu_impl(const DwRows& rw, const at::Tensor& x, const at::Tensor& wt, bool training,
                     const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& mean,
                     at::Tensor& invstd, double eps, at::Tensor& y) {
  using A = at::opmath_type<T>;
  const T* xp = x.const_data_ptr<T>();
  const A* wp = wt.const_data_ptr<A>();
  auto conv = [&](int64_t r, A* scratch) -> const A* {
    conv_row<T, A>(rw, xp, wp, r, scratch);
    return scratch;
  };
  if (training) batch_stats<A>(rw, conv, eps, mean.data_ptr<A>(), invstd.data_ptr<A>());
  at::Tensor scale, shift;
  std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
  apply_rows<T, A>(rw, conv, rw.g.act, scale.const_data_ptr<A>(), shift.const_data_ptr<A>(),
                   static_cast<const T*>(nullptr), y.data_ptr<T>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, int64_t stride, int64_t padding,
    int64_t dilation, bool training, double eps, c10::string_view act) {
  DwGeom g = dw_check(x_, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                      dilation, training, act);
  const auto acc = acc_type(x_.scalar_type());
  auto x = x_.contiguous(g.format());
  auto y = at::empty({g.N, g.C, g.Ho, g.Wo}, x.options().memory_format(g.format()));
  at::Tensor mean, invstd;
  if (training) {
    mean = at::empty({g.C}, x.options().dtype(acc));
    invstd = at::empty({g.C}, x.options().dtype(acc));
  } else {
    std::tie(mean, invstd) = eval_stats(*running_mean, *running_var, eps, acc);
  }
  if (y.numel() == 0) return {y, mean, invstd};
  DwRows rw(g);
  auto wt = weight_taps(weight, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_fwd_cpu", [&] {
    dw_fwd_cpu_impl<scalar_t>(rw, x, wt, training, bn_weight, bn_bias, mean, invstd, eps, y);
  });
  return {y, mean, invstd};
}

// Backward: the shared epilogue backward gives dgamma, dbeta and dc (recomputing
// the conv row by row); the dweight partials sum(dc * x(tap)) accumulate per
// thread as each dc row is produced; dx is the transposed conv of dc, one dx row
// at a time (no write conflicts).
template <typename T>
void dw_bwd_cpu_impl(const DwRows& rw, const at::Tensor& dy, const at::Tensor& x,
                     const at::Tensor& wt, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                     const at::Tensor& mean, const at::Tensor& invstd, bool training, at::Tensor& dx,
                     at::Tensor& dw_taps, at::Tensor& dgamma, at::Tensor& dbeta) {
  using A = at::opmath_type<T>;
  const DwGeom& g = rw.g;
  const int KK = g.K * g.K;
  const int nt = at::get_num_threads();
  const T* xp = x.const_data_ptr<T>();
  const A* wp = wt.const_data_ptr<A>();
  at::Tensor scale, shift;
  std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
  auto gamma = bn_weight.to(mean.scalar_type()).contiguous();
  auto dc = at::empty({rw.R * rw.row_len}, x.options().dtype(mean.scalar_type()));
  A* dcp = dc.data_ptr<A>();
  std::vector<A> dwp(int64_t(nt) * KK * g.C, A(0));  // [thread][tap][C]

  auto conv = [&](int64_t r, A* scratch) -> const A* {
    conv_row<T, A>(rw, xp, wp, r, scratch);
    return scratch;
  };
  auto dweight_row = [&](int64_t r, const A* __restrict__ dcr, int tid) {
    const int64_t pl = rw.plane(r), c0 = rw.c0(r), ho = rw.ho(r);
    A* dwt = dwp.data() + int64_t(tid) * KK * g.C;
    for (int i = 0; i < g.K; ++i) {
      const int hi = rw.in_h(ho, i);
      if (hi < 0) continue;
      const T* __restrict__ xr = xp + rw.in_row(pl, hi);
      for (int j = 0; j < g.K; ++j) {
        A* __restrict__ dwr = dwt + (i * g.K + j) * g.C + c0;
        rw.tap(j, [&](int64_t eo, int64_t ei, int64_t c) {
          dwr[c] += dcr[eo] * static_cast<A>(xr[ei]);
        });
      }
    }
  };
  bn_act_backward<T, A>(rw, conv, g.act, training, scale.const_data_ptr<A>(),
                        shift.const_data_ptr<A>(), gamma.const_data_ptr<A>(),
                        mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(),
                        dy.const_data_ptr<T>(), dcp, dgamma.data_ptr<A>(), dbeta.data_ptr<A>(),
                        dweight_row);
  A* dwo = dw_taps.data_ptr<A>();
  for (int64_t e = 0; e < int64_t(KK) * g.C; ++e) {
    A s = 0;
    for (int t = 0; t < nt; ++t) s += dwp[int64_t(t) * KK * g.C + e];
    dwo[e] = s;
  }

  // dx row (plane, hi) gathers the dc rows ho with ho*s - p + i*d == hi
  T* dxp = dx.data_ptr<T>();
  const int64_t in_len = g.W * rw.Cr;
  const int64_t in_rows = rw.R / g.Ho * g.H;
  at::parallel_for(0, in_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(in_len);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t pl = q / g.H;
      const int hi = static_cast<int>(q % g.H);
      const int64_t c0 = g.channels_last ? 0 : pl % g.C;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int i = 0; i < g.K; ++i) {
        const int num = hi + g.pad - i * g.dil;
        if (num < 0 || num % g.stride != 0) continue;
        const int ho = num / g.stride;
        if (ho >= g.Ho) continue;
        const A* __restrict__ dcr = dcp + rw.out_row(pl, ho);
        A* __restrict__ ap = acc.data();
        for (int j = 0; j < g.K; ++j) {
          const A* __restrict__ wq = wp + (i * g.K + j) * g.C + c0;
          rw.tap(j, [&](int64_t eo, int64_t ei, int64_t c) { ap[ei] += wq[c] * dcr[eo]; });
        }
      }
      T* dxr = dxp + q * in_len;
      for (int64_t e = 0; e < in_len; ++e) dxr[e] = static_cast<T>(acc[e]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& invstd, int64_t stride, int64_t padding, int64_t dilation, bool training,
    c10::string_view act) {
  DwGeom g = dw_bwd_check(grad_y, x_, weight, bn_weight, bn_bias, mean, invstd, stride, padding,
                          dilation, act);
  const auto acc = acc_type(x_.scalar_type());
  auto x = x_.contiguous(g.format());
  auto dy = grad_y.contiguous(g.format());
  auto dx = at::empty(x.sizes(), x.options().memory_format(g.format()));
  auto dw_taps = at::zeros({g.K * g.K, g.C}, x.options().dtype(acc));
  auto dgamma = at::zeros({g.C}, x.options().dtype(acc));
  auto dbeta = at::zeros({g.C}, x.options().dtype(acc));
  if (dy.numel() == 0) {
    dx.zero_();
  } else {
    DwRows rw(g);
    auto wt = weight_taps(weight, acc);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_bwd_cpu", [&] {
      dw_bwd_cpu_impl<scalar_t>(rw, dy, x, wt, bn_weight, bn_bias, mean.contiguous(),
                                invstd.contiguous(), training, dx, dw_taps, dgamma, dbeta);
    });
  }
  auto dweight = dw_taps.t().contiguous().reshape(weight.sizes()).to(weight.scalar_type());
  return {dx, dweight, dgamma.to(bn_weight.scalar_type()), dbeta.to(bn_bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mobilenet_ext, CPU, m) {
  m.impl("dw_fwd", &dw_fwd_cpu);
  m.impl("dw_bwd", &dw_bwd_cpu);
}

}  // namespace mbx
