// The per-token passes of a norm over all heads (pre_attention.h): its statistics before the
// per-head passes, and the rest of its gradient after them. Plus the argument checks.
#include "cpu/pre_attention.h"

#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cpu/dtype.h"

namespace linattn {

namespace {

void check_head_param(const View& t, std::int64_t H, std::int64_t D, const std::string& what) {
  expect_shape(t, {H, D}, what.c_str(), "(H, D)");
  expect_nonnegative_strides(t, what.c_str());
  visit_float_dtype(t.dtype, [](auto) {});
}

void write_stats(const View& stats, std::int64_t b, std::int64_t n, double mean, double rstd) {
  visit_float_dtype(stats.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    S* out = stats.as<S>() + b * stats.stride[0] + n * stats.stride[1];
    store_elem<double>(out, mean);
    store_elem<double>(out + stats.stride[2], rstd);
  });
}

}  // namespace

void check_norm(const NormArg& norm, const std::optional<View>& stats, std::int64_t B,
                std::int64_t N, std::int64_t H, std::int64_t D, DType stats_dtype,
                const char* what) {
  const std::string name(what);
  if (norm.kind == int(NormKind::none)) return;
  if (norm.kind != int(NormKind::rms) && norm.kind != int(NormKind::layer)) {
    throw std::invalid_argument(name + ": unknown norm kind " + std::to_string(norm.kind));
  }
  if (!std::isfinite(norm.eps) || norm.eps <= 0.0) {
    throw std::invalid_argument(name + ": eps must be a finite number > 0, got " +
                                std::to_string(norm.eps));
  }
  if (norm.start < 0 || norm.start > norm.stop || norm.stop > N) {
    throw std::invalid_argument(name + ": token range [" + std::to_string(norm.start) + ", " +
                                std::to_string(norm.stop) + ") is not inside the " +
                                std::to_string(N) + " tokens");
  }
  if (norm.weight) check_head_param(*norm.weight, H, D, name + " weight");
  if (norm.bias) check_head_param(*norm.bias, H, D, name + " bias");
  if (norm.over_heads) {
    if (!stats) {
      throw std::invalid_argument(name + ": a norm over heads needs its statistics tensor");
    }
    const std::string s = name + " statistics";
    expect_shape(*stats, {B, N, 2}, s.c_str(), "(B, N, 2)");
    expect_dtype(*stats, stats_dtype, s.c_str(), "the state dtype");
    expect_nonnegative_strides(*stats, s.c_str());
  }
}

void check_norm_grads(const NormArg& norm, const std::optional<View>& d_weight,
                      const std::optional<View>& d_bias, std::int64_t H, std::int64_t D,
                      const char* what) {
  const bool has = norm.kind != int(NormKind::none);
  const std::pair<const std::optional<View>*, const std::optional<View>*> pairs[] = {
      {&norm.weight, &d_weight}, {&norm.bias, &d_bias}};
  for (const auto& [param, grad] : pairs) {
    const std::string name = std::string(what) + (param == &norm.weight ? " weight" : " bias") +
                             " gradient";
    if (bool(*grad) != (has && bool(*param))) {
      throw std::invalid_argument(name + ": expected one exactly where the norm has that "
                                         "parameter");
    }
    if (*grad) check_head_param(**grad, H, D, name);
  }
}

void check_rope(const RopeArg& rope, std::int64_t B, std::int64_t N, std::int64_t H,
                std::int64_t D) {
  if (rope.style == int(RopeStyle::none)) return;
  if (rope.style != int(RopeStyle::interleaved) && rope.style != int(RopeStyle::half)) {
    throw std::invalid_argument("rope: unknown style " + std::to_string(rope.style));
  }
  if (D % 2) throw std::invalid_argument("rope: the head dim must be even, got " + std::to_string(D));
  if (!rope.cos || !rope.sin) throw std::invalid_argument("rope: cos and sin tables are required");
  for (const auto* t : {&*rope.cos, &*rope.sin}) {
    const char* what = t == &*rope.cos ? "rope cos" : "rope sin";
    expect_rank(*t, 4, what, "(B | 1, Nr, H | 1, W)");
    expect_nonnegative_strides(*t, what);
    visit_float_dtype(t->dtype, [](auto) {});
    const std::int64_t* s = t->shape;
    if ((s[0] != 1 && s[0] != B) || (s[2] != 1 && s[2] != H) || (s[3] != D && 2 * s[3] != D) ||
        s[1] != rope.cos->shape[1] || rope.start < 0 || rope.start + s[1] > N) {
      throw std::invalid_argument(std::string(what) + ": expected (B | 1, Nr, H | 1, D | D/2) "
                                  "with start + Nr <= N, got " + t->describe() +
                                  " and start " + std::to_string(rope.start));
    }
  }
}

