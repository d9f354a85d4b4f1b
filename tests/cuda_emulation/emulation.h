// Host emulation of the CUDA backend (csrc/cuda), so that machines without a GPU run its kernels and its
// host code: tests/cuda_emulation/__init__.py builds csrc/cuda/*.cu as C++ with this header force-included
// (-include) and RNNKERNELS_CUDA_EMULATION defined; the headers under include/ stand in for torch's and
// CUDA's CUDA headers, so no CUDA toolkit is needed. Tensors are CPU tensors; cuBLAS calls (at::mm) run
// on the CPU.
//
// Every CUDA thread of a launch runs as a fiber on the calling thread. A fiber runs until it reaches a
// barrier (__syncthreads, a warp shuffle, grid.sync) or returns. A round runs the fibers of a random part
// of the blocks, in a shuffled order (seeded), and then releases the barriers whose participants have all
// arrived; so blocks drift apart as on a GPU, one passing several barriers while another has not moved,
// and a missing barrier, inside a block or between blocks, shows as results that change with the seed
// rather than hiding behind one fixed order. The blocks of a plain launch run one after another, in a
// shuffled order.
// Reported as errors: a deadlock, or barriers split between a block's threads (naming where each waits);
// threads meeting at a barrier or a shuffle reached from different places in the code; a full-mask
// shuffle after lanes of the warp returned; grid.sync outside a cooperative launch; a cooperative grid
// larger than the device holds at once (threads, registers at the most a 512-thread block may use, shared
// memory); more dynamic shared memory than the kernel's limit; a misaligned 16-byte load; writes past the
// end of the dynamic shared memory, which starts filled with NaN bytes so that reading what no thread
// wrote shows in the results; memory read through the read-only path (__ldg), which may serve stale values
// from L1, changing between the first such read and the end of the launch (a write before the first read
// escapes, unless another seed reverses the order; data other blocks write goes through __ldcg).
// Not emulated: the device's own arithmetic (its exp/tanh), memory ordering without barriers, a kernel's
// own register count, and time.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
struct cudaDeviceProp {
  int multiProcessorCount;
  int cooperativeLaunch;
  size_t sharedMemPerBlockOptin;
};

namespace rnnkernels::emulation {

// The emulated device: an H100's limits, with few multiprocessors so that small layers split over blocks.
struct Device {
  int multiprocessors = 4;
  size_t shared_per_block_optin = 232448;
  size_t shared_per_multiprocessor = 233472;
  int threads_per_multiprocessor = 2048;
  int registers_per_multiprocessor = 65536;
  // Registers a thread is taken to use: the most that __launch_bounds__(512, 1) allows, which the
  // persistent kernels come close to (ptxas: 102-128); the emulation cannot know a kernel's own count.
  int registers_per_thread = 128;
  uint64_t seed = 0;
  int64_t launches = 0, cooperative_launches = 0;  // made so far: tests check which path ran
};

inline Device& device() {
  static Device d;
  return d;
}

enum class Wait { none, warp, block, grid };

inline const char* name(Wait w) {
  switch (w) {
    case Wait::warp: return "a warp shuffle";
    case Wait::block: return "__syncthreads";
    case Wait::grid: return "grid.sync";
    default: return "nothing";
  }
}

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  dim3 thread, block;
  int block_slot = 0, warp = 0, lane = 0;  // block_slot: the block's index among those running at once
  Wait wait = Wait::none;
  const char* file = nullptr;  // where the fiber waits: the threads meeting at a barrier must wait at the same one
  int line = 0;
  bool done = false;
};

struct Warp {
  int generation = 0;
  uint64_t slots[2][32] = {};  // double-buffered by generation: a lane writing the next shuffle's value
                               // cannot overwrite one a slower lane has still to read
};

struct Block {
  std::unique_ptr<unsigned char[]> shared;
  std::vector<Warp> warps;
};

constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kCanaryBytes = 64;
constexpr unsigned char kCanary = 0xA5;

