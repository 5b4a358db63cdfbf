#include "cpu/view.h"

#include <sstream>
#include <stdexcept>

namespace linattn {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::float16: return "float16";
    case DType::bfloat16: return "bfloat16";
    case DType::float32: return "float32";
    case DType::float64: return "float64";
    case DType::bool8: return "bool";
  }
  return "unknown";
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::float16:
    case DType::bfloat16: return 2;
    case DType::float32: return 4;
    case DType::float64: return 8;
    case DType::bool8: return 1;
  }
  return 0;
}

void throw_not_floating(DType dtype) {
  throw std::invalid_argument(std::string("expected a floating dtype, got ") + dtype_name(dtype));
}

std::string View::describe() const {
  std::ostringstream out;
  out << dtype_name(dtype) << " (";
  for (int i = 0; i < rank; ++i) out << (i ? ", " : "") << shape[i];
  out << ")";
  return out.str();
}

void expect_rank(const View& view, int rank, const char* what, const char* dims) {
  if (view.rank != rank) {
    std::ostringstream out;
    out << what << ": expected a rank-" << rank << " tensor " << dims << ", got "
        << view.describe();
    throw std::invalid_argument(out.str());
  }
}

void expect_shape(const View& view, std::initializer_list<std::int64_t> shape, const char* what,
                  const char* dims) {
  expect_rank(view, int(shape.size()), what, dims);
  int i = 0;
  for (std::int64_t size : shape) {
    if (size >= 0 && view.shape[i] != size) {
      std::ostringstream out;
      out << what << ": expected shape " << dims << " = (";
      int j = 0;
      for (std::int64_t s : shape) out << (j++ ? ", " : "") << (s >= 0 ? std::to_string(s) : "*");
      out << "), got " << view.describe();
      throw std::invalid_argument(out.str());
    }
    ++i;
  }
}

void expect_dtype(const View& view, DType dtype, const char* what, const char* why) {
  if (view.dtype != dtype) {
    std::ostringstream out;
    out << what << ": expected dtype " << dtype_name(dtype) << " (" << why << "), got "
        << dtype_name(view.dtype);
    throw std::invalid_argument(out.str());
  }
}

void expect_nonnegative_strides(const View& view, const char* what) {
  for (int i = 0; i < view.rank; ++i) {
    if (view.stride[i] < 0) {
      throw std::invalid_argument(std::string(what) + ": negative strides are not supported");
    }
  }
}

}  // namespace linattn
