// What the CUDA files share: the walk over time steps, the per-unit cell math with its workspace layout,
// 16-byte vector loads, and the paths' host entry points (recurrence.cu chooses between them).
//
// Layouts are those of the CPU kernels (csrc/recurrence_args.h): time-major, rows of G*H gates in
// torch.nn's gate order, the workspace per (t, b) gate-major (column k*H + j holds value k of unit j).
//
// Device code is compiled by nvcc, and by the host emulation of tests/cuda_emulation (RNNKERNELS_CUDA_EMULATION),
// which runs these same kernels on the CPU with one fiber per CUDA thread; that emulation supplies the few
// device primitives marked below.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <optional>
#include <string>
#include <utility>

#include "../cell_math.h"
#include "../recurrence_args.h"

namespace rnnkernels::cuda {

using at::Tensor;

// Which (t, b) a sequence takes, as csrc/cpu/recurrence.cpp walks them; lengths is a device pointer
// (null: every sequence has length T).
struct Steps {
  int64_t T;
  bool reverse;
  const int64_t* lengths;
  RK_HD int64_t length(int64_t b) const { return lengths ? lengths[b] : T; }
  RK_HD int64_t time(int64_t step) const { return reverse ? T - 1 - step : step; }
  RK_HD bool active(int64_t t, int64_t b) const { return t < length(b); }
  // Whether step t is the first one sequence b takes, so its previous state is h0/c0.
  RK_HD bool first(int64_t t, int64_t b) const { return reverse ? t == length(b) - 1 : t == 0; }
  RK_HD int64_t previous(int64_t t) const { return reverse ? t + 1 : t - 1; }
};

// Values per hidden unit the workspace holds (LSTM i, f, g, o, c; GRU r, z, n, W_hn h + b_hn).
constexpr int workspace_values(Cell cell) { return static_cast<int>(workspace_width(cell, 1)); }

// One hidden unit's step. x[g]: input part of gate g's pre-activation (x W_ih^T + b_ih), r[g]: recurrent
// part (h W_hh^T + b_hh). Updates h (and c for the LSTM) and fills the unit's workspace values ws.
template <Cell cell, typename T>
RK_HD void unit_forward(const T (&x)[4], const T (&r)[4], T& h, T& c, T (&ws)[5]) {
  if constexpr (cell == Cell::LSTM) {
    const LstmForward<T> s(x[0] + r[0], x[1] + r[1], x[2] + r[2], x[3] + r[3], c);
    ws[0] = s.i, ws[1] = s.f, ws[2] = s.g, ws[3] = s.o, ws[4] = s.c;
    c = s.c;
    h = s.h;
  } else if constexpr (cell == Cell::GRU) {
    const GruForward<T> s(x[0] + r[0], x[1] + r[1], x[2], r[2], h);
    ws[0] = s.r, ws[1] = s.z, ws[2] = s.n, ws[3] = r[2];
    h = s.h;
  } else {
    h = rnn_forward(x[0] + r[0], cell == Cell::RNN_RELU);
  }
}

// One hidden unit's backward step. dh: dL/dh_t of the unit (all contributions); dc: dL/dc_t in, dL/dc_{t-1}
// out (LSTM); ws: the unit's workspace values at t; prev: c_{t-1} (LSTM) or h_{t-1} (GRU); h: h_t (RNN).
// dgx[g]: gradient of gate g's input part; dgh[g]: of its recurrent part (they differ only in the GRU's n,
// by the factor r); direct: the share of dL/dh_{t-1} that bypasses W_hh (GRU: z * dh).
template <Cell cell, typename T>
RK_HD void unit_backward(T dh, T& dc, const T (&ws)[5], T prev, T h, T (&dgx)[4], T (&dgh)[4], T& direct) {
  if constexpr (cell == Cell::LSTM) {
    const LstmBackward<T> s(dh, dc, ws[0], ws[1], ws[2], ws[3], ws[4], prev);
    dgx[0] = dgh[0] = s.d_i, dgx[1] = dgh[1] = s.d_f, dgx[2] = dgh[2] = s.d_g, dgx[3] = dgh[3] = s.d_o;
    dc = s.dc_prev;
  } else if constexpr (cell == Cell::GRU) {
    const GruBackward<T> s(dh, ws[0], ws[1], ws[2], ws[3], prev);
    dgx[0] = dgh[0] = s.d_r, dgx[1] = dgh[1] = s.d_z;
    dgx[2] = s.d_xn;
    dgh[2] = s.d_hn;
    direct = s.dh_direct;
  } else {
    dgx[0] = dgh[0] = rnn_backward(dh, h, cell == Cell::RNN_RELU);
  }
}

#if defined(__CUDACC__)
// The primitives the host emulation replaces: the block's dynamic shared memory, and launches on the
// current stream (a cooperative launch for kernels that synchronise the grid).
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  return reinterpret_cast<T*>(shared_bytes);
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), unsigned blocks, unsigned threads, size_t smem, Args&&... args) {
  kernel<<<blocks, threads, smem, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename... Params>
void launch_cooperative(void (*kernel)(Params...), unsigned blocks, unsigned threads, size_t smem, Params... args) {
  void* params[] = {&args...};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), blocks, threads, params, smem,
                                             at::cuda::getCurrentCUDAStream()));
}
#endif

