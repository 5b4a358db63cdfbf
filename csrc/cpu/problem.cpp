#include "cpu/problem.h"

#include <omp.h>

#include <cmath>
#include <stdexcept>
#include <string>

namespace linattn {

void check_tensor(const View& t, std::initializer_list<std::int64_t> shape, DType dtype,
                  const char* what, const char* dims, const char* why) {
  expect_shape(t, shape, what, dims);
  expect_dtype(t, dtype, what, why);
  expect_nonnegative_strides(t, what);
}

Dims check_inputs(const View& q, const View& k, const View& v,
                  const std::optional<View>& key_mask, double eps) {
  expect_rank(q, 4, "q", "(B, Nq, H, D)");
  if (q.dtype == DType::bool8) {
    throw std::invalid_argument("q: expected a floating dtype, got bool");
  }
  Dims d{q.shape[0], q.shape[1], k.rank == 4 ? k.shape[1] : 0, q.shape[2], q.shape[3],
         v.rank == 4 ? v.shape[3] : 0, 0};
  check_tensor(q, {d.B, d.Nq, d.H, d.D}, q.dtype, "q", "(B, Nq, H, D)", "");
  check_tensor(k, {d.B, -1, d.H, d.D}, q.dtype, "k", "(B, Nk, H, D)", "like q");
  check_tensor(v, {d.B, d.Nk, d.H, -1}, q.dtype, "v", "(B, Nk, H, Dv)", "like q");
  const std::int64_t sizes[] = {d.B, d.Nq, d.Nk, d.H, d.D, d.Dv};
  const char* names[] = {"batch", "query length", "key length", "heads", "head dim", "value dim"};
  for (int i = 0; i < 6; ++i) {
    if (sizes[i] < 1) {
      throw std::invalid_argument(std::string("q, k, v: ") + names[i] + " is " +
                                  std::to_string(sizes[i]) + "; every size must be >= 1");
    }
  }
  if (key_mask) {
    check_tensor(*key_mask, {d.B, d.Nk}, DType::bool8, "key_mask", "(B, Nk)", "True = keep");
  }
  if (!std::isfinite(eps) || eps <= 0.0) {
    throw std::invalid_argument("eps: must be a finite number > 0, got " + std::to_string(eps));
  }
  return d;
}

namespace {

void expect_sizes(const std::int64_t* sizes, const char* const* names, int count,
                  const char* what) {
  for (int i = 0; i < count; ++i) {
    if (sizes[i] < 1) {
      throw std::invalid_argument(std::string(what) + ": " + names[i] + " is " +
                                  std::to_string(sizes[i]) + "; every size must be >= 1");
    }
  }
}

void expect_floating(const View& t, const char* what) {
  if (t.dtype == DType::bool8) {
    throw std::invalid_argument(std::string(what) + ": expected a floating dtype, got bool");
  }
}

}  // namespace

Dims check_keys(const View& k, const View& v, const std::optional<View>& key_mask) {
  expect_rank(k, 4, "k", "(B, Nk, H, D)");
  expect_floating(k, "k");
  Dims d{k.shape[0], 0, k.shape[1], k.shape[2], k.shape[3], v.rank == 4 ? v.shape[3] : 0, 0};
  check_tensor(k, {d.B, d.Nk, d.H, d.D}, k.dtype, "k", "(B, Nk, H, D)", "");
  check_tensor(v, {d.B, d.Nk, d.H, -1}, k.dtype, "v", "(B, Nk, H, Dv)", "like k");
  const std::int64_t sizes[] = {d.B, d.Nk, d.H, d.D, d.Dv};
  const char* names[] = {"batch", "key length", "heads", "head dim", "value dim"};
  expect_sizes(sizes, names, 5, "k, v");
  if (key_mask) {
    check_tensor(*key_mask, {d.B, d.Nk}, DType::bool8, "key_mask", "(B, Nk)", "True = keep");
  }
  return d;
}

Dims check_queries(const View& q, double eps) {
  expect_rank(q, 4, "q", "(B, Nq, H, D)");
  expect_floating(q, "q");
  Dims d{q.shape[0], q.shape[1], 0, q.shape[2], q.shape[3], 0, 0};
  check_tensor(q, {d.B, d.Nq, d.H, d.D}, q.dtype, "q", "(B, Nq, H, D)", "");
  const std::int64_t sizes[] = {d.B, d.Nq, d.H, d.D};
  const char* names[] = {"batch", "query length", "heads", "head dim"};
  expect_sizes(sizes, names, 4, "q");
  if (!std::isfinite(eps) || eps <= 0.0) {
    throw std::invalid_argument("eps: must be a finite number > 0, got " + std::to_string(eps));
  }
  return d;
}

void check_state(const View& state, const View& normaliser, const Dims& d, DType input,
                 const char* state_name, const char* normaliser_name) {
  const DType sdt = state_dtype(input);
  check_tensor(state, {d.B, d.H, d.F, d.Dv}, sdt, state_name, "(B, H, D', Dv)",
               "the state dtype");
  check_tensor(normaliser, {d.B, d.H, d.F}, sdt, normaliser_name, "(B, H, D')",
               "the state dtype");
}

DType state_dtype(DType input) {
  return input == DType::float64 ? DType::float64 : DType::float32;
}

KeyMask key_mask_of(const std::optional<View>& key_mask) {
  KeyMask mask;
  if (key_mask) {
    mask.data = key_mask->as<std::uint8_t>();
    mask.batch_stride = key_mask->stride[0];
    mask.token_stride = key_mask->stride[1];
  }
  return mask;
}

int resolve_threads(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

template <class T>
MapPair<T> make_maps(const std::string& q_name, const std::vector<View>& q_params,
                     const std::string& k_name, const std::vector<View>& k_params, Dims* dims) {
  MapPair<T> maps{make_feature_map<T>(q_name, q_params, dims->H, dims->D, "q_map"),
                  make_feature_map<T>(k_name, k_params, dims->H, dims->D, "k_map")};
  if (maps.q->features() != maps.k->features()) {
    throw std::invalid_argument("q_map, k_map: φ(q) and φ(k) must have the same width, got " +
                                std::to_string(maps.q->features()) + " and " +
                                std::to_string(maps.k->features()));
  }
  dims->F = maps.q->features();
  return maps;
}

template MapPair<float> make_maps<float>(const std::string&, const std::vector<View>&,
                                         const std::string&, const std::vector<View>&, Dims*);
template MapPair<double> make_maps<double>(const std::string&, const std::vector<View>&,
                                           const std::string&, const std::vector<View>&, Dims*);

}  // namespace linattn