// One launch at a time, on the thread that makes it.
struct Launch {
  dim3 grid, block;
  size_t smem = 0;
  bool cooperative = false;
  std::function<void()> body;
  std::vector<std::unique_ptr<Fiber>> fibers;
  std::vector<Block> blocks;
  ucontext_t scheduler{};
  Fiber* current = nullptr;
  std::mt19937_64 order;
  std::exception_ptr error;  // raised by device code; rethrown by the scheduler
  // What each read-only load (__ldg) read: the read-only path may serve stale data from L1, so memory read
  // through it must not change while the kernel runs; checked when the launch ends.
  std::map<const uint4*, uint4> read_only;
};

inline Launch*& active() {
  static thread_local Launch* launch = nullptr;
  return launch;
}

inline Fiber& current() {
  Launch* launch = active();
  TORCH_CHECK(launch != nullptr && launch->current != nullptr, "emulation: device code ran outside a launch");
  return *launch->current;
}

inline void fiber_main() {
  Launch& launch = *active();
  try {
    launch.body();
  } catch (...) {  // unwinding must not leave the fiber's stack
    launch.error = std::current_exception();
  }
  launch.current->done = true;  // returning resumes the scheduler (uc_link)
}

// Suspends the running fiber at barrier w, reached at file:line, until the scheduler releases it.
inline void wait(Wait w, const char* file, int line) {
  Launch& launch = *active();
  Fiber& fiber = *launch.current;
  fiber.wait = w;
  fiber.file = file;
  fiber.line = line;
  swapcontext(&fiber.context, &launch.scheduler);
}

inline std::string where(const Fiber& f) {
  std::ostringstream s;
  s << "block " << f.block.x << " thread " << f.thread.x;
  return s.str();
}

// Threads released together must have waited at the same barrier of the code, not at two in divergent branches.
inline void check_same_place(const std::vector<Fiber*>& fibers) {
  const Fiber* first = nullptr;
  for (const Fiber* f : fibers) {
    if (f->done) continue;
    if (first == nullptr) first = f;
    TORCH_CHECK(f->line == first->line && std::strcmp(f->file, first->file) == 0, "emulation: ", where(*first),
                " and ", where(*f), " meet at ", name(f->wait), " from different places (", first->file, ":",
                first->line, " and ", f->file, ":", f->line, ")");
  }
}

// Releases every barrier whose participants have all arrived (warp shuffles first); true if any was.
inline bool release(Launch& launch) {
  bool released = false;
  const int slots = static_cast<int>(launch.blocks.size());
  std::vector<std::vector<std::vector<Fiber*>>> by_warp(slots);
  std::vector<std::vector<Fiber*>> by_block(slots);
  for (auto& f : launch.fibers) {
    auto& warps = by_warp[f->block_slot];
    if (warps.size() <= static_cast<size_t>(f->warp)) warps.resize(f->warp + 1);
    warps[f->warp].push_back(f.get());
    by_block[f->block_slot].push_back(f.get());
  }
  for (int b = 0; b < slots; ++b) {
    for (size_t w = 0; w < by_warp[b].size(); ++w) {
      const auto& lanes = by_warp[b][w];
      const auto at_shuffle = std::count_if(lanes.begin(), lanes.end(), [](Fiber* f) { return f->wait == Wait::warp; });
      if (at_shuffle == 0) continue;
      const auto returned = std::count_if(lanes.begin(), lanes.end(), [](Fiber* f) { return f->done; });
      TORCH_CHECK(returned == 0 && lanes.size() == 32, "emulation: ", where(*lanes[0]), " shuffles with a full mask",
                  " but its warp has ", lanes.size() - returned, " live lanes");
      if (at_shuffle == static_cast<long>(lanes.size())) {
        check_same_place(lanes);
        for (Fiber* f : lanes) f->wait = Wait::none;
        ++launch.blocks[b].warps[w].generation;
        released = true;
      }
    }
  }
  if (released) return true;
  for (int b = 0; b < slots; ++b) {
    const auto& threads = by_block[b];
    const bool all = std::all_of(threads.begin(), threads.end(), [](Fiber* f) { return f->done || f->wait == Wait::block; });
    const bool any = std::any_of(threads.begin(), threads.end(), [](Fiber* f) { return f->wait == Wait::block; });
    if (all && any) {
      check_same_place(threads);
      for (Fiber* f : threads) f->wait = Wait::none;
      released = true;
    }
  }
  if (released) return true;
  const bool all_grid = std::all_of(launch.fibers.begin(), launch.fibers.end(),
                                    [](const auto& f) { return f->done || f->wait == Wait::grid; });
  const bool any_grid = std::any_of(launch.fibers.begin(), launch.fibers.end(),
                                    [](const auto& f) { return f->wait == Wait::grid; });
  if (all_grid && any_grid) {
    for (auto& f : launch.fibers) {
      TORCH_CHECK(!f->done, "emulation: grid.sync after ", where(*f), " returned");
      f->wait = Wait::none;
    }
    return true;
  }
  return false;
}

