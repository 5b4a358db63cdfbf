// Pairwise (cascade) summation of the per-chunk partials of a reduction over a sequence.
//
// Why. S = Σ_j φ(k_j) v_jᵀ, z, dS, dz and a map's parameter gradient are sums over up to 10^5+
// tokens. Accumulated in one fp32 running sum, each term is added to a total N times its size,
// so the rounding error grows like N·u (u = 2^-24): at N = 200,000 the state carried 2–6e-6
// relative error against 1–2e-7 for PyTorch's einsum, and the backward's dq, which subtracts two
// nearly equal terms built from S and z, amplified it to 1–4e-2 in bf16 (issue 10, item 4).
//
// How. A pass accumulates kChunkBlocks token blocks at a time into a fresh (zeroed) chunk
// buffer, so no running sum holds more than kChunkBlocks·kBlock terms. Finished chunks merge
// like a binary counter: level l holds the sum of 2^l chunks, and a new chunk is added to level
// 0, the carry to level 1, and so on. That is pairwise summation over chunks: every term goes
// through log2(chunks) additions of operands of similar size, so the error grows like log N.
// The tree's shape depends only on the number of blocks, never on timing: deterministic.
//
// Cost: one add of a slot per chunk (amortised; a binary counter carries once per increment on
// average) and one zeroing, against kChunkBlocks·kBlock·F·Dv multiply-adds of the chunk's
// products: under 1% at kChunkBlocks = 4. Memory: bit_width(chunks) + 1 slots per thread.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/partition.h"

namespace linattn {

// Blocks of kBlock tokens summed in sequence before a chunk joins the tree. Four blocks keep
// the tree's adds under 1% of the products; a 256-term running sum adds at most ~16u (RMS) of
// error, about what one level of the tree adds beyond it anyway.
constexpr std::int64_t kChunkBlocks = 4;

inline int bit_width(std::uint64_t x) {
  int w = 0;
  while (x) {
    ++w;
    x >>= 1;
  }
  return w;
}

// The most levels a cascade over `chunks` chunks can occupy at once, plus the open chunk.
inline std::int64_t cascade_buffers(std::int64_t chunks) { return bit_width(chunks) + 1; }

// Buffers a cascade over `tokens` tokens needs (see CascadeSum).
inline std::int64_t cascade_buffers_for_tokens(std::int64_t tokens) {
  const std::int64_t blocks = (tokens + kBlock - 1) / kBlock;
  return cascade_buffers((blocks + kChunkBlocks - 1) / kChunkBlocks);
}

template <class T>
class CascadeSum {
 public:
  static constexpr int kMaxLevels = 64;

  // scratch: `buffers` buffers of `size` elements each (cascade_buffers_for_tokens of the
  // longest range this cascade will sum), owned by the caller.
  CascadeSum(T* scratch, std::int64_t buffers, std::int64_t size) : size_(size) {
    free_count_ = 0;
    for (std::int64_t i = buffers - 1; i >= 0; --i) free_[free_count_++] = scratch + i * size;
    for (int l = 0; l < kMaxLevels; ++l) level_[l] = nullptr;
    open_chunk();
  }

  // The buffer the current chunk accumulates into (size elements, zero at the chunk's start).
  T* chunk() const { return chunk_; }

  // Call after each block of kBlock tokens (a block whose rows were all masked too, so chunks
  // keep their token ranges): every kChunkBlocks blocks the chunk joins the tree.
  void block_done() {
    if (++blocks_in_chunk_ == kChunkBlocks) close_chunk();
  }

  // out[0, size) = the sum of every block added (0 when none was). Ends this cascade's use.
  void finish(T* out) {
    if (blocks_in_chunk_ > 0) close_chunk();
    bool first = true;
    for (int l = 0; l < kMaxLevels; ++l) {
      if (!level_[l]) continue;
      if (first) {
        std::memcpy(out, level_[l], sizeof(T) * size_);
        first = false;
      } else {
        add(out, level_[l]);
      }
    }
    if (first) std::memset(static_cast<void*>(out), 0, sizeof(T) * size_);
  }

 private:
  void open_chunk() {
    chunk_ = free_[--free_count_];
    std::memset(static_cast<void*>(chunk_), 0, sizeof(T) * size_);
    blocks_in_chunk_ = 0;
  }

  void close_chunk() {
    T* carry = chunk_;
    int l = 0;
    while (level_[l]) {  // the binary counter's carry: merge two sums of 2^l chunks each
      add(level_[l], carry);
      free_[free_count_++] = carry;
      carry = level_[l];
      level_[l] = nullptr;
      ++l;
    }
    level_[l] = carry;
    open_chunk();
  }

  void add(T* __restrict acc, const T* __restrict x) const {
    for (std::int64_t i = 0; i < size_; ++i) acc[i] += x[i];  // vectorises (no reordering)
  }

  std::int64_t size_;
  T* chunk_ = nullptr;
  std::int64_t blocks_in_chunk_ = 0;
  T* level_[kMaxLevels];
  T* free_[kMaxLevels + 1];
  int free_count_ = 0;
};

}  // namespace linattn
