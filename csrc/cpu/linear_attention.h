// The two entry points of the CPU backend, as linattn/backends/base.py's contract defines them.
//
// forward:  S = Σ_j φ(k_j) v_jᵀ, z = Σ_j φ(k_j) over kept keys; o_i = φ(q_i)ᵀS / (φ(q_i)ᵀz + eps).
// backward: from do and the forward's S, z: dq, dk, dv and the maps' parameter gradients.
// All tensors are (B, N, H, X)-indexed views with arbitrary strides; outputs are preallocated
// by the caller and every element of them is written.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "cpu/view.h"

namespace linattn {

struct MapArg {
  std::string name;
  std::vector<View> params;
};

struct ForwardArgs {
  View q, k, v;
  std::optional<View> key_mask;  // (B, Nk) bool, true = keep
  MapArg q_map, k_map;
  double eps = 0.0;
  View o, state, normaliser;  // (B, Nq, H, Dv) in q's dtype; (B, H, D', Dv), (B, H, D')
  int num_threads = 0;        // <= 0: OpenMP's default
};

struct BackwardArgs {
  View grad_out, q, k, v;
  std::optional<View> key_mask;
  MapArg q_map, k_map;
  double eps = 0.0;
  View state, normaliser;  // what forward wrote
  View dq, dk, dv;
  std::vector<View> d_q_params, d_k_params;
  int num_threads = 0;
};

void cpu_forward(const ForwardArgs& args);
void cpu_backward(const BackwardArgs& args);

}  // namespace linattn