#if defined(__CUDACC__) || defined(RNNKERNELS_CUDA_EMULATION)
// 16-byte vectors: elements per vector, and the vector as an array.
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

template <typename scalar_t>
struct alignas(16) Vec {
  scalar_t v[kVec<scalar_t>];
};

// p 16-byte aligned. load_l2 bypasses L1, which is not coherent across blocks: for data that other blocks
// of a persistent kernel write while it runs. load_shared / load_readonly for data nobody writes meanwhile.
template <typename scalar_t>
__device__ __forceinline__ Vec<scalar_t> as_vec(uint4 raw) {
  Vec<scalar_t> v;
  __builtin_memcpy(&v, &raw, sizeof(v));
  return v;
}

template <typename scalar_t>
__device__ __forceinline__ Vec<scalar_t> load_l2(const scalar_t* p) {
  return as_vec<scalar_t>(__ldcg(reinterpret_cast<const uint4*>(p)));
}

template <typename scalar_t>
__device__ __forceinline__ Vec<scalar_t> load_readonly(const scalar_t* p) {
  return as_vec<scalar_t>(__ldg(reinterpret_cast<const uint4*>(p)));
}

template <typename scalar_t>
__device__ __forceinline__ Vec<scalar_t> load_shared(const scalar_t* p) {
  return *reinterpret_cast<const Vec<scalar_t>*>(p);
}

template <typename scalar_t>
__device__ __forceinline__ float dot(const Vec<scalar_t>& a, const Vec<scalar_t>& b, float acc) {
#pragma unroll
  for (int k = 0; k < kVec<scalar_t>; ++k) acc = fmaf(static_cast<float>(a.v[k]), static_cast<float>(b.v[k]), acc);
  return acc;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sums each of the N values of acc over the warp's lanes with N - 1 + log2(32 / N) shuffles, where N
// separate warp_sums take 5 N: at each halving, a lane keeps one half of its values and adds its partner's
// copy of that half. Returns the total of value lane / (32 / N) (the 32 / N lanes of a group hold the same).
// One template level per halving: constant indices, so acc stays in registers.
template <int Half, int N>
__device__ __forceinline__ void fold_halves(float (&acc)[N], int lane) {
  constexpr int offset = 32 * Half / N;
  const bool upper = lane & offset;
#pragma unroll
  for (int i = 0; i < Half; ++i) {
    const float send = upper ? acc[i] : acc[i + Half];
    const float keep = upper ? acc[i + Half] : acc[i];
    acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
  }
  if constexpr (Half > 1) fold_halves<Half / 2>(acc, lane);
}

template <int N>
__device__ __forceinline__ float warp_sum_each(float (&acc)[N]) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N: a power of two up to 32");
  if constexpr (N > 1) fold_halves<N / 2>(acc, threadIdx.x % 32);
  float total = acc[0];
#pragma unroll
  for (int offset = 16 / N; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
  return total;
}
#endif

// ------------------------------------------------------------------------------- host entry points
// Stepwise path (stepwise.cu), any floating dtype, float64 included: the CPU kernels' loop with cuBLAS
// GEMMs. Arguments as forward_impl / backward_impl in csrc/cpu/recurrence.cpp; the buffers the sweep
// writes at active (t, b) only must arrive zeroed where lengths are given.
template <Cell cell>
void stepwise_forward(const RecurrenceDims& d, const Steps& steps, const Tensor& gx, const Tensor& w_hh,
                      const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr, Tensor& h, Tensor& c,
                      Tensor& output, Tensor& workspace);

template <Cell cell>
void stepwise_backward(const RecurrenceDims& d, const Steps& steps, const Tensor& grad_output, Tensor& dh,
                       Tensor& dc, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                       const std::optional<Tensor>& w_hr, const Tensor& output, const Tensor& workspace,
                       Tensor& grad_gx, Tensor& grad_gh, Tensor& dh_all, Tensor& m_all);

// Persistent path (persistent.cu): float32, float16, bfloat16, no projection. A plan is the launch shape
// for one case, or why the case cannot run persistently.
struct PersistentPlan {
  int units = 0;  // hidden units per block
  int blocks = 0;
  size_t smem = 0;
  std::string why_not;  // empty: the plan runs
};

template <Cell cell>
PersistentPlan plan_persistent(bool backward, at::ScalarType dtype, const RecurrenceDims& d, bool projected,
                               const at::Device& device);

// Every tensor contiguous and on the device (the 16-byte loads read only buffers persistent.cu allocates);
// outputs need no clearing (the kernels write every element). workspace is (T, B, 0) when the forward
// keeps none.
template <Cell cell>
void persistent_forward(const PersistentPlan& plan, const RecurrenceDims& d, const Steps& steps, const Tensor& gx,
                        const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                        Tensor& output, Tensor& h_n, Tensor& c_n, Tensor& workspace);

template <Cell cell>
void persistent_backward(const PersistentPlan& plan, const RecurrenceDims& d, const Steps& steps,
                         const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
                         const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const Tensor& output,
                         const Tensor& workspace, Tensor& grad_gx, Tensor& grad_gh, Tensor& grad_h0,
                         Tensor& grad_c0);

}  // namespace rnnkernels::cuda
