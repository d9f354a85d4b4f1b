// Persistent CUDA path: one cooperative kernel runs a whole sequence, one grid-wide barrier per time step.
//
// Each block owns a slice of `units` hidden units for all time steps. Forward: the block keeps the W_hh
// rows of every gate of its units in shared memory; per step it reads all of h_{t-1} (B x H, from L2),
// computes its gates' pre-activations in float, applies the cell math (cell_math.h through unit_forward),
// writes its units of output[t], the workspace and h_t, and meets the grid at the barrier. Its units'
// h and c stay in registers. Backward: the block keeps the W_hh COLUMNS of its units; per step it first
// finishes the gate gradients of its units (dc stays in registers), then after the barrier computes its
// own units of dh_{t-1} = d gates_t W_hh from the whole d gates_t row, so no reduction crosses blocks.
// What one block writes and every block reads at the next barrier (h_t forward, d gates_t backward) goes
// through a two-slot buffer whose rows, like the weight rows in shared memory, are zero-padded to whole
// 16-byte vectors: any H runs (ptb's 650 and 1500 among the benchmark's), with vector loads throughout.
//
// Assumes (plan_persistent checks, recurrence.cu prepares): float32, float16 or bfloat16; no projection;
// every tensor contiguous; the two-slot buffers the kernels read with 16-byte loads allocated (zeroed)
// here, so 16-byte aligned; B * units <= kItems * kThreads; the grid co-resident (the occupancy API sizes
// it, the cooperative launch verifies it).
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "kernels.cuh"

namespace rnnkernels::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 512;
constexpr int kItems = 2;           // (b, unit) pairs per thread in the pointwise phases
constexpr int kChunksInFlight = 4;  // 16-byte loads of the vector a lane issues before using them
// Matrix rows one warp reduces per pass over a vector: as many as the registers hold (a float vector takes
// twice the registers of a 16-bit one). At 8 float rows the float LSTM forward kernel spills 8 bytes under
// the 128-register cap (ptxas -v, sm_90, nvcc 13.0; the others none): a local store and load per step
// against the 31 shuffles warp_sum_each saves; to be weighed on a GPU.
template <typename scalar_t>
constexpr int kRowsPerItem = sizeof(scalar_t) == 2 ? 16 : 8;

// A row of n elements padded to whole 16-byte vectors: the row stride of the weights in shared memory and
// of the two-slot buffers.
template <typename scalar_t>
RK_HD constexpr int64_t padded(int64_t n) {
  return (n + kVec<scalar_t> - 1) / kVec<scalar_t> * kVec<scalar_t>;
}

// out[b * R + r] = sum_k vec[b * K + k] * mat[r * K + k] for b < B, r < R, summed in float. vec is global
// memory that other blocks write during the kernel (read through L2); mat is in shared memory. K is a
// multiple of kVec. One warp per item (b, s): lanes split k in 16-byte vectors, up to kChunksInFlight
// loads of vec[b] issued at once (L2 latency is the cost here), and the warp reduces the rows s, s + S,
// s + 2S, ... together, so each item reads vec[b] once, and sums them over its lanes in one pass
// (warp_sum_each). S grows until every warp has work.
template <typename scalar_t>
__device__ void block_matvec(const scalar_t* vec, const scalar_t* mat, int B, int R, int K, float* out) {
  constexpr int V = kVec<scalar_t>, rows = kRowsPerItem<scalar_t>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kThreads / 32;
  const int S = max((R + rows - 1) / rows, min(R, warps / B));
  const int chunks = K / V;
  for (int item = warp; item < B * S; item += warps) {
    const int b = item / S, s = item % S;
    const scalar_t* v = vec + static_cast<int64_t>(b) * K;
    float acc[rows] = {};
    for (int first = lane; first < chunks; first += 32 * kChunksInFlight) {
      Vec<scalar_t> x[kChunksInFlight];
#pragma unroll
      for (int q = 0; q < kChunksInFlight; ++q) {
        if (first + 32 * q < chunks) x[q] = load_l2(v + (first + 32 * q) * V);
      }
#pragma unroll
      for (int q = 0; q < kChunksInFlight; ++q) {
        const int c = first + 32 * q;
        if (c >= chunks) break;
#pragma unroll
        for (int i = 0; i < rows; ++i) {
          const int r = s + i * S;
          if (r < R) acc[i] = dot(x[q], load_shared(mat + static_cast<int64_t>(r) * K + c * V), acc[i]);
        }
      }
    }
    const float total = warp_sum_each(acc);  // of row s + i S, i = lane / (32 / rows)
    const int r = s + lane / (32 / rows) * S;
    if (lane % (32 / rows) == 0 && r < R) out[b * R + r] = total;
  }
}

