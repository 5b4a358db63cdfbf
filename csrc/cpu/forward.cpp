// The forward pass: one pass over k, v per (batch, head) for the state, one over q for o.
//
//   0. stats   for a q or k norm over all heads: mean and rstd per token (pre_attention.cpp).
//   1. state   tasks (b, h, key part): per block of kept keys, x = RoPE(norm(k rows)) (just the
//              k rows without pre-attention work), φ = φ(x), then
//              S += φᵀ v (register-blocked rank-block update) and z += Σ φ, into a chunk of a
//              pairwise cascade (cascade.h: the error does not grow with N). Parts of a
//              sequence are reduced pairwise in a fixed tree, so the result does not depend on
//              thread timing.
//   2. output  tasks (b, h, query part): S and z staged in scratch; per block of queries,
//              x = RoPE(norm(q rows)), num = φ(x) S, den = φ(x)·z + eps, o = num / den
//              written in o's dtype.
//
// cpu_forward runs both; cpu_forward_state and cpu_forward_output run one each (the phases a
// context-parallel caller separates with an all-reduce of S and z, linear_attention.h), each
// with its own side's pre-attention work (and the statistics of that side's norm).
#include <omp.h>

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

// Output parts need no reduction; they only have to amortise staging S.
constexpr std::int64_t kMinOutputTokens = 128;

// 1. state. `partials` holds B·H·k_parts slots (zeroed); each head's parts are reduced into
// its first slot, which is also written to S and z.
template <class E, class T>
void run_state(const View& k, const View& v, const std::optional<View>& key_mask, const Dims& d,
               const FeatureMap<T>& k_map, const PreTransform<T>& k_pre, std::int64_t k_parts,
               T* partials, const View& state, const View& normaliser, int threads) {
  const std::int64_t BH = d.B * d.H, F = d.F;
  const std::int64_t Dp = padded<T>(d.D), Fp = padded<T>(F), Dvp = padded<T>(d.Dv);
  const KeyMask mask = key_mask_of(key_mask);
  const std::int64_t slot = state_slot<T>(d);

  ScratchLayout<T> sl;
  const std::int64_t cascade_buffers = cascade_buffers_for_tokens((d.Nk + k_parts - 1) / k_parts);
  const std::int64_t o_x = sl.add(kBlock * Dp), o_phi = sl.add(kBlock * Fp),
                     o_v = sl.add(kBlock * Dvp), o_ws = sl.add(k_map.workspace_size(kBlock)),
                     o_cascade = sl.add(cascade_buffers * slot),
                     o_pre = sl.add(k_pre.workspace_size());
  const int state_threads = int(std::min<std::int64_t>(threads, BH * k_parts));
  Buffer<T> state_scratch(state_threads * sl.size());

#pragma omp parallel for num_threads(state_threads) schedule(dynamic, 1)
  for (std::int64_t task = 0; task < BH * k_parts; ++task) {
    const std::int64_t bh = task / k_parts, part = task % k_parts, b = bh / d.H, h = bh % d.H;
    T* scratch = state_scratch.data() + omp_get_thread_num() * sl.size();
    T *x = scratch + o_x, *phi = scratch + o_phi, *vb = scratch + o_v, *ws = scratch + o_ws,
      *pre_ws = scratch + o_pre;
    CascadeSum<T> sum(scratch + o_cascade, cascade_buffers, slot);
    const RowSlice<const E> k_rows(k, b, h), v_rows(v, b, h);
    std::int64_t kept[kBlock], dropped[kBlock];
    std::int64_t begin, end;
    part_range(d.Nk, k_parts, part, &begin, &end);
    k_map.begin_head(h, ws);
    PreTransform<T> pre = k_pre;
    if (pre.active()) pre.begin(b, h, pre_ws);
    for (std::int64_t n0 = begin; n0 < end; n0 += kBlock) {
      const std::int64_t next_end = std::min(n0 + 2 * kBlock, end);
      prefetch_rows(k_rows, n0 + kBlock, next_end, d.D, false);
      prefetch_rows(v_rows, n0 + kBlock, next_end, d.Dv, false);
      const int rows = mask.partition(b, n0, int(std::min<std::int64_t>(kBlock, end - n0)), kept,
                                      dropped);
      if (rows == 0) {
        sum.block_done();
        continue;
      }
      T* S = sum.chunk();
      T* z = S + F * Dvp;
      load_rows(k_rows, kept, rows, d.D, x, Dp);
      if (pre.active()) pre.forward(rows, kept, x, Dp, x, Dp, pre_ws);
      k_map.forward(rows, x, Dp, phi, Fp, ws);
      load_rows(v_rows, kept, rows, d.Dv, vb, Dvp);
      gemm<T>(F, Dvp, rows, phi, 1, Fp, vb, Dvp, S, Dvp, true);
      for (int r = 0; r < rows; ++r) {
        for (std::int64_t f = 0; f < F; ++f) z[f] += phi[r * Fp + f];
      }
      sum.block_done();
    }
    sum.finish(partials + task * slot);
  }

  // Reduce the parts of each (b, h) pairwise, then write S and z out.
#pragma omp parallel for num_threads(int(std::min<std::int64_t>(threads, BH))) schedule(static)
  for (std::int64_t bh = 0; bh < BH; ++bh) {
    T* total = partials + bh * k_parts * slot;
    reduce_parts(total, k_parts, slot, slot);
    write_matrix(state, bh / d.H, bh % d.H, total, Dvp);
    write_vector(normaliser, bh / d.H, bh % d.H, total + F * Dvp);
  }
}

