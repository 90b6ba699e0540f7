// numbabn's pool of reused output buffers, shared by its compiled framework ops
// (keras_layer/_native/numbabn_ops.cc, numbabn/torch/_native/numbabn_torch.cc): header
// only, so each op library holds a pool of its own.
//
// Why: the frameworks' CPU allocators hand out fresh pages for every large tensor (a
// 51 MB output: 12,500 page faults, ~15-30 ms a call here); a pooled buffer is faulted in
// once (and asked for transparent huge pages). A buffer returns to the pool when the
// framework drops its last reference to the tensor that owns it, so no buffer is reused
// while anything reads it. The pool keeps at most NUMBABN_POOL_MB (default 1024) MB of
// free buffers, freeing the least recently freed beyond that.

#ifndef NUMBABN_BUFFER_POOL_H_
#define NUMBABN_BUFFER_POOL_H_

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

namespace numbabn {

class BufferPool {
 public:
  static BufferPool& Get() {
    static BufferPool* pool = new BufferPool();  // never destroyed: buffers outlive exit
    return *pool;
  }

  void* Acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second.data;
        free_.erase(it);
        cached_ -= Footprint(bytes);
        return p;
      }
    }
    // Aligned to a huge page, so that the advice can cover the whole buffer: madvise
    // takes page-aligned ranges only (on malloc's 16-byte-offset block it fails with
    // EINVAL, which is what this did before). Advice only: ignored where THP is off.
    const size_t align = Alignment(bytes);
    void* p = std::aligned_alloc(align, Footprint(bytes));
    if (p != nullptr && align == kHugePage) madvise(p, Footprint(bytes), MADV_HUGEPAGE);
    return p;
  }

  void Release(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.emplace(bytes, Entry{p, ++clock_});
      cached_ += Footprint(bytes);  // the cap counts what was allocated
      while (cached_ > limit_ && !free_.empty()) {  // the least recently freed first
        auto oldest = free_.begin();
        for (auto it = free_.begin(); it != free_.end(); ++it) {
          if (it->second.stamp < oldest->second.stamp) oldest = it;
        }
        cached_ -= Footprint(oldest->first);
        drop.push_back(oldest->second.data);
        free_.erase(oldest);
      }
    }
    for (void* q : drop) std::free(q);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

  static constexpr size_t kAlign = 64;
  static constexpr size_t kHugePage = 2 << 20;
  static constexpr size_t kMinBytes = 256 << 10;

 private:
  struct Entry {
    void* data;
    uint64_t stamp;
  };

  static size_t Alignment(size_t bytes) { return bytes >= kHugePage ? kHugePage : kAlign; }
  // The bytes a buffer of `bytes` occupies: rounded up to its alignment (a 2 MiB + 1 byte
  // buffer takes 4 MiB)
  static size_t Footprint(size_t bytes) {
    return (bytes + Alignment(bytes) - 1) / Alignment(bytes) * Alignment(bytes);
  }

  BufferPool() {
    const char* mb = std::getenv("NUMBABN_POOL_MB");
    limit_ = (mb ? std::strtoull(mb, nullptr, 10) : 1024ull) << 20;
  }

  std::mutex mu_;
  std::multimap<size_t, Entry> free_;
  size_t cached_ = 0, limit_ = 0;
  uint64_t clock_ = 0;
};

}  // namespace numbabn

#endif  // NUMBABN_BUFFER_POOL_H_