template <typename scalar_t>
struct ForwardArgs {
  Steps steps;
  int B, H, units;
  const scalar_t *gx, *h0, *c0, *w_hh, *b_hh;  // c0 (LSTM) and b_hh may be null
  scalar_t *output, *h_n, *c_n, *workspace;   // c_n (LSTM) and workspace may be null
  scalar_t* hbuf;  // (2, B, padded(H)): step s reads slot (s + 1) % 2 (slot 1 holds h0), writes slot s % 2
};

template <typename scalar_t>
struct BackwardArgs {
  Steps steps;
  int B, H, units;
  const scalar_t *grad_output, *grad_h_n, *grad_c_n, *h0, *c0, *w_hh, *output, *workspace;  // grad_c_n may be null
  scalar_t *grad_gx, *grad_gh, *grad_h0, *grad_c0;  // grad_gh == grad_gx but for the GRU
  scalar_t* dgh_slots;  // (2, B, padded(G * H)): d gates_t of the recurrent part, step s in slot s % 2
};

// The pointwise phases give each thread up to kItems of the block's B x mine (batch row, unit) pairs,
// the same ones at every step, so a unit's carried state stays in that thread's registers.
struct Item {
  int b, u;
  bool valid;
  __device__ Item(int k, int mine, int n) {
    const int i = threadIdx.x + k * kThreads;
    b = i / mine, u = i % mine, valid = i < n;
  }
};

template <Cell cell, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const ForwardArgs<scalar_t> a) {
  constexpr int G = static_cast<int>(gates_of(cell)), W = workspace_values(cell);
  const int B = a.B, H = a.H, U = a.units, R = G * U, Hp = static_cast<int>(padded<scalar_t>(H));
  const int u0 = blockIdx.x * U, mine = min(U, H - u0), n = B * mine;
  // Shared row g * U + u holds W_hh row g * H + u0 + u (zeros past H and past the block's units), rows
  // Hp apart, then the pre-activations (B x R).
  scalar_t* w = dynamic_shared<scalar_t>();
  float* pre = reinterpret_cast<float*>(w + static_cast<int64_t>(R) * Hp);
  for (int64_t e = threadIdx.x; e < static_cast<int64_t>(R) * Hp; e += kThreads) {
    const int row = static_cast<int>(e / Hp), k = static_cast<int>(e % Hp), g = row / U, u = row % U;
    w[e] = u < mine && k < H ? a.w_hh[static_cast<int64_t>(g * H + u0 + u) * H + k] : scalar_t(0);
  }
  float h[kItems], c[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const Item it(k, mine, n);
    if (!it.valid) continue;
    h[k] = a.h0[it.b * H + u0 + it.u];
    c[k] = cell == Cell::LSTM ? static_cast<float>(a.c0[it.b * H + u0 + it.u]) : 0.f;
  }
  __syncthreads();
  cg::grid_group grid = cg::this_grid();
  for (int64_t step = 0; step < a.steps.T; ++step) {
    const int64_t t = a.steps.time(step);
    float x[kItems][4];  // loaded before the matrix-vector product, whose time hides their latency
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const Item it(k, mine, n);
      if (!it.valid) continue;
#pragma unroll
      for (int g = 0; g < G; ++g) x[k][g] = a.gx[(t * B + it.b) * G * H + g * H + u0 + it.u];
    }
    block_matvec(a.hbuf + ((step + 1) & 1) * B * Hp, w, B, R, Hp, pre);
    __syncthreads();
    scalar_t* h_next = a.hbuf + (step & 1) * B * Hp;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const Item it(k, mine, n);
      if (!it.valid) continue;
      const int j = u0 + it.u;
      const int64_t row = t * B + it.b;
      const bool active = a.steps.active(t, it.b);
      if (active) {
        float r[4], values[5];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          r[g] = pre[it.b * R + g * U + it.u] + (a.b_hh ? static_cast<float>(a.b_hh[g * H + j]) : 0.f);
        }
        unit_forward<cell>(x[k], r, h[k], c[k], values);
        if (a.workspace) {
#pragma unroll
          for (int v = 0; v < W; ++v) a.workspace[row * W * H + v * H + j] = values[v];
        }
      } else if (a.workspace) {  // a finished (or not yet started) sequence keeps its state, outputs zeros
#pragma unroll
        for (int v = 0; v < W; ++v) a.workspace[row * W * H + v * H + j] = scalar_t(0);
      }
      a.output[row * H + j] = active ? h[k] : 0.f;
      h_next[it.b * Hp + j] = h[k];
    }
    if (step + 1 < a.steps.T) grid.sync();
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const Item it(k, mine, n);
    if (!it.valid) continue;
    a.h_n[it.b * H + u0 + it.u] = h[k];
    if (cell == Cell::LSTM) a.c_n[it.b * H + u0 + it.u] = c[k];
  }
}

