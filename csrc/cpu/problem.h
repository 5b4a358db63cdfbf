// Validation shared by the forward and backward passes, and the sizes of one call.
//
// Python validates at the public boundary (linattn/ops/validation.py); the checks here guard
// the pointer arithmetic against a caller that bypassed it, with messages naming the argument.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "cpu/feature_map.h"
#include "cpu/tokens.h"
#include "cpu/view.h"

namespace linattn {

struct Dims {
  std::int64_t B, Nq, Nk, H, D, Dv, F;  // F = D', the feature width of φ
};

// Checks q (B, Nq, H, D), k (B, Nk, H, D), v (B, Nk, H, Dv), the key mask and eps; F is left 0.
Dims check_inputs(const View& q, const View& k, const View& v,
                  const std::optional<View>& key_mask, double eps);

// Throws unless t is (shape...) in `dtype` with non-negative strides.
void check_tensor(const View& t, std::initializer_list<std::int64_t> shape, DType dtype,
                  const char* what, const char* dims, const char* why);

// float32 for fp16/bf16/fp32 inputs, float64 for float64 (the contract's state dtype).
DType state_dtype(DType input);

KeyMask key_mask_of(const std::optional<View>& key_mask);

// The OpenMP thread count for a call: `requested`, or OpenMP's default when <= 0.
int resolve_threads(int requested);

template <class T>
struct MapPair {
  std::unique_ptr<FeatureMap<T>> q, k;
};

// Builds both maps and sets dims->F; throws when φ(q) and φ(k) differ in width.
template <class T>
MapPair<T> make_maps(const std::string& q_name, const std::vector<View>& q_params,
                     const std::string& k_name, const std::vector<View>& k_params, Dims* dims);

}  // namespace linattn