[[noreturn]] inline void stuck(const Launch& launch) {
  std::ostringstream s;
  s << "emulation: the kernel deadlocks; threads wait at different barriers:";
  std::map<std::pair<unsigned, Wait>, int> counts;
  for (const auto& f : launch.fibers) {
    if (!f->done) ++counts[{f->block.x, f->wait}];
  }
  for (const auto& [key, count] : counts) s << " block " << key.first << ": " << count << " at " << name(key.second) << ";";
  TORCH_CHECK(false, s.str());
}

// Runs the blocks [first, first + count) of the launch at once, to completion.
inline void run_blocks(Launch& launch, unsigned first, unsigned count) {
  const unsigned threads = launch.block.x * launch.block.y * launch.block.z;
  launch.fibers.clear();
  launch.blocks.clear();
  launch.blocks.resize(count);
  for (unsigned b = 0; b < count; ++b) {
    Block& block = launch.blocks[b];
    block.shared = std::make_unique<unsigned char[]>(launch.smem + kCanaryBytes);
    std::memset(block.shared.get(), 0xFF, launch.smem);
    std::memset(block.shared.get() + launch.smem, kCanary, kCanaryBytes);
    block.warps.resize((threads + 31) / 32);
    for (unsigned i = 0; i < threads; ++i) {
      auto f = std::make_unique<Fiber>();
      f->block = dim3((first + b) % launch.grid.x, (first + b) / launch.grid.x % launch.grid.y,
                      (first + b) / (launch.grid.x * launch.grid.y));
      f->thread = dim3(i % launch.block.x, i / launch.block.x % launch.block.y, i / (launch.block.x * launch.block.y));
      f->block_slot = static_cast<int>(b);
      f->warp = static_cast<int>(i / 32);
      f->lane = static_cast<int>(i % 32);
      f->stack.reset(new char[kStackBytes]);  // not zero-filled: thousands of fibers per launch
      getcontext(&f->context);
      f->context.uc_stack.ss_sp = f->stack.get();
      f->context.uc_stack.ss_size = kStackBytes;
      f->context.uc_link = &launch.scheduler;
      makecontext(&f->context, fiber_main, 0);
      launch.fibers.push_back(std::move(f));
    }
  }
  std::vector<Fiber*> runnable;
  std::vector<char> chosen(count);
  for (;;) {
    runnable.clear();
    for (auto& f : launch.fibers) {
      if (!f->done && f->wait == Wait::none) runnable.push_back(f.get());
    }
    if (runnable.empty()) {
      if (std::all_of(launch.fibers.begin(), launch.fibers.end(), [](const auto& f) { return f->done; })) break;
      if (!release(launch)) stuck(launch);
      continue;
    }
    // The blocks this round runs: each by a coin, and the block of one runnable fiber whatever the coins say.
    for (char& c : chosen) c = static_cast<char>(launch.order() & 1);
    chosen[runnable[launch.order() % runnable.size()]->block_slot] = 1;
    std::shuffle(runnable.begin(), runnable.end(), launch.order);
    for (Fiber* f : runnable) {
      if (!chosen[f->block_slot]) continue;
      launch.current = f;
      swapcontext(&launch.scheduler, &f->context);
      if (launch.error) std::rethrow_exception(launch.error);
    }
    launch.current = nullptr;
    release(launch);
  }
  for (unsigned b = 0; b < count; ++b) {
    const unsigned char* canary = launch.blocks[b].shared.get() + launch.smem;
    TORCH_CHECK(std::all_of(canary, canary + kCanaryBytes, [](unsigned char c) { return c == kCanary; }),
                "emulation: block ", first + b, " wrote past the ", launch.smem, " bytes of its dynamic shared memory");
  }
}

