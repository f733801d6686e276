// CPU kernels of the fused depthwise conv + BatchNorm + activation.
//
// Work is split into "rows": one output row of one channel plane for NCHW, one
// output row of all channels for channels_last. Inside a row the element (w, c)
// sits at row[w*Cr + c] with Cr = 1 (NCHW) or C (channels_last), so one code path
// serves both layouts natively and every inner loop runs over contiguous memory
// (w for NCHW, c for channels_last) where the compiler vectorises it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "../dw_conv.h"

namespace mbx {
namespace {

// Row geometry shared by all passes.
struct Rows {
  DwGeom g;
  int64_t Cr;  // channels inside a row
  int64_t R;   // number of output rows
  int lo[8], hi[8];  // output columns [lo[j], hi[j]) whose tap j lies inside the input row
  Rows(const DwGeom& geom) : g(geom) {
    Cr = g.channels_last ? g.C : 1;
    R = (g.channels_last ? g.N : g.N * g.C) * g.Ho;
    for (int j = 0; j < g.K; ++j)
      tap_range(off(j), g.stride, static_cast<int>(g.W), static_cast<int>(g.Wo), &lo[j], &hi[j]);
  }
  int off(int j) const { return j * g.dil - g.pad; }
  // plane = image (channels_last) or (image, channel) (NCHW)
  int64_t plane(int64_t r) const { return r / g.Ho; }
  int64_t ho(int64_t r) const { return r % g.Ho; }
  int64_t c0(int64_t r) const { return g.channels_last ? 0 : plane(r) % g.C; }
  int64_t in_row(int64_t pl, int64_t h) const { return (pl * g.H + h) * g.W * Cr; }
  int64_t out_row(int64_t pl, int64_t h) const { return (pl * g.Ho + h) * g.Wo * Cr; }

