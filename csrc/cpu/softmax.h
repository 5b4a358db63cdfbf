// Row softmax and its vector-Jacobian product, shared by the softmax and hedgehog maps.
#pragma once

#include <cstdint>

#include "cpu/simd.h"

namespace linattn {

// out = softmax(sign · logits) over a row of n (sign = −1 gives hedgehog's second half).
// The maximum is subtracted before exp, so no logit overflows.
template <class T>
inline void softmax_row(const T* logits, std::int64_t n, T sign, T* out) {
  const T top = max_signed(logits, n, sign);
  for (std::int64_t i = 0; i < n; ++i) out[i] = sign * logits[i] - top;
  exp_inplace(out, n);
  const T inv = T(1) / sum(out, n);
  for (std::int64_t i = 0; i < n; ++i) out[i] *= inv;
}

// dlogits = J_softmax(p)ᵀ dp = p ⊙ (dp − p·dp), for a row of n softmax outputs p.
template <class T>
inline void softmax_row_backward(const T* p, const T* dp, std::int64_t n, T* dlogits) {
  const T c = dot(p, dp, n);
  for (std::int64_t i = 0; i < n; ++i) dlogits[i] = p[i] * (dp[i] - c);
}

}  // namespace linattn
