// The pre-attention work of a DiT layer, fused into the passes' loads of q and k: the q/k
// normalisation, then RoPE (linattn/pre_attention/spec.py defines both; reference.py is the
// oracle). A pass loads a block of raw q or k rows into scratch, calls forward() to get the rows
// φ sees, and in the backward calls backward() to turn dL/d(rows φ saw) into dL/d(raw rows).
//
//   norm:  n = (x − mean)·rstd·w + b, over each head's D values (per-head norms: the statistics
//          come from the row itself) or over all H·D values of a token (norm over heads: mean
//          and rstd per token from compute_norm_stats, run once before the passes).
//   RoPE:  y = n·cos + rot(n)·sin, rot pairing dims (2i, 2i+1) or (i, i + D/2).
//
// Backward, with x̂ = (x − mean)·rstd and g = dn ⊙ w:
//   dn = dy·cos + rotᵀ(dy·sin)
//   dw += dn ⊙ x̂,  db += dn
//   dx = rstd·(g − mean(g) − x̂·mean(g ⊙ x̂))       (mean(g) only for LayerNorm)
// The means run over the normalised group. For a per-head norm that is the row; for a norm over
// heads the row holds one head of the group, so the pass writes rstd·g and the row's sums of g
// and g ⊙ x̂, and finish_norm_over_heads subtracts the rest once every head is done.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/simd.h"
#include "cpu/tokens.h"
#include "cpu/view.h"

namespace linattn {

enum class NormKind : int { none = 0, rms = 1, layer = 2 };
enum class RopeStyle : int { none = 0, interleaved = 1, half = 2 };

// One side's normalisation as Python passes it (NormCall of spec.py).
struct NormArg {
  int kind = 0;
  bool over_heads = false;
  double eps = 0.0;
  std::int64_t start = 0, stop = 0;  // tokens [start, stop) are normalised
  std::optional<View> weight, bias;  // (H, D), any float dtype and strides
};

// The rotary embedding shared by q and k (RopeCall of spec.py).
struct RopeArg {
  int style = 0;
  std::optional<View> cos, sin;  // (B | 1, Nr, H | 1, W), W = D or D/2
  std::int64_t start = 0;        // table row r rotates token start + r
};

struct PreArgs {
  NormArg q_norm, k_norm;
  RopeArg rope;
  // (B, N, 2) [mean, rstd] per token, in the state dtype, for a norm over heads: written by the
  // forward (compute_norm_stats), read by the backward.
  std::optional<View> q_stats, k_stats;
};

// Checks one side's arguments against (B, N, H, D); `what` is "q_norm" or "k_norm".
void check_norm(const NormArg& norm, const std::optional<View>& stats, std::int64_t B,
                std::int64_t N, std::int64_t H, std::int64_t D, DType stats_dtype,
                const char* what);
// Throws unless the gradient outputs match the norm: one (H, D) output per weight and bias present.
void check_norm_grads(const NormArg& norm, const std::optional<View>& d_weight,
                      const std::optional<View>& d_bias, std::int64_t H, std::int64_t D,
                      const char* what);
void check_rope(const RopeArg& rope, std::int64_t B, std::int64_t N, std::int64_t H,
                std::int64_t D);

// stats[b, n] = (mean, rstd) over the H·D values of token n of x (B, N, H, D), for the tokens
// in [norm.start, norm.stop) (a LayerNorm's mean, 0 for RMSNorm); (0, 1) for other tokens.
void compute_norm_stats(const View& x, const NormArg& norm, const View& stats, int threads);

// dx[b, n] −= rstd·(mean(g) + x̂·mean(g ⊙ x̂)) over every head of each normalised token, from
// the per-(token, head) sums (Σg, Σg ⊙ x̂) in `partials` [B][N][H][2]; masked keys (key_mask
// false) are left as they are.
template <class T>
void finish_norm_over_heads(const View& x, const View& dx, const NormArg& norm, const View& stats,
                            const T* partials, const KeyMask& mask, int threads);

template <class T>
class PreTransform {
 public:
  // For q (or k) of shape (B, N, H, D); `stats` as in PreArgs.
  PreTransform(const NormArg& norm, const RopeArg& rope, const std::optional<View>& stats,
               std::int64_t D)
      : norm_(norm), rope_(rope), stats_(stats), D_(D), Dp_(padded<T>(D)) {}

  bool active() const { return has_norm() || has_rope(); }
  bool has_norm() const { return norm_.kind != int(NormKind::none); }
  bool has_rope() const { return rope_.style != int(RopeStyle::none); }
  bool norm_over_heads() const { return has_norm() && norm_.over_heads; }

  // Per-thread scratch: w, b | cos, sin of a row | a row of n or dn.
  std::int64_t workspace_size() const { return active() ? 5 * Dp_ : 0; }
  // Elements of one task's (dw, db) accumulator.
  std::int64_t param_grad_size() const { return has_norm() ? 2 * Dp_ : 0; }

