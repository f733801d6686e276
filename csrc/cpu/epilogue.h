// The fused BatchNorm + activation (+ residual) epilogue of the CPU kernels,
// shared by the depthwise and the pointwise op. Each op supplies the conv output
// one row at a time (`get_row(r, scratch)` returns a pointer to it, computed into
// scratch or read from a buffer); the passes here turn it into batch statistics,
// y, or the gradient at the conv output.
//
// Every inner loop runs over contiguous memory with raw __restrict__ pointers:
// over channels for channels_last rows, over w (with per-row channel constants)
// for NCHW rows, whose sums use explicit vectors (vec.h).
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "vec.h"

namespace mbx {
namespace cpu {
namespace MBX_ISA {

// Rows of a conv output (N, C, Ho, Wo): one row of one channel plane for NCHW,
// one row of all channels for channels_last. Inside a row the element (w, c) sits
// at row[w*Cr + c] with Cr = 1 (NCHW) or C (channels_last).
struct OutRows {
  int64_t N, C, Ho, Wo;
  bool channels_last;
  int64_t Cr;       // channels inside a row
  int64_t R;        // number of rows
  int64_t row_len;  // Wo * Cr
  OutRows(int64_t N_, int64_t C_, int64_t Ho_, int64_t Wo_, bool cl)
      : N(N_), C(C_), Ho(Ho_), Wo(Wo_), channels_last(cl) {
    Cr = cl ? C : 1;
    R = (cl ? N : N * C) * Ho;
    row_len = Wo * Cr;
  }
  // plane = image (channels_last) or (image, channel) (NCHW)
  int64_t plane(int64_t r) const { return r / Ho; }
  int64_t ho(int64_t r) const { return r % Ho; }
  int64_t c0(int64_t r) const { return channels_last ? 0 : plane(r) % C; }
  int64_t out_row(int64_t pl, int64_t h) const { return (pl * Ho + h) * row_len; }
};

// Batch mean and 1/sqrt(var + eps) per channel: an exact two-pass mean / M2 per
// row, Chan-merged into one Welford partial per thread, merged in thread order.
template <typename A, typename GetRow>
void batch_stats(const OutRows& rw, GetRow&& get_row, double eps, A* mean, A* invstd) {
  const int nt = at::get_num_threads();
  std::vector<Welford<A>> part(int64_t(nt) * rw.C);
  const A n = A(rw.Wo);
  at::parallel_for(0, rw.R, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> scratch(rw.row_len), sum_v(rw.Cr), m2_v(rw.Cr);
    A* __restrict__ rs = sum_v.data();
    A* __restrict__ rm = m2_v.data();
    Welford<A>* mine = part.data() + int64_t(at::get_thread_num()) * rw.C;
    const int64_t Cr = rw.Cr;
    for (int64_t r = begin; r < end; ++r) {
      const A* __restrict__ v = get_row(r, scratch.data());
      if (Cr == 1) {
        const A m = vec_sum<A>(rw.Wo, [&](int64_t e, auto k) { return vload<A>(v + e, k); }) / n;
        const A m2 = vec_sum<A>(rw.Wo, [&](int64_t e, auto k) {
          const auto dv = vload<A>(v + e, k) - m;
          return dv * dv;
        });
        mine[rw.c0(r)].merge(m, m2, n);
        continue;
      }
      for (int64_t c = 0; c < Cr; ++c) rs[c] = v[c];
      for (int64_t wo = 1; wo < rw.Wo; ++wo) {
        const A* __restrict__ vw = v + wo * Cr;
        for (int64_t c = 0; c < Cr; ++c) rs[c] += vw[c];
      }
      for (int64_t c = 0; c < Cr; ++c) {
        rs[c] /= n;
        rm[c] = 0;
      }
      for (int64_t wo = 0; wo < rw.Wo; ++wo) {
        const A* __restrict__ vw = v + wo * Cr;
        for (int64_t c = 0; c < Cr; ++c) rm[c] += (vw[c] - rs[c]) * (vw[c] - rs[c]);
      }
      for (int64_t c = 0; c < Cr; ++c) mine[c].merge(rs[c], rm[c], n);
    }
  });
  for (int64_t c = 0; c < rw.C; ++c) {
    Welford<A> w;
    for (int t = 0; t < nt; ++t) {
      const auto& p = part[int64_t(t) * rw.C + c];
      w.merge(p.mean, p.m2, p.n);
    }
    mean[c] = w.mean;
    invstd[c] = bn_invstd(w.m2 / w.n, A(eps));
  }
}

// y = act(conv*scale + shift) (+ residual), residual laid out like y (or null).
// get_row may return y's own row (in place, T == A).
template <typename T, typename A, typename GetRow>
void apply_rows(const OutRows& rw, GetRow&& get_row, int act_id, const A* sc, const A* sh,
                const T* residual, T* y) {
  with_act(act_id, [&](auto act) {
    at::parallel_for(0, rw.R, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> scratch(rw.row_len);
      const int64_t Cr = rw.Cr;
      for (int64_t r = begin; r < end; ++r) {
        const A* v = get_row(r, scratch.data());  // may be y's own memory (T == A)
        const T* __restrict__ rr = residual ? residual + r * rw.row_len : nullptr;
        T* yr = y + r * rw.row_len;
        if (Cr == 1) {
          const A s = sc[rw.c0(r)], b = sh[rw.c0(r)];
          if (rr) {
            map_row(v, yr, rw.Wo, [&](A x, int64_t e) {
              return act_fwd<A>(act, x * s + b) + static_cast<A>(rr[e]);
            });
          } else {
            map_row(v, yr, rw.Wo, [&](A x, int64_t) { return act_fwd<A>(act, x * s + b); });
          }
          continue;
        }
        const A* __restrict__ s = sc;
        const A* __restrict__ b = sh;
        for (int64_t wo = 0; wo < rw.Wo; ++wo) {
          const int64_t o = wo * Cr;
          if (rr) {
            map_row(v + o, yr + o, Cr, [&](A x, int64_t c) {
              return act_fwd<A>(act, x * s[c] + b[c]) + static_cast<A>(rr[o + c]);
            });
          } else {
            map_row(v + o, yr + o, Cr,
                    [&](A x, int64_t c) { return act_fwd<A>(act, x * s[c] + b[c]); });
          }
        }
      }
    });
  });
}

// Backward of the epilogue: dz = act'(z) * dy with z = conv*scale + shift, then
// dgamma = sum(dz*(conv-mean))*invstd, dbeta = sum(dz) and the gradient at the
// conv output dc = a*dz + b*conv + d (BnBwdCoef), written to `dc` (laid out like
// y, accumulation type; it may be the very buffer get_row reads: each element is
// read before it is overwritten). on_dc_row(r, dc_row, thread) runs after each dc
// row (the depthwise op accumulates its weight gradient there). In training the
// coefficients need the sums first (two passes); in eval one pass does both.
template <typename T, typename A, typename GetRow, typename OnDcRow>
void bn_act_backward(const OutRows& rw, GetRow&& get_row, int act_id, bool training,
                     const A* sc, const A* sh, const A* gamma, const A* mean, const A* invstd,
                     const T* dy, A* dc, A* dgamma, A* dbeta, OnDcRow&& on_dc_row) {
  const int nt = at::get_num_threads();
  const int64_t C = rw.C;
  std::vector<A> sums(int64_t(nt) * 2 * C, A(0));  // [thread][sum dz | sum dz*(c-mean)][C]
  std::vector<A> coef(3 * C);                       // a | b | d, per channel
  A* ca = coef.data();
  A* cb = ca + C;
  A* cd = cb + C;
  const A count = A(rw.N) * A(rw.Ho) * A(rw.Wo);
  auto make_coef = [&]() {
    for (int64_t c = 0; c < C; ++c) {
      A s1 = 0, s2 = 0;
      for (int t = 0; t < nt; ++t) {
        s1 += sums[(int64_t(t) * 2 + 0) * C + c];
        s2 += sums[(int64_t(t) * 2 + 1) * C + c];
      }
      dbeta[c] = s1;
      dgamma[c] = s2 * invstd[c];
      const auto k = BnBwdCoef<A>::make(training, gamma[c], mean[c], invstd[c], s1, dgamma[c],
                                        count);
      ca[c] = k.a;
      cb[c] = k.b;
      cd[c] = k.d;
    }
  };
  auto pass = [&](auto want_sums, auto want_dc, auto act) {
    at::parallel_for(0, rw.R, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> scratch(rw.row_len), dz_row(rw.Cr == 1 ? rw.Wo : 0);
      const int tid = at::get_thread_num();
      A* __restrict__ s_dz = sums.data() + (int64_t(tid) * 2 + 0) * C;
      A* __restrict__ s_dzx = sums.data() + (int64_t(tid) * 2 + 1) * C;
      const int64_t Cr = rw.Cr;
      for (int64_t r = begin; r < end; ++r) {
        const A* v = get_row(r, scratch.data());
        const T* __restrict__ dyr = dy + r * rw.row_len;
        A* dcr = dc + r * rw.row_len;
        if (Cr == 1) {
          const int64_t ch = rw.c0(r);
          const A s = sc[ch], b = sh[ch], m = mean[ch], ka = ca[ch], kb = cb[ch], kd = cd[ch];
          A* __restrict__ dz = dz_row.data();
          vec_blocks<A>(rw.Wo, [&](int64_t e, auto nv, auto cnt) {
            for (int k = 0; k < decltype(nv)::value; ++k) {
              const int64_t i = e + k * Simd<A>::N;
              vstore(dz + i, vact_bwd<A>(act, vload<A>(v + i, cnt) * s + b, vload<A>(dyr + i, cnt)),
                     cnt);
            }
          });
          if (want_sums) {
            s_dz[ch] += vec_sum<A>(rw.Wo, [&](int64_t e, auto k) { return vload<A>(dz + e, k); });
            s_dzx[ch] += vec_sum<A>(rw.Wo, [&](int64_t e, auto k) {
              return vload<A>(dz + e, k) * (vload<A>(v + e, k) - m);
            });
          }
          if (want_dc)
            map_row(v, dcr, rw.Wo, [&](A cv, int64_t e) { return ka * dz[e] + kb * cv + kd; });
        } else {
          const A* __restrict__ s = sc;
          const A* __restrict__ b = sh;
          const A* __restrict__ m = mean;
          for (int64_t wo = 0; wo < rw.Wo; ++wo) {
            const int64_t o = wo * Cr;
            if (want_sums) {
              vec_blocks<A>(Cr, [&](int64_t c0, auto nv, auto cnt) {
                for (int k = 0; k < decltype(nv)::value; ++k) {
                  const int64_t c = c0 + k * Simd<A>::N;
                  const auto cv = vload<A>(v + o + c, cnt);
                  const auto dz = vact_bwd<A>(act, cv * vload<A>(s + c, cnt) + vload<A>(b + c, cnt),
                                              vload<A>(dyr + o + c, cnt));
                  vstore(s_dz + c, vload<A>(s_dz + c, cnt) + dz, cnt);
                  vstore(s_dzx + c, vload<A>(s_dzx + c, cnt) + dz * (cv - vload<A>(m + c, cnt)), cnt);
                }
              });
            }
            if (want_dc) {
              const A* __restrict__ ka = ca;
              const A* __restrict__ kb = cb;
              const A* __restrict__ kd = cd;
              map_row(v + o, dcr + o, Cr, [&](A cv, int64_t c) {
                const A dz = act_bwd<A>(act, cv * s[c] + b[c], static_cast<A>(dyr[o + c]));
                return ka[c] * dz + kb[c] * cv + kd[c];
              });
            }
          }
        }
        if (want_dc) on_dc_row(r, static_cast<const A*>(dcr), tid);
      }
    });
  };
  using yes = std::true_type;
  using no = std::false_type;
  with_act(act_id, [&](auto act) {
    if (training) {
      pass(yes(), no(), act);
      make_coef();
      pass(no(), yes(), act);
    } else {
      make_coef();  // eval: the coefficients need only gamma and invstd
      pass(yes(), yes(), act);
      make_coef();  // again, now with the sums, for dgamma / dbeta
    }
  });
}

}  // namespace MBX_ISA
}  // namespace cpu
}  // namespace mbx