// The dynamic shared memory limit each kernel was given (cudaFuncSetAttribute), 48 KiB by default.
inline std::map<const void*, size_t>& shared_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

inline size_t shared_limit(const void* kernel) {
  const auto found = shared_limits().find(kernel);
  return found == shared_limits().end() ? size_t{48 * 1024} : found->second;
}

inline int resident_per_multiprocessor(int threads, size_t smem) {
  const Device& d = device();
  int blocks = std::min({d.threads_per_multiprocessor / threads, 32,
                         d.registers_per_multiprocessor / (threads * d.registers_per_thread)});
  if (smem > 0) blocks = std::min<int>(blocks, static_cast<int>(d.shared_per_multiprocessor / (smem + 1024)));
  return blocks;
}

inline void run(const void* kernel, dim3 grid, dim3 block, size_t smem, bool cooperative, std::function<void()> body) {
  TORCH_CHECK(active() == nullptr, "emulation: a launch from device code");
  const unsigned threads = block.x * block.y * block.z, blocks = grid.x * grid.y * grid.z;
  TORCH_CHECK(blocks > 0 && threads > 0 && threads <= 1024, "emulation: invalid launch configuration (", blocks,
              " blocks of ", threads, " threads)");
  TORCH_CHECK(smem <= shared_limit(kernel), "emulation: the launch asks for ", smem,
              " bytes of dynamic shared memory, more than the kernel's limit of ", shared_limit(kernel));
  if (cooperative) {
    TORCH_CHECK(blocks <= static_cast<unsigned>(resident_per_multiprocessor(threads, smem) * device().multiprocessors),
                "emulation: cooperative launch too large (", blocks, " blocks cannot be resident at once)");
  }
  ++(cooperative ? device().cooperative_launches : device().launches);
  Launch launch;
  launch.grid = grid;
  launch.block = block;
  launch.smem = smem;
  launch.cooperative = cooperative;
  launch.body = std::move(body);
  launch.order.seed(device().seed);
  active() = &launch;
  try {
    if (cooperative) {
      run_blocks(launch, 0, blocks);
    } else {
      // Independent blocks, one at a time, in a shuffled order: a kernel may not rely on any.
      std::vector<unsigned> order(blocks);
      std::iota(order.begin(), order.end(), 0u);
      std::shuffle(order.begin(), order.end(), launch.order);
      for (unsigned b : order) run_blocks(launch, b, 1);
    }
  } catch (...) {
    active() = nullptr;
    throw;
  }
  active() = nullptr;
  for (const auto& [address, value] : launch.read_only) {
    TORCH_CHECK(std::memcmp(address, &value, sizeof(uint4)) == 0, "emulation: the kernel wrote memory it also ",
                "read through the read-only path (__ldg), which may serve it stale values");
  }
}

