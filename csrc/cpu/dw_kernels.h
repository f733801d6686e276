// The depthwise conv + BatchNorm + activation CPU kernels (included by
// kernels_impl.h once per ISA). The conv output is fed to the shared epilogue passes
// (epilogue.h); only the conv itself, its weight gradient and dx live here.
//
// Every conv loop keeps its accumulators in vector registers across all K*K taps.
// channels_last: one output row (all channels) at a time, blocked over channels
// (vec_blocks). NCHW: one (image, channel) plane at a time through a zero-padded
// copy, blocked over output columns (the plane kernels below).
#pragma once

namespace mbx {
namespace cpu {
namespace MBX_ISA {

// Output rows of a channels_last conv plus the depthwise geometry.
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
  // Taps j in [*jl, *jh) of output column wo lie inside the input row (contiguous).
  void taps_of(int64_t wo, int* jl, int* jh) const {
    int a = 0, b = g.K;
    while (a < b && !(wo >= lo[a] && wo < hi[a])) ++a;
    while (b > a && !(wo >= lo[b - 1] && wo < hi[b - 1])) --b;
    *jl = a;
    *jh = b;
  }
  // The valid tap rows of output row r: input row pointers and their tap index i.
  // Returns how many.
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

// One output row of the conv: out[wo*C + c] = sum over taps of wt[tap*C + c] *
// x(h, wo*s - p + j*d, c). store(e, v, count, c) receives each finished vector:
// elements e.. of the row, channels c.. (count of them: Full or an int).
template <typename T, typename A, typename Store>
void conv_row_to(const DwRows& rw, const T* x, const A* wt, int64_t r, Store&& store) {
  using V = typename Simd<A>::V;
  constexpr int VN = Simd<A>::N;
  const DwGeom& g = rw.g;
  const int K = g.K, s = g.stride, d = g.dil;
  const T* rows[8];
  int taps[8];
  const int nr = rw.rows_of(r, x, rows, taps);
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
  conv_row_to<T, A>(rw, x, wt, r, [&](int64_t e, V v, auto cnt, int64_t c) {
    vstore(yr + e, vact_fwd<A>(act, v * vload<A>(sc + c, cnt) + vload<A>(sh + c, cnt)), cnt);
  });
}

// dweight partials of one dc row: dwt[tap*C + c] += sum_wo dc(wo, c) * x(tap, wo, c).
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
  const int64_t C = g.C;
  for (int t = 0; t < nr; ++t) {
    for (int j = 0; j < K; ++j) {
      const int64_t a = rw.lo[j], b = rw.hi[j], o = rw.off(j);
      A* __restrict__ dwr = dwt + (taps[t] * K + j) * C;
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

// One dx row (image, h): the transposed conv of dc, gathered per input column
// from the (ho, wo) taps that read it.
template <typename T, typename A>
void dx_row(const DwRows& rw, const A* dc, const A* wt, int64_t q, T* __restrict__ dxr) {
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
}

// out[e] = sum over threads t, in thread order, of part[t * n + e], n = part.size() / nt:
// the per-thread weight-gradient partials of both layouts ([thread][tap][C]).
template <typename A>
void sum_thread_partials(const std::vector<A>& part, int nt, A* __restrict__ out) {
  const int64_t n = static_cast<int64_t>(part.size()) / nt;
  for (int64_t e = 0; e < n; ++e) {
    A s = 0;
    for (int t = 0; t < nt; ++t) s += part[int64_t(t) * n + e];
    out[e] = s;
  }
}

// ---------------------------------------------------------------- NCHW planes
// The NCHW kernels: one (image, channel) plane at a time, copied once into a
// zero-padded buffer of the accumulation type, so that every output row is interior:
// K*K taps unrolled (K a template parameter), full-vector loads, no bounds checks,
// the channel's weights broadcast once per plane. (Row kernels like the channels_last
// ones above, with runtime K, edges peeled per row and a stride-2 gather per load,
// ran the 56- and 112-column MobileNetV2 layers at 0.6-0.8x eager.)
//
// Plane buffer: `rows` rows of pitch `ld`. Source element (h, w) of an Hi x Wi plane
// sits at padded (pad + h*up, pad + w*up), everything else is zero (up = 2 is the
// zero-upsampled dc of a stride-2 dx). Output (ho, wo) reads padded row ho*S + i*d
// and column wo*S + j*d for tap (i, j). Stride 1 keeps each padded row as is. Stride
// 2 keeps the even columns of a padded row, then its odd ones (`half` apart): column
// 2*wo + j*d is element wo + (j*d)/2 of the half (j*d)%2 selects, so the loads stay
// contiguous. Rows and pitch cover whole vectors of outputs: the last, partial
// vector loads in bounds and stores `cnt`.
struct PlaneGeom {
  int64_t Hi, Wi, Ho, Wo;  // source plane, outputs computed from it
  int K, S, d, pad, up;
  int64_t rows, ld, half;  // padded rows, row pitch (= padded width), stride 2's odd-half offset
  template <typename A>
  static PlaneGeom make(int64_t Hi, int64_t Wi, int64_t Ho, int64_t Wo, int K, int S, int d,
                        int pad, int up) {
    constexpr int VN = Simd<A>::N;
    PlaneGeom p{Hi, Wi, Ho, Wo, K, S, d, pad, up, 0, 0, 0};
    const int64_t wv = (Wo + VN - 1) / VN * VN;  // outputs computed per row
    const int64_t span = int64_t(K - 1) * d;     // K odd: even, so span/2 is exact
    p.rows = (Ho - 1) * S + span + 1;
    p.half = S == 1 ? 0 : wv + span / 2;
    p.ld = S == 1 ? wv + span : 2 * p.half;
    return p;
  }
  // Elements of the plane buffer, plus one staging row (stride 2 deinterleaves it).
  int64_t size() const { return rows * ld + (S == 2 ? ld : 0); }
};

// One padded row at stride 2 (no upsampling, source already in A) written straight
// into its even and odd halves: padded column c is source column c - pad, so half
// element e holds source columns 2e - pad (even half) and 2e + 1 - pad (odd half),
// zero outside the row. Whole vectors are deinterleaved where every source column they
// read lies in the row, single elements elsewhere (the pads and the row's ends).
template <typename A>
void fill_row_s2(const PlaneGeom& p, const A* __restrict__ s, A* __restrict__ out) {
  constexpr int VN = Simd<A>::N;
  A* __restrict__ odd = out + p.half;
  const auto one = [&](int64_t e) {
    const int64_t c = 2 * e - p.pad;
    out[e] = c >= 0 && c < p.Wi ? s[c] : A(0);
    odd[e] = c + 1 >= 0 && c + 1 < p.Wi ? s[c + 1] : A(0);
  };
  int64_t e = 0;
  for (; e < p.half && 2 * e < p.pad; ++e) one(e);
  for (; e + VN <= p.half && 2 * e + 2 * VN - p.pad <= p.Wi; e += VN) {
    typename Simd<A>::V ev, od;
    vload_deinterleave<A>(s + 2 * e - p.pad, &ev, &od);
    vstore(out + e, ev, Full{});
    vstore(odd + e, od, Full{});
  }
  for (; e < p.half; ++e) one(e);
}

// Copies the Hi x Wi plane src (T) into buf (A), laid out as PlaneGeom says.
template <typename A, typename T>
void fill_plane(const PlaneGeom& p, const T* __restrict__ src, A* __restrict__ buf) {
  constexpr int VN = Simd<A>::N;
  A* __restrict__ stage = buf + p.rows * p.ld;
  for (int64_t r = 0; r < p.rows; ++r) {
    A* __restrict__ row = p.S == 1 ? buf + r * p.ld : stage;
    const int64_t hr = r - p.pad;
    const bool hit = hr >= 0 && hr % p.up == 0 && hr / p.up < p.Hi;
    const T* __restrict__ s = src + (hit ? hr / p.up * p.Wi : 0);
    if constexpr (std::is_same_v<A, T>) {
      if (hit && p.S == 2 && p.up == 1) {  // no staging row: deinterleave the source
        fill_row_s2<A>(p, s, buf + r * p.ld);
        continue;
      }
    }
    if (!hit) {
      std::fill(row, row + p.ld, A(0));
    } else if (p.up == 1) {
      const int64_t n = std::max<int64_t>(0, std::min<int64_t>(p.Wi, p.ld - p.pad));
      std::fill(row, row + std::min<int64_t>(p.pad, p.ld), A(0));
      for (int64_t w = 0; w < n; ++w) row[p.pad + w] = static_cast<A>(s[w]);
      std::fill(row + std::min<int64_t>(p.pad + n, p.ld), row + p.ld, A(0));
    } else {
      std::fill(row, row + p.ld, A(0));
      for (int64_t w = 0; w < p.Wi && p.pad + w * p.up < p.ld; ++w)
        row[p.pad + w * p.up] = static_cast<A>(s[w]);
    }
    if (p.S == 2) {  // even columns, then odd ones
      A* __restrict__ out = buf + r * p.ld;
      vec_blocks<A>(p.half, [&](int64_t m, auto nv, auto cnt) {
        for (int k = 0; k < decltype(nv)::value; ++k) {
          const int64_t e = m + k * VN;
          if constexpr (std::is_same_v<decltype(cnt), Full>) {
            typename Simd<A>::V ev, od;
            vload_deinterleave<A>(stage + 2 * e, &ev, &od);
            vstore(out + e, ev, cnt);
            vstore(out + p.half + e, od, cnt);
          } else {  // the tail: nothing past the staged row is read
            vstore(out + e, vload_even<A>(stage + 2 * e, cnt), cnt);
            vstore(out + p.half + e, vload_even<A>(stage + 2 * e + 1, cnt), cnt);
          }
        }
      });
    }
  }
}

// Offset of tap column j in a padded row (see PlaneGeom).
template <int S>
MBX_VINL int64_t tap_col(const PlaneGeom& p, int j) {
  const int64_t c = int64_t(j) * p.d;
  return S == 1 ? c : (c & 1) * p.half + c / 2;
}

// The conv of a filled plane buffer with the taps w[i*K + j]: store(ho, wo, v, cnt)
// receives outputs wo.. of row ho (cnt of them: Full or an int). Taps are summed in
// the order of the row kernels (i, then j).
template <int K, int S, typename A, typename Store>
void conv_plane(const PlaneGeom& p, const A* buf, const A* w, Store&& store) {
  using V = typename Simd<A>::V;
  constexpr int VN = Simd<A>::N;
  V wb[K * K];
  for (int t = 0; t < K * K; ++t) wb[t] = V{} + w[t];
  int64_t off[K];
  for (int j = 0; j < K; ++j) off[j] = tap_col<S>(p, j);
  for (int64_t ho = 0; ho < p.Ho; ++ho) {
    const A* rows = buf + ho * S * p.ld;
    vec_blocks<A>(p.Wo, [&](int64_t wo, auto nv, auto cnt) {
      constexpr int NV = decltype(nv)::value;
      V acc[NV] = {};
#pragma GCC unroll 7
      for (int i = 0; i < K; ++i) {
#pragma GCC unroll 7
        for (int j = 0; j < K; ++j) {
          const A* src = rows + i * p.d * p.ld + off[j] + wo;
#pragma GCC unroll 4
          for (int k = 0; k < NV; ++k) acc[k] += wb[i * K + j] * vload<A>(src + k * VN, Full());
        }
      }
      for (int k = 0; k < NV; ++k) store(ho, wo + k * VN, acc[k], cnt);
    });
  }
}

// dw[(i*K + j) * ldw] += sum over the plane's outputs of dc(ho, wo) * x(tap (i, j)), x a
// filled plane buffer. The tail vector loads both operands masked: lanes past Wo read
// nothing (the x columns only they would read may hold inf).
template <int K, int S, typename A>
void dweight_plane(const PlaneGeom& p, const A* buf, const A* __restrict__ dc, A* __restrict__ dw,
                   int64_t ldw) {
  using V = typename Simd<A>::V;
  constexpr int VN = Simd<A>::N;
  int64_t off[K];
  for (int j = 0; j < K; ++j) off[j] = tap_col<S>(p, j);
  for (int i = 0; i < K; ++i) {
    V acc[K][2] = {};  // two partial sums per tap: independent FMA chains
    for (int64_t ho = 0; ho < p.Ho; ++ho) {
      const A* row = buf + (ho * S + i * p.d) * p.ld;
      const A* d = dc + ho * p.Wo;
      vec_blocks<A>(p.Wo, [&](int64_t wo, auto nv, auto cnt) {
#pragma GCC unroll 4
        for (int k = 0; k < decltype(nv)::value; ++k) {
          const V dv = vload<A>(d + wo + k * VN, cnt);
#pragma GCC unroll 7
          for (int j = 0; j < K; ++j) acc[j][k & 1] += dv * vload<A>(row + off[j] + wo + k * VN, cnt);
        }
      });
    }
    for (int j = 0; j < K; ++j) dw[(i * K + j) * ldw] += vsum<A>(acc[j][0] + acc[j][1]);
  }
}

// f(K, S) with K and S as integral_constants, for the plane path's kernel sizes.
template <typename F>
void with_plane_ks(const DwGeom& g, F&& f) {
  auto s = [&](auto k) {
    if (g.stride == 1) f(k, std::integral_constant<int, 1>());
    else f(k, std::integral_constant<int, 2>());
  };
  switch (g.K) {
    case 3: return s(std::integral_constant<int, 3>());
    case 5: return s(std::integral_constant<int, 5>());
    default: return s(std::integral_constant<int, 7>());
  }
}


// The taps of channel c from wt ([K*K][C]), reversed when flip (dx is the conv of dc
// with the reversed taps).
template <typename A>
void channel_taps(const A* wt, const DwGeom& g, int64_t c, bool flip, A* w) {
  const int KK = g.K * g.K;
  for (int t = 0; t < KK; ++t) w[t] = wt[int64_t(flip ? KK - 1 - t : t) * g.C + c];
}

// conv of every plane: store(plane, ho, wo, v, cnt).
template <typename T, typename A, typename Store>
void conv_planes(const DwGeom& g, const T* x, const A* wt, Store&& store) {
  with_plane_ks(g, [&](auto k, auto s) {
    constexpr int K = decltype(k)::value, S = decltype(s)::value;
    const auto p = PlaneGeom::make<A>(g.H, g.W, g.Ho, g.Wo, K, S, g.dil, g.pad, 1);
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> buf(p.size());
      A w[K * K];
      for (int64_t pl = begin; pl < end; ++pl) {
        fill_plane(p, x + pl * g.H * g.W, buf.data());
        channel_taps(wt, g, pl % g.C, false, w);
        conv_plane<K, S>(p, buf.data(), w, [&](int64_t ho, int64_t wo, auto v, auto cnt) {
          store(pl, ho, wo, v, cnt);
        });
      }
    });
  });
}

// Forward: eval applies the epilogue to each conv vector; training writes the conv
// planes to a buffer (y itself when T is the accumulation type), takes the
// statistics over each plane, then normalises in place.
template <typename T>
void dw_fwd_planes(const DwGeom& g, const at::Tensor& x, const at::Tensor& wt, bool training,
                   const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& mean,
                   at::Tensor& invstd, double eps, at::Tensor& y) {
  using A = at::opmath_type<T>;
  const OutRows planes(g.N, g.C, 1, g.Ho * g.Wo, false);  // one row per plane
  const int64_t plen = planes.row_len;
  const T* xp = x.const_data_ptr<T>();
  const A* wp = wt.const_data_ptr<A>();
  T* yp = y.data_ptr<T>();
  at::Tensor buf;
  A* bp = nullptr;
  if (training) {
    if constexpr (std::is_same_v<T, A>) {
      bp = yp;
    } else {
      buf = at::empty({planes.R * plen}, wt.options());
      bp = buf.data_ptr<A>();
    }
    conv_planes<T, A>(g, xp, wp, [&](int64_t pl, int64_t ho, int64_t wo, auto v, auto cnt) {
      vstore(bp + pl * plen + ho * g.Wo + wo, v, cnt);
    });
    batch_stats<A>(planes, [&](int64_t r, A*) -> const A* { return bp + r * plen; }, eps,
                   mean.data_ptr<A>(), invstd.data_ptr<A>());
  }
  at::Tensor scale, shift;
  std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
  const A* sc = scale.const_data_ptr<A>();
  const A* sh = shift.const_data_ptr<A>();
  if (bp) {
    apply_rows<T, A>(planes, [&](int64_t r, A*) -> const A* { return bp + r * plen; }, g.act, sc,
                     sh, static_cast<const T*>(nullptr), yp);
    return;
  }
  with_act(g.act, [&](auto act) {
    conv_planes<T, A>(g, xp, wp, [&](int64_t pl, int64_t ho, int64_t wo, auto v, auto cnt) {
      const int64_t c = pl % g.C;
      vstore(yp + pl * plen + ho * g.Wo + wo, vact_fwd<A>(act, v * sc[c] + sh[c]), cnt);
    });
  });
}

// Backward: the conv recomputed into dc's buffer, the shared epilogue backward turns
// it into dc in place (plus dgamma, dbeta); then per plane the weight gradient from
// the padded x plane and dx as the conv of dc (zero-upsampled at stride 2, padding
// (K-1)*d - pad >= 0, dw_check's bound) with the reversed taps.
template <typename T>
void dw_bwd_planes(const DwGeom& g, const at::Tensor& dy, const at::Tensor& x,
                   const at::Tensor& wt, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                   const at::Tensor& mean, const at::Tensor& invstd, bool training,
                   at::Tensor& dx, at::Tensor& dw_taps, at::Tensor& dgamma, at::Tensor& dbeta) {
  using A = at::opmath_type<T>;
  const OutRows planes(g.N, g.C, 1, g.Ho * g.Wo, false);
  const int64_t plen = planes.row_len, KK = int64_t(g.K) * g.K;
  const T* xp = x.const_data_ptr<T>();
  const A* wp = wt.const_data_ptr<A>();
  at::Tensor scale, shift;
  std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
  auto gamma = bn_weight.to(mean.scalar_type()).contiguous();
  auto dc = at::empty({planes.R * plen}, x.options().dtype(mean.scalar_type()));
  A* dcp = dc.data_ptr<A>();
  conv_planes<T, A>(g, xp, wp, [&](int64_t pl, int64_t ho, int64_t wo, auto v, auto cnt) {
    vstore(dcp + pl * plen + ho * g.Wo + wo, v, cnt);
  });
  bn_act_backward<T, A>(planes, [&](int64_t r, A*) -> const A* { return dcp + r * plen; }, g.act,
                        training, scale.const_data_ptr<A>(), shift.const_data_ptr<A>(),
                        gamma.const_data_ptr<A>(), mean.const_data_ptr<A>(),
                        invstd.const_data_ptr<A>(), dy.const_data_ptr<T>(), dcp,
                        dgamma.data_ptr<A>(), dbeta.data_ptr<A>(), [](int64_t, const A*, int) {});
  const int nt = at::get_num_threads();
  std::vector<A> dwp(int64_t(nt) * KK * g.C, A(0));  // [thread][tap][C]
  T* dxp = dx.data_ptr<T>();
  with_plane_ks(g, [&](auto k, auto s) {
    constexpr int K = decltype(k)::value, S = decltype(s)::value;
    const auto px = PlaneGeom::make<A>(g.H, g.W, g.Ho, g.Wo, K, S, g.dil, g.pad, 1);
    const auto pd =
        PlaneGeom::make<A>(g.Ho, g.Wo, g.H, g.W, K, 1, g.dil, (K - 1) * g.dil - g.pad, S);
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> bx(px.size()), bd(pd.size());
      A* dwt = dwp.data() + int64_t(at::get_thread_num()) * KK * g.C;
      A w[K * K];
      for (int64_t pl = begin; pl < end; ++pl) {
        const int64_t c = pl % g.C;
        fill_plane(px, xp + pl * g.H * g.W, bx.data());
        dweight_plane<K, S>(px, bx.data(), dcp + pl * plen, dwt + c, g.C);
        fill_plane(pd, static_cast<const A*>(dcp + pl * plen), bd.data());
        channel_taps(wp, g, c, true, w);
        T* dxr = dxp + pl * g.H * g.W;
        conv_plane<K, 1>(pd, bd.data(), w, [&](int64_t h, int64_t wi, auto v, auto cnt) {
          vstore(dxr + h * g.W + wi, v, cnt);
        });
      }
    });
  });
  sum_thread_partials(dwp, nt, dw_taps.data_ptr<A>());
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
  sum_thread_partials(dwp, nt, dw_taps.data_ptr<A>());
  T* dxp = dx.data_ptr<T>();
  const int64_t in_len = g.W * g.C;
  at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) dx_row<T, A>(rw, dcp, wp, q, dxp + q * in_len);
  });
}

