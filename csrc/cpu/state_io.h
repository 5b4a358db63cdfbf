// Moving the per-head state (S: D' x Dv, z: D') between the caller's tensors and scratch.
//
// In scratch S is [F][Dvp] (rows padded to whole vectors, padding zero: a GEMM B operand) and
// Sᵀ is [Dv][Fp]; the caller's S (B, H, F, Dv) and z (B, H, F) may have any strides. The passes
// keep one head's state (or dS, dz) as a slot: S [F][Dvp], then z [Fp].
// (Sᵀ is staged straight from the caller's S in backward.cpp.)
#pragma once

#include <cstdint>

#include "cpu/problem.h"
#include "cpu/simd.h"
#include "cpu/view.h"

namespace linattn {

// Elements of one head's slot.
template <class T>
inline std::int64_t state_slot(const Dims& d) {
  return d.F * padded<T>(d.Dv) + padded<T>(d.F);
}

// S[b, h] = src [F][ld].
template <class T>
inline void write_matrix(const View& s, std::int64_t b, std::int64_t h, const T* src,
                         std::int64_t ld) {
  T* base = s.as<T>() + b * s.stride[0] + h * s.stride[1];
  for (std::int64_t f = 0; f < s.shape[2]; ++f) {
    for (std::int64_t e = 0; e < s.shape[3]; ++e) {
      base[f * s.stride[2] + e * s.stride[3]] = src[f * ld + e];
    }
  }
}

// dst [F][ld] = S[b, h]; columns [Dv, ld) are left as they are (zero in a fresh Buffer).
template <class T>
inline void read_matrix(const View& s, std::int64_t b, std::int64_t h, T* dst, std::int64_t ld) {
  const T* base = s.as<T>() + b * s.stride[0] + h * s.stride[1];
  for (std::int64_t f = 0; f < s.shape[2]; ++f) {
    for (std::int64_t e = 0; e < s.shape[3]; ++e) {
      dst[f * ld + e] = base[f * s.stride[2] + e * s.stride[3]];
    }
  }
}

// dst [n] = z[b, h]; dst[n, padded) = 0.
template <class T>
inline void read_vector(const View& z, std::int64_t b, std::int64_t h, T* dst,
                        std::int64_t padded_n) {
  const T* base = z.as<T>() + b * z.stride[0] + h * z.stride[1];
  for (std::int64_t f = 0; f < padded_n; ++f) {
    dst[f] = f < z.shape[2] ? base[f * z.stride[2]] : T(0);
  }
}

template <class T>
inline void write_vector(const View& z, std::int64_t b, std::int64_t h, const T* src) {
  T* base = z.as<T>() + b * z.stride[0] + h * z.stride[1];
  for (std::int64_t f = 0; f < z.shape[2]; ++f) base[f * z.stride[2]] = src[f];
}

// dst [cols][ldt] = srcᵀ for src [rows][lds] (rows x cols used); dst's padding columns zeroed.
template <class T>
inline void transpose(const T* src, std::int64_t rows, std::int64_t cols, std::int64_t lds, T* dst,
                      std::int64_t ldt) {
  for (std::int64_t c = 0; c < cols; ++c) {
    for (std::int64_t r = 0; r < ldt; ++r) dst[c * ldt + r] = r < rows ? src[r * lds + c] : T(0);
  }
}

}  // namespace linattn