  // f(element index, channel offset) over one output row. The NCHW case (Cr == 1)
  // gets its own flat loop so the compiler vectorises it over w.
  template <typename F>
  void each(F&& f) const {
    if (Cr == 1) {
      for (int64_t e = 0; e < g.Wo; ++e) f(e, int64_t(0));
    } else {
      for (int64_t wo = 0; wo < g.Wo; ++wo)
        for (int64_t c = 0; c < Cr; ++c) f(wo * Cr + c, c);
    }
  }
  // f(output index, input index, channel offset) over the columns of tap j: the
  // shared inner loop of the conv, the dweight reduction and the dx scatter.
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
void conv_row(const Rows& rw, const T* __restrict__ x, const A* __restrict__ wt, int64_t r,
              A* __restrict__ acc) {
  const DwGeom& g = rw.g;
  const int64_t pl = rw.plane(r), c0 = rw.c0(r), Cr = rw.Cr;
  const int ho = static_cast<int>(rw.ho(r));
  std::fill(acc, acc + g.Wo * Cr, A(0));
  for (int i = 0; i < g.K; ++i) {
    const int hi = ho * g.stride - g.pad + i * g.dil;
    if (hi < 0 || hi >= g.H) continue;
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
template <typename A>
at::Tensor weight_taps(const at::Tensor& weight, at::ScalarType acc) {
  return weight.reshape({weight.size(0), -1}).t().to(acc).contiguous();
}

// One Welford accumulator per (thread, channel); merged in thread order so the
// result does not depend on scheduling.
template <typename A>
struct PerThread {
  int64_t C;
  std::vector<A> data;
  PerThread(int64_t width, int64_t C_) : C(C_), data(at::get_num_threads() * width * C_, A(0)) {}
};

template <typename T>
void dw_fwd_cpu_impl(const Rows& rw, const at::Tensor& x, const at::Tensor& wt, bool training,
                     const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& mean,
                     at::Tensor& invstd, double eps, at::Tensor& y) {
  using A = at::opmath_type<T>;
  const DwGeom& g = rw.g;
  const T* xp = x.const_data_ptr<T>();
  const A* wp = wt.const_data_ptr<A>();
  const int64_t row_len = g.Wo * rw.Cr;
  if (training) {
    const int nt = at::get_num_threads();
    std::vector<Welford<A>> part(int64_t(nt) * g.C);
    at::parallel_for(0, rw.R, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> acc(row_len), rsum(rw.Cr), rm2(rw.Cr);
      Welford<A>* mine = part.data() + int64_t(at::get_thread_num()) * g.C;
      for (int64_t r = begin; r < end; ++r) {
        conv_row<T, A>(rw, xp, wp, r, acc.data());
        // exact two-pass mean / M2 of the row, then Chan-merge into this thread's partial
        std::fill(rsum.begin(), rsum.end(), A(0));
        std::fill(rm2.begin(), rm2.end(), A(0));
        rw.each([&](int64_t e, int64_t c) { rsum[c] += acc[e]; });
        for (int64_t c = 0; c < rw.Cr; ++c) rsum[c] /= A(g.Wo);
        rw.each([&](int64_t e, int64_t c) {
          const A d = acc[e] - rsum[c];
          rm2[c] += d * d;
        });
        const int64_t c0 = rw.c0(r);
        for (int64_t c = 0; c < rw.Cr; ++c) mine[c0 + c].merge(rsum[c], rm2[c], A(g.Wo));
      }
    });
    A* m = mean.data_ptr<A>();
    A* is = invstd.data_ptr<A>();
    for (int64_t c = 0; c < g.C; ++c) {
      Welford<A> w;
      for (int t = 0; t < nt; ++t) {
        const auto& p = part[int64_t(t) * g.C + c];
        w.merge(p.mean, p.m2, p.n);
      }
      m[c] = w.mean;
      is[c] = A(1) / std::sqrt(w.m2 / w.n + A(eps));
    }
  }
  at::Tensor scale, shift;
  std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
  const A* sc = scale.const_data_ptr<A>();
  const A* sh = shift.const_data_ptr<A>();
  T* yp = y.data_ptr<T>();
  with_act(g.act, [&](auto act) {
    at::parallel_for(0, rw.R, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> acc(row_len);
      for (int64_t r = begin; r < end; ++r) {
        conv_row<T, A>(rw, xp, wp, r, acc.data());
        const A* __restrict__ scr = sc + rw.c0(r);
        const A* __restrict__ shr = sh + rw.c0(r);
        T* __restrict__ yr = yp + r * row_len;
        rw.each([&](int64_t e, int64_t c) {
          yr[e] = static_cast<T>(act_fwd<A>(act, acc[e] * scr[c] + shr[c]));
        });
      }
    });
  });
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
  Rows rw(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    auto wt = weight_taps<A>(weight, acc);
    dw_fwd_cpu_impl<scalar_t>(rw, x, wt, training, bn_weight, bn_bias, mean, invstd, eps, y);
  });
  return {y, mean, invstd};
}

// Backward in three passes over rows:
//   sums: recompute c, dz = act'(z)*dy; per channel sum(dz), sum(dz*(c-mean))
//   dc:   dc = a*dz + b*c + d (BnBwdCoef), stored in the accumulation type, and
//         dweight partials sum(dc * x(tap)) per thread
//   dx:   transposed conv of dc, one dx row at a time (no write conflicts)
// In eval mode the coefficients do not depend on the sums, so pass 1 is folded
// into pass 2.
template <typename T>
void dw_bwd_cpu_impl(const Rows& rw, const at::Tensor& dy, const at::Tensor& x,
                     const at::Tensor& wt, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                     const at::Tensor& mean, const at::Tensor& invstd, bool training, at::Tensor& dx,
                     at::Tensor& dw_taps, at::Tensor& dgamma, at::Tensor& dbeta) {
  using A = at::opmath_type<T>;
  const DwGeom& g = rw.g;
  const int KK = g.K * g.K;
  const int64_t row_len = g.Wo * rw.Cr;
  const int nt = at::get_num_threads();
  const T* xp = x.const_data_ptr<T>();
  const T* dyp = dy.const_data_ptr<T>();
  const A* wp = wt.const_data_ptr<A>();
  at::Tensor scale, shift;
  std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
  const A* sc = scale.const_data_ptr<A>();
  const A* sh = shift.const_data_ptr<A>();
  const A* mp = mean.const_data_ptr<A>();
  const A* isp = invstd.const_data_ptr<A>();
  auto gamma = bn_weight.to(mean.scalar_type()).contiguous();
  const A* gp = gamma.const_data_ptr<A>();

  std::vector<A> sums(int64_t(nt) * 2 * g.C, A(0));  // [thread][sum_dz | sum_dz_xc][C]
  std::vector<A> dwp(int64_t(nt) * KK * g.C, A(0));   // [thread][tap][C]
  std::vector<BnBwdCoef<A>> coef(g.C);
  auto dc = at::empty({rw.R * row_len}, x.options().dtype(mean.scalar_type()));
  A* dcp = dc.data_ptr<A>();

  auto make_coef = [&]() {
    for (int64_t c = 0; c < g.C; ++c) {
      A s1 = 0, s2 = 0;
      for (int t = 0; t < nt; ++t) {
        s1 += sums[(int64_t(t) * 2 + 0) * g.C + c];
        s2 += sums[(int64_t(t) * 2 + 1) * g.C + c];
      }
      dbeta.data_ptr<A>()[c] = s1;
      dgamma.data_ptr<A>()[c] = s2 * isp[c];
      coef[c] = BnBwdCoef<A>::make(training, gp[c], mp[c], isp[c], s1, s2 * isp[c],
                                   A(g.N * g.Ho * g.Wo));
    }
  };

  // pass 1 (training) or 1+2 (eval)
  auto row_pass = [&](bool want_sums, bool want_dc, auto act) {
    at::parallel_for(0, rw.R, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> acc(row_len);
      const int tid = at::get_thread_num();
      A* s_dz = sums.data() + (int64_t(tid) * 2 + 0) * g.C;
      A* s_dzx = sums.data() + (int64_t(tid) * 2 + 1) * g.C;
      A* dwt = dwp.data() + int64_t(tid) * KK * g.C;
      for (int64_t r = begin; r < end; ++r) {
        conv_row<T, A>(rw, xp, wp, r, acc.data());
        const int64_t c0 = rw.c0(r);
        const T* __restrict__ dyr = dyp + r * row_len;
        A* __restrict__ dcr = dcp + r * row_len;
        rw.each([&](int64_t e, int64_t c) {
          const int64_t ch = c0 + c;
          const A cv = acc[e];
          const A dz = act_bwd<A>(act, cv * sc[ch] + sh[ch], static_cast<A>(dyr[e]));
          if (want_sums) {
            s_dz[ch] += dz;
            s_dzx[ch] += dz * (cv - mp[ch]);
          }
          if (want_dc) dcr[e] = coef[ch](dz, cv);
        });
        if (!want_dc) continue;
        // dweight: sum over outputs of dc * x at each tap
        const int64_t pl = rw.plane(r);
        const int ho = static_cast<int>(rw.ho(r));
        for (int i = 0; i < g.K; ++i) {
          const int hi = ho * g.stride - g.pad + i * g.dil;
          if (hi < 0 || hi >= g.H) continue;
          const T* __restrict__ xr = xp + rw.in_row(pl, hi);
          for (int j = 0; j < g.K; ++j) {
            A* __restrict__ dwr = dwt + (i * g.K + j) * g.C + c0;
            rw.tap(j, [&](int64_t eo, int64_t ei, int64_t c) {
              dwr[c] += dcr[eo] * static_cast<A>(xr[ei]);
            });
          }
        }
      }
    });
  };
  with_act(g.act, [&](auto act) {
    if (training) {
      row_pass(true, false, act);
      make_coef();
      row_pass(false, true, act);
    } else {
      make_coef();  // eval: coefficients need only gamma and invstd
      row_pass(true, true, act);
      make_coef();  // now with the sums, for dgamma / dbeta
    }
  });
  A* dwo = dw_taps.data_ptr<A>();
  for (int64_t e = 0; e < int64_t(KK) * g.C; ++e) {
    A s = 0;
    for (int t = 0; t < nt; ++t) s += dwp[int64_t(t) * KK * g.C + e];
    dwo[e] = s;
  }

