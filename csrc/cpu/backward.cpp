// The backward pass, from do and the forward's S, z (φ and the denominators are recomputed):
//
//   1. queries  tasks (b, h, query part), per block:
//                 den = φ(q)·z + eps,  g = S do          (one GEMM; g_i = S do_i)
//                 dden = −(φ(q)·g)/den²                  (do·o = φ(q)·g / den: o is not needed)
//                 dφ(q) = g/den + dden z  → dq through the map
//                 dS += (φ(q)/den)ᵀ do,  dz += Σ dden φ(q)
//               (summed in a pairwise cascade, cascade.h, with the map's parameter gradient;
//               parts reduced pairwise in a fixed tree)
//   2. keys     tasks (b, h, key part), per block of kept keys:
//                 dφ(k) = dS v + dz → dk through the map;  dv = dSᵀ φ(k);  masked keys: 0
//   3. the maps' parameter gradients (hedgehog dW): per-task cascades summed per head over
//      batch and parts, pairwise in a fixed order.
// With pre-attention work (pre_attention.h), both passes load raw q or k rows, recompute what φ
// saw, and take the map's dx back through RoPE and the norm (dw, db summed like dW, in the same
// cascades); a norm over all heads ends with finish_norm_over_heads once every head of every
// token is done.
//
// cpu_backward runs both passes; cpu_backward_queries and cpu_backward_keys run one each (the
// phases a context-parallel caller separates with an all-reduce of dS and dz,
// linear_attention.h), each with its own side's pre-attention work and norm gradients.
#include <omp.h>

#include <optional>
#include <type_traits>

#include "cpu/cascade.h"
#include "cpu/gemm.h"
#include "cpu/linear_attention.h"
#include "cpu/partition.h"
#include "cpu/problem.h"
#include "cpu/simd.h"
#include "cpu/state_io.h"
#include "cpu/tokens.h"
#include "cpu/workspace.h"

