// How the sequence of each (batch, head) is split into tasks for the OpenMP threads.
#pragma once

#include <algorithm>
#include <cstdint>

namespace linattn {

// Tokens per block: a block's rows of x, φ, v (64 x 64 fp32: 16 KB each) stay in L1/L2 while
// the micro-kernels run over them, and the 64-long K loop of a rank-block update amortises
// loading and storing its register tile.
constexpr int kBlock = 64;

// The shortest part of a sequence whose pass ends in a reduction of per-part partials (S, z in
// the forward; dS, dz, dW in the backward): its F x Dv partial and its share of the reduction
// must be small next to reading its tokens (512 tokens of k and v hold 1024/D times the elements
// of one partial when F = D = Dv: 8x at D = 128).
constexpr std::int64_t kMinReducedPartTokens = 512;

// The number of parts to cut each of `bh` sequences of `n` tokens into, so that the bh·parts
// equal-sized tasks keep `threads` threads busy: the fewest parts whose last round of tasks
// leaves at most 10% of the thread-time idle, each part at least `min_tokens` long. Fewer parts
// is better where partial results must be reduced (the states S, z and dS, dz cost one
// F x Dv matrix per part), so the search stops at the first good count.
inline std::int64_t choose_splits(std::int64_t bh, std::int64_t n, int threads,
                                  std::int64_t min_tokens) {
  const std::int64_t max_parts = std::max<std::int64_t>(1, n / min_tokens);
  std::int64_t best = 1;
  double best_busy = 0.0;
  for (std::int64_t parts = 1; parts <= max_parts; ++parts) {
    const std::int64_t tasks = bh * parts;
    const std::int64_t rounds = (tasks + threads - 1) / threads;
    const double busy = double(tasks) / double(rounds * threads);
    if (busy >= 0.9) return parts;
    if (busy > best_busy) {
      best = parts;
      best_busy = busy;
    }
    if (tasks >= 64 * std::int64_t(threads)) break;  // enough tasks; more only adds reductions
  }
  return best;
}

// [begin, end) of part `part` of `parts` over n tokens, the parts as equal as possible.
inline void part_range(std::int64_t n, std::int64_t parts, std::int64_t part, std::int64_t* begin,
                       std::int64_t* end) {
  const std::int64_t base = n / parts, extra = n % parts;
  *begin = part * base + std::min(part, extra);
  *end = *begin + base + (part < extra ? 1 : 0);
}

// Sums the `parts` partials of `size` elements at acc + i·stride into the first, pairwise
// (part 0 += part 1, part 2 += part 3, ..., then 0 += 2, ...): a tree whose shape depends only
// on `parts`, so the result does not depend on which thread finished first, and whose error
// grows like log(parts), not parts (cascade.h says why that matters).
template <class T>
void reduce_parts(T* acc, std::int64_t parts, std::int64_t stride, std::int64_t size) {
  for (std::int64_t step = 1; step < parts; step *= 2) {
    for (std::int64_t part = 0; part + step < parts; part += 2 * step) {
      T* __restrict into = acc + part * stride;
      const T* __restrict p = acc + (part + step) * stride;
      for (std::int64_t i = 0; i < size; ++i) into[i] += p[i];
    }
  }
}

}  // namespace linattn
