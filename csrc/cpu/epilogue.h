// The fused BatchNorm + activation (+ residual) epilogue of the CPU kernels,
// shared by the depthwise and the pointwise op. Each op supplies the conv output
// one row at a time (`get_row(r, scratch)` returns a pointer to it, computed into
// scratch or read from a GEMM result); the passes here turn it into batch
// statistics, y, or the gradient at the conv output.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../common.h"

namespace mbx {

// Rows of a conv output (N, C, Ho, Wo): one row of one channel plane for NCHW,
// one row of all channels for channels_last. Inside a row the element (w, c) sits
// at row[w*Cr + c] with Cr = 1 (NCHW) or C (channels_last), so one code path
// serves both layouts and the inner loops run over contiguous memory.
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

  // f(element index, channel offset) over one row. NCHW (Cr == 1) gets a flat
  // loop so the compiler vectorises it over w.
  template <typename F>
  void each(F&& f) const {
    if (Cr == 1) {
      for (int64_t e = 0; e < Wo; ++e) f(e, int64_t(0));
    } else {
      for (int64_t wo = 0; wo < Wo; ++wo)
        for (int64_t c = 0; c < Cr; ++c) f(wo * Cr + c, c);
    }
  }
};

// Batch mean and 1/sqrt(var + eps) per channel: an exact two-pass mean / M2 per
// row, Chan-merged into one Welford partial per thread, merged in thread order.
template <typename A, typename GetRow>
void batch_stats(const OutRows& rw, GetRow&& get_row, double eps, A* mean, A* invstd) {
  const int nt = at::get_num_threads();
  std::vector<Welford<A>> part(int64_t(nt) * rw.C);
  at::parallel_for(0, rw.R, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> scratch(rw.row_len), rsum(rw.Cr), rm2(rw.Cr);
    Welford<A>* mine = part.data() + int64_t(at::get_thread_num()) * rw.C;
    for (int64_t r = begin; r < end; ++r) {
      const A* acc = get_row(r, scratch.data());
      std::fill(rsum.begin(), rsum.end(), A(0));
      std::fill(rm2.begin(), rm2.end(), A(0));
      rw.each([&](int64_t e, int64_t c) { rsum[c] += acc[e]; });
      for (int64_t c = 0; c < rw.Cr; ++c) rsum[c] /= A(rw.Wo);
      rw.each([&](int64_t e, int64_t c) {
        const A d = acc[e] - rsum[c];
        rm2[c] += d * d;
      });
      const int64_t c0 = rw.c0(r);
      for (int64_t c = 0; c < rw.Cr; ++c) mine[c0 + c].merge(rsum[c], rm2[c], A(rw.Wo));
    }
  });
  for (int64_t c = 0; c < rw.C; ++c) {
    Welford<A> w;
    for (int t = 0; t < nt; ++t) {
      const auto& p = part[int64_t(t) * rw.C + c];
      w.merge(p.mean, p.m2, p.n);
    }
    mean[c] = w.mean;
    invstd[c] = A(1) / std::sqrt(w.m2 / w.n + A(eps));
  }
}

// y = act(conv*scale + shift) (+ residual), residual laid out like y (or null).
template <typename T, typename A, typename GetRow>
void apply_rows(const OutRows& rw, GetRow&& get_row, int act_id, const A* sc, const A* sh,
                const T* residual, T* y) {
  with_act(act_id, [&](auto act) {
    at::parallel_for(0, rw.R, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> scratch(rw.row_len);
      for (int64_t r = begin; r < end; ++r) {
        const A* __restrict__ acc = get_row(r, scratch.data());
        const A* __restrict__ scr = sc + rw.c0(r);
        const A* __restrict__ shr = sh + rw.c0(r);
        T* __restrict__ yr = y + r * rw.row_len;
        if (residual == nullptr) {
          rw.each([&](int64_t e, int64_t c) {
            yr[e] = static_cast<T>(act_fwd<A>(act, acc[e] * scr[c] + shr[c]));
          });
        } else {
          const T* __restrict__ rr = residual + r * rw.row_len;
          rw.each([&](int64_t e, int64_t c) {
            yr[e] = static_cast<T>(act_fwd<A>(act, acc[e] * scr[c] + shr[c]) +
                                   static_cast<A>(rr[e]));
          });
        }
      }
    });
  });
}

