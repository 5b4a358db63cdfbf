// A tensor as Python hands it over: data pointer, dtype code, shape and strides (in elements).
//
// Views are how the module stays independent of torch's C++ ABI. They carry no ownership: the
// Python caller keeps the tensors alive for the duration of the call.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "cpu/dtype.h"

namespace linattn {

constexpr int kMaxRank = 4;

struct View {
  char* data = nullptr;
  DType dtype = DType::float32;
  int rank = 0;
  std::int64_t shape[kMaxRank] = {};
  std::int64_t stride[kMaxRank] = {};

  template <class E>
  E* as() const { return reinterpret_cast<E*>(data); }
  std::string describe() const;  // "float32 (2, 77, 2, 32) strides (..)" for error messages
};

// Throws std::invalid_argument (Python ValueError) naming `what` unless `view` has this rank.
void expect_rank(const View& view, int rank, const char* what, const char* dims);
// Throws unless view.shape equals `shape` (-1 entries are not checked).
void expect_shape(const View& view, std::initializer_list<std::int64_t> shape, const char* what,
                  const char* dims);
void expect_dtype(const View& view, DType dtype, const char* what, const char* why);
// Throws unless every stride is >= 0 (torch never produces negative strides; a view built by
// hand could, and the offset arithmetic assumes it does not).
void expect_nonnegative_strides(const View& view, const char* what);

}  // namespace linattn
