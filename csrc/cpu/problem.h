// Validation shared by the forward and backward passes, and the sizes of one call.
//
// Python validates at the public boundary (linattn/ops/validation.py); the checks here guard
// the pointer arithmetic against a caller that bypassed it, with messages naming the argument.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>

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

// The same checks for one side of a call, for the phases (linear_attention.h): the keys k, v
// and their mask (Nq is left 0), or the queries q and eps (Nk and Dv are left 0).
Dims check_keys(const View& k, const View& v, const std::optional<View>& key_mask);
Dims check_queries(const View& q, double eps);

// Throws unless state (B, H, F, Dv) and normaliser (B, H, F) are in the state dtype of
// `input`; `what` names them ("state", "d_state").
void check_state(const View& state, const View& normaliser, const Dims& d, DType input,
                 const char* state_name, const char* normaliser_name);

// Throws unless t is (shape...) in `dtype` with non-negative strides.
void check_tensor(const View& t, std::initializer_list<std::int64_t> shape, DType dtype,
                  const char* what, const char* dims, const char* why);

// float32 for fp16/bf16/fp32 inputs, float64 for float64 (the contract's state dtype).
DType state_dtype(DType input);

KeyMask key_mask_of(const std::optional<View>& key_mask);

// The OpenMP thread count for a call: `requested`, or OpenMP's default when <= 0.
int resolve_threads(int requested);

// Runs f(TypeTag<E>) for the element type E of `dtype` that computes in T (float64 inputs in
// double, the others in float).
template <class T, class F>
void visit_elements(DType dtype, F&& f) {
  visit_float_dtype(dtype, [&](auto tag) {
    using E = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, double> == std::is_same_v<E, double>) f(tag);
  });
}

template <class T>
struct MapPair {
  std::unique_ptr<FeatureMap<T>> q, k;
};

// Builds both maps and sets dims->F; throws when φ(q) and φ(k) differ in width.
template <class T>
MapPair<T> make_maps(const std::string& q_name, const std::vector<View>& q_params,
                     const std::string& k_name, const std::vector<View>& k_params, Dims* dims);

}  // namespace linattn
