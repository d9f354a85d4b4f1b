// One time step for generation: rnnkernels::{cell}_step on CUDA.
//
// Batch up to kMaxBatch without projection (float32, float16, bfloat16): ONE kernel computes both
// matrix-vector products (x W_ih^T + b_ih and h W_hh^T + b_hh), the gates and the state update. A warp
// owns one hidden unit: its lanes split the input and hidden dimensions, each lane keeps the partial sums
// of every gate and batch row in registers, and one pass over the unit's weight rows serves all rows of
// the batch (the weights are read once per step: the step is bound by reading them).
// Otherwise (larger batches, float64, proj_size): the input projection as one GEMM, then one step of the
// stepwise path (a GEMM and one fused pointwise kernel, plus the projection GEMM).
//
// Assumes: x, h, c, weights and biases contiguous (made so here); 16-byte loads only where I and H are
// multiples of kVec and the four pointers 16-byte aligned (checked here), element loads otherwise.
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "kernels.cuh"
#include "recurrence_cuda.h"

namespace rnnkernels {
namespace {

using at::Tensor;
using cuda::Vec;
using cuda::kVec;

constexpr int kMaxBatch = 8;
constexpr int kWarps = 8;  // hidden units per block

template <typename scalar_t>
struct StepArgs {
  int B, I, H;
  const scalar_t *x, *h, *c, *w_ih, *w_hh, *b_ih, *b_hh;  // c (LSTM), b_ih and b_hh may be null
  scalar_t *h_next, *c_next, *workspace;                  // c_next (LSTM) and workspace may be null
};

// Sums slot(g) of batch row b: gate g, but for the GRU's n gate, whose recurrent part (slot 3) the reset
// gate scales apart from its input part (slot 2).
template <Cell cell, bool recurrent>
constexpr int slot(int g) {
  return cell == Cell::GRU && recurrent && g == 2 ? 3 : g;
}

// acc[slot(g)][b] += lane's share of in[b, :] . w[g * H + j, :] for every gate g and batch row b < B.
template <Cell cell, bool recurrent, bool vectorized, typename scalar_t>
__device__ __forceinline__ void accumulate(const scalar_t* in, const scalar_t* w, int K, int H, int j, int B,
                                           float (&acc)[4][kMaxBatch]) {
  constexpr int G = static_cast<int>(gates_of(cell));
  const int lane = threadIdx.x % 32;
  if constexpr (vectorized) {
    constexpr int V = kVec<scalar_t>;
    for (int k = lane * V; k < K; k += 32 * V) {
      Vec<scalar_t> wv[G];
#pragma unroll
      for (int g = 0; g < G; ++g) wv[g] = cuda::load_readonly(w + static_cast<int64_t>(g * H + j) * K + k);
#pragma unroll
      for (int b = 0; b < kMaxBatch; ++b) {
        if (b >= B) break;
        const Vec<scalar_t> xv = cuda::load_readonly(in + static_cast<int64_t>(b) * K + k);
#pragma unroll
        for (int g = 0; g < G; ++g) acc[slot<cell, recurrent>(g)][b] = cuda::dot(xv, wv[g], acc[slot<cell, recurrent>(g)][b]);
      }
    }
  } else {
    for (int k = lane; k < K; k += 32) {
      float wv[G];
#pragma unroll
      for (int g = 0; g < G; ++g) wv[g] = w[static_cast<int64_t>(g * H + j) * K + k];
#pragma unroll
      for (int b = 0; b < kMaxBatch; ++b) {
        if (b >= B) break;
        const float xv = in[static_cast<int64_t>(b) * K + k];
#pragma unroll
        for (int g = 0; g < G; ++g) acc[slot<cell, recurrent>(g)][b] = fmaf(xv, wv[g], acc[slot<cell, recurrent>(g)][b]);
      }
    }
  }
}

template <Cell cell, bool vectorized, typename scalar_t>
__global__ void __launch_bounds__(kWarps * 32) fused_step_kernel(const StepArgs<scalar_t> a) {
  constexpr int G = static_cast<int>(gates_of(cell)), W = cuda::workspace_values(cell);
  constexpr int slots = cell == Cell::GRU ? 4 : G;
  const int j = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (j >= a.H) return;  // the whole warp
  float acc[4][kMaxBatch] = {};
  accumulate<cell, false, vectorized>(a.x, a.w_ih, a.I, a.H, j, a.B, acc);
  accumulate<cell, true, vectorized>(a.h, a.w_hh, a.H, a.H, j, a.B, acc);
  // Every lane ends with every total; lane b then takes batch row b (a select, not a run-time register index).
  float sums[4] = {};
#pragma unroll
  for (int b = 0; b < kMaxBatch; ++b) {
    if (b >= a.B) break;
#pragma unroll
    for (int s = 0; s < slots; ++s) {
      const float total = cuda::warp_sum(acc[s][b]);
      if (lane == b) sums[s] = total;
    }
  }
  if (lane >= a.B) return;
  const int b = lane;
  float x[4], r[4], values[5];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const bool gru_n = cell == Cell::GRU && g == 2;
    x[g] = sums[g] + (a.b_ih ? static_cast<float>(a.b_ih[g * a.H + j]) : 0.f);
    r[g] = (gru_n ? sums[3] : 0.f) + (a.b_hh ? static_cast<float>(a.b_hh[g * a.H + j]) : 0.f);
  }
  float h = cell == Cell::GRU ? static_cast<float>(a.h[b * a.H + j]) : 0.f;
  float c = cell == Cell::LSTM ? static_cast<float>(a.c[b * a.H + j]) : 0.f;
  cuda::unit_forward<cell>(x, r, h, c, values);
  a.h_next[b * a.H + j] = h;
  if (cell == Cell::LSTM) a.c_next[b * a.H + j] = c;
  if (a.workspace) {
#pragma unroll
    for (int v = 0; v < W; ++v) a.workspace[(b * W + v) * a.H + j] = values[v];
  }
}

bool aligned16(const Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0; }

template <typename scalar_t>
const scalar_t* maybe(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

template <Cell cell>
void fused_step(const RecurrenceDims& d, const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih,
                const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                Tensor& h_next, Tensor& c_next, Tensor& workspace) {
  const int64_t I = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rnnkernels_fused_step", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const StepArgs<scalar_t> args{static_cast<int>(d.B), static_cast<int>(I), static_cast<int>(d.H),
                                    x.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                                    c.defined() ? c.data_ptr<scalar_t>() : nullptr, w_ih.data_ptr<scalar_t>(),
                                    w_hh.data_ptr<scalar_t>(), maybe<scalar_t>(b_ih), maybe<scalar_t>(b_hh),
                                    h_next.data_ptr<scalar_t>(), c_next.numel() ? c_next.data_ptr<scalar_t>() : nullptr,
                                    workspace.numel() ? workspace.data_ptr<scalar_t>() : nullptr};
      const bool vectorized = I % kVec<scalar_t> == 0 && d.H % kVec<scalar_t> == 0 && aligned16(x) && aligned16(h) &&
                              aligned16(w_ih) && aligned16(w_hh);
      const auto kernel = vectorized ? fused_step_kernel<cell, true, scalar_t> : fused_step_kernel<cell, false, scalar_t>;
      const auto blocks = static_cast<unsigned>((d.H + kWarps - 1) / kWarps);
      cuda::launch_kernel(kernel, blocks, kWarps * 32, 0, args);
    }
  });
}

}  // namespace