// 2. output, from the heads' states at states + bh·head_stride (state_slot layout).
template <class E, class T>
void run_output(const View& q, const View& o, const Dims& d, const FeatureMap<T>& q_map,
                const PreTransform<T>& q_pre, T eps, const T* states, std::int64_t head_stride,
                int threads) {
  const std::int64_t BH = d.B * d.H, F = d.F;
  const std::int64_t Dp = padded<T>(d.D), Fp = padded<T>(F), Dvp = padded<T>(d.Dv);
  const std::int64_t q_parts = choose_splits(BH, d.Nq, threads, kMinOutputTokens);
  ScratchLayout<T> ol;
  const std::int64_t p_x = ol.add(kBlock * Dp), p_phi = ol.add(kBlock * Fp),
                     p_num = ol.add(kBlock * Dvp), p_inv = ol.add(kBlock),
                     p_ws = ol.add(q_map.workspace_size(kBlock)),
                     p_pre = ol.add(q_pre.workspace_size());
  const int out_threads = int(std::min<std::int64_t>(threads, BH * q_parts));
  Buffer<T> out_scratch(out_threads * ol.size());

#pragma omp parallel for num_threads(out_threads) schedule(dynamic, 1)
  for (std::int64_t task = 0; task < BH * q_parts; ++task) {
    const std::int64_t bh = task / q_parts, part = task % q_parts, b = bh / d.H, h = bh % d.H;
    T* scratch = out_scratch.data() + omp_get_thread_num() * ol.size();
    T *x = scratch + p_x, *phi = scratch + p_phi, *num = scratch + p_num, *inv = scratch + p_inv,
      *ws = scratch + p_ws, *pre_ws = scratch + p_pre;
    // The reduced state, read in place (every thread only reads it): S [F][Dvp] with zero
    // padding columns (they were only ever added zeros), then z.
    const T* S = states + bh * head_stride;
    const T* z = S + F * Dvp;
    const RowSlice<const E> q_rows(q, b, h);
    const RowSlice<E> o_rows(o, b, h);
    std::int64_t tokens[kBlock];
    std::int64_t begin, end;
    part_range(d.Nq, q_parts, part, &begin, &end);
    q_map.begin_head(h, ws);
    PreTransform<T> pre = q_pre;
    if (pre.active()) pre.begin(b, h, pre_ws);
    for (std::int64_t n0 = begin; n0 < end; n0 += kBlock) {
      const std::int64_t next_end = std::min(n0 + 2 * kBlock, end);
      prefetch_rows(q_rows, n0 + kBlock, next_end, d.D, false);
      prefetch_rows(o_rows, n0 + kBlock, next_end, d.Dv, true);
      const int count = int(std::min<std::int64_t>(kBlock, end - n0));
      const int rows = consecutive_tokens(n0, count, tokens);
      load_rows(q_rows, tokens, rows, d.D, x, Dp);
      if (pre.active()) pre.forward(rows, tokens, x, Dp, x, Dp, pre_ws);
      q_map.forward(rows, x, Dp, phi, Fp, ws);
      gemm<T>(rows, Dvp, F, phi, Fp, 1, S, Dvp, num, Dvp, false);
      for (int r = 0; r < rows; ++r) inv[r] = T(1) / (dot(phi + r * Fp, z, F) + eps);
      store_rows(o_rows, tokens, rows, d.Dv, num, Dvp, inv);
    }
  }
}

