// Fixed-width vectors for the CPU kernels (GCC/Clang vector extensions) of the
// accumulation type: one register of the ISA the including file is compiled for
// (256 bits with AVX2, 128 otherwise), so accumulators stay in registers across
// a conv's taps (plain arrays of scalars, and 256-bit vectors on an SSE build,
// were kept on the stack: see bench/NOTES.md). Included by kernels_impl.h, inside
// the ISA's namespace.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#define MBX_VINL inline __attribute__((always_inline))

namespace mbx {
namespace cpu {
namespace MBX_ISA {

// (MBX_ISA_AVX2, not __AVX2__: GCC's target pragma does not define the ISA
// macros in C++)
#if defined(MBX_ISA_AVX2)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename A>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(kVecBytes)));
  static constexpr int N = kVecBytes / 4;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(kVecBytes)));
  static constexpr int N = kVecBytes / 8;
};

// A whole vector's worth of elements (the common case) or a count below N (the tail).
using Full = std::integral_constant<int, -1>;

#if defined(MBX_ISA_AVX2)
// The first n elements of p (none when n <= 0, all 8 or 4 when n >= N; the other
// lanes zero), one masked load: lanes past n are never read.
template <typename A>
MBX_VINL typename Simd<A>::V vload_first(const A* p, int n) {
  using V = typename Simd<A>::V;
  if constexpr (std::is_same_v<A, float>) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return reinterpret_cast<V>(_mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane)));
  } else {
    const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
    return reinterpret_cast<V>(
        _mm256_maskload_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), lane)));
  }
}
#endif

// N elements of type T from p (count of them when Cnt is int; the rest zero), as A.
template <typename A, typename T, typename Cnt>
MBX_VINL typename Simd<A>::V vload(const T* p, Cnt count) {
  using V = typename Simd<A>::V;
  V v;
  if constexpr (std::is_same_v<Cnt, Full>) {
    if constexpr (std::is_same_v<A, T>) {
      std::memcpy(&v, p, sizeof(V));
    } else {
      for (int l = 0; l < Simd<A>::N; ++l) v[l] = static_cast<A>(p[l]);
    }
  } else {
#if defined(MBX_ISA_AVX2)
    // A masked load: the lane loop below compiled to a memcpy into a stack slot
    // and a vector reload, a failed store-to-load forward on every partial vector
    // (a sixth of the NCHW depthwise conv at 112 columns, bench/NOTES.md).
    if constexpr (std::is_same_v<A, T> && (std::is_same_v<A, float> || std::is_same_v<A, double>))
      return vload_first<A>(p, count);
#endif
    v = V{};
    for (int l = 0; l < count; ++l) v[l] = static_cast<A>(p[l]);
  }
  return v;
}

// The even lanes and the odd lanes of the 2N elements lo, hi: even = [lo0 lo2 ...
// hi0 hi2 ...], odd = [lo1 lo3 ... hi1 hi3 ...].
template <typename A>
MBX_VINL void split_even_odd(typename Simd<A>::V lo, typename Simd<A>::V hi,
                             typename Simd<A>::V* even, typename Simd<A>::V* odd) {
#if defined(MBX_ISA_AVX2)
  using V = typename Simd<A>::V;
  if constexpr (std::is_same_v<A, float>) {
    // [lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6] -> [lo0 lo2 lo4 lo6 | hi0 hi2 hi4 hi6]
    const __m256 ev = _mm256_shuffle_ps(__m256(lo), __m256(hi), 0x88);
    const __m256 od = _mm256_shuffle_ps(__m256(lo), __m256(hi), 0xDD);
    *even = reinterpret_cast<V>(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8)));
    *odd = reinterpret_cast<V>(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xD8)));
  } else {
    // [lo0 hi0 | lo2 hi2] -> [lo0 lo2 hi0 hi2]
    *even = reinterpret_cast<V>(_mm256_permute4x64_pd(_mm256_unpacklo_pd(__m256d(lo), __m256d(hi)), 0xD8));
    *odd = reinterpret_cast<V>(_mm256_permute4x64_pd(_mm256_unpackhi_pd(__m256d(lo), __m256d(hi)), 0xD8));
  }
#else
  constexpr int H = Simd<A>::N / 2;
  for (int l = 0; l < Simd<A>::N; ++l) {
    (*even)[l] = l < H ? lo[2 * l] : hi[2 * (l - H)];
    (*odd)[l] = l < H ? lo[2 * l + 1] : hi[2 * (l - H) + 1];
  }
#endif
}

// Elements p[0], p[2], ... (count of them: Full or an int; the other lanes zero), as
// A. Nothing past the last one, p[2(count-1)], is read.
template <typename A, typename T, typename Cnt>
MBX_VINL typename Simd<A>::V vload_even(const T* p, Cnt count) {
  using V = typename Simd<A>::V;
  const int n = std::is_same_v<Cnt, Full> ? Simd<A>::N : static_cast<int>(count);
#if defined(MBX_ISA_AVX2)
  // Two masked loads of the 2n-1 elements, then the even lanes (a lane loop was 8
  // scalar loads per vector).
  if constexpr (std::is_same_v<A, T>) {
    constexpr int N = Simd<A>::N;
    const int span = 2 * n - 1;  // elements p[0, span) are read
    V even, odd;
    split_even_odd<A>(vload_first<A>(p, span), vload_first<A>(p + N, span - N), &even, &odd);
    return even;
  }
#endif
  V v = V{};
  for (int l = 0; l < n; ++l) v[l] = static_cast<A>(p[2 * l]);
  return v;
}

