// Scratch memory: 64-byte aligned buffers, carved into per-thread pieces.
//
// Every buffer a call needs is allocated before its parallel region (so an allocation failure
// is an exception on the calling thread, never inside OpenMP) and zero-filled, so that padding
// a pass never writes reads as zero.
#pragma once

#include <cstdint>
#include <cstring>
#include <new>

namespace linattn {

constexpr std::int64_t kAlignBytes = 64;  // a cache line: pieces of two threads never share one

template <class T>
class Buffer {
 public:
  explicit Buffer(std::int64_t elems) : size_(elems) {
    if (elems > 0) {
      data_ = static_cast<T*>(::operator new(sizeof(T) * elems, std::align_val_t(kAlignBytes)));
      std::memset(static_cast<void*>(data_), 0, sizeof(T) * elems);
    }
  }
  ~Buffer() {
    if (data_) ::operator delete(data_, std::align_val_t(kAlignBytes));
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  T* data() const { return data_; }
  std::int64_t size() const { return size_; }

 private:
  T* data_ = nullptr;
  std::int64_t size_ = 0;
};

// Offsets of named pieces inside one thread's scratch, each starting on a cache line.
template <class T>
class ScratchLayout {
 public:
  std::int64_t add(std::int64_t elems) {
    const std::int64_t offset = size_;
    constexpr std::int64_t per_line = kAlignBytes / sizeof(T);
    size_ += (elems + per_line - 1) / per_line * per_line;
    return offset;
  }
  std::int64_t size() const { return size_; }

 private:
  std::int64_t size_ = 0;
};

}  // namespace linattn
