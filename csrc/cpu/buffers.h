// Large CPU buffers (sweeps, packed weights, transposes, panel products): from a cache of blocks that
// stay mapped, in transparent huge pages.
//
// glibc maps an allocation above its mmap threshold (at most 32 MB, often less) afresh at every call and
// unmaps it on free, and each fresh 4 KB page costs a fault when first written: about 3 us on the 2-core
// CI VM, where a long-seq LSTM training step took 85,000 of them. Huge pages alone (advised before first
// touch) cut the faults 512x, but there left some steps up to 2.5x slower (a fresh huge page can be slow
// to come by in a VM). So blocks of 2 MB and more are kept when freed and reused for the next buffer of
// about their size (at most a quarter larger): the sweeps of one workload ask for the same sizes every
// step. RNNKERNELS_CPU_CACHE_MB sets how many megabytes of idle blocks are kept, the least recently freed
// going first (default 1024; 0: none, every block is freed at once).
#pragma once
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <list>
#include <mutex>
#include <unordered_map>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif
#if defined(_WIN32)
#include <malloc.h>
#endif

namespace rnnkernels {

class BufferCache final : public c10::Allocator {
  struct Block {
    void* data;
    size_t size;
  };

 public:
  static constexpr size_t kBlockAlign = size_t{2} << 20;  // a huge page

  // Never destroyed: tensors may be freed after static destructors have run.
  static BufferCache& get() {
    static BufferCache* cache = new BufferCache();
    return *cache;
  }

  // The context is the data pointer itself (a "simple" DataPtr, which copy-on-write clones require);
  // the block's size is looked up in live_.
  c10::DataPtr allocate(size_t bytes) override {
    const size_t wanted = (std::max<size_t>(bytes, 1) + kBlockAlign - 1) / kBlockAlign * kBlockAlign;
    Block block = take(wanted);
    if (block.data == nullptr) {  // allocated outside the lock
      block = {aligned_malloc(wanted), wanted};
      TORCH_CHECK_WITH(OutOfMemoryError, block.data != nullptr,
                       "rnnkernels: out of memory allocating a CPU buffer of ", wanted, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(block.data, wanted, MADV_HUGEPAGE);  // advice only: where the kernel declines, nothing changes
#endif
    }
    try {
      const std::lock_guard<std::mutex> lock(mutex_);
      live_[block.data] = block.size;
    } catch (...) {
      aligned_free(block.data);
      throw;
    }
    return {block.data, block.data, &BufferCache::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  BufferCache() {
    constexpr long long kDefaultMB = 1024;
    const char* text = std::getenv("RNNKERNELS_CPU_CACHE_MB");
    long long megabytes = kDefaultMB;
    if (text != nullptr) {
      char* end = nullptr;
      megabytes = std::strtoll(text, &end, 10);
      if (end == text || *end != '\0' || megabytes < 0 || megabytes > (1LL << 30)) {
        TORCH_WARN("rnnkernels: RNNKERNELS_CPU_CACHE_MB=", text, " is not a number of megabytes; using ", kDefaultMB);
        megabytes = kDefaultMB;
      }
    }
    limit_ = static_cast<size_t>(megabytes) << 20;
#if defined(__linux__)
    // A fork (a DataLoader worker) while another thread holds the lock would leave it held in the child.
    pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); }, [] { get().mutex_.unlock(); });
#endif
  }

  // The smallest idle block of at least `wanted` bytes and at most a quarter more, taken out of the cache;
  // none: {nullptr, 0}.
  Block take(size_t wanted) {
    const std::lock_guard<std::mutex> lock(mutex_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if (it->size >= wanted && it->size <= wanted + wanted / 4 && (best == idle_.end() || it->size < best->size)) {
        best = it;
      }
    }
    if (best == idle_.end()) return {nullptr, 0};
    const Block block = *best;
    idle_bytes_ -= block.size;
    idle_.erase(best);
    return block;
  }

  static void* aligned_malloc(size_t size) {
#if defined(_WIN32)
    return _aligned_malloc(size, kBlockAlign);
#else
    return std::aligned_alloc(kBlockAlign, size);
#endif
  }

  static void aligned_free(void* data) {
#if defined(_WIN32)
    _aligned_free(data);
#else
    std::free(data);
#endif
  }

  static void release(void* data) { get().put(data); }

  // Keeps the block as the most recently freed, and frees the least recently freed ones past the limit.
  void put(void* data) {
    std::list<Block> evicted;
    bool kept = true;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto found = live_.find(data);
      const size_t size = found->second;
      live_.erase(found);
      try {
        idle_.push_front(Block{data, size});
        idle_bytes_ += size;
      } catch (...) {  // a deleter must not throw: without memory for the list node, the block goes
        kept = false;
      }
      while (idle_bytes_ > limit_) {
        idle_bytes_ -= idle_.back().size;
        evicted.splice(evicted.end(), idle_, std::prev(idle_.end()));
      }
    }
    if (!kept) aligned_free(data);
    for (const Block& block : evicted) aligned_free(block.data);
  }

  std::mutex mutex_;
  std::unordered_map<void*, size_t> live_;  // blocks in use, by data pointer: their sizes
  std::list<Block> idle_;                   // most recently freed first
  size_t idle_bytes_ = 0;
  size_t limit_ = 0;
};

// at::empty for a buffer the caller writes in full; from BufferCache from one block's size on, for the
// strided, unpinned CPU tensors that the CPU kernels make.
inline at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const bool plain = options.device().is_cpu() && options.layout() == at::kStrided && !options.pinned_memory();
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (!plain || bytes < static_cast<int64_t>(BufferCache::kBlockAlign)) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &BufferCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

// t itself where it is contiguous, else a contiguous copy in an empty_buffer (a gradient that autograd
// expanded from a sum: 16 MB for long-seq).
inline at::Tensor contiguous_buffer(const at::Tensor& t) {
  return t.is_contiguous() ? t : empty_buffer(t.sizes(), t.options()).copy_(t);
}

// t converted to `type` in an empty_buffer, in t's layout where t is contiguous or a transposed contiguous
// matrix (else contiguous): the 16-bit products widened to float32 (recurrence.cpp's linear_once), whose
// operands of 1 MB and more, in at::Tensor::to's fresh pages, took a page fault per 4 KB (timemachine-char's
// bfloat16 gate gradients, 1120 x 1024, on Zen 3: 1.3-1.7 ms a conversion).
inline at::Tensor converted_buffer(const at::Tensor& t, at::ScalarType type) {
  if (t.scalar_type() == type) return t;
  const bool transposed = t.dim() == 2 && !t.is_contiguous() && t.t().is_contiguous();
  const at::Tensor like = transposed ? t.t() : t;
  const at::Tensor out = empty_buffer(like.sizes(), t.options().dtype(type));
  return transposed ? out.t().copy_(t) : out.copy_(t);
}

}  // namespace rnnkernels