template <Cell cell, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 1) backward_kernel(const BackwardArgs<scalar_t> a) {
  constexpr int G = static_cast<int>(gates_of(cell)), W = workspace_values(cell);
  const int B = a.B, H = a.H, U = a.units, K = G * H, Kp = static_cast<int>(padded<scalar_t>(K));
  const int u0 = blockIdx.x * U, mine = min(U, H - u0), n = B * mine;
  // Shared row u holds W_hh column u0 + u (zeros past K and past the block's units), rows Kp apart, then
  // dh_{t-1} of the block's units (B x U).
  scalar_t* w = dynamic_shared<scalar_t>();
  float* rec = reinterpret_cast<float*>(w + static_cast<int64_t>(U) * Kp);
  for (int64_t e = threadIdx.x; e < static_cast<int64_t>(U) * Kp; e += kThreads) {
    const int r = static_cast<int>(e / U), u = static_cast<int>(e % U);  // consecutive threads, consecutive columns
    w[static_cast<int64_t>(u) * Kp + r] =
        u < mine && r < K ? a.w_hh[static_cast<int64_t>(r) * H + u0 + u] : scalar_t(0);
  }
  float dh[kItems], dc[kItems], direct[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const Item it(k, mine, n);
    if (!it.valid) continue;
    dh[k] = a.grad_h_n[it.b * H + u0 + it.u];
    dc[k] = a.grad_c_n ? static_cast<float>(a.grad_c_n[it.b * H + u0 + it.u]) : 0.f;
    direct[k] = 0.f;
  }
  __syncthreads();
  cg::grid_group grid = cg::this_grid();
  for (int64_t step = a.steps.T - 1; step >= 0; --step) {
    const int64_t t = a.steps.time(step);
    scalar_t* dgh_slot = a.dgh_slots + (step & 1) * B * Kp;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const Item it(k, mine, n);
      if (!it.valid) continue;
      const int b = it.b, j = u0 + it.u;
      const int64_t row = t * B + b;
      float dgx[4] = {}, dgh[4] = {};  // zeros: the gradient of an inactive (t, b)
      if (a.steps.active(t, b)) {
        const float g = dh[k] + static_cast<float>(a.grad_output[row * H + j]);
        float values[5], prev = 0.f, h = 0.f;
#pragma unroll
        for (int v = 0; v < W; ++v) values[v] = a.workspace[row * W * H + v * H + j];
        const bool first = a.steps.first(t, b);
        const int64_t prev_row = a.steps.previous(t) * B + b;
        if (cell == Cell::LSTM) prev = first ? a.c0[b * H + j] : a.workspace[prev_row * W * H + 4 * H + j];
        if (cell == Cell::GRU) prev = first ? a.h0[b * H + j] : a.output[prev_row * H + j];
        if (cell == Cell::RNN_TANH || cell == Cell::RNN_RELU) h = a.output[row * H + j];
        unit_backward<cell>(g, dc[k], values, prev, h, dgx, dgh, direct[k]);
      }
#pragma unroll
      for (int q = 0; q < G; ++q) {
        a.grad_gx[row * K + q * H + j] = dgx[q];
        if (cell == Cell::GRU) a.grad_gh[row * K + q * H + j] = dgh[q];
        dgh_slot[b * Kp + q * H + j] = dgh[q];
      }
    }
    grid.sync();
    block_matvec(dgh_slot, w, B, U, Kp, rec);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const Item it(k, mine, n);
      if (it.valid && a.steps.active(t, it.b)) dh[k] = rec[it.b * U + it.u] + direct[k];
    }
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const Item it(k, mine, n);
    if (!it.valid) continue;
    a.grad_h0[it.b * H + u0 + it.u] = dh[k];
    if (cell == Cell::LSTM) a.grad_c0[it.b * H + u0 + it.u] = dc[k];
  }
}