  // Stages head h of batch b (weight, bias in T); once per task, on the task's own copy (the
  // passes share one const PreTransform and copy it per task: it is a few views).
  void begin(std::int64_t b, std::int64_t h, T* ws) {
    b_ = b;
    h_ = h;
    T* w = ws;
    T* bias = ws + Dp_;
    for (std::int64_t d = 0; d < Dp_; ++d) {
      w[d] = T(1);
      bias[d] = T(0);
    }
    if (norm_.weight) read_head_row(*norm_.weight, h, w);
    if (norm_.bias) read_head_row(*norm_.bias, h, bias);
  }

  // out[r] = RoPE(norm(x[r])) for token tokens[r]; out may be x. Padding columns stay 0.
  void forward(int rows, const std::int64_t* tokens, const T* x, std::int64_t ldx, T* out,
               std::int64_t ldo, T* ws) const {
    const T* w = ws;
    const T* bias = ws + Dp_;
    T* cos = ws + 2 * Dp_;
    T* sin = ws + 3 * Dp_;
    T* n = ws + 4 * Dp_;
    for (int r = 0; r < rows; ++r) {
      const T* xr = x + r * ldx;
      for (std::int64_t d = 0; d < D_; ++d) n[d] = xr[d];
      T mean, rstd;
      if (normalises(tokens[r]) && row_stats(tokens[r], xr, &mean, &rstd)) {
        for (std::int64_t d = 0; d < D_; ++d) n[d] = (xr[d] - mean) * rstd * w[d] + bias[d];
      }
      T* o = out + r * ldo;
      if (rotates(tokens[r])) {
        load_angles(tokens[r], cos, sin);
        rotate(n, cos, sin, o);
      } else {
        for (std::int64_t d = 0; d < D_; ++d) o[d] = n[d];
      }
    }
  }

  // dy (rows of dL/d(forward's out), overwritten) -> dx. grad_acc (param_grad_size(): dw, then
  // db) accumulates over tokens. For a norm over heads, dx holds rstd·g for normalised rows and
  // row_sums[2·r] = Σ g, row_sums[2·r + 1] = Σ g ⊙ x̂ (0 for other rows).
  void backward(int rows, const std::int64_t* tokens, const T* x, std::int64_t ldx, T* dy,
                std::int64_t lddy, T* dx, std::int64_t lddx, T* ws, T* grad_acc,
                T* row_sums) const {
    const T* w = ws;
    T* cos = ws + 2 * Dp_;
    T* sin = ws + 3 * Dp_;
    T* dn = ws + 4 * Dp_;
    T* dw = grad_acc;
    T* db = grad_acc + Dp_;
    const bool layer = norm_.kind == int(NormKind::layer);
    for (int r = 0; r < rows; ++r) {
      T* g = dy + r * lddy;
      if (rotates(tokens[r])) {
        load_angles(tokens[r], cos, sin);
        rotate_transposed(g, cos, sin, dn);
      } else {
        for (std::int64_t d = 0; d < D_; ++d) dn[d] = g[d];
      }
      const T* xr = x + r * ldx;
      T* dxr = dx + r * lddx;
      T mean, rstd;
      if (row_sums) row_sums[2 * r] = row_sums[2 * r + 1] = T(0);
      if (!normalises(tokens[r]) || !row_stats(tokens[r], xr, &mean, &rstd)) {
        for (std::int64_t d = 0; d < D_; ++d) dxr[d] = dn[d];
        continue;
      }
      T sum_g = T(0), sum_gx = T(0);
      for (std::int64_t d = 0; d < D_; ++d) {
        const T xhat = (xr[d] - mean) * rstd;
        dw[d] += dn[d] * xhat;
        db[d] += dn[d];
        const T gd = dn[d] * w[d];
        dn[d] = gd;  // dn becomes g
        sum_g += gd;
        sum_gx += gd * xhat;
      }
      if (norm_.over_heads) {
        for (std::int64_t d = 0; d < D_; ++d) dxr[d] = rstd * dn[d];
        row_sums[2 * r] = sum_g;
        row_sums[2 * r + 1] = sum_gx;
      } else {
        const T c0 = layer ? sum_g / T(D_) : T(0);
        const T c1 = sum_gx / T(D_);
        for (std::int64_t d = 0; d < D_; ++d) {
          dxr[d] = rstd * (dn[d] - c0 - (xr[d] - mean) * rstd * c1);
        }
      }
    }
  }

  // Writes head h's (dw, db) (accumulators summed over tasks) into d_weight, d_bias (H, D).
  void store_param_grads(std::int64_t h, const T* grad, const std::optional<View>& d_weight,
                         const std::optional<View>& d_bias) const {
    if (d_weight) write_head_row(*d_weight, h, grad);
    if (d_bias) write_head_row(*d_bias, h, grad + Dp_);
  }

 private:
  bool normalises(std::int64_t t) const {
    return has_norm() && t >= norm_.start && t < norm_.stop;
  }
  bool rotates(std::int64_t t) const {
    return has_rope() && t >= rope_.start && t < rope_.start + rope_.cos->shape[1];
  }