namespace linattn {
namespace {

// Per-task accumulators of a gradient that sums over tokens: task (b, h, part)'s lives at
// grads + ((b·H + h)·parts + part)·stride; head h's gradient is their sum over b and part,
// taken pairwise over the B·parts accumulators in (b, part) order (a fixed tree). Returns the
// accumulator that holds the sum.
template <class T>
T* sum_head_accumulators(T* grads, std::int64_t stride, std::int64_t size, const Dims& d,
                         std::int64_t parts, std::int64_t h) {
  const std::int64_t count = d.B * parts;
  // Accumulator i = b·parts + part of head h.
  auto acc = [&](std::int64_t i) {
    return grads + ((i / parts * d.H + h) * parts + i % parts) * stride;
  };
  for (std::int64_t step = 1; step < count; step *= 2) {
    for (std::int64_t i = 0; i + step < count; i += 2 * step) {
      T* __restrict into = acc(i);
      const T* __restrict from = acc(i + step);
      for (std::int64_t e = 0; e < size; ++e) into[e] += from[e];
    }
  }
  return acc(0);
}

// Parameter gradients of a map (hedgehog dW), from accumulators laid out as above.
template <class T>
void store_param_grads(const FeatureMap<T>& map, const std::vector<View>& outputs, T* grads,
                       std::int64_t stride, const Dims& d, std::int64_t parts, int threads) {
  const std::int64_t size = map.param_grad_size();
  if (size == 0) return;
#pragma omp parallel for num_threads(int(std::min<std::int64_t>(threads, d.H))) schedule(static)
  for (std::int64_t h = 0; h < d.H; ++h) {
    map.store_param_grad(h, sum_head_accumulators(grads, stride, size, d, parts, h), outputs);
  }
}

// The norm's (dw, db), from accumulators laid out as above.
template <class T>
void store_norm_grads(const PreTransform<T>& pre, const std::optional<View>& d_weight,
                      const std::optional<View>& d_bias, T* grads, std::int64_t stride,
                      const Dims& d, std::int64_t parts, int threads) {
  const std::int64_t size = pre.param_grad_size();
  if (size == 0) return;
#pragma omp parallel for num_threads(int(std::min<std::int64_t>(threads, d.H))) schedule(static)
  for (std::int64_t h = 0; h < d.H; ++h) {
    pre.store_param_grads(h, sum_head_accumulators(grads, stride, size, d, parts, h), d_weight,
                          d_bias);
  }
}

// Per-(token, head) sums of a norm over heads go to sums[((b·N + n)·H + h)·2 + {0, 1}].
template <class T>
void scatter_row_sums(const T* row_sums, const std::int64_t* tokens, int rows, std::int64_t b,
                      std::int64_t h, std::int64_t N, std::int64_t H, T* sums) {
  for (int r = 0; r < rows; ++r) {
    T* out = sums + ((b * N + tokens[r]) * H + h) * 2;
    out[0] = row_sums[2 * r];
    out[1] = row_sums[2 * r + 1];
  }
}


// The query pass's slot per task: dS [F][Dvp], then dz [Fp] (state_slot), then the q map's
// parameter gradient, then the q norm's (dw, db); one cascade sums all four.
template <class T>
std::int64_t query_slot(const Dims& d, const FeatureMap<T>& q_map, const PreTransform<T>& q_pre) {
  return state_slot<T>(d) + q_map.param_grad_size() + q_pre.param_grad_size();
}

// Where a pass writes its norm's weight and bias gradients (both absent without a norm).
struct NormGrads {
  std::optional<View> weight, bias;
};

// 1. queries. `dstate` holds B·H·q_parts query_slots; each head's parts are reduced into its
// first slot (dS, dz there in state_slot layout). The q map's parameter gradients are written
// to d_q_params, the q norm's to d_norm; `pre` applies q's norm (statistics `stats`) and RoPE.
template <class E, class T>
void run_queries(const View& grad_out, const View& q, const View& state, const View& normaliser,
                 const View& dq, const std::vector<View>& d_q_params, const Dims& d,
                 const FeatureMap<T>& q_map, const NormArg& norm, const RopeArg& rope,
                 const std::optional<View>& stats, const NormGrads& d_norm, T eps,
                 std::int64_t q_parts, T* dstate, int threads) {
  const std::int64_t BH = d.B * d.H, F = d.F, Dv = d.Dv;
  const std::int64_t Dp = padded<T>(d.D), Fp = padded<T>(F), Dvp = padded<T>(Dv);
  const PreTransform<T> q_pre(norm, rope, stats, d.D);
  const std::int64_t q_grad_offset = state_slot<T>(d);
  const std::int64_t q_norm_offset = q_grad_offset + q_map.param_grad_size();
  const std::int64_t slot = query_slot<T>(d, q_map, q_pre);
  Buffer<T> q_sums(q_pre.norm_over_heads() ? d.B * d.Nq * d.H * 2 : 0);

  ScratchLayout<T> ql;
  const std::int64_t o_x = ql.add(kBlock * Dp), o_phi = ql.add(kBlock * Fp),
                     o_do = ql.add(kBlock * Dvp), o_g = ql.add(kBlock * Fp),
                     o_dx = ql.add(kBlock * Dp), o_St = ql.add(Dv * Fp), o_z = ql.add(Fp),
                     o_inv = ql.add(kBlock), o_ws = ql.add(q_map.workspace_size(kBlock)),
                     o_raw = ql.add(q_pre.active() ? kBlock * Dp : 0),
                     o_pre = ql.add(q_pre.workspace_size()), o_rs = ql.add(2 * kBlock);
  const std::int64_t q_cascade_buffers =
      cascade_buffers_for_tokens((d.Nq + q_parts - 1) / q_parts);
  const std::int64_t o_cascade = ql.add(q_cascade_buffers * slot);
  const int q_threads = int(std::min<std::int64_t>(threads, BH * q_parts));
  Buffer<T> q_scratch(q_threads * ql.size());

#pragma omp parallel for num_threads(q_threads) schedule(dynamic, 1)
  for (std::int64_t task = 0; task < BH * q_parts; ++task) {
    const std::int64_t bh = task / q_parts, part = task % q_parts, b = bh / d.H, h = bh % d.H;
    T* scratch = q_scratch.data() + omp_get_thread_num() * ql.size();
    T *x = scratch + o_x, *phi = scratch + o_phi, *dob = scratch + o_do, *g = scratch + o_g,
      *dx = scratch + o_dx, *St = scratch + o_St, *z = scratch + o_z, *inv = scratch + o_inv,
      *ws = scratch + o_ws, *raw = scratch + o_raw, *pre_ws = scratch + o_pre,
      *row_sums = scratch + o_rs;
    CascadeSum<T> sums(scratch + o_cascade, q_cascade_buffers, slot);

    // From the forward: z, and Sᵀ [Dv][Fp], the B operand of g = do Sᵀ (g_i = S do_i).
    const T* S_base = state.as<T>() + b * state.stride[0] + h * state.stride[1];
    for (std::int64_t e = 0; e < Dv; ++e) {
      for (std::int64_t f = 0; f < Fp; ++f) {
        St[e * Fp + f] = f < F ? S_base[f * state.stride[2] + e * state.stride[3]] : T(0);
      }
    }
    read_vector(normaliser, b, h, z, Fp);

    const RowSlice<const E> q_rows(q, b, h), do_rows(grad_out, b, h);
    const RowSlice<E> dq_rows(dq, b, h);
    std::int64_t tokens[kBlock];
    std::int64_t begin, end;
    part_range(d.Nq, q_parts, part, &begin, &end);
    q_map.begin_head(h, ws);
    PreTransform<T> pre = q_pre;
    if (pre.active()) pre.begin(b, h, pre_ws);
    for (std::int64_t n0 = begin; n0 < end; n0 += kBlock) {
      const std::int64_t next_end = std::min(n0 + 2 * kBlock, end);
      prefetch_rows(q_rows, n0 + kBlock, next_end, d.D, false);
      prefetch_rows(do_rows, n0 + kBlock, next_end, Dv, false);
      prefetch_rows(dq_rows, n0 + kBlock, next_end, d.D, true);
      const int count = int(std::min<std::int64_t>(kBlock, end - n0));
      const int rows = consecutive_tokens(n0, count, tokens);
      T* dS = sums.chunk();
      T* dz = dS + F * Dvp;
      T* grad_acc = dS + q_grad_offset;
      T* norm_acc = dS + q_norm_offset;
      if (pre.active()) {
        load_rows(q_rows, tokens, rows, d.D, raw, Dp);
        pre.forward(rows, tokens, raw, Dp, x, Dp, pre_ws);
      } else {
        load_rows(q_rows, tokens, rows, d.D, x, Dp);
      }
      q_map.forward(rows, x, Dp, phi, Fp, ws);
      load_rows(do_rows, tokens, rows, Dv, dob, Dvp);
      gemm<T>(rows, Fp, Dv, dob, Dvp, 1, St, Fp, g, Fp, false);
      for (int r = 0; r < rows; ++r) {
        const T* phi_r = phi + r * Fp;
        T* g_r = g + r * Fp;
        const T inv_den = T(1) / (dot(phi_r, z, F) + eps);
        const T dden = -dot(phi_r, g_r, F) * inv_den * inv_den;
        for (std::int64_t f = 0; f < F; ++f) {
          g_r[f] = g_r[f] * inv_den + dden * z[f];  // g becomes dφ(q)
          dz[f] += dden * phi_r[f];
        }
        inv[r] = inv_den;
      }
      q_map.backward(rows, x, Dp, phi, Fp, g, Fp, dx, Dp, ws, grad_acc);
      if (pre.active()) {
        pre.backward(rows, tokens, raw, Dp, dx, Dp, dx, Dp, pre_ws, norm_acc, row_sums);
        if (pre.norm_over_heads()) scatter_row_sums(row_sums, tokens, rows, b, h, d.Nq, d.H, q_sums.data());
      }
      store_rows(dq_rows, tokens, rows, d.D, dx, Dp, static_cast<const T*>(nullptr));
      // dS += (φ(q)/den)ᵀ do: scale φ's rows in place (the map is done with them).
      for (int r = 0; r < rows; ++r) {
        for (std::int64_t f = 0; f < F; ++f) phi[r * Fp + f] *= inv[r];
      }
      gemm<T>(F, Dvp, rows, phi, 1, Fp, dob, Dvp, dS, Dvp, true);
      sums.block_done();
    }
    sums.finish(dstate + task * slot);
  }

#pragma omp parallel for num_threads(int(std::min<std::int64_t>(threads, BH))) schedule(static)
  for (std::int64_t bh = 0; bh < BH; ++bh) {
    reduce_parts(dstate + bh * q_parts * slot, q_parts, slot, q_grad_offset);
  }
  store_param_grads(q_map, d_q_params, dstate + q_grad_offset, slot, d, q_parts, threads);
  store_norm_grads(q_pre, d_norm.weight, d_norm.bias, dstate + q_norm_offset, slot, d, q_parts,
                   threads);
  if (q_pre.norm_over_heads()) {
    finish_norm_over_heads(q, dq, norm, *stats, q_sums.data(), KeyMask{}, threads);
  }
}

// 2. keys, from the heads' dS, dz at dstates + bh·head_stride (state_slot layout). The k map's
// parameter gradients are written to d_k_params, the k norm's to d_norm; `pre` applies k's norm
// (statistics `stats`) and RoPE.
template <class E, class T>
void run_keys(const View& k, const View& v, const std::optional<View>& key_mask, const View& dk,
              const View& dv, const std::vector<View>& d_k_params, const Dims& d,
              const FeatureMap<T>& k_map, const NormArg& norm, const RopeArg& rope,
              const std::optional<View>& stats, const NormGrads& d_norm, const T* dstates,
              std::int64_t head_stride, int threads) {
  const std::int64_t BH = d.B * d.H, F = d.F, Dv = d.Dv;
  const std::int64_t Dp = padded<T>(d.D), Fp = padded<T>(F), Dvp = padded<T>(Dv);
  const KeyMask mask = key_mask_of(key_mask);
  const PreTransform<T> k_pre(norm, rope, stats, d.D);
  const std::int64_t k_parts = choose_splits(BH, d.Nk, threads, kMinReducedPartTokens);
  // The map's parameter gradient and the norm's (dw, db) sum over every key like dS: one
  // cascade per task sums both (0: neither has parameters).
  const std::int64_t k_grad_size = k_map.param_grad_size();
  const std::int64_t k_norm_size = k_pre.param_grad_size();
  const std::int64_t k_sum_size = k_grad_size + k_norm_size;
  Buffer<T> k_grads(BH * k_parts * k_sum_size);
  const std::int64_t k_cascade_buffers =
      k_sum_size ? cascade_buffers_for_tokens((d.Nk + k_parts - 1) / k_parts) : 0;
  // Zero-filled: masked keys leave their entries 0 (finish_norm_over_heads skips them anyway).
  Buffer<T> k_sums(k_pre.norm_over_heads() ? d.B * d.Nk * d.H * 2 : 0);

  ScratchLayout<T> kl;
  const std::int64_t p_x = kl.add(kBlock * Dp), p_phi = kl.add(kBlock * Fp),
                     p_v = kl.add(kBlock * Dvp), p_dphi = kl.add(kBlock * Fp),
                     p_dv = kl.add(kBlock * Dvp), p_dx = kl.add(kBlock * Dp),
                     p_dSt = kl.add(Dv * Fp), p_ws = kl.add(k_map.workspace_size(kBlock)),
                     p_cascade = kl.add(k_cascade_buffers * k_sum_size),
                     p_raw = kl.add(k_pre.active() ? kBlock * Dp : 0),
                     p_pre = kl.add(k_pre.workspace_size()), p_rs = kl.add(2 * kBlock);
  const int k_threads = int(std::min<std::int64_t>(threads, BH * k_parts));
  Buffer<T> k_scratch(k_threads * kl.size());

#pragma omp parallel for num_threads(k_threads) schedule(dynamic, 1)
  for (std::int64_t task = 0; task < BH * k_parts; ++task) {
    const std::int64_t bh = task / k_parts, part = task % k_parts, b = bh / d.H, h = bh % d.H;
    T* scratch = k_scratch.data() + omp_get_thread_num() * kl.size();
    T *x = scratch + p_x, *phi = scratch + p_phi, *vb = scratch + p_v, *dphi = scratch + p_dphi,
      *dvb = scratch + p_dv, *dx = scratch + p_dx, *dSt = scratch + p_dSt, *ws = scratch + p_ws,
      *raw = scratch + p_raw, *pre_ws = scratch + p_pre, *row_sums = scratch + p_rs;
    // dS [F][Dvp] and dz of this head; dSᵀ [Dv][Fp].
    const T* dS = dstates + bh * head_stride;
    const T* dz = dS + F * Dvp;
    transpose(dS, F, Dv, Dvp, dSt, Fp);
    std::optional<CascadeSum<T>> grad_sums;
    if (k_sum_size) grad_sums.emplace(scratch + p_cascade, k_cascade_buffers, k_sum_size);

    const RowSlice<const E> k_rows(k, b, h), v_rows(v, b, h);
    const RowSlice<E> dk_rows(dk, b, h), dv_rows(dv, b, h);
    std::int64_t kept[kBlock], dropped[kBlock];
    std::int64_t begin, end;
    part_range(d.Nk, k_parts, part, &begin, &end);
    k_map.begin_head(h, ws);
    PreTransform<T> pre = k_pre;
    if (pre.active()) pre.begin(b, h, pre_ws);
    for (std::int64_t n0 = begin; n0 < end; n0 += kBlock) {
      const std::int64_t next_end = std::min(n0 + 2 * kBlock, end);
      prefetch_rows(k_rows, n0 + kBlock, next_end, d.D, false);
      prefetch_rows(v_rows, n0 + kBlock, next_end, Dv, false);
      prefetch_rows(dk_rows, n0 + kBlock, next_end, d.D, true);
      prefetch_rows(dv_rows, n0 + kBlock, next_end, Dv, true);
      const int count = int(std::min<std::int64_t>(kBlock, end - n0));
      const int rows = mask.partition(b, n0, count, kept, dropped);
      store_zero_rows(dk_rows, dropped, count - rows, d.D);
      store_zero_rows(dv_rows, dropped, count - rows, Dv);
      if (rows == 0) {
        if (grad_sums) grad_sums->block_done();
        continue;
      }
      T* grad_acc = grad_sums ? grad_sums->chunk() : nullptr;
      T* norm_acc = grad_sums ? grad_sums->chunk() + k_grad_size : nullptr;
      if (pre.active()) {
        load_rows(k_rows, kept, rows, d.D, raw, Dp);
        pre.forward(rows, kept, raw, Dp, x, Dp, pre_ws);
      } else {
        load_rows(k_rows, kept, rows, d.D, x, Dp);
      }
      k_map.forward(rows, x, Dp, phi, Fp, ws);
      load_rows(v_rows, kept, rows, Dv, vb, Dvp);
      gemm<T>(rows, Fp, Dv, vb, Dvp, 1, dSt, Fp, dphi, Fp, false);
      for (int r = 0; r < rows; ++r) {
        for (std::int64_t f = 0; f < F; ++f) dphi[r * Fp + f] += dz[f];
      }
      gemm<T>(rows, Dvp, F, phi, Fp, 1, dS, Dvp, dvb, Dvp, false);
      store_rows(dv_rows, kept, rows, Dv, dvb, Dvp, static_cast<const T*>(nullptr));
      k_map.backward(rows, x, Dp, phi, Fp, dphi, Fp, dx, Dp, ws, grad_acc);
      if (pre.active()) {
        pre.backward(rows, kept, raw, Dp, dx, Dp, dx, Dp, pre_ws, norm_acc, row_sums);
        if (pre.norm_over_heads()) scatter_row_sums(row_sums, kept, rows, b, h, d.Nk, d.H, k_sums.data());
      }
      store_rows(dk_rows, kept, rows, d.D, dx, Dp, static_cast<const T*>(nullptr));
      if (grad_sums) grad_sums->block_done();
    }
    if (grad_sums) grad_sums->finish(k_grads.data() + task * k_sum_size);
  }
  store_param_grads(k_map, d_k_params, k_grads.data(), k_sum_size, d, k_parts, threads);
  store_norm_grads(k_pre, d_norm.weight, d_norm.bias, k_grads.data() + k_grad_size, k_sum_size, d,
                   k_parts, threads);
  if (k_pre.norm_over_heads()) {
    finish_norm_over_heads(k, dk, norm, *stats, k_sums.data(), mask, threads);
  }
}

template <class E, class T>
void run_backward(const BackwardArgs& a, const Dims& d, const FeatureMap<T>& q_map,
                  const FeatureMap<T>& k_map, int threads) {
  const std::int64_t q_parts = choose_splits(d.B * d.H, d.Nq, threads, kMinReducedPartTokens);
  const PreTransform<T> q_pre(a.pre.q_norm, a.pre.rope, a.pre.q_stats, d.D);
  const std::int64_t slot = query_slot<T>(d, q_map, q_pre);
  Buffer<T> dstate(d.B * d.H * q_parts * slot);
  run_queries<E, T>(a.grad_out, a.q, a.state, a.normaliser, a.dq, a.d_q_params, d, q_map,
                    a.pre.q_norm, a.pre.rope, a.pre.q_stats,
                    NormGrads{a.d_q_norm_weight, a.d_q_norm_bias}, T(a.eps), q_parts,
                    dstate.data(), threads);
  // The key pass reads the reduced dS, dz where the query pass left them.
  run_keys<E, T>(a.k, a.v, a.key_mask, a.dk, a.dv, a.d_k_params, d, k_map, a.pre.k_norm,
                 a.pre.rope, a.pre.k_stats, NormGrads{a.d_k_norm_weight, a.d_k_norm_bias},
                 dstate.data(), q_parts * slot, threads);
}

template <class T>
void backward_typed(const BackwardArgs& a, Dims d) {
  MapPair<T> maps = make_maps<T>(a.q_map.name, a.q_map.params, a.k_map.name, a.k_map.params, &d);
  const DType dt = a.q.dtype, sdt = state_dtype(dt);
  check_tensor(a.grad_out, {d.B, d.Nq, d.H, d.Dv}, dt, "grad_out", "(B, Nq, H, Dv)", "q's dtype");
  check_state(a.state, a.normaliser, d, dt, "state", "normaliser");
  check_tensor(a.dq, {d.B, d.Nq, d.H, d.D}, dt, "dq", "(B, Nq, H, D)", "q's dtype");
  check_tensor(a.dk, {d.B, d.Nk, d.H, d.D}, dt, "dk", "(B, Nk, H, D)", "k's dtype");
  check_tensor(a.dv, {d.B, d.Nk, d.H, d.Dv}, dt, "dv", "(B, Nk, H, Dv)", "v's dtype");
  maps.q->check_param_grads(a.d_q_params, "d_q_params");
  maps.k->check_param_grads(a.d_k_params, "d_k_params");
  check_norm(a.pre.q_norm, a.pre.q_stats, d.B, d.Nq, d.H, d.D, sdt, "q_norm");
  check_norm(a.pre.k_norm, a.pre.k_stats, d.B, d.Nk, d.H, d.D, sdt, "k_norm");
  check_rope(a.pre.rope, d.B, std::min(d.Nq, d.Nk), d.H, d.D);
  check_norm_grads(a.pre.q_norm, a.d_q_norm_weight, a.d_q_norm_bias, d.H, d.D, "q_norm");
  check_norm_grads(a.pre.k_norm, a.d_k_norm_weight, a.d_k_norm_bias, d.H, d.D, "k_norm");
  const int threads = resolve_threads(a.num_threads);
  visit_elements<T>(dt, [&](auto tag) {
    run_backward<typename decltype(tag)::type, T>(a, d, *maps.q, *maps.k, threads);
  });
}

template <class T>
void queries_typed(const QueryGradArgs& a, Dims d) {
  const auto q_map = make_feature_map<T>(a.q_map.name, a.q_map.params, d.H, d.D, "q_map");
  d.F = q_map->features();
  const DType dt = a.q.dtype;
  expect_rank(a.grad_out, 4, "grad_out", "(B, Nq, H, Dv)");
  d.Dv = a.grad_out.shape[3];
  check_tensor(a.grad_out, {d.B, d.Nq, d.H, d.Dv}, dt, "grad_out", "(B, Nq, H, Dv)", "q's dtype");
  check_state(a.state, a.normaliser, d, dt, "state", "normaliser");
  check_state(a.d_state, a.d_normaliser, d, dt, "d_state", "d_normaliser");
  check_tensor(a.dq, {d.B, d.Nq, d.H, d.D}, dt, "dq", "(B, Nq, H, D)", "q's dtype");
  q_map->check_param_grads(a.d_q_params, "d_q_params");
  check_norm(a.pre.q_norm, a.pre.q_stats, d.B, d.Nq, d.H, d.D, state_dtype(dt), "q_norm");
  check_rope(a.pre.rope, d.B, d.Nq, d.H, d.D);
  check_norm_grads(a.pre.q_norm, a.d_norm_weight, a.d_norm_bias, d.H, d.D, "q_norm");
  const int threads = resolve_threads(a.num_threads);
  const std::int64_t q_parts = choose_splits(d.B * d.H, d.Nq, threads, kMinReducedPartTokens);
  const PreTransform<T> q_pre(a.pre.q_norm, a.pre.rope, a.pre.q_stats, d.D);
  const std::int64_t slot = query_slot<T>(d, *q_map, q_pre), Dvp = padded<T>(d.Dv);
  Buffer<T> dstate(d.B * d.H * q_parts * slot);
  visit_elements<T>(dt, [&](auto tag) {
    run_queries<typename decltype(tag)::type, T>(a.grad_out, a.q, a.state, a.normaliser, a.dq,
                                                 a.d_q_params, d, *q_map, a.pre.q_norm,
                                                 a.pre.rope, a.pre.q_stats,
                                                 NormGrads{a.d_norm_weight, a.d_norm_bias},
                                                 T(a.eps), q_parts,
                                                 dstate.data(), threads);
  });
  for (std::int64_t bh = 0; bh < d.B * d.H; ++bh) {
    const T* total = dstate.data() + bh * q_parts * slot;
    write_matrix(a.d_state, bh / d.H, bh % d.H, total, Dvp);
    write_vector(a.d_normaliser, bh / d.H, bh % d.H, total + d.F * Dvp);
  }
}

template <class T>
void keys_typed(const KeyGradArgs& a, Dims d) {
  const auto k_map = make_feature_map<T>(a.k_map.name, a.k_map.params, d.H, d.D, "k_map");
  d.F = k_map->features();
  const DType dt = a.k.dtype;
  check_state(a.d_state, a.d_normaliser, d, dt, "d_state", "d_normaliser");
  check_tensor(a.dk, {d.B, d.Nk, d.H, d.D}, dt, "dk", "(B, Nk, H, D)", "k's dtype");
  check_tensor(a.dv, {d.B, d.Nk, d.H, d.Dv}, dt, "dv", "(B, Nk, H, Dv)", "v's dtype");
  k_map->check_param_grads(a.d_k_params, "d_k_params");
  check_norm(a.pre.k_norm, a.pre.k_stats, d.B, d.Nk, d.H, d.D, state_dtype(dt), "k_norm");
  check_rope(a.pre.rope, d.B, d.Nk, d.H, d.D);
  check_norm_grads(a.pre.k_norm, a.d_norm_weight, a.d_norm_bias, d.H, d.D, "k_norm");
  const int threads = resolve_threads(a.num_threads);
  // Stage the given dS, dz in the layout the pass reads (Buffer zero-fills the padding).
  const std::int64_t slot = state_slot<T>(d), Dvp = padded<T>(d.Dv);
  Buffer<T> dstates(d.B * d.H * slot);
  for (std::int64_t bh = 0; bh < d.B * d.H; ++bh) {
    T* dS = dstates.data() + bh * slot;
    read_matrix(a.d_state, bh / d.H, bh % d.H, dS, Dvp);
    read_vector(a.d_normaliser, bh / d.H, bh % d.H, dS + d.F * Dvp, padded<T>(d.F));
  }
  visit_elements<T>(dt, [&](auto tag) {
    run_keys<typename decltype(tag)::type, T>(a.k, a.v, a.key_mask, a.dk, a.dv, a.d_k_params, d,
                                              *k_map, a.pre.k_norm, a.pre.rope, a.pre.k_stats,
                                              NormGrads{a.d_norm_weight, a.d_norm_bias},
                                              dstates.data(), slot, threads);
  });
}

}  // namespace

void cpu_backward(const BackwardArgs& a) {
  const Dims d = check_inputs(a.q, a.k, a.v, a.key_mask, a.eps);
  if (a.q.dtype == DType::float64) {
    backward_typed<double>(a, d);
  } else {
    backward_typed<float>(a, d);
  }
}

void cpu_backward_queries(const QueryGradArgs& a) {
  const Dims d = check_queries(a.q, a.eps);
  if (a.q.dtype == DType::float64) {
    queries_typed<double>(a, d);
  } else {
    queries_typed<float>(a, d);
  }
}

void cpu_backward_keys(const KeyGradArgs& a) {
  const Dims d = check_keys(a.k, a.v, a.key_mask);
  if (a.k.dtype == DType::float64) {
    keys_typed<double>(a, d);
  } else {
    keys_typed<float>(a, d);
  }
}

}  // namespace linattn