void compute_norm_stats(const View& x, const NormArg& norm, const View& stats, int threads) {
  const std::int64_t B = x.shape[0], N = x.shape[1], H = x.shape[2], D = x.shape[3];
  const bool layer = norm.kind == int(NormKind::layer);
  const double width = double(H * D);
  visit_float_dtype(x.dtype, [&](auto tag) {
    using E = typename decltype(tag)::type;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (std::int64_t i = 0; i < B * N; ++i) {
      const std::int64_t b = i / N, n = i % N;
      // Tokens outside the range get (0, 1), never read, so the whole output is written.
      if (n < norm.start || n >= norm.stop) {
        write_stats(stats, b, n, 0.0, 1.0);
        continue;
      }
      const E* token = x.as<E>() + b * x.stride[0] + n * x.stride[1];
      // Two passes (mean, then the centred squares), in double: H·D reaches 5120 values.
      double mean = 0.0;
      if (layer) {
        for (std::int64_t h = 0; h < H; ++h) {
          for (std::int64_t d = 0; d < D; ++d) {
            mean += load_elem<double>(token + h * x.stride[2] + d * x.stride[3]);
          }
        }
        mean /= width;
      }
      double var = 0.0;
      for (std::int64_t h = 0; h < H; ++h) {
        for (std::int64_t d = 0; d < D; ++d) {
          const double c = double(load_elem<double>(token + h * x.stride[2] + d * x.stride[3])) -
                           mean;
          var += c * c;
        }
      }
      write_stats(stats, b, n, mean, 1.0 / std::sqrt(var / width + norm.eps));
    }
  });
}

template <class T>
void finish_norm_over_heads(const View& x, const View& dx, const NormArg& norm, const View& stats,
                            const T* partials, const KeyMask& mask, int threads) {
  const std::int64_t B = x.shape[0], N = x.shape[1], H = x.shape[2], D = x.shape[3];
  const std::int64_t count = norm.stop - norm.start;
  const bool layer = norm.kind == int(NormKind::layer);
  const T width = T(H * D);
  visit_float_dtype(x.dtype, [&](auto tag) {
    using E = typename decltype(tag)::type;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (std::int64_t i = 0; i < B * count; ++i) {
      const std::int64_t b = i / count, n = norm.start + i % count;
      if (mask.data && !mask.data[b * mask.batch_stride + n * mask.token_stride]) continue;
      const T* sums = partials + (b * N + n) * H * 2;
      T sum_g = T(0), sum_gx = T(0);
      for (std::int64_t h = 0; h < H; ++h) {
        sum_g += sums[2 * h];
        sum_gx += sums[2 * h + 1];
      }
      const T* s = stats.as<T>() + b * stats.stride[0] + n * stats.stride[1];
      const T mean = s[0], rstd = s[stats.stride[2]];
      const T c0 = layer ? sum_g / width : T(0);
      const T c1 = sum_gx / width;
      const E* xt = x.as<E>() + b * x.stride[0] + n * x.stride[1];
      E* gt = dx.as<E>() + b * dx.stride[0] + n * dx.stride[1];
      for (std::int64_t h = 0; h < H; ++h) {
        for (std::int64_t d = 0; d < D; ++d) {
          const T xhat = (load_elem<T>(xt + h * x.stride[2] + d * x.stride[3]) - mean) * rstd;
          E* g = gt + h * dx.stride[2] + d * dx.stride[3];
          store_elem<T>(g, load_elem<T>(g) - rstd * (c0 + xhat * c1));
        }
      }
    }
  });
}

template void finish_norm_over_heads<float>(const View&, const View&, const NormArg&, const View&,
                                            const float*, const KeyMask&, int);
template void finish_norm_over_heads<double>(const View&, const View&, const NormArg&,
                                             const View&, const double*, const KeyMask&, int);

}  // namespace linattn