// Backward of the epilogue: dz = act'(z) * dy with z = conv*scale + shift, then
// dgamma = sum(dz*(conv-mean))*invstd, dbeta = sum(dz) and the gradient at the
// conv output dc = a*dz + b*conv + d (BnBwdCoef), written to `dc` (laid out like
// y, accumulation type). on_dc_row(r, dc_row, thread) runs after each dc row (the
// depthwise op accumulates its weight gradient there). In training the
// coefficients need the sums first (two passes); in eval one pass does both.
template <typename T, typename A, typename GetRow, typename OnDcRow>
void bn_act_backward(const OutRows& rw, GetRow&& get_row, int act_id, bool training,
                     const A* sc, const A* sh, const A* gamma, const A* mean, const A* invstd,
                     const T* dy, A* dc, A* dgamma, A* dbeta, OnDcRow&& on_dc_row) {
  const int nt = at::get_num_threads();
  std::vector<A> sums(int64_t(nt) * 2 * rw.C, A(0));  // [thread][sum dz | sum dz*(c-mean)][C]
  std::vector<BnBwdCoef<A>> coef(rw.C);
  const A count = A(rw.N) * A(rw.Ho) * A(rw.Wo);
  auto make_coef = [&]() {
    for (int64_t c = 0; c < rw.C; ++c) {
      A s1 = 0, s2 = 0;
      for (int t = 0; t < nt; ++t) {
        s1 += sums[(int64_t(t) * 2 + 0) * rw.C + c];
        s2 += sums[(int64_t(t) * 2 + 1) * rw.C + c];
      }
      dbeta[c] = s1;
      dgamma[c] = s2 * invstd[c];
      coef[c] = BnBwdCoef<A>::make(training, gamma[c], mean[c], invstd[c], s1, dgamma[c], count);
    }
  };
  auto pass = [&](bool want_sums, bool want_dc, auto act) {
    at::parallel_for(0, rw.R, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> scratch(rw.row_len);
      const int tid = at::get_thread_num();
      A* s_dz = sums.data() + (int64_t(tid) * 2 + 0) * rw.C;
      A* s_dzx = sums.data() + (int64_t(tid) * 2 + 1) * rw.C;
      for (int64_t r = begin; r < end; ++r) {
        const A* __restrict__ acc = get_row(r, scratch.data());
        const int64_t c0 = rw.c0(r);
        const T* __restrict__ dyr = dy + r * rw.row_len;
        A* __restrict__ dcr = dc + r * rw.row_len;
        rw.each([&](int64_t e, int64_t c) {
          const int64_t ch = c0 + c;
          const A cv = acc[e];
          const A dz = act_bwd<A>(act, cv * sc[ch] + sh[ch], static_cast<A>(dyr[e]));
          if (want_sums) {
            s_dz[ch] += dz;
            s_dzx[ch] += dz * (cv - mean[ch]);
          }
          if (want_dc) dcr[e] = coef[ch](dz, cv);
        });
        if (want_dc) on_dc_row(r, static_cast<const A*>(dcr), tid);
      }
    });
  };
  with_act(act_id, [&](auto act) {
    if (training) {
      pass(true, false, act);
      make_coef();
      pass(false, true, act);
    } else {
      make_coef();  // eval: the coefficients need only gamma and invstd
      pass(true, true, act);
      make_coef();  // again, now with the sums, for dgamma / dbeta
    }
  });
}

}  // namespace mbx
