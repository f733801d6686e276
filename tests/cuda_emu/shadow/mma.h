// nvcuda::wmma for the CPU emulator (emu.h): the 16x16x16 fragments pw_fused.cu uses,
// fp16/bf16 operands, fp32 accumulators. The fragment layout across a warp's lanes is
// opaque on a GPU; here every lane holds the whole tile. So loads and mma_sync run
// per lane (each lane reads the whole operand tile, computes the whole product, in
// fp32 with k ascending), and store_matrix_sync writes only the lane's share of the
// tile (element e of the 256 by lane e % 32, 8 each, as many as on a GPU): a read of
// another lane's part without a __syncwarp between sees the old (or poisoned) memory
// in one of the thread orders. What a GPU requires is checked: 256-bit aligned
// pointers, ldm a multiple of 16 bytes; a violation aborts with a message. Not
// modelled: the per-element access of fragment.x (none of the kernels use it), the
// warp-convergence requirement, and the tensor cores' accumulation order. In the
// profile build (profile.h) the loads and stores here are not counted: they are not
// the accesses a GPU makes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

namespace emu {
inline unsigned lane();
}
#ifndef EMU_QUIET  // emu.h's: the profile build's logging off within a call
#define EMU_QUIET
#endif

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has the 16x16x16 shape only");
  static constexpr int kRows = 16, kCols = 16;
  float v[kRows][kCols];  // the whole tile: element (row, col) of the operand
};

namespace detail {

inline void check(const void* p, unsigned ldm, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * elem) % 16 != 0) {
    std::fprintf(stderr, "emu: wmma::%s at %p with ldm %u: the pointer must be 256-bit "
                 "aligned and ldm a multiple of 16 bytes\n", what, p, ldm);
    std::abort();
  }
}

inline float to_float(__half h) { return __half2float(h); }
inline float to_float(__nv_bfloat16 h) { return __bfloat162float(h); }

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (auto& row : f.v)
    for (float& e : row) e = value;
}

// A (matrix_a) or B (matrix_b) operand tile from memory in the fragment's layout.
template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators take a layout");
  EMU_QUIET;
  detail::check(p, ldm, sizeof(T), "load_matrix_sync");
  constexpr bool kRowMajor = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = detail::to_float(kRowMajor ? p[r * ldm + c] : p[c * ldm + r]);
}

template <typename TA, typename TB, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  fragment<accumulator, 16, 16, 16, float> out;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.v[m][n];
      for (int k = 0; k < 16; ++k) s += a.v[m][k] * b.v[k][n];
      out.v[m][n] = s;
    }
  d = out;
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  EMU_QUIET;
  detail::check(p, ldm, sizeof(float), "store_matrix_sync");
  for (int e = int(::emu::lane()); e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.v[r][c];
  }
}

}  // namespace wmma
}  // namespace nvcuda