template <typename T>
T shuffle_xor(unsigned mask, T value, int lane_mask, const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  TORCH_CHECK(mask == 0xffffffffu, "emulation: only full-mask shuffles are emulated");
  TORCH_CHECK(lane_mask >= 0 && lane_mask < 32, "emulation: shuffle lane mask ", lane_mask, " out of [0, 32)");
  Launch& launch = *active();
  Fiber& f = current();
  Warp& warp = launch.blocks[f.block_slot].warps[f.warp];
  uint64_t* slots = warp.slots[warp.generation & 1];
  std::memcpy(&slots[f.lane], &value, sizeof(T));
  wait(Wait::warp, file, line);
  T result;
  std::memcpy(&result, &slots[f.lane ^ lane_mask], sizeof(T));
  return result;
}

inline const uint4* aligned16(const uint4* p) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "emulation: ", where(current()),
              " makes a 16-byte load from an address that is not 16-byte aligned");
  return p;
}

}  // namespace rnnkernels::emulation

#define threadIdx (::rnnkernels::emulation::current().thread)
#define blockIdx (::rnnkernels::emulation::current().block)
#define blockDim (::rnnkernels::emulation::active()->block)
#define gridDim (::rnnkernels::emulation::active()->grid)

// Macros, so that each barrier knows where in the code it was reached.
#define __syncthreads() ::rnnkernels::emulation::wait(::rnnkernels::emulation::Wait::block, __FILE__, __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask) \
  ::rnnkernels::emulation::shuffle_xor(mask, value, lane_mask, __FILE__, __LINE__)

inline uint4 __ldg(const uint4* p) {
  const uint4 value = *rnnkernels::emulation::aligned16(p);
  rnnkernels::emulation::active()->read_only.emplace(p, value);
  return value;
}
inline uint4 __ldcg(const uint4* p) { return *rnnkernels::emulation::aligned16(p); }

namespace cooperative_groups {
struct grid_group {
  void sync() const {
    TORCH_CHECK(rnnkernels::emulation::active()->cooperative, "emulation: grid.sync in a launch that is not cooperative");
    rnnkernels::emulation::wait(rnnkernels::emulation::Wait::grid, __FILE__, __LINE__);
  }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

// The runtime calls the host code makes.
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute, int value) {
  rnnkernels::emulation::shared_limits()[kernel] = static_cast<size_t>(value);
  return cudaSuccess;
}

inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int threads, size_t smem) {
  *blocks = rnnkernels::emulation::resident_per_multiprocessor(threads, smem);
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "emulation: ", #expr, " failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK()

namespace at::cuda {
inline namespace emulated {  // its own symbols, never torch's
inline cudaDeviceProp* getDeviceProperties(int) {
  static cudaDeviceProp prop;
  const auto& d = rnnkernels::emulation::device();
  prop.multiProcessorCount = d.multiprocessors;
  prop.cooperativeLaunch = 1;
  prop.sharedMemPerBlockOptin = d.shared_per_block_optin;
  return &prop;
}
}  // namespace emulated
}  // namespace at::cuda

namespace c10::cuda {
inline namespace emulated {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace emulated
}  // namespace c10::cuda

namespace rnnkernels {
using std::max;  // CUDA's integer min and max, which device code calls unqualified
using std::min;

namespace cuda {
template <typename T>
T* dynamic_shared() {
  emulation::Fiber& f = emulation::current();
  return reinterpret_cast<T*>(emulation::active()->blocks[f.block_slot].shared.get());
}

// Launches as CUDA makes them: the arguments converted to the kernel's parameter types first.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), unsigned blocks, unsigned threads, size_t smem, Args&&... args) {
  std::tuple<Params...> params(std::forward<Args>(args)...);
  emulation::run(reinterpret_cast<const void*>(kernel), dim3(blocks), dim3(threads), smem, false,
                 [&] { std::apply(kernel, params); });
}

template <typename... Params>
void launch_cooperative(void (*kernel)(Params...), unsigned blocks, unsigned threads, size_t smem, Params... args) {
  std::tuple<Params...> params(args...);
  emulation::run(reinterpret_cast<const void*>(kernel), dim3(blocks), dim3(threads), smem, true,
                 [&] { std::apply(kernel, params); });
}
}  // namespace cuda
}  // namespace rnnkernels