template <class E, class T>
void run_forward(const ForwardArgs& a, const Dims& d, const FeatureMap<T>& q_map,
                 const FeatureMap<T>& k_map, int threads) {
  const PreTransform<T> q_pre(a.pre.q_norm, a.pre.rope, a.pre.q_stats, d.D),
      k_pre(a.pre.k_norm, a.pre.rope, a.pre.k_stats, d.D);
  // 0. statistics of norms over all heads.
  if (k_pre.norm_over_heads()) compute_norm_stats(a.k, a.pre.k_norm, *a.pre.k_stats, threads);
  if (q_pre.norm_over_heads()) compute_norm_stats(a.q, a.pre.q_norm, *a.pre.q_stats, threads);
  const std::int64_t k_parts = choose_splits(d.B * d.H, d.Nk, threads, kMinReducedPartTokens);
  const std::int64_t slot = state_slot<T>(d);
  Buffer<T> partials(d.B * d.H * k_parts * slot);
  run_state<E, T>(a.k, a.v, a.key_mask, d, k_map, k_pre, k_parts, partials.data(), a.state,
                  a.normaliser, threads);
  // The output pass reads the reduced states where the state pass left them.
  run_output<E, T>(a.q, a.o, d, q_map, q_pre, T(a.eps), partials.data(), k_parts * slot,
                   threads);
}

template <class T>
void forward_typed(const ForwardArgs& a, Dims d) {
  MapPair<T> maps = make_maps<T>(a.q_map.name, a.q_map.params, a.k_map.name, a.k_map.params, &d);
  check_tensor(a.o, {d.B, d.Nq, d.H, d.Dv}, a.q.dtype, "o", "(B, Nq, H, Dv)", "q's dtype");
  const DType sdt = state_dtype(a.q.dtype);
  check_state(a.state, a.normaliser, d, a.q.dtype, "state", "normaliser");
  check_norm(a.pre.q_norm, a.pre.q_stats, d.B, d.Nq, d.H, d.D, sdt, "q_norm");
  check_norm(a.pre.k_norm, a.pre.k_stats, d.B, d.Nk, d.H, d.D, sdt, "k_norm");
  check_rope(a.pre.rope, d.B, std::min(d.Nq, d.Nk), d.H, d.D);
  const int threads = resolve_threads(a.num_threads);
  visit_elements<T>(a.q.dtype, [&](auto tag) {
    run_forward<typename decltype(tag)::type, T>(a, d, *maps.q, *maps.k, threads);
  });
}