// The even elements p[0], p[2], ... and the odd ones p[1], p[3], ... of the 2N
// elements at p (all of them are read).
template <typename A>
MBX_VINL void vload_deinterleave(const A* p, typename Simd<A>::V* even, typename Simd<A>::V* odd) {
  typename Simd<A>::V lo, hi;
  std::memcpy(&lo, p, sizeof(lo));
  std::memcpy(&hi, p + Simd<A>::N, sizeof(hi));
  split_even_odd<A>(lo, hi, even, odd);
}

// Stores the vector v (of some Simd<A>::V) to p as T.
template <typename T, typename V, typename Cnt>
MBX_VINL void vstore(T* p, V v, Cnt count) {
  using A = std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>;
  if constexpr (std::is_same_v<Cnt, Full>) {
    if constexpr (std::is_same_v<A, T>) {
      std::memcpy(p, &v, sizeof(v));
    } else {
      for (int l = 0; l < Simd<A>::N; ++l) p[l] = static_cast<T>(v[l]);
    }
  } else {
    for (int l = 0; l < count; ++l) p[l] = static_cast<T>(v[l]);
  }
}

template <typename A>
MBX_VINL A vsum(typename Simd<A>::V v) {
  A s = 0;
  for (int l = 0; l < Simd<A>::N; ++l) s += v[l];
  return s;
}

// body(i, nv, count) over [0, n): blocks of 4 vectors, then of one vector, then one
// partial vector (count < N elements). nv is an integral_constant (vectors in the
// block), count is Full or an int; body's vload/vstore take count.
template <typename A, typename F>
MBX_VINL void vec_blocks(int64_t n, F&& body) {
  constexpr int N = Simd<A>::N;
  int64_t i = 0;
  for (; i + 4 * N <= n; i += 4 * N) body(i, std::integral_constant<int, 4>(), Full());
  for (; i + N <= n; i += N) body(i, std::integral_constant<int, 1>(), Full());
  if (i < n) body(i, std::integral_constant<int, 1>(), static_cast<int>(n - i));
}

// sum over i in [0, n) of the vectors f(i, count) (terms i..i+N; the lanes of the
// tail past count are dropped).
template <typename A, typename F>
MBX_VINL A vec_sum(int64_t n, F&& f) {
  using V = typename Simd<A>::V;
  V acc = V{};
  vec_blocks<A>(n, [&](int64_t i, auto nv, auto count) {
    for (int k = 0; k < decltype(nv)::value; ++k) {
      V t = f(i + k * Simd<A>::N, count);
      if constexpr (!std::is_same_v<decltype(count), Full>)
        for (int l = count; l < Simd<A>::N; ++l) t[l] = 0;
      acc += t;
    }
  });
  return vsum<A>(acc);
}

// out[i] = f(in[i], i) for i in [0, n), as T. in may be out itself (T == A: the
// epilogues run in place over a conv buffer); that case gets a loop through one
// pointer, since an aliasing check would send it to the scalar fallback.
template <typename T, typename A, typename F>
MBX_VINL void map_row(const A* in, T* out, int64_t n, F&& f) {
  if constexpr (std::is_same_v<T, A>) {
    if (static_cast<const void*>(in) == static_cast<const void*>(out)) {
      for (int64_t i = 0; i < n; ++i) out[i] = f(out[i], i);
      return;
    }
  }
  const A* __restrict__ a = in;
  T* __restrict__ o = out;
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<T>(f(a[i], i));
}

// act_fwd (common.h) on a vector: relu6 / relu / identity as selects (NaN passes
// through as in the scalar form), the others lane by lane.
template <typename A, int act>
MBX_VINL typename Simd<A>::V vact_fwd(std::integral_constant<int, act>, typename Simd<A>::V z) {
  using V = typename Simd<A>::V;
  const V zero = V{};
  if constexpr (act == kReLU6) {
    const V six = zero + A(6);
    const V r = z < zero ? zero : z;
    return r > six ? six : r;
  } else if constexpr (act == kReLU) {
    return z < zero ? zero : z;
  } else if constexpr (act == kIdentity) {
    return z;
  } else {
    V r = V{};
    for (int l = 0; l < Simd<A>::N; ++l) r[l] = act_fwd<A>(act, z[l]);
    return r;
  }
}

// act_bwd (common.h) on a vector: the gradient at z given dy. relu6 / relu /
// identity are selects (GCC keeps the scalar form's compares as branches in the
// reduction loops); the others go lane by lane through the scalar definition.
template <typename A, int act>
MBX_VINL typename Simd<A>::V vact_bwd(std::integral_constant<int, act>, typename Simd<A>::V z,
                                      typename Simd<A>::V dy) {
  using V = typename Simd<A>::V;
  const V zero = V{};
  if constexpr (act == kReLU6) {
    return ((z > zero) & (z < zero + A(6))) ? dy : zero;
  } else if constexpr (act == kReLU) {
    return z > zero ? dy : zero;
  } else if constexpr (act == kIdentity) {
    return dy;
  } else {
    V r = V{};
    for (int l = 0; l < Simd<A>::N; ++l) r[l] = act_bwd<A>(act, z[l], dy[l]);
    return r;
  }
}

}  // namespace MBX_ISA
}  // namespace cpu
}  // namespace mbx
