// Hedgehog (LinVideo's learnable map): φ(x) = softmax(x W_h) ⊕ softmax(−x W_h), W_h of D x F.
//
// Per block of rows: logits = x W_h (one GEMM), then two row softmaxes into the halves of φ.
// Backward, with dφ = [dp, dn] and φ = [p, n]:
//   dlogits = p ⊙ (dp − p·dp) − n ⊙ (dn − n·dn)      (the second softmax is of −logits)
//   dx = dlogits W_hᵀ,   dW_h += xᵀ dlogits            (summed over every token, like dS)
// W may be float32 while the inputs are bf16: it is staged in the compute type per head, and
// its gradient is written back in W's dtype.
#include <stdexcept>

#include "cpu/feature_map.h"
#include "cpu/gemm.h"
#include "cpu/simd.h"
#include "cpu/softmax.h"

namespace linattn {
namespace {

template <class T>
class Hedgehog final : public FeatureMap<T> {
 public:
  Hedgehog(const View& weight, std::int64_t heads, std::int64_t head_dim)
      : FeatureMap<T>(head_dim, 2 * weight.shape[2]),
        weight_(weight),
        heads_(heads),
        F_(weight.shape[2]),
        Fp_(padded<T>(weight.shape[2])),
        Dp_(padded<T>(head_dim)) {}

  // Workspace: W_h [D][Fp] | W_hᵀ [F][Dp] | logits (or dlogits) [rows][Fp].
  std::int64_t workspace_size(int rows) const override {
    return this->head_dim() * Fp_ + F_ * Dp_ + std::int64_t(rows) * Fp_;
  }

  void begin_head(std::int64_t h, T* ws) const override {
    const std::int64_t D = this->head_dim();
    T* w = ws;
    T* wt = ws + D * Fp_;
    visit_float_dtype(weight_.dtype, [&](auto tag) {
      using E = typename decltype(tag)::type;
      const E* base = weight_.as<E>() + h * weight_.stride[0];
      for (std::int64_t d = 0; d < D; ++d) {
        for (std::int64_t f = 0; f < Fp_; ++f) {
          const E* element = base + d * weight_.stride[1] + f * weight_.stride[2];
          w[d * Fp_ + f] = f < F_ ? load_elem<T>(element) : T(0);
        }
      }
    });
    // Both are GEMM B operands: padding columns zero.
    for (std::int64_t f = 0; f < F_; ++f) {
      for (std::int64_t d = 0; d < Dp_; ++d) wt[f * Dp_ + d] = d < D ? w[d * Fp_ + f] : T(0);
    }
  }

  void forward(int rows, const T* x, std::int64_t ldx, T* phi, std::int64_t ldphi,
               T* ws) const override {
    const std::int64_t D = this->head_dim();
    const T* w = ws;
    T* logits = ws + D * Fp_ + F_ * Dp_;
    gemm<T>(rows, Fp_, D, x, ldx, 1, w, Fp_, logits, Fp_, false);
    for (int r = 0; r < rows; ++r) {
      const T* lr = logits + r * Fp_;
      softmax_row(lr, F_, T(1), phi + r * ldphi);
      softmax_row(lr, F_, T(-1), phi + r * ldphi + F_);
    }
  }

  void backward(int rows, const T* x, std::int64_t ldx, const T* phi, std::int64_t ldphi,
                T* dphi, std::int64_t lddphi, T* dx, std::int64_t lddx, T* ws,
                T* grad_acc) const override {
    const std::int64_t D = this->head_dim();
    const T* wt = ws + D * Fp_;
    T* dlogits = ws + D * Fp_ + F_ * Dp_;
    for (int r = 0; r < rows; ++r) {
      const T* p = phi + r * ldphi;
      T* dp = dphi + r * lddphi;
      T* dl = dlogits + r * Fp_;
      softmax_row_backward(p, dp, F_, dl);
      softmax_row_backward(p + F_, dp + F_, F_, dp + F_);  // in place: dphi may be overwritten
      for (std::int64_t f = 0; f < F_; ++f) dl[f] -= dp[F_ + f];
      for (std::int64_t f = F_; f < Fp_; ++f) dl[f] = T(0);  // a GEMM B operand below
    }
    gemm<T>(rows, Dp_, F_, dlogits, Fp_, 1, wt, Dp_, dx, lddx, false);
    gemm<T>(D, Fp_, rows, x, 1, ldx, dlogits, Fp_, grad_acc, Fp_, true);
  }

  // The accumulator is dW_h laid out [D][Fp].
  std::int64_t param_grad_size() const override { return this->head_dim() * Fp_; }

  void check_param_grads(const std::vector<View>& grads, const std::string& what) const override {
    if (grads.size() != 1) {
      throw std::invalid_argument(what + ": hedgehog has one parameter (W), got " +
                                  std::to_string(grads.size()) + " parameter gradients");
    }
    const std::string name = what + " gradient of W";
    expect_shape(grads[0], {heads_, this->head_dim(), F_}, name.c_str(), "(H, D, F)");
    expect_nonnegative_strides(grads[0], name.c_str());
    visit_float_dtype(grads[0].dtype, [](auto) {});
  }

  void store_param_grad(std::int64_t h, const T* grad,
                        const std::vector<View>& grads) const override {
    const View& out = grads[0];
    visit_float_dtype(out.dtype, [&](auto tag) {
      using E = typename decltype(tag)::type;
      E* base = out.as<E>() + h * out.stride[0];
      for (std::int64_t d = 0; d < this->head_dim(); ++d) {
        for (std::int64_t f = 0; f < F_; ++f) {
          store_elem<T>(base + d * out.stride[1] + f * out.stride[2], grad[d * Fp_ + f]);
        }
      }
    });
  }

 private:
  View weight_;
  std::int64_t heads_;
  std::int64_t F_;   // features per half
  std::int64_t Fp_;  // F padded to whole vectors
  std::int64_t Dp_;
};

}  // namespace

template <class T>
std::unique_ptr<FeatureMap<T>> make_hedgehog(const std::vector<View>& params, std::int64_t heads,
                                             std::int64_t head_dim, const std::string& what) {
  if (params.size() != 1) {
    throw std::invalid_argument(what + ": hedgehog takes one parameter, W of shape (H, D, F); " +
                                "got " +
                                std::to_string(params.size()));
  }
  const View& weight = params[0];
  const std::string name = what + " W";
  expect_shape(weight, {heads, head_dim, -1}, name.c_str(), "(H, D, F)");
  if (weight.shape[2] < 1) throw std::invalid_argument(name + ": feature dim F must be >= 1");
  expect_nonnegative_strides(weight, name.c_str());
  visit_float_dtype(weight.dtype, [](auto) {});  // throws for a non-floating dtype
  return std::make_unique<Hedgehog<T>>(weight, heads, head_dim);
}

template std::unique_ptr<FeatureMap<float>> make_hedgehog<float>(const std::vector<View>&,
                                                                 std::int64_t, std::int64_t,
                                                                 const std::string&);
template std::unique_ptr<FeatureMap<double>> make_hedgehog<double>(const std::vector<View>&,
                                                                   std::int64_t, std::int64_t,
                                                                   const std::string&);

}  // namespace linattn