template <class T>
void state_typed(const StateArgs& a, Dims d) {
  const auto k_map = make_feature_map<T>(a.k_map.name, a.k_map.params, d.H, d.D, "k_map");
  d.F = k_map->features();
  check_state(a.state, a.normaliser, d, a.k.dtype, "state", "normaliser");
  check_norm(a.pre.k_norm, a.pre.k_stats, d.B, d.Nk, d.H, d.D, state_dtype(a.k.dtype), "k_norm");
  check_rope(a.pre.rope, d.B, d.Nk, d.H, d.D);
  const int threads = resolve_threads(a.num_threads);
  const PreTransform<T> k_pre(a.pre.k_norm, a.pre.rope, a.pre.k_stats, d.D);
  if (k_pre.norm_over_heads()) compute_norm_stats(a.k, a.pre.k_norm, *a.pre.k_stats, threads);
  const std::int64_t k_parts = choose_splits(d.B * d.H, d.Nk, threads, kMinReducedPartTokens);
  Buffer<T> partials(d.B * d.H * k_parts * state_slot<T>(d));
  visit_elements<T>(a.k.dtype, [&](auto tag) {
    run_state<typename decltype(tag)::type, T>(a.k, a.v, a.key_mask, d, *k_map, k_pre,
                                               k_parts, partials.data(), a.state, a.normaliser,
                                               threads);
  });
}

template <class T>
void output_typed(const OutputArgs& a, Dims d) {
  const auto q_map = make_feature_map<T>(a.q_map.name, a.q_map.params, d.H, d.D, "q_map");
  d.F = q_map->features();
  expect_rank(a.o, 4, "o", "(B, Nq, H, Dv)");
  d.Dv = a.o.shape[3];
  check_tensor(a.o, {d.B, d.Nq, d.H, d.Dv}, a.q.dtype, "o", "(B, Nq, H, Dv)", "q's dtype");
  check_state(a.state, a.normaliser, d, a.q.dtype, "state", "normaliser");
  check_norm(a.pre.q_norm, a.pre.q_stats, d.B, d.Nq, d.H, d.D, state_dtype(a.q.dtype), "q_norm");
  check_rope(a.pre.rope, d.B, d.Nq, d.H, d.D);
  const int threads = resolve_threads(a.num_threads);
  const PreTransform<T> q_pre(a.pre.q_norm, a.pre.rope, a.pre.q_stats, d.D);
  if (q_pre.norm_over_heads()) compute_norm_stats(a.q, a.pre.q_norm, *a.pre.q_stats, threads);
  // Stage the given S and z in the layout the pass reads (Buffer zero-fills the padding).
  const std::int64_t slot = state_slot<T>(d), Dvp = padded<T>(d.Dv);
  Buffer<T> states(d.B * d.H * slot);
  for (std::int64_t bh = 0; bh < d.B * d.H; ++bh) {
    T* S = states.data() + bh * slot;
    read_matrix(a.state, bh / d.H, bh % d.H, S, Dvp);
    read_vector(a.normaliser, bh / d.H, bh % d.H, S + d.F * Dvp, padded<T>(d.F));
  }
  visit_elements<T>(a.q.dtype, [&](auto tag) {
    run_output<typename decltype(tag)::type, T>(a.q, a.o, d, *q_map, q_pre, T(a.eps),
                                                states.data(), slot, threads);
  });
}

}  // namespace

void cpu_forward(const ForwardArgs& a) {
  const Dims d = check_inputs(a.q, a.k, a.v, a.key_mask, a.eps);
  if (a.q.dtype == DType::float64) {
    forward_typed<double>(a, d);
  } else {
    forward_typed<float>(a, d);
  }
}

void cpu_forward_state(const StateArgs& a) {
  const Dims d = check_keys(a.k, a.v, a.key_mask);
  if (a.k.dtype == DType::float64) {
    state_typed<double>(a, d);
  } else {
    state_typed<float>(a, d);
  }
}

void cpu_forward_output(const OutputArgs& a) {
  const Dims d = check_queries(a.q, a.eps);
  if (a.q.dtype == DType::float64) {
    output_typed<double>(a, d);
  } else {
    output_typed<float>(a, d);
  }
}

}  // namespace linattn