  // pass 3: dx row (plane, hi) gathers dc rows ho with ho*s - p + i*d == hi
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
  DwGeom g = dw_check(x_, weight, bn_weight, bn_bias, mean, invstd, stride, padding, dilation,
                      false, act);
  const auto acc = acc_type(x_.scalar_type());
  TORCH_CHECK_VALUE(mean.scalar_type() == acc && invstd.scalar_type() == acc,
                    "mean/invstd: expected dtype ", acc, " (the statistics dw_fwd returns)");
  TORCH_CHECK_VALUE(grad_y.sizes() == at::IntArrayRef({g.N, g.C, g.Ho, g.Wo}),
                    "grad_y: expected shape ", at::IntArrayRef({g.N, g.C, g.Ho, g.Wo}), ", got ",
                    grad_y.sizes());
  TORCH_CHECK_VALUE(grad_y.scalar_type() == x_.scalar_type(), "grad_y: expected dtype ",
                    x_.scalar_type());
  auto x = x_.contiguous(g.format());
  auto dy = grad_y.contiguous(g.format());
  auto dx = at::empty(x.sizes(), x.options().memory_format(g.format()));
  auto dw_taps = at::zeros({g.K * g.K, g.C}, x.options().dtype(acc));
  auto dgamma = at::zeros({g.C}, x.options().dtype(acc));
  auto dbeta = at::zeros({g.C}, x.options().dtype(acc));
  if (x.numel() == 0 || dy.numel() == 0) {
    dx.zero_();
  } else {
    Rows rw(g);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_bwd_cpu", [&] {
      using A = at::opmath_type<scalar_t>;
      auto wt = weight_taps<A>(weight, acc);
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
