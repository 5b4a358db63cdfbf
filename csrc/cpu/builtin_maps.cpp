// The parameter-free maps: relu, elu (+1), identity (elementwise) and softmax over the head dim.
#include <algorithm>

#include "cpu/feature_map.h"
#include "cpu/simd.h"
#include "cpu/softmax.h"

namespace linattn {

namespace {

// φ(x) = max(x, 0); φ'(x) = [x > 0] (0 at 0, as torch.relu's gradient).
template <class T>
class ReLU final : public FeatureMap<T> {
 public:
  explicit ReLU(std::int64_t d) : FeatureMap<T>(d, d) {}

  void forward(int rows, const T* x, std::int64_t ldx, T* phi, std::int64_t ldphi,
               T*) const override {
    const std::int64_t D = this->head_dim();
    for (int r = 0; r < rows; ++r) {
      for (std::int64_t d = 0; d < D; ++d) phi[r * ldphi + d] = std::max(x[r * ldx + d], T(0));
    }
  }

  void backward(int rows, const T* x, std::int64_t ldx, const T*, std::int64_t, T* dphi,
                std::int64_t lddphi, T* dx, std::int64_t lddx, T*, T*) const override {
    const std::int64_t D = this->head_dim();
    for (int r = 0; r < rows; ++r) {
      for (std::int64_t d = 0; d < D; ++d) {
        dx[r * lddx + d] = x[r * ldx + d] > T(0) ? dphi[r * lddphi + d] : T(0);
      }
    }
  }
};

// φ(x) = elu(x) + 1 = x + 1 (x > 0), e^x (x <= 0); φ'(x) = 1 (x > 0), e^x = φ(x) (x <= 0).
template <class T>
class ELU final : public FeatureMap<T> {
 public:
  explicit ELU(std::int64_t d) : FeatureMap<T>(d, d) {}

  void forward(int rows, const T* x, std::int64_t ldx, T* phi, std::int64_t ldphi,
               T*) const override {
    const std::int64_t D = this->head_dim();
    for (int r = 0; r < rows; ++r) {
      const T* xr = x + r * ldx;
      T* pr = phi + r * ldphi;
      // e^min(x, 0) for the whole row in one vector pass, then pick the branch.
      for (std::int64_t d = 0; d < D; ++d) pr[d] = std::min(xr[d], T(0));
      exp_inplace(pr, D);
      for (std::int64_t d = 0; d < D; ++d) pr[d] = xr[d] > T(0) ? xr[d] + T(1) : pr[d];
    }
  }

  void backward(int rows, const T* x, std::int64_t ldx, const T* phi, std::int64_t ldphi,
                T* dphi, std::int64_t lddphi, T* dx, std::int64_t lddx, T*, T*) const override {
    const std::int64_t D = this->head_dim();
    for (int r = 0; r < rows; ++r) {
      for (std::int64_t d = 0; d < D; ++d) {
        const T g = dphi[r * lddphi + d];
        dx[r * lddx + d] = x[r * ldx + d] > T(0) ? g : g * phi[r * ldphi + d];
      }
    }
  }
};

// φ(x) = x: the caller applied its own map.
template <class T>
class Identity final : public FeatureMap<T> {
 public:
  explicit Identity(std::int64_t d) : FeatureMap<T>(d, d) {}

  void forward(int rows, const T* x, std::int64_t ldx, T* phi, std::int64_t ldphi,
               T*) const override {
    const std::int64_t D = this->head_dim();
    for (int r = 0; r < rows; ++r) {
      for (std::int64_t d = 0; d < D; ++d) phi[r * ldphi + d] = x[r * ldx + d];
    }
  }

  void backward(int rows, const T*, std::int64_t, const T*, std::int64_t, T* dphi,
                std::int64_t lddphi, T* dx, std::int64_t lddx, T*, T*) const override {
    const std::int64_t D = this->head_dim();
    for (int r = 0; r < rows; ++r) {
      for (std::int64_t d = 0; d < D; ++d) dx[r * lddx + d] = dphi[r * lddphi + d];
    }
  }
};

}  // namespace

namespace {

// φ(x) = softmax(x) over the head dim.
template <class T>
class Softmax final : public FeatureMap<T> {
 public:
  explicit Softmax(std::int64_t d) : FeatureMap<T>(d, d) {}

  void forward(int rows, const T* x, std::int64_t ldx, T* phi, std::int64_t ldphi,
               T*) const override {
    for (int r = 0; r < rows; ++r) {
      softmax_row(x + r * ldx, this->head_dim(), T(1), phi + r * ldphi);
    }
  }

  void backward(int rows, const T*, std::int64_t, const T* phi, std::int64_t ldphi, T* dphi,
                std::int64_t lddphi, T* dx, std::int64_t lddx, T*, T*) const override {
    for (int r = 0; r < rows; ++r) {
      softmax_row_backward(phi + r * ldphi, dphi + r * lddphi, this->head_dim(), dx + r * lddx);
    }
  }
};

}  // namespace

template <class T>
std::unique_ptr<FeatureMap<T>> make_builtin_map(const std::string& name, std::int64_t head_dim) {
  if (name == "relu") return std::make_unique<ReLU<T>>(head_dim);
  if (name == "elu") return std::make_unique<ELU<T>>(head_dim);
  if (name == "softmax") return std::make_unique<Softmax<T>>(head_dim);
  if (name == "identity") return std::make_unique<Identity<T>>(head_dim);
  return nullptr;
}

template std::unique_ptr<FeatureMap<float>> make_builtin_map<float>(const std::string&,
                                                                    std::int64_t);
template std::unique_ptr<FeatureMap<double>> make_builtin_map<double>(const std::string&,
                                                                      std::int64_t);

}  // namespace linattn
