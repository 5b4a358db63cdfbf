// Portable SIMD through GCC/Clang vector extensions: one source for AVX2, AVX-512, NEON, SSE.
//
// The compiler lowers each operation to the widest instructions the target flags allow (with
// -march=native, what the building machine has), so no intrinsics and no per-ISA copies.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

namespace linattn {

// The vector width is the target's register width: 64 bytes with AVX-512, 32 with AVX, else
// 16 (SSE, NEON). A wider vector type than the registers would be split into register pairs,
// doubling the micro-kernels' register use (12 accumulators, gemm.h) past what the target has.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <class T>
struct Vec;

template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
  typedef std::int32_t bits __attribute__((vector_size(kVecBytes)));
  static constexpr int lanes = kVecBytes / 4;
};

template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
  typedef std::int64_t bits __attribute__((vector_size(kVecBytes)));
  static constexpr int lanes = kVecBytes / 8;
};

template <class T>
constexpr int lanes = Vec<T>::lanes;

// Rows of every scratch matrix are padded to whole vectors, so the micro-kernels never handle a
// partial vector. The padding columns are kept at zero where a matrix is a GEMM B operand.
template <class T>
constexpr std::int64_t padded(std::int64_t n) {
  return (n + lanes<T> - 1) / lanes<T> * lanes<T>;
}

template <class T>
inline typename Vec<T>::type load_vec(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof v);  // unaligned load (vmovups); scratch rows are not all aligned
  return v;
}

template <class T>
inline void store_vec(T* p, typename Vec<T>::type v) { std::memcpy(p, &v, sizeof v); }

// Every lane = x, written as a braced list of x so that the compiler emits one broadcast (not
// `V{} + x`: adding +0 is not an identity for -0.0, so a scalar add would stay in front of every
// broadcast; not a loop over lanes, which GCC assembles from lane inserts).
template <class T, std::size_t... I>
inline typename Vec<T>::type splat_lanes(T x, std::index_sequence<I...>) {
  return typename Vec<T>::type{((void)I, x)...};
}

template <class T>
inline typename Vec<T>::type splat(T x) {
  return splat_lanes<T>(x, std::make_index_sequence<lanes<T>>{});
}

template <class T>
inline T horizontal_sum(typename Vec<T>::type v) {
  T s = T(0);
  for (int i = 0; i < lanes<T>; ++i) s += v[i];
  return s;
}

// Reductions over a row, with vector accumulators: without -ffast-math the compiler may not
// reorder a float sum, so a plain loop would run one dependent add per element.
template <class T>
inline T dot(const T* a, const T* b, std::int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int L = lanes<T>;
  V acc0{}, acc1{};
  std::int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    acc0 += load_vec(a + i) * load_vec(b + i);
    acc1 += load_vec(a + i + L) * load_vec(b + i + L);
  }
  for (; i + L <= n; i += L) acc0 += load_vec(a + i) * load_vec(b + i);
  T s = horizontal_sum<T>(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class T>
inline T sum(const T* a, std::int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int L = lanes<T>;
  V acc{};
  std::int64_t i = 0;
  for (; i + L <= n; i += L) acc += load_vec(a + i);
  T s = horizontal_sum<T>(acc);
  for (; i < n; ++i) s += a[i];
  return s;
}

// max_i sign·a[i] (n >= 1). A NaN element is skipped here; it still turns the softmax that
// uses this maximum into NaN through its own exp.
template <class T>
inline T max_signed(const T* a, std::int64_t n, T sign) {
  using V = typename Vec<T>::type;
  constexpr int L = lanes<T>;
  T top = sign * a[0];
  std::int64_t i = 0;
  if (n >= L) {
    V m = splat<T>(sign) * load_vec(a);
    for (i = L; i + L <= n; i += L) {
      const V x = splat<T>(sign) * load_vec(a + i);
      m = x > m ? x : m;
    }
    for (int j = 0; j < L; ++j) top = m[j] > top ? m[j] : top;
  }
  for (; i < n; ++i) top = sign * a[i] > top ? sign * a[i] : top;
  return top;
}

// e^x for a vector of floats, to ~2 ulp: x = n·ln2 + r with |r| <= ln2/2, e^r by its degree-7
// Taylor polynomial (truncation error < 5.2e-9, under float32's unit roundoff), 2^n by building
// the exponent bits. The maps call it with x <= 0 (softmax after subtracting the maximum, the
// negative branch of elu), but every float is handled: below ln(2^-126) the result is 0 (a
// flush, absolute error under 1.2e-38), above 127.5·ln2 it is inf (so that 2^n stays a finite
// float; the true values there are within a factor 2 of FLT_MAX), NaN stays NaN.
inline Vec<float>::type exp_vec(Vec<float>::type x) {
  using V = Vec<float>::type;
  using I = Vec<float>::bits;
  constexpr float kLo = -87.33654475f;  // ln(2^-126): the smallest result that stays normal
  constexpr float kHi = 88.37626266f;   // 127.5·ln2: n = round(x·log2 e) stays <= 127
  const V clamped = x < kLo ? splat<float>(kLo) : (x > kHi ? splat<float>(kHi) : x);
  // Round clamped·log2(e) to the nearest integer with the 1.5·2^23 trick: adding it pushes the
  // fraction bits out of the mantissa, and the low mantissa bits then hold n itself.
  constexpr float kShift = 12582912.0f;
  const V shifted = clamped * 1.44269504088896341f + kShift;
  const V n = shifted - kShift;
  // ln2 split in two so that n·ln2_hi is exact for |n| <= 128 and r keeps full precision.
  const V r = (clamped - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  V p = splat<float>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // Vector casts between same-size vector types reinterpret the bits.
  const I n_int = (I)shifted - (I)splat<float>(kShift);
  const I scale_bits = (n_int + 127) << 23;
  V result = p * (V)scale_bits;
  result = x < kLo ? V{} : result;
  result = x > kHi ? splat<float>(std::numeric_limits<float>::infinity()) : result;
  return x != x ? x : result;
}

// e^x in place over n elements. float: the vector routine (the tail through a zero-filled
// vector, so no element past n is touched); double: the C library, since float64 is the
// precision path, not the fast one.
inline void exp_inplace(float* x, std::int64_t n) {
  constexpr int L = lanes<float>;
  std::int64_t i = 0;
  for (; i + L <= n; i += L) store_vec(x + i, exp_vec(load_vec(x + i)));
  if (i < n) {
    float tail[L] = {};
    std::memcpy(tail, x + i, sizeof(float) * (n - i));
    store_vec(tail, exp_vec(load_vec(tail)));
    std::memcpy(x + i, tail, sizeof(float) * (n - i));
  }
}

inline void exp_inplace(double* x, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

}  // namespace linattn
