// Element types of the tensors Python hands over, and their conversion to the compute type.
//
// The module never links against torch: Python passes a data pointer and a dtype code, and the
// kernels read half-precision elements through the small types below, converting on the fly
// (no fp32 copy of an input ever exists).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace linattn {

// The codes Python uses (linattn/backends/cpu.py maps torch dtypes onto them by name).
enum class DType : int { float16 = 0, bfloat16 = 1, float32 = 2, float64 = 3, bool8 = 4 };

const char* dtype_name(DType dtype);
std::size_t dtype_size(DType dtype);
[[noreturn]] void throw_not_floating(DType dtype);

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// bfloat16 is the upper half of a float32: widening is a shift, narrowing rounds to nearest even.
struct BFloat16 {
  std::uint16_t bits;
};

inline float to_float(BFloat16 x) { return bits_float(std::uint32_t(x.bits) << 16); }

inline BFloat16 bfloat16_from(float f) {
  std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    // NaN: keep the sign and a quiet payload; rounding could otherwise carry it into infinity.
    return BFloat16{std::uint16_t((u >> 16) | 0x0040u)};
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{std::uint16_t(u >> 16)};
}

#if defined(__FLT16_MAX__)
// The compiler has a native half type (GCC >= 12, Clang >= 15 on x86-64 and AArch64): its
// conversions compile to vcvtph2ps / vcvtps2ph (F16C) or fcvt, and vectorise.
struct Float16 {
  _Float16 value;
};
inline float to_float(Float16 x) { return static_cast<float>(x.value); }
inline Float16 float16_from(float f) { return Float16{static_cast<_Float16>(f)}; }
#else
// Older compilers have no _Float16: convert bit by bit (IEEE binary16, round to nearest even).
// Same results as the native path, only slower.
struct Float16 {
  std::uint16_t bits;
};

inline float to_float(Float16 x) {
  const std::uint32_t sign = std::uint32_t(x.bits & 0x8000u) << 16;
  std::uint32_t exponent = (x.bits >> 10) & 0x1fu;
  std::uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    // Subnormal half: normalise the mantissa into a float32 exponent.
    exponent = 127 - 15 + 1;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    mantissa &= 0x3ffu;
    return bits_float(sign | (exponent << 23) | (mantissa << 13));
  }
  return bits_float(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

inline Float16 float16_from(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
  const std::uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return Float16{std::uint16_t(sign | 0x7e00u)};  // NaN
  if (magnitude >= 0x477ff000u) return Float16{std::uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (magnitude < 0x38800000u) {
    // Result is subnormal or zero: align the implicit-one mantissa to 2^-24 units and round.
    if (magnitude < 0x33000000u) return Float16{sign};  // below half the smallest subnormal
    const std::uint32_t shift = 126 - (magnitude >> 23);  // 14 .. 24
    const std::uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    std::uint32_t half = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    return Float16{std::uint16_t(sign | half)};
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  std::uint32_t h = ((magnitude - 0x38000000u) >> 13);
  const std::uint32_t rest = magnitude & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return Float16{std::uint16_t(sign | h)};
}
#endif

// Element <-> compute type T (float or double), one overload set per element type.
template <class T>
inline T load_elem(const float* p) { return T(*p); }
template <class T>
inline T load_elem(const double* p) { return T(*p); }
template <class T>
inline T load_elem(const BFloat16* p) { return T(to_float(*p)); }
template <class T>
inline T load_elem(const Float16* p) { return T(to_float(*p)); }

template <class T>
inline void store_elem(float* p, T x) { *p = float(x); }
template <class T>
inline void store_elem(double* p, T x) { *p = double(x); }
template <class T>
inline void store_elem(BFloat16* p, T x) { *p = bfloat16_from(float(x)); }
template <class T>
inline void store_elem(Float16* p, T x) { *p = float16_from(float(x)); }

template <class E>
struct TypeTag {
  using type = E;
};

// Calls f(TypeTag<E>{}) with the element type E of a floating dtype code: code switches on the
// dtype once and then runs typed loops.
template <class F>
decltype(auto) visit_float_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::float16: return f(TypeTag<Float16>{});
    case DType::bfloat16: return f(TypeTag<BFloat16>{});
    case DType::float32: return f(TypeTag<float>{});
    case DType::float64: return f(TypeTag<double>{});
    default: break;
  }
  throw_not_floating(dtype);
}

}  // namespace linattn