  // mean and rstd of the row of token t (its own values, or the token's statistics over all
  // heads). Always true; a function so both passes share it.
  bool row_stats(std::int64_t t, const T* xr, T* mean, T* rstd) const {
    if (norm_.over_heads) {
      const T* s = stats_->as<T>() + b_ * stats_->stride[0] + t * stats_->stride[1];
      *mean = s[0];
      *rstd = s[stats_->stride[2]];
      return true;
    }
    double m = 0.0;
    if (norm_.kind == int(NormKind::layer)) {
      for (std::int64_t d = 0; d < D_; ++d) m += double(xr[d]);
      m /= double(D_);
    }
    double var = 0.0;
    for (std::int64_t d = 0; d < D_; ++d) {
      const double c = double(xr[d]) - m;
      var += c * c;
    }
    *mean = T(m);
    *rstd = T(1.0 / std::sqrt(var / double(D_) + norm_.eps));
    return true;
  }

  void read_head_row(const View& t, std::int64_t h, T* dst) const {
    visit_float_dtype(t.dtype, [&](auto tag) {
      using E = typename decltype(tag)::type;
      const E* base = t.as<E>() + h * t.stride[0];
      for (std::int64_t d = 0; d < D_; ++d) dst[d] = load_elem<T>(base + d * t.stride[1]);
    });
  }

  void write_head_row(const View& t, std::int64_t h, const T* src) const {
    visit_float_dtype(t.dtype, [&](auto tag) {
      using E = typename decltype(tag)::type;
      E* base = t.as<E>() + h * t.stride[0];
      for (std::int64_t d = 0; d < D_; ++d) store_elem<T>(base + d * t.stride[1], src[d]);
    });
  }

  // cos[d], sin[d] for every dim d of token t's row (table columns spread over pairs).
  void load_angles(std::int64_t t, T* cos, T* sin) const {
    const View& c = *rope_.cos;
    const View& s = *rope_.sin;
    const std::int64_t row = t - rope_.start;
    const std::int64_t width = c.shape[3];
    const bool half = rope_.style == int(RopeStyle::half);
    auto fill = [&](const View& v, T* out) {
      visit_float_dtype(v.dtype, [&](auto tag) {
        using E = typename decltype(tag)::type;
        const E* base = v.as<E>() + (v.shape[0] == 1 ? 0 : b_) * v.stride[0] +
                        row * v.stride[1] + (v.shape[2] == 1 ? 0 : h_) * v.stride[2];
        for (std::int64_t d = 0; d < D_; ++d) {
          const std::int64_t col = width == D_ ? d : (half ? d % width : d / 2);
          out[d] = load_elem<T>(base + col * v.stride[3]);
        }
      });
    };
    fill(c, cos);
    fill(s, sin);
  }

  // o = n·cos + rot(n)·sin.
  void rotate(const T* n, const T* cos, const T* sin, T* o) const {
    if (rope_.style == int(RopeStyle::interleaved)) {
      for (std::int64_t d = 0; d < D_; d += 2) {
        const T a = n[d], b = n[d + 1];
        o[d] = a * cos[d] - b * sin[d];
        o[d + 1] = b * cos[d + 1] + a * sin[d + 1];
      }
    } else {
      const std::int64_t half = D_ / 2;
      for (std::int64_t d = 0; d < half; ++d) {
        const T a = n[d], b = n[d + half];
        o[d] = a * cos[d] - b * sin[d];
        o[d + half] = b * cos[d + half] + a * sin[d + half];
      }
    }
  }

  // dn = dy·cos + rotᵀ(dy·sin).
  void rotate_transposed(const T* dy, const T* cos, const T* sin, T* dn) const {
    if (rope_.style == int(RopeStyle::interleaved)) {
      for (std::int64_t d = 0; d < D_; d += 2) {
        dn[d] = dy[d] * cos[d] + dy[d + 1] * sin[d + 1];
        dn[d + 1] = dy[d + 1] * cos[d + 1] - dy[d] * sin[d];
      }
    } else {
      const std::int64_t half = D_ / 2;
      for (std::int64_t d = 0; d < half; ++d) {
        dn[d] = dy[d] * cos[d] + dy[d + half] * sin[d + half];
        dn[d + half] = dy[d + half] * cos[d + half] - dy[d] * sin[d];
      }
    }
  }

  NormArg norm_;
  RopeArg rope_;
  std::optional<View> stats_;
  std::int64_t D_, Dp_;
  std::int64_t b_ = 0, h_ = 0;
};

// No norm and no RoPE: what the single-pass entry points (cpu_forward_state and the others,
// linear_attention.h) apply, since the context-parallel op refuses pre-attention work.
template <class T>
PreTransform<T> no_pre(std::int64_t D) {
  return PreTransform<T>(NormArg{}, RopeArg{}, std::nullopt, D);
}

}  // namespace linattn
