// Large CPU buffers (sweeps, packed weights, transposes, panel products): from a cache of blocks that
// stay mapped, in transparent huge pages.
//
// glibc maps an allocation above its mmap threshold (at most 32 MB, often less) afresh at every call and
// unmaps it on free, and each fresh 4 KB page costs a fault when first written: about 3 us on the 2-core
// CI VM, where a long-seq LSTM training step took 85,000 of them. Huge pages alone (advised before first
// touch) cut the faults 512x, but there left a quarter of such steps 2-3x slower (fresh huge pages are
// slow to come by in a VM). So blocks of 2 MB and more are kept when freed, up to a limit, and reused for
// the next buffer of the same rounded size: the sweeps of one workload ask for the same sizes every step.
// RNNKERNELS_CPU_CACHE_MB sets how many megabytes of idle blocks are kept (default 1024; 0: none, every
// block is freed at once).
#pragma once
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace rnnkernels {

class BufferCache final : public c10::Allocator {
 public:
  static constexpr size_t kBlockAlign = size_t{2} << 20;  // a huge page

  // Never destroyed: tensors may be freed after static destructors have run.
  static BufferCache& get() {
    static BufferCache* cache = new BufferCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t bytes) override {
    const size_t size = (std::max<size_t>(bytes, 1) + kBlockAlign - 1) / kBlockAlign * kBlockAlign;
    void* data = take(size);
    if (data == nullptr) {
      data = std::aligned_alloc(kBlockAlign, size);
      TORCH_CHECK(data != nullptr, "rnnkernels: out of memory allocating a CPU buffer of ", size, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(data, size, MADV_HUGEPAGE);  // advice only: where the kernel declines, nothing changes
#endif
    }
    return {data, new Block{data, size}, &BufferCache::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    size_t size;
  };

  BufferCache() {
    const char* limit = std::getenv("RNNKERNELS_CPU_CACHE_MB");
    limit_ = (limit != nullptr ? std::strtoull(limit, nullptr, 10) : 1024) << 20;
#if defined(__linux__)
    // A fork (a DataLoader worker) while another thread holds the lock would leave it held in the child.
    pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); }, [] { get().mutex_.unlock(); });
#endif
  }

  static void release(void* context) {
    const Block* block = static_cast<const Block*>(context);
    get().put(block->data, block->size);
    delete block;
  }

  void* take(size_t size) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto found = idle_.find(size);
    if (found == idle_.end()) return nullptr;
    void* data = found->second;
    idle_.erase(found);
    idle_bytes_ -= size;
    return data;
  }

  void put(void* data, size_t size) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (idle_bytes_ + size <= limit_) {
        idle_.emplace(size, data);
        idle_bytes_ += size;
        return;
      }
    }
    std::free(data);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;  // by size
  size_t idle_bytes_ = 0;
  size_t limit_ = 0;
};

// at::empty for a buffer the caller writes in full; from BufferCache from one block's size on.
inline at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  if (bytes < static_cast<int64_t>(BufferCache::kBlockAlign)) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &BufferCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

// t itself where it is contiguous, else a contiguous copy in an empty_buffer (a gradient that autograd
// expanded from a sum: 16 MB for long-seq).
inline at::Tensor contiguous_buffer(const at::Tensor& t) {
  return t.is_contiguous() ? t : empty_buffer(t.sizes(), t.options()).copy_(t);
}

}  // namespace rnnkernels
