// Large CPU buffers, asked for transparent huge pages before their first touch.
//
// glibc serves an allocation above its mmap threshold (at most 32 MB, often less) from fresh pages at
// every call, and each fresh 4 KB page costs a fault when first written: about 3 us on the 2-core CI
// VM, where a long-seq LSTM training step took 98,000 of them. Where THP is on in "madvise" mode (the
// common default) or "always", a range advised before it is touched faults once per 2 MB instead.
// Advice only: memory reused from the heap keeps the pages it has, and where the kernel declines,
// nothing changes.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rnnkernels {

// The whole 2 MB pages inside t's memory, advised as huge pages.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + t.nbytes()) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty for a buffer the caller writes in full.
inline at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

// t itself where it is contiguous, else a contiguous copy in an empty_buffer (a gradient that autograd
// expanded from a sum: 16 MB for long-seq).
inline at::Tensor contiguous_buffer(const at::Tensor& t) {
  return t.is_contiguous() ? t : empty_buffer(t.sizes(), t.options()).copy_(t);
}

}  // namespace rnnkernels