template <typename scalar_t>
const scalar_t* maybe(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
scalar_t* maybe(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<scalar_t>() : nullptr;
}

template <Cell cell, typename scalar_t>
const void* kernel_of(bool backward) {
  return backward ? reinterpret_cast<const void*>(backward_kernel<cell, scalar_t>)
                  : reinterpret_cast<const void*>(forward_kernel<cell, scalar_t>);
}

// Blocks of `kernel` one multiprocessor holds with `smem` bytes of dynamic shared memory. The first query
// raises the kernel's shared-memory limit to the device's; answers are cached, so that calls inside CUDA
// graph capture, after a warm-up call outside it, make no CUDA API calls here.
int resident_blocks(const void* kernel, int device, int64_t smem, size_t smem_limit) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int64_t>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, device, smem);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_limit)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(smem)));
  cache.emplace(key, per_sm);
  return per_sm;
}

// Hidden units per block: by default as many blocks as multiprocessors, each with an even share of the
// units (the fewest per block). RNNKERNELS_CUDA_UNITS sets it instead, to measure the trade between more
// blocks (less work each) and fewer (cheaper grid barriers, less of h read from L2 per step).
int64_t units_per_block(int64_t H, int multiprocessors) {
  const char* env = std::getenv("RNNKERNELS_CUDA_UNITS");
  if (env == nullptr || *env == '\0') return (H + multiprocessors - 1) / multiprocessors;
  char* end = nullptr;
  const long long units = std::strtoll(env, &end, 10);
  TORCH_CHECK(*end == '\0' && units > 0, "rnnkernels: RNNKERNELS_CUDA_UNITS must be a positive integer, got '",
              env, "'");
  return std::min<int64_t>(units, H);
}

template <Cell cell, typename scalar_t>
PersistentPlan plan_for(bool backward, const RecurrenceDims& d, const at::Device& device) {
  PersistentPlan plan;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());
  if (!prop->cooperativeLaunch) {
    plan.why_not = "the device does not support cooperative launches";
    return plan;
  }
  const int64_t units = units_per_block(d.H, prop->multiProcessorCount);
  const int64_t rows_per_unit = backward ? 1 : d.G, K = padded<scalar_t>(backward ? d.G * d.H : d.H);
  const int64_t smem = units * rows_per_unit * (K * int64_t{sizeof(scalar_t)} + d.B * int64_t{sizeof(float)});
  if (d.B * units > int64_t{kItems} * kThreads) {
    plan.why_not = "batch x hidden units per block (" + std::to_string(d.B * units) + ") exceeds " +
                   std::to_string(kItems * kThreads);
    return plan;
  }
  if (smem > static_cast<int64_t>(prop->sharedMemPerBlockOptin)) {
    plan.why_not = "the weights need " + std::to_string(smem) + " bytes of shared memory per block, more than the " +
                   std::to_string(prop->sharedMemPerBlockOptin) + " a block can have";
    return plan;
  }
  const int per_sm =
      resident_blocks(kernel_of<cell, scalar_t>(backward), device.index(), smem, prop->sharedMemPerBlockOptin);
  const int64_t blocks = (d.H + units - 1) / units;
  if (blocks > int64_t{per_sm} * prop->multiProcessorCount) {
    plan.why_not = std::to_string(blocks) + " blocks cannot all be resident at once";
    return plan;
  }
  plan.units = static_cast<int>(units);
  plan.blocks = static_cast<int>(blocks);
  plan.smem = static_cast<size_t>(smem);
  return plan;
}

}  // namespace

