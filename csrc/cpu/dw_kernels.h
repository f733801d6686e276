// The depthwise conv + BatchNorm + activation CPU kernels (included by
// kernels_impl.h once per ISA). The conv is computed one output row at a time (see
// OutRows in epilogue.h) and fed to the shared epilogue passes; only the conv
// itself, its weight gradient and dx live here.
//
// Every conv loop keeps its accumulators in vector registers across all K*K
// taps: channels_last rows are blocked over channels (vec_blocks), NCHW rows over
// output columns, with the padding checks hoisted out of the interior.
#pragma once

namespace mbx {
namespace cpu {
namespace MBX_ISA {

// Output rows plus the depthwise geometry.
struct DwRows : OutRows {
  DwGeom g;
  int lo[8], hi[8];  // output columns [lo[j], hi[j]) whose tap j lies inside the input row
  int in_lo = 0, in_hi = 0;  // output columns whose K taps all lie inside the input row
  explicit DwRows(const DwGeom& geom)
      : OutRows(geom.N, geom.C, geom.Ho, geom.Wo, geom.channels_last), g(geom) {
    in_lo = 0;
    in_hi = static_cast<int>(g.Wo);
    for (int j = 0; j < g.K; ++j) {
      tap_range(off(j), g.stride, static_cast<int>(g.W), static_cast<int>(g.Wo), &lo[j], &hi[j]);
      in_lo = std::max(in_lo, lo[j]);
      in_hi = std::min(in_hi, hi[j]);
    }
    in_hi = std::max(in_hi, in_lo);
  }
  int off(int j) const { return j * g.dil - g.pad; }
  int64_t in_row(int64_t pl, int64_t h) const { return (pl * g.H + h) * g.W * Cr; }
  // Input row h that tap row i of output row ho reads, or -1 when it is padding.
  int in_h(int64_t ho, int i) const {
    const int h = static_cast<int>(ho) * g.stride - g.pad + i * g.dil;
    return (h < 0 || h >= g.H) ? -1 : h;
  }
  // Taps j in [*jl, *jh) of output column wo lie inside the input row (contiguous).
  void taps_of(int64_t wo, int* jl, int* jh) const {
    int a = 0, b = g.K;
    while (a < b && !(wo >= lo[a] && wo < hi[a])) ++a;
    while (b > a && !(wo >= lo[b - 1] && wo < hi[b - 1])) --b;
    *jl = a;
    *jh = b;
  }
  // The valid tap rows of output row r: input row pointers (offset to channel
  // c0 for NCHW planes) and their tap index i. Returns how many.
  template <typename P>
  int rows_of(int64_t r, P base, P* rows, int* taps) const {
    const int64_t pl = plane(r), oh = ho(r);
    int n = 0;
    for (int i = 0; i < g.K; ++i) {
      const int h = in_h(oh, i);
      if (h < 0) continue;
      rows[n] = base + in_row(pl, h);
      taps[n++] = i;
    }
    return n;
  }
};

// One output row of the conv into out (accumulation type):
// out[wo*Cr + c] = sum over taps of wt[tap*C + c0 + c] * x(h, wo*s - p + j*d, c).
// store(e, v, count, c) receives each finished vector: elements e.. of the row (count of
// them: Full or an int), channels c.. of the row (channels_last; 0 for NCHW rows, whose
// channel is rw.c0(r)).
template <typename T, typename A, typename Store>
void conv_row_to(const DwRows& rw, const T* x, const A* wt, int64_t r, Store&& store) {
  using V = typename Simd<A>::V;
  constexpr int VN = Simd<A>::N;
  const DwGeom& g = rw.g;
  const int K = g.K, s = g.stride, d = g.dil;
  const T* rows[8];
  int taps[8];
  const int nr = rw.rows_of(r, x, rows, taps);
  if (g.channels_last) {
    const int64_t C = g.C;
    for (int64_t wo = 0; wo < g.Wo; ++wo) {
      int jl, jh;
      rw.taps_of(wo, &jl, &jh);
      const int64_t x0 = wo * s - g.pad;
      vec_blocks<A>(C, [&](int64_t c, auto nv, auto cnt) {
        constexpr int NV = decltype(nv)::value;
        V acc[NV] = {};
        for (int t = 0; t < nr; ++t) {
          for (int j = jl; j < jh; ++j) {
            const T* xp = rows[t] + (x0 + j * d) * C + c;
            const A* wp = wt + (taps[t] * K + j) * C + c;
            for (int k = 0; k < NV; ++k) acc[k] += vload<A>(wp + k * VN, cnt) * vload<A>(xp + k * VN, cnt);
          }
        }
        for (int k = 0; k < NV; ++k) store(wo * C + c + k * VN, acc[k], cnt, c + k * VN);
      });
    }
    return;
  }
  const int64_t c0 = rw.c0(r);
  A wv[64];  // the taps of channel c0, [t][j]
  for (int t = 0; t < nr; ++t)
    for (int j = 0; j < K; ++j) wv[t * K + j] = wt[(taps[t] * K + j) * g.C + c0];
  auto edge = [&](int64_t wo) {
    int jl, jh;
    rw.taps_of(wo, &jl, &jh);
    V acc = V{};
    for (int t = 0; t < nr; ++t)
      for (int j = jl; j < jh; ++j) acc[0] += wv[t * K + j] * static_cast<A>(rows[t][wo * s + rw.off(j)]);
    store(wo, acc, 1, int64_t(0));
  };
  for (int64_t wo = 0; wo < rw.in_lo; ++wo) edge(wo);
  vec_blocks<A>(rw.in_hi - rw.in_lo, [&](int64_t i, auto nv, auto cnt) {
    constexpr int NV = decltype(nv)::value;
    const int64_t wo = rw.in_lo + i;
    V acc[NV] = {};
    for (int t = 0; t < nr; ++t) {
      for (int j = 0; j < K; ++j) {
        const T* xp = rows[t] + wo * s + rw.off(j);
        const A w = wv[t * K + j];
        for (int k = 0; k < NV; ++k) acc[k] += w * vload_strided<A>(xp + k * VN * s, s, cnt);
      }
    }
    for (int k = 0; k < NV; ++k) store(wo + k * VN, acc[k], cnt, int64_t(0));
  });
  for (int64_t wo = rw.in_hi; wo < g.Wo; ++wo) edge(wo);
}

// One output row of the conv into out (accumulation type).
template <typename T, typename A>
void conv_row(const DwRows& rw, const T* x, const A* wt, int64_t r, A* __restrict__ out) {
  conv_row_to<T, A>(rw, x, wt, r, [&](int64_t e, auto v, auto cnt, int64_t) {
    vstore<A>(out + e, v, cnt);
  });
}

// Eval forward of one row with the epilogue applied to each conv vector as it is
// finished: y = act(conv * scale + shift), no conv row in memory.
template <typename T, typename A, typename Act>
void conv_apply_row(const DwRows& rw, const T* x, const A* wt, int64_t r, Act act, const A* sc,
                    const A* sh, T* __restrict__ yr) {
  using V = typename Simd<A>::V;
  if (rw.g.channels_last) {
    conv_row_to<T, A>(rw, x, wt, r, [&](int64_t e, V v, auto cnt, int64_t c) {
      vstore(yr + e, vact_fwd<A>(act, v * vload<A>(sc + c, cnt) + vload<A>(sh + c, cnt)), cnt);
    });
    return;
  }
  const A s = sc[rw.c0(r)], b = sh[rw.c0(r)];
  conv_row_to<T, A>(rw, x, wt, r, [&](int64_t e, V v, auto cnt, int64_t) {
    vstore(yr + e, vact_fwd<A>(act, v * s + b), cnt);
  });
}

// dweight partials of one dc row: dwt[tap*C + c0 + c] += sum_wo dc(wo, c) * x(tap, wo, c).
template <typename T, typename A>
void dweight_row(const DwRows& rw, const T* x, int64_t r, const A* __restrict__ dcr,
                 A* __restrict__ dwt) {
  using V = typename Simd<A>::V;
  constexpr int VN = Simd<A>::N;
  const DwGeom& g = rw.g;
  const int K = g.K, s = g.stride;
  const T* rows[8];
  int taps[8];
  const int nr = rw.rows_of(r, x, rows, taps);
  const int64_t C = g.C, c0 = rw.c0(r);
  for (int t = 0; t < nr; ++t) {
    for (int j = 0; j < K; ++j) {
      const int64_t a = rw.lo[j], b = rw.hi[j], o = rw.off(j);
      A* __restrict__ dwr = dwt + (taps[t] * K + j) * C;
      if (!g.channels_last) {
        const T* __restrict__ xr = rows[t];
        dwr[c0] += vec_sum<A>(b - a, [&](int64_t i, auto cnt) {
          return vload<A>(dcr + a + i, cnt) * vload_strided<A>(xr + (a + i) * s + o, s, cnt);
        });
        continue;
      }
      vec_blocks<A>(C, [&](int64_t c, auto nv, auto cnt) {
        constexpr int NV = decltype(nv)::value;
        V acc[NV] = {};
        for (int64_t wo = a; wo < b; ++wo) {
          const A* dp = dcr + wo * C + c;
          const T* xp = rows[t] + (wo * s + o) * C + c;
          for (int k = 0; k < NV; ++k) acc[k] += vload<A>(dp + k * VN, cnt) * vload<A>(xp + k * VN, cnt);
        }
        for (int k = 0; k < NV; ++k) vstore<A>(dwr + c + k * VN, acc[k] + vload<A>(dwr + c + k * VN, cnt), cnt);
      });
    }
  }
}

// One dx row (plane, h): the transposed conv of dc. channels_last gathers, per
// input column, the (ho, wo) taps that read it; NCHW scatters each dc row into
// an accumulator row (contiguous for stride 1).
template <typename T, typename A>
void dx_row(const DwRows& rw, const A* dc, const A* wt, int64_t q, A* __restrict__ acc,
            T* __restrict__ dxr) {
  using V = typename Simd<A>::V;
  constexpr int VN = Simd<A>::N;
  const DwGeom& g = rw.g;
  const int K = g.K, s = g.stride;
  const int64_t pl = q / g.H, C = g.C;
  const int h = static_cast<int>(q % g.H);
  const A* drows[8];
  int taps[8], nr = 0;
  for (int i = 0; i < K; ++i) {
    const int num = h + g.pad - i * g.dil;
    if (num < 0 || num % s != 0 || num / s >= g.Ho) continue;
    drows[nr] = dc + rw.out_row(pl, num / s);
    taps[nr++] = i;
  }
  if (g.channels_last) {
    for (int64_t wi = 0; wi < g.W; ++wi) {
      int js[8], wos[8], nj = 0;
      for (int j = 0; j < K; ++j) {
        const int num = static_cast<int>(wi) + g.pad - j * g.dil;
        if (num < 0 || num % s != 0 || num / s >= g.Wo) continue;
        js[nj] = j;
        wos[nj++] = num / s;
      }
      vec_blocks<A>(C, [&](int64_t c, auto nv, auto cnt) {
        constexpr int NV = decltype(nv)::value;
        V a[NV] = {};
        for (int t = 0; t < nr; ++t) {
          for (int u = 0; u < nj; ++u) {
            const A* dp = drows[t] + wos[u] * C + c;
            const A* wp = wt + (taps[t] * K + js[u]) * C + c;
            for (int k = 0; k < NV; ++k) a[k] += vload<A>(wp + k * VN, cnt) * vload<A>(dp + k * VN, cnt);
          }
        }
        for (int k = 0; k < NV; ++k) vstore<T>(dxr + wi * C + c + k * VN, a[k], cnt);
      });
    }
    return;
  }
  const int64_t c0 = pl % C;
  std::fill(acc, acc + g.W, A(0));
  for (int t = 0; t < nr; ++t) {
    const A* __restrict__ dr = drows[t];
    for (int j = 0; j < K; ++j) {
      const A w = wt[(taps[t] * K + j) * C + c0];
      const int o = rw.off(j);
      for (int64_t wo = rw.lo[j]; wo < rw.hi[j]; ++wo) acc[wo * s + o] += w * dr[wo];
    }
  }
  for (int64_t e = 0; e < g.W; ++e) dxr[e] = static_cast<T>(acc[e]);
}

// Training computes the conv once into a y-sized buffer of the accumulation type
// (its rows feed the statistics, then the normalisation, in place); that buffer is
// y itself when y is in the accumulation type, since every fresh allocation of
// that size costs its page faults on CPU. Eval applies the epilogue to each conv
// vector in registers (conv_apply_row).
template <typename T>
void dw_fwd_rows(const DwRows& rw, const at::Tensor& x, const at::Tensor& wt, bool training,
                 const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& mean,
                 at::Tensor& invstd, double eps, at::Tensor& y) {
  using A = at::opmath_type<T>;
  const T* xp = x.const_data_ptr<T>();
  const A* wp = wt.const_data_ptr<A>();
  at::Tensor buf;
  A* bp = nullptr;
  if (training) {
    if constexpr (std::is_same_v<T, A>) {
      bp = y.data_ptr<A>();
    } else {
      buf = at::empty({rw.R * rw.row_len}, wt.options());
      bp = buf.data_ptr<A>();
    }
    batch_stats<A>(rw, [&](int64_t r, A*) -> const A* {
      conv_row<T, A>(rw, xp, wp, r, bp + r * rw.row_len);
      return bp + r * rw.row_len;
    }, eps, mean.data_ptr<A>(), invstd.data_ptr<A>());
  }
  at::Tensor scale, shift;
  std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
  const A* sc = scale.const_data_ptr<A>();
  const A* sh = shift.const_data_ptr<A>();
  T* yp = y.data_ptr<T>();
  if (bp) {
    apply_rows<T, A>(rw, [&](int64_t r, A*) -> const A* { return bp + r * rw.row_len; },
                     rw.g.act, sc, sh, static_cast<const T*>(nullptr), yp);
    return;
  }
  with_act(rw.g.act, [&](auto act) {
    at::parallel_for(0, rw.R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        conv_apply_row<T, A>(rw, xp, wp, r, act, sc, sh, yp + r * rw.row_len);
    });
  });
}

// Backward: the conv output is recomputed once into a y-sized buffer of the
// accumulation type; the shared epilogue backward turns it in place into dc
// (plus dgamma, dbeta); the dweight partials accumulate per thread as each dc
// row is produced; dx is the transposed conv of dc, one dx row at a time (no
// write conflicts). In eval the epilogue is one pass, so the conv rows go
// through per-thread scratch instead of the buffer.
template <typename T>
void dw_bwd_rows(const DwRows& rw, const at::Tensor& dy, const at::Tensor& x,
                 const at::Tensor& wt, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                 const at::Tensor& mean, const at::Tensor& invstd, bool training, at::Tensor& dx,
                 at::Tensor& dw_taps, at::Tensor& dgamma, at::Tensor& dbeta) {
  using A = at::opmath_type<T>;
  const DwGeom& g = rw.g;
  const int64_t KC = int64_t(g.K) * g.K * g.C;
  const int nt = at::get_num_threads();
  const T* xp = x.const_data_ptr<T>();
  const A* wp = wt.const_data_ptr<A>();
  at::Tensor scale, shift;
  std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
  auto gamma = bn_weight.to(mean.scalar_type()).contiguous();
  auto dc = at::empty({rw.R * rw.row_len}, x.options().dtype(mean.scalar_type()));
  A* dcp = dc.data_ptr<A>();
  if (training) {
    at::parallel_for(0, rw.R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) conv_row<T, A>(rw, xp, wp, r, dcp + r * rw.row_len);
    });
  }
  std::vector<A> dwp(int64_t(nt) * KC, A(0));  // [thread][tap][C]
  auto conv = [&](int64_t r, A* scratch) -> const A* {
    if (training) return dcp + r * rw.row_len;
    conv_row<T, A>(rw, xp, wp, r, scratch);
    return scratch;
  };
  bn_act_backward<T, A>(rw, conv, g.act, training, scale.const_data_ptr<A>(),
                        shift.const_data_ptr<A>(), gamma.const_data_ptr<A>(),
                        mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(),
                        dy.const_data_ptr<T>(), dcp, dgamma.data_ptr<A>(), dbeta.data_ptr<A>(),
                        [&](int64_t r, const A* dcr, int tid) {
                          dweight_row<T, A>(rw, xp, r, dcr, dwp.data() + int64_t(tid) * KC);
                        });
  A* dwo = dw_taps.data_ptr<A>();
  for (int64_t e = 0; e < KC; ++e) {
    A s = 0;
    for (int t = 0; t < nt; ++t) s += dwp[int64_t(t) * KC + e];
    dwo[e] = s;
  }
  T* dxp = dx.data_ptr<T>();
  const int64_t in_len = g.W * rw.Cr;
  at::parallel_for(0, rw.R / g.Ho * g.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(g.channels_last ? 0 : g.W);
    for (int64_t q = begin; q < end; ++q) dx_row<T, A>(rw, dcp, wp, q, acc.data(), dxp + q * in_len);
  });
}

// Entry points of the kernel table (isa.h).
void dw_forward(const DwGeom& g, const at::Tensor& x, const at::Tensor& wt, bool training,
                const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& mean,
                at::Tensor& invstd, double eps, at::Tensor& y) {
  DwRows rw(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_fwd_cpu", [&] {
    dw_fwd_rows<scalar_t>(rw, x, wt, training, bn_weight, bn_bias, mean, invstd, eps, y);
  });
}

void dw_backward(const DwGeom& g, const at::Tensor& dy, const at::Tensor& x,
                 const at::Tensor& wt, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                 const at::Tensor& mean, const at::Tensor& invstd, bool training, at::Tensor& dx,
                 at::Tensor& dw_taps, at::Tensor& dgamma, at::Tensor& dbeta) {
  DwRows rw(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_bwd_cpu", [&] {
    dw_bwd_rows<scalar_t>(rw, dy, x, wt, bn_weight, bn_bias, mean, invstd, training, dx, dw_taps,
                          dgamma, dbeta);
  });
}

}  // namespace MBX_ISA
}  // namespace cpu
}  // namespace mbx