// NCHW eval forward on narrow planes (nchw_tiles): tile_c channel planes of one image
// at a time are transposed into a channels_last tile (thread-local, in cache), the
// channels_last row kernel with the epilogue (conv_apply_row) runs on the tile, and
// the output tile is transposed back into y's planes. x and y cross memory once, as in
// the channels_last layout, where the copies path moved each twice more.
template <typename T>
void dw_fwd_tiles(const DwGeom& g, const at::Tensor& x, const at::Tensor& wt,
                  const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
                  const at::Tensor& invstd, at::Tensor& y) {
  using A = at::opmath_type<T>;
  const int64_t HW = g.H * g.W, HWo = g.Ho * g.Wo, KK = int64_t(g.K) * g.K;
  // channels per tile: the row kernel's per-pixel work is amortised over the channel
  // vectors (2 vectors at 16 channels did not pay for it), the input tile stays within
  // ~256 KB (L2): at fp32, 248 channels at 7x7, 88 at 28x28
  // (an odd multiple of 8: a power-of-two pixel stride in the tile maps the transposes'
  // accesses onto a few cache sets)
  const int64_t budget = (int64_t(256) << 10) / (HW * int64_t(sizeof(T)));
  const int64_t tile_c =
      std::max<int64_t>(24, std::min<int64_t>(248, budget / 8 * 8)) / 16 * 16 + 8;
  const int64_t nb = (g.C + tile_c - 1) / tile_c;
  at::Tensor scale, shift;
  std::tie(scale, shift) = fold_bn(bn_weight, bn_bias, mean, invstd);
  const A* sc = scale.const_data_ptr<A>();
  const A* sh = shift.const_data_ptr<A>();
  const A* wp = wt.const_data_ptr<A>();  // [K*K][C]
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.data_ptr<T>();
  with_act(g.act, [&](auto act) {
    at::parallel_for(0, g.N * nb, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> xt(HW * tile_c), yt(HWo * tile_c);
      std::vector<A> wb(KK * tile_c), sb(tile_c), hb(tile_c);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / nb, c0 = (i % nb) * tile_c;
        const int64_t cb = std::min(tile_c, g.C - c0);
        DwGeom gt = g;
        gt.N = 1;
        gt.C = cb;
        gt.channels_last = true;
        gt.nchw_tiles = false;
        const DwRows rt(gt);
        // transposes 8 channels at a time: 8 sequential streams on the plane side,
        // 8 contiguous values on the tile side
        const T* xs = xp + (n * g.C + c0) * HW;
        for (int64_t c8 = 0; c8 < cb; c8 += 8) {
          const int64_t m = std::min<int64_t>(8, cb - c8);
          T* __restrict__ dst = xt.data() + c8;
          const T* __restrict__ src = xs + c8 * HW;
          for (int64_t q = 0; q < HW; ++q)
            for (int64_t k = 0; k < m; ++k) dst[q * cb + k] = src[k * HW + q];
        }
        for (int64_t t = 0; t < KK; ++t)
          for (int64_t c = 0; c < cb; ++c) wb[t * cb + c] = wp[t * g.C + c0 + c];
        for (int64_t c = 0; c < cb; ++c) {
          sb[c] = sc[c0 + c];
          hb[c] = sh[c0 + c];
        }
        for (int64_t r = 0; r < g.Ho; ++r)
          conv_apply_row<T, A>(rt, xt.data(), wb.data(), r, act, sb.data(), hb.data(),
                               yt.data() + r * g.Wo * cb);
        T* ys = yp + (n * g.C + c0) * HWo;
        for (int64_t c8 = 0; c8 < cb; c8 += 8) {
          const int64_t m = std::min<int64_t>(8, cb - c8);
          const T* __restrict__ src = yt.data() + c8;
          T* __restrict__ dst = ys + c8 * HWo;
          for (int64_t q = 0; q < HWo; ++q)
            for (int64_t k = 0; k < m; ++k) dst[k * HWo + q] = src[q * cb + k];
        }
      }
    });
  });
}