template <Cell cell>
PersistentPlan plan_persistent(bool backward, at::ScalarType dtype, const RecurrenceDims& d, bool projected,
                               const at::Device& device) {
  PersistentPlan plan;
  if (projected) {
    plan.why_not = "the projected LSTM (proj_size) runs stepwise";
  } else if (dtype == at::kFloat) {
    plan = plan_for<cell, float>(backward, d, device);
  } else if (dtype == at::kHalf) {
    plan = plan_for<cell, at::Half>(backward, d, device);
  } else if (dtype == at::kBFloat16) {
    plan = plan_for<cell, at::BFloat16>(backward, d, device);
  } else {
    plan.why_not = std::string("dtype ") + c10::toString(dtype) + " runs stepwise";
  }
  return plan;
}

template <Cell cell>
void persistent_forward(const PersistentPlan& plan, const RecurrenceDims& d, const Steps& steps, const Tensor& gx,
                        const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                        Tensor& output, Tensor& h_n, Tensor& c_n, Tensor& workspace) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gx.scalar_type(), "rnnkernels_persistent_forward", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      Tensor hbuf = at::zeros({2, d.B, padded<scalar_t>(d.H)}, gx.options());  // zeros: the padding
      hbuf[1].narrow(1, 0, d.H).copy_(h0);
      const ForwardArgs<scalar_t> args{steps, static_cast<int>(d.B), static_cast<int>(d.H), plan.units,
                                       gx.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), maybe<scalar_t>(c0),
                                       w_hh.data_ptr<scalar_t>(), maybe<scalar_t>(b_hh), output.data_ptr<scalar_t>(),
                                       h_n.data_ptr<scalar_t>(), maybe<scalar_t>(c_n), maybe<scalar_t>(workspace),
                                       hbuf.data_ptr<scalar_t>()};
      launch_cooperative(forward_kernel<cell, scalar_t>, plan.blocks, kThreads, plan.smem, args);
    }
  });
}

template <Cell cell>
void persistent_backward(const PersistentPlan& plan, const RecurrenceDims& d, const Steps& steps,
                         const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
                         const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const Tensor& output,
                         const Tensor& workspace, Tensor& grad_gx, Tensor& grad_gh, Tensor& grad_h0,
                         Tensor& grad_c0) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output.scalar_type(), "rnnkernels_persistent_backward", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      Tensor dgh_slots = at::zeros({2, d.B, padded<scalar_t>(d.G * d.H)}, output.options());  // zeros: the padding
      const BackwardArgs<scalar_t> args{steps, static_cast<int>(d.B), static_cast<int>(d.H), plan.units,
                                        grad_output.data_ptr<scalar_t>(), grad_h_n.data_ptr<scalar_t>(),
                                        maybe<scalar_t>(grad_c_n), h0.data_ptr<scalar_t>(), maybe<scalar_t>(c0),
                                        w_hh.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
                                        maybe<scalar_t>(workspace), grad_gx.data_ptr<scalar_t>(),
                                        grad_gh.data_ptr<scalar_t>(), grad_h0.data_ptr<scalar_t>(),
                                        maybe<scalar_t>(grad_c0), dgh_slots.data_ptr<scalar_t>()};
      launch_cooperative(backward_kernel<cell, scalar_t>, plan.blocks, kThreads, plan.smem, args);
    }
  });
}

#define RNNKERNELS_INSTANTIATE(cell)                                                                               \
  template PersistentPlan plan_persistent<cell>(bool, at::ScalarType, const RecurrenceDims&, bool,                 \
                                                const at::Device&);                                                \
  template void persistent_forward<cell>(const PersistentPlan&, const RecurrenceDims&, const Steps&, const Tensor&, \
                                         const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, \
                                         Tensor&, Tensor&, Tensor&, Tensor&);                                       \
  template void persistent_backward<cell>(const PersistentPlan&, const RecurrenceDims&, const Steps&,              \
                                          const Tensor&, const Tensor&, const Tensor&, const Tensor&,              \
                                          const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&,     \
                                          Tensor&, Tensor&, Tensor&);
RNNKERNELS_FOR_EACH_CELL(RNNKERNELS_INSTANTIATE)

}  // namespace rnnkernels::cuda
