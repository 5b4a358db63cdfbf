// The register-blocked matrix products every pass of the kernels is built from.
//
// C (M x N) = or += A (M x K) · B (K x N), with
//   A read through two strides (rsa between rows, csa between columns), so the same kernel
//     serves A row-major (φ(q)·S, with csa = 1) and A transposed (S += φ(k)ᵀ·v, the rank-K update
//     over a block of tokens, with rsa = 1);
//   B and C row-major with leading dimensions ldb, ldc, and N a multiple of the vector width:
//     callers pad rows to whole vectors (simd.h `padded`), and B's padding columns must be zero,
//     which makes C's padding columns zero too.
//
// The micro-kernel keeps an MR x (NV vectors) tile of C in registers for the whole K loop: per
// k it loads NV vectors of B and broadcasts MR elements of A, MR·NV fused multiply-adds. With
// MR = 6, NV = 2 that is 12 accumulators, enough independent FMA chains to cover the FMA
// latency on current x86 cores, and 15 of AVX2's 16 vector registers in use.
#pragma once

#include <cstdint>

#include "cpu/simd.h"

namespace linattn {

constexpr int kMR = 6;
constexpr int kNV = 2;

template <class T, int MR, int NV>
inline void micro_kernel(std::int64_t K, const T* __restrict A, std::int64_t rsa, std::int64_t csa,
                         const T* __restrict B, std::int64_t ldb, T* __restrict C,
                         std::int64_t ldc, bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int L = lanes<T>;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load_vec(C + r * ldc + v * L) : V{};
  }
  for (std::int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load_vec(B + k * ldb + v * L);
    const T* a = A + k * csa;
    for (int r = 0; r < MR; ++r) {
      const V ar = splat(a[r * rsa]);
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * b[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) store_vec(C + r * ldc + v * L, acc[r][v]);
  }
}

// The last M % MR rows: one instantiation per row count, chosen at run time.
template <class T, int NV>
inline void micro_kernel_rows(int rows, std::int64_t K, const T* A, std::int64_t rsa,
                              std::int64_t csa, const T* B, std::int64_t ldb, T* C,
                              std::int64_t ldc, bool accumulate) {
  static_assert(kMR == 6, "add cases when changing kMR");
  switch (rows) {
    case 1: micro_kernel<T, 1, NV>(K, A, rsa, csa, B, ldb, C, ldc, accumulate); break;
    case 2: micro_kernel<T, 2, NV>(K, A, rsa, csa, B, ldb, C, ldc, accumulate); break;
    case 3: micro_kernel<T, 3, NV>(K, A, rsa, csa, B, ldb, C, ldc, accumulate); break;
    case 4: micro_kernel<T, 4, NV>(K, A, rsa, csa, B, ldb, C, ldc, accumulate); break;
    case 5: micro_kernel<T, 5, NV>(K, A, rsa, csa, B, ldb, C, ldc, accumulate); break;
    default: micro_kernel<T, kMR, NV>(K, A, rsa, csa, B, ldb, C, ldc, accumulate); break;
  }
}

template <class T, int NV>
inline void gemm_panel(std::int64_t M, std::int64_t K, const T* A, std::int64_t rsa,
                       std::int64_t csa, const T* B, std::int64_t ldb, T* C, std::int64_t ldc,
                       bool accumulate) {
  std::int64_t m = 0;
  for (; m + kMR <= M; m += kMR) {
    micro_kernel<T, kMR, NV>(K, A + m * rsa, rsa, csa, B, ldb, C + m * ldc, ldc, accumulate);
  }
  if (m < M) {
    micro_kernel_rows<T, NV>(int(M - m), K, A + m * rsa, rsa, csa, B, ldb, C + m * ldc, ldc,
                             accumulate);
  }
}

// C = A·B (accumulate = false) or C += A·B. N must be a multiple of lanes<T>.
template <class T>
inline void gemm(std::int64_t M, std::int64_t N, std::int64_t K, const T* A, std::int64_t rsa,
                 std::int64_t csa, const T* B, std::int64_t ldb, T* C, std::int64_t ldc,
                 bool accumulate) {
  constexpr int L = lanes<T>;
  // Column panels outermost: a K x (NV·L) panel of B stays in L1 while every row block of A
  // streams past it.
  std::int64_t n = 0;
  for (; n + kNV * L <= N; n += kNV * L) {
    gemm_panel<T, kNV>(M, K, A, rsa, csa, B + n, ldb, C + n, ldc, accumulate);
  }
  for (; n < N; n += L) gemm_panel<T, 1>(M, K, A, rsa, csa, B + n, ldb, C + n, ldc, accumulate);
}

}  // namespace linattn
