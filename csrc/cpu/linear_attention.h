// The entry points of the CPU backend, as linattn/backends/base.py's contract defines them.
//
// With `pre`, φ applies to RoPE(norm(q)) and RoPE(norm(k)) instead of q and k (pre_attention.h).
//
// forward:  S = Σ_j φ(k_j) v_jᵀ, z = Σ_j φ(k_j) over kept keys; o_i = φ(q_i)ᵀS / (φ(q_i)ᵀz + eps).
// backward: from do and the forward's S, z: dq, dk, dv and the maps' parameter gradients.
// All tensors are (B, N, H, X)-indexed views with arbitrary strides; outputs are preallocated
// by the caller and every element of them is written.
//
// Each pass is also an entry point of its own (the phases), for a caller that combines the
// sequence reductions of several processes between them (context parallelism,
// linattn/distributed): the state pass (S, z from keys), the output pass (o from queries and
// a given S, z), the query pass of the backward (dq, dS, dz and the q map's parameter gradient
// from queries) and the key pass (dk, dv and the k map's parameter gradient from a given
// dS, dz). forward = state + output and backward = queries + keys run the same code. A phase
// takes the call's PreArgs and applies its own side of it (the state and key passes k's norm
// and the RoPE, the output and query passes q's): its statistics of a norm over all heads are
// written by the forward phase and read by the backward one, and the backward phases write
// their side's norm weight and bias gradients (over their own tokens).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "cpu/pre_attention.h"
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
  PreArgs pre;                // q/k norm and RoPE applied before φ (none by default)
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
  PreArgs pre;  // as the forward got it, with the statistics it wrote
  // Gradients of the norms' weight and bias, (H, D) like them; present where they are.
  std::optional<View> d_q_norm_weight, d_q_norm_bias, d_k_norm_weight, d_k_norm_bias;
};

struct StateArgs {
  View k, v;
  std::optional<View> key_mask;
  MapArg k_map;
  View state, normaliser;  // written: (B, H, D', Dv), (B, H, D') in the state dtype
  int num_threads = 0;
  PreArgs pre;             // its k_norm (statistics k_stats, written) and rope apply to k
};

struct OutputArgs {
  View q;
  MapArg q_map;
  double eps = 0.0;
  View state, normaliser;  // read
  View o;                  // written
  int num_threads = 0;
  PreArgs pre;             // its q_norm (statistics q_stats, written) and rope apply to q
};

struct QueryGradArgs {
  View grad_out, q;
  MapArg q_map;
  double eps = 0.0;
  View state, normaliser;        // read: the forward's (summed) S and z
  View dq;                       // written
  View d_state, d_normaliser;    // written: this call's queries' dS, dz in the state dtype
  std::vector<View> d_q_params;  // written: the q map's parameter gradients over these queries
  int num_threads = 0;
  PreArgs pre;                   // as output's (q_stats read)
  std::optional<View> d_norm_weight, d_norm_bias;  // written: the q norm's, over these queries
};

struct KeyGradArgs {
  View k, v;
  std::optional<View> key_mask;
  MapArg k_map;
  View d_state, d_normaliser;    // read: the (summed) dS and dz
  View dk, dv;                   // written
  std::vector<View> d_k_params;  // written: the k map's parameter gradients over these keys
  int num_threads = 0;
  PreArgs pre;                   // as state's (k_stats read)
  std::optional<View> d_norm_weight, d_norm_bias;  // written: the k norm's, over these keys
};

void cpu_forward(const ForwardArgs& args);
void cpu_backward(const BackwardArgs& args);
void cpu_forward_state(const StateArgs& args);
void cpu_forward_output(const OutputArgs& args);
void cpu_backward_queries(const QueryGradArgs& args);
void cpu_backward_keys(const KeyGradArgs& args);

}  // namespace linattn
