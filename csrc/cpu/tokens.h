// Moving blocks of token rows between (B, N, H, X) tensors and fp32/fp64 scratch.
//
// A row is tensor[b, n, h, :], read through the tensor's strides (q, k, v arrive as views of
// any layout, do may have zero strides). Elements are converted on the fly, so a half-precision
// input is never copied whole. Scratch rows are `ld` wide (whole vectors); loads zero the
// padding columns so that a loaded block can serve as a GEMM B operand (gemm.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/view.h"

namespace linattn {

// The (b, h) slice of a (B, N, H, X) tensor: base pointer and the two strides left.
template <class E>
struct RowSlice {
  E* base;
  std::int64_t token_stride;
  std::int64_t elem_stride;

  RowSlice(const View& t, std::int64_t b, std::int64_t h)
      : base(t.as<E>() + b * t.stride[0] + h * t.stride[2]),
        token_stride(t.stride[1]),
        elem_stride(t.stride[3]) {}

  E* row(std::int64_t n) const { return base + n * token_stride; }
};

// dst[r][0, width) = src row tokens[r], converted; dst[r][width, ld) = 0.
template <class E, class T>
inline void load_rows(const RowSlice<E>& src, const std::int64_t* tokens, int rows,
                      std::int64_t width, T* dst, std::int64_t ld) {
  for (int r = 0; r < rows; ++r) {
    const E* in = src.row(tokens[r]);
    T* out = dst + r * ld;
    if (src.elem_stride == 1) {
      for (std::int64_t d = 0; d < width; ++d) out[d] = load_elem<T>(in + d);  // vectorises
    } else {
      for (std::int64_t d = 0; d < width; ++d) out[d] = load_elem<T>(in + d * src.elem_stride);
    }
    for (std::int64_t d = width; d < ld; ++d) out[d] = T(0);
  }
}

// Row tokens[r] of dst = src[r][0, width) · scale[r] (scale may be null: no scaling).
template <class E, class T>
inline void store_rows(const RowSlice<E>& dst, const std::int64_t* tokens, int rows,
                       std::int64_t width, const T* src, std::int64_t ld, const T* scale) {
  for (int r = 0; r < rows; ++r) {
    E* out = dst.row(tokens[r]);
    const T* in = src + r * ld;
    const T s = scale ? scale[r] : T(1);
    if (dst.elem_stride == 1) {
      for (std::int64_t d = 0; d < width; ++d) store_elem<T>(out + d, in[d] * s);
    } else {
      for (std::int64_t d = 0; d < width; ++d) store_elem<T>(out + d * dst.elem_stride, in[d] * s);
    }
  }
}

template <class E>
inline void store_zero_rows(const RowSlice<E>& dst, const std::int64_t* tokens, int rows,
                            std::int64_t width) {
  for (int r = 0; r < rows; ++r) {
    E* out = dst.row(tokens[r]);
    for (std::int64_t d = 0; d < width; ++d) store_elem<float>(out + d * dst.elem_stride, 0.0f);
  }
}

// Prefetches rows [n0, n1) of a slice (for reading, or for writing when `write`).
//
// In the (B, N, H, D) layout the rows of one (b, h) are H·D elements apart, so almost every row
// starts on a new 4 KB page, where the hardware prefetchers stop: without this each row of a
// block costs a cache miss at full memory latency. The passes call it for the next block while
// computing on the current one.
template <class E>
inline void prefetch_rows(const RowSlice<E>& slice, std::int64_t n0, std::int64_t n1,
                          std::int64_t width, bool write) {
  constexpr std::int64_t kLine = 64;
  // Bytes a row spans; a strided last dim is covered up to 1 KB (beyond that the row is so
  // sparse that prefetching its span would mostly fetch other data).
  const std::int64_t span =
      std::min<std::int64_t>(((width - 1) * slice.elem_stride + 1) * std::int64_t(sizeof(E)), 1024);
  for (std::int64_t n = n0; n < n1; ++n) {
    const char* row = reinterpret_cast<const char*>(slice.row(n));
    for (std::int64_t offset = 0; offset < span; offset += kLine) {
      if (write) {
        __builtin_prefetch(row + offset, 1, 3);
      } else {
        __builtin_prefetch(row + offset, 0, 3);
      }
    }
  }
}

// The key mask (B, Nk) of bytes (torch.bool), or none: every key kept.
struct KeyMask {
  const std::uint8_t* data = nullptr;
  std::int64_t batch_stride = 0;
  std::int64_t token_stride = 0;

  // Splits keys [n0, n0 + count) of batch b into kept[] and dropped[]; returns how many kept
  // (the rest, count - kept, are in dropped).
  int partition(std::int64_t b, std::int64_t n0, int count, std::int64_t* kept,
                std::int64_t* dropped) const {
    int nk = 0, nd = 0;
    for (int i = 0; i < count; ++i) {
      const std::int64_t n = n0 + i;
      if (!data || data[b * batch_stride + n * token_stride]) {
        kept[nk++] = n;
      } else {
        dropped[nd++] = n;
      }
    }
    return nk;
  }
};

inline int consecutive_tokens(std::int64_t n0, int count, std::int64_t* tokens) {
  for (int i = 0; i < count; ++i) tokens[i] = n0 + i;
  return count;
}

}  // namespace linattn