// Entry points of the kernel table (isa.h).
void dw_forward(const DwGeom& g, const at::Tensor& x, const at::Tensor& wt, bool training,
                const at::Tensor& bn_weight, const at::Tensor& bn_bias, at::Tensor& mean,
                at::Tensor& invstd, double eps, at::Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_fwd_cpu", [&] {
    if (g.nchw_tiles && !training)
      dw_fwd_tiles<scalar_t>(g, x, wt, bn_weight, bn_bias, mean, invstd, y);
    else if (g.channels_last)
      dw_fwd_rows<scalar_t>(DwRows(g), x, wt, training, bn_weight, bn_bias, mean, invstd, eps, y);
    else
      dw_fwd_planes<scalar_t>(g, x, wt, training, bn_weight, bn_bias, mean, invstd, eps, y);
  });
}

void dw_backward(const DwGeom& g, const at::Tensor& dy, const at::Tensor& x,
                 const at::Tensor& wt, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                 const at::Tensor& mean, const at::Tensor& invstd, bool training, at::Tensor& dx,
                 at::Tensor& dw_taps, at::Tensor& dgamma, at::Tensor& dbeta) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_bwd_cpu", [&] {
    if (g.channels_last)
      dw_bwd_rows<scalar_t>(DwRows(g), dy, x, wt, bn_weight, bn_bias, mean, invstd, training, dx,
                            dw_taps, dgamma, dbeta);
    else
      dw_bwd_planes<scalar_t>(g, dy, x, wt, bn_weight, bn_bias, mean, invstd, training, dx,
                              dw_taps, dgamma, dbeta);
  });
}

}  // namespace MBX_ISA
}  // namespace cpu
}  // namespace mbx