template <Cell cell>
Tensors3 step_cuda(const Tensor& x_in, const Tensor& h_in, const std::optional<Tensor>& c_in, const Tensor& w_ih_in,
                   const Tensor& w_hh_in, const std::optional<Tensor>& b_ih_in,
                   const std::optional<Tensor>& b_hh_in, const std::optional<Tensor>& w_hr_in, bool keep_workspace) {
  const RecurrenceDims d =
      check_step_args(gates_of(cell), x_in, h_in, c_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, w_hr_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), h = h_in.contiguous(), w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const Tensor c = cell == Cell::LSTM ? c_in->contiguous() : Tensor();
  const std::optional<Tensor> b_ih = contiguous(b_ih_in), b_hh = contiguous(b_hh_in), w_hr = contiguous(w_hr_in);
  const auto opts = x.options();
  const int64_t W = keep_workspace ? workspace_width(cell, d.H) : 0;
  if (d.B == 0) {
    const Tensor c_next = cell == Cell::LSTM ? at::empty({0, d.H}, opts) : at::empty({0}, opts);
    return {at::empty({0, d.P}, opts), c_next, at::empty({0, W}, opts)};
  }
  // H = 0 takes the GEMM path, whose launches skip empty grids (the fused kernel's would be 0 blocks).
  if (d.B <= kMaxBatch && d.H > 0 && !w_hr.has_value() && x.scalar_type() != at::kDouble) {
    Tensor h_next = at::empty({d.B, d.P}, opts), workspace = at::empty({d.B, W}, opts);
    Tensor c_next = cell == Cell::LSTM ? at::empty({d.B, d.H}, opts) : at::empty({0}, opts);
    fused_step<cell>(d, x, h, c, w_ih, w_hh, b_ih, b_hh, h_next, c_next, workspace);
    return {h_next, c_next, workspace};
  }
  const Tensor gx = linear_cuda(x, w_ih, b_ih).view({1, d.B, d.G * d.H});
  const cuda::Steps steps{1, false, nullptr};
  Tensor output = at::empty({1, d.B, d.P}, opts), workspace = at::empty({1, d.B, W}, opts);
  Tensor h_next = h.clone(), c_next = cell == Cell::LSTM ? c.clone() : at::empty({0}, opts);
  cuda::stepwise_forward<cell>(d, steps, gx, w_hh, b_hh, w_hr, h_next, c_next, output, workspace);
  return {h_next, c_next, workspace[0]};
}

#define RNNKERNELS_INSTANTIATE(cell)                                                                              \
  template Tensors3 step_cuda<cell>(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,    \
                                    const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&,    \
                                    const std::optional<Tensor>&, bool);
RNNKERNELS_FOR_EACH_CELL(RNNKERNELS_INSTANTIATE)

}  // namespace rnnkernels
