// The fused feature maps φ: what the passes call on each block of token rows.
//
// The passes load a block of q or k rows into fp32 (fp64) scratch, call forward() to get φ for
// the block, and in the backward call backward() with dφ to get dx. A map with parameters
// (hedgehog: W per head) stages its head's parameters in begin_head() and accumulates its
// parameter gradient in a per-task accumulator that the passes reduce over tasks in a fixed
// order, like the state. Adding a map is one more subclass and one line in make_feature_map.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu/view.h"

namespace linattn {

template <class T>
class FeatureMap {
 public:
  FeatureMap(std::int64_t head_dim, std::int64_t features)
      : head_dim_(head_dim), features_(features) {}
  virtual ~FeatureMap() = default;

  std::int64_t head_dim() const { return head_dim_; }
  std::int64_t features() const { return features_; }  // D'

  // Scratch (elements of T) one thread needs to run the map on blocks of up to `rows` tokens.
  virtual std::int64_t workspace_size(int rows) const { return 0; }
  // Prepares a thread's workspace for head h (a parameterised map stages W_h); once per task.
  virtual void begin_head(std::int64_t h, T* workspace) const {}

  // phi[r][0, D') = φ(x[r][0, D)) for r < rows.
  virtual void forward(int rows, const T* x, std::int64_t ldx, T* phi, std::int64_t ldphi,
                       T* workspace) const = 0;

  // dx[r][0, D) = J_φ(x[r])ᵀ dphi[r], given phi = forward(x). dphi may be overwritten; dx rows
  // must hold padded(D) elements (a map may write the padding). Parameter gradients are added
  // into grad_acc (param_grad_size() elements).
  virtual void backward(int rows, const T* x, std::int64_t ldx, const T* phi, std::int64_t ldphi,
                        T* dphi, std::int64_t lddphi, T* dx, std::int64_t lddx, T* workspace,
                        T* grad_acc) const = 0;

  // Elements of one task's parameter-gradient accumulator; 0 for a map without parameters.
  virtual std::int64_t param_grad_size() const { return 0; }
  // Throws unless `grads` are the outputs this map's parameter gradients go to.
  virtual void check_param_grads(const std::vector<View>& grads, const std::string& what) const;
  // Writes head h's gradient (accumulators summed over tasks) into the outputs.
  virtual void store_param_grad(std::int64_t h, const T* grad,
                                const std::vector<View>& grads) const {}

 private:
  std::int64_t head_dim_;
  std::int64_t features_;
};

// The map called `name` ("relu", "elu", "softmax", "identity", "hedgehog") for heads of
// `head_dim`, with its parameters; `what` names the argument in error messages ("q_map").
template <class T>
std::unique_ptr<FeatureMap<T>> make_feature_map(const std::string& name,
                                                const std::vector<View>& params,
                                                std::int64_t heads, std::int64_t head_dim,
                                                const std::string& what);

// The parameter-free maps (builtin_maps.cpp); null for another name.
template <class T>
std::unique_ptr<FeatureMap<T>> make_builtin_map(const std::string& name, std::int64_t head_dim);

// Hedgehog (hedgehog.cpp); params = {W of shape (H, D, F)}.
template <class T>
std::unique_ptr<FeatureMap<T>> make_hedgehog(const std::vector<View>& params, std::int64_t heads,
                                             std::int64_t head_dim, const std::string& what);

// Names make_feature_map accepts, for Python (CpuBackend.supported_maps is checked against it).
std::vector<std::string> fused_feature_maps();

}  // namespace linattn
