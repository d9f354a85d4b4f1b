// Stepwise CUDA path: the CPU kernels' loop (csrc/cpu/recurrence.cpp) with cuBLAS GEMMs. Per time step one
// GEMM for the recurrent term into a preallocated buffer, then ONE fused pointwise kernel over batch x
// hidden for every gate and the state update; the backward sweep likewise, with the carried gradient folded
// into its GEMM. Runs any size and every floating dtype (float64 included), and the projected LSTM.
//
// Assumes: every tensor contiguous and on the current device (recurrence.cu makes them so); no alignment
// beyond the element's; buffers that only active (t, b) write arrive zeroed where lengths are given.
// Element indices fit in int64; a kernel covers at most B * max(H, P) elements of one step.
#include <ATen/OpMathType.h>

#include "kernels.cuh"

namespace rnnkernels::cuda {
namespace {

constexpr int kThreads = 256;

// Runs kernel over n elements. None where n is 0 (H = 0 or P = 0, legal shapes): a grid of 0 blocks is a
// launch error.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t n, Args... args) {
  if (n == 0) return;
  launch_kernel(kernel, static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, args...);
}

// One time step's pointwise work after the GEMM gh = h W_hh^T + b_hh. h_out receives the new hidden
// values: the state h itself, or (projected LSTM) the unprojected o * tanh(c) that the projection GEMM reads.
template <Cell cell, typename scalar_t>
__global__ void forward_step_kernel(Steps steps, int64_t t, int64_t B, int64_t H, const scalar_t* __restrict__ gx,
                                    const scalar_t* __restrict__ gh, const scalar_t* h_prev, scalar_t* c,
                                    scalar_t* h_out, scalar_t* __restrict__ output, scalar_t* __restrict__ ws) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int G = static_cast<int>(gates_of(cell)), W = workspace_values(cell);
  const int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (i >= B * H) return;
  const int64_t b = i / H, j = i % H;
  if (!steps.active(t, b)) return;
  acc_t x[4], r[4], values[5];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    x[g] = gx[b * G * H + g * H + j];
    r[g] = gh[b * G * H + g * H + j];
  }
  acc_t h = cell == Cell::GRU ? acc_t(h_prev[i]) : acc_t(0);
  acc_t cv = cell == Cell::LSTM ? acc_t(c[i]) : acc_t(0);
  unit_forward<cell>(x, r, h, cv, values);
  if (ws) {
#pragma unroll
    for (int k = 0; k < W; ++k) ws[b * W * H + k * H + j] = values[k];
  }
  if (cell == Cell::LSTM) c[i] = cv;
  h_out[i] = h;
  if (output) output[i] = h;
}

// Projected LSTM, after output[t] = m w_hr^T: the active rows take it as their state; the rest output zeros.
template <typename scalar_t>
__global__ void projection_step_kernel(Steps steps, int64_t t, int64_t B, int64_t P, scalar_t* h,
                                       scalar_t* output) {
  const int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (i >= B * P) return;
  if (steps.active(t, i / P)) {
    h[i] = output[i];
  } else {
    output[i] = scalar_t(0);
  }
}

// Projected LSTM, start of a backward step: dh += grad_output[t] on active rows, kept for dW_hr. carry is
// what the step's GEMM adds to grad_gh[t] W_hh: the unchanged dh of inactive rows, zero for active ones.
template <typename scalar_t>
__global__ void accumulate_step_kernel(Steps steps, int64_t t, int64_t B, int64_t P,
                                       const scalar_t* __restrict__ grad_output, scalar_t* __restrict__ dh,
                                       scalar_t* __restrict__ dh_all, scalar_t* __restrict__ carry) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (i >= B * P) return;
  if (steps.active(t, i / P)) {
    const scalar_t g = acc_t(dh[i]) + acc_t(grad_output[i]);
    dh[i] = g;
    dh_all[i] = g;
    carry[i] = scalar_t(0);
  } else {
    carry[i] = dh[i];
  }
}

// One backward step's pointwise work. dh_in is dL/dh_t before this step's output gradient (unprojected:
// the carried dh, to which grad_output[t] is added here) or dL/dm_t (projected: already complete). For
// unprojected cells it sets carry (what the GEMM dh = carry + grad_gh[t] W_hh adds): the GRU's direct
// term on active rows, zero for other cells, the unchanged dh on inactive rows.
template <Cell cell, bool projected, typename scalar_t>
__global__ void backward_step_kernel(Steps steps, int64_t t, int64_t B, int64_t H,
                                     const scalar_t* __restrict__ dh_in, const scalar_t* __restrict__ grad_output,
                                     const scalar_t* __restrict__ workspace, const scalar_t* __restrict__ output,
                                     const scalar_t* __restrict__ h0, const scalar_t* __restrict__ c0,
                                     scalar_t* __restrict__ dc, scalar_t* __restrict__ grad_gx,
                                     scalar_t* __restrict__ grad_gh, scalar_t* __restrict__ m_all,
                                     scalar_t* __restrict__ carry) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int G = static_cast<int>(gates_of(cell)), W = workspace_values(cell);
  const int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (i >= B * H) return;
  const int64_t b = i / H, j = i % H, row = t * B + b;
  if (!steps.active(t, b)) {
    if (!projected) carry[i] = dh_in[i];
    return;
  }
  const acc_t dh = projected ? acc_t(dh_in[i]) : acc_t(dh_in[i]) + acc_t(grad_output[row * H + j]);
  acc_t values[5];
#pragma unroll
  for (int k = 0; k < W; ++k) values[k] = workspace[row * W * H + k * H + j];
  const bool first = steps.first(t, b);
  const int64_t prev_row = steps.previous(t) * B + b;
  acc_t prev = 0, h = 0;
  if constexpr (cell == Cell::LSTM) prev = first ? acc_t(c0[i]) : acc_t(workspace[prev_row * W * H + 4 * H + j]);
  if constexpr (cell == Cell::GRU) prev = first ? acc_t(h0[i]) : acc_t(output[prev_row * H + j]);
  if constexpr (cell == Cell::RNN_TANH || cell == Cell::RNN_RELU) h = output[row * H + j];
  acc_t dcv = cell == Cell::LSTM ? acc_t(dc[i]) : acc_t(0), dgx[4], dgh[4], direct = 0;
  unit_backward<cell>(dh, dcv, values, prev, h, dgx, dgh, direct);
#pragma unroll
  for (int g = 0; g < G; ++g) {
    grad_gx[row * G * H + g * H + j] = dgx[g];
    if (cell == Cell::GRU) grad_gh[row * G * H + g * H + j] = dgh[g];
  }
  if (cell == Cell::LSTM) dc[i] = dcv;
  if (projected) m_all[row * H + j] = values[3] * Fn<acc_t>::tanh(values[4]);
  if (!projected) carry[i] = direct;
}

template <typename scalar_t>
scalar_t* ptr(const Tensor& t, int64_t offset = 0) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<scalar_t>() + offset : nullptr;
}

template <Cell cell, typename scalar_t>
void forward_impl(const RecurrenceDims& d, const Steps& steps, const Tensor& gx, const Tensor& w_hh,
                  const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr, Tensor& h, Tensor& c,
                  Tensor& output, Tensor& workspace) {
  const int64_t T = d.T, B = d.B, H = d.H, P = d.P, GH = d.G * d.H, W = workspace_width(cell, H);
  const bool projected = w_hr.has_value(), keep = workspace.size(2) > 0;
  Tensor gh = at::empty({B, GH}, gx.options());
  Tensor m = projected ? at::empty({B, H}, gx.options()) : h;
  const Tensor w_hh_t = w_hh.t();
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = steps.time(step);
    b_hh.has_value() ? at::addmm_out(gh, *b_hh, h, w_hh_t) : at::mm_out(gh, h, w_hh_t);
    launch(forward_step_kernel<cell, scalar_t>, B * H, steps, t, B, H, ptr<scalar_t>(gx, t * B * GH),
           ptr<scalar_t>(gh), ptr<scalar_t>(h), ptr<scalar_t>(c), ptr<scalar_t>(m),
           projected ? nullptr : ptr<scalar_t>(output, t * B * P), keep ? ptr<scalar_t>(workspace, t * B * W) : nullptr);
    if (projected) {
      Tensor out_t = output[t];
      at::mm_out(out_t, m, w_hr->t());
      launch(projection_step_kernel<scalar_t>, B * P, steps, t, B, P, ptr<scalar_t>(h),
             ptr<scalar_t>(output, t * B * P));
    }
  }
}

template <Cell cell, typename scalar_t>
void backward_impl(const RecurrenceDims& d, const Steps& steps, const Tensor& grad_output, Tensor& dh, Tensor& dc,
                   const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                   const Tensor& output, const Tensor& workspace, Tensor& grad_gx, Tensor& grad_gh,
                   Tensor& dh_all, Tensor& m_all) {
  const int64_t T = d.T, B = d.B, H = d.H, P = d.P;
  const bool projected = w_hr.has_value();
  Tensor carry = at::empty({B, P}, dh.options());
  Tensor dm = projected ? at::empty({B, H}, dh.options()) : Tensor();
  const auto cell_step = projected ? backward_step_kernel<cell, true, scalar_t>
                                   : backward_step_kernel<cell, false, scalar_t>;
  for (int64_t step = T - 1; step >= 0; --step) {
    const int64_t t = steps.time(step);
    if (projected) {
      launch(accumulate_step_kernel<scalar_t>, B * P, steps, t, B, P, ptr<scalar_t>(grad_output, t * B * P),
             ptr<scalar_t>(dh), ptr<scalar_t>(dh_all, t * B * P), ptr<scalar_t>(carry));
      at::mm_out(dm, dh, *w_hr);
    }
    launch(cell_step, B * H, steps, t, B, H, projected ? ptr<scalar_t>(dm) : ptr<scalar_t>(dh),
           ptr<scalar_t>(grad_output), ptr<scalar_t>(workspace), ptr<scalar_t>(output), ptr<scalar_t>(h0),
           ptr<scalar_t>(c0), ptr<scalar_t>(dc), ptr<scalar_t>(grad_gx), ptr<scalar_t>(grad_gh), ptr<scalar_t>(m_all),
           ptr<scalar_t>(carry));
    at::addmm_out(dh, carry, grad_gh[t], w_hh);
  }
}

}  // namespace

template <Cell cell>
void stepwise_forward(const RecurrenceDims& d, const Steps& steps, const Tensor& gx, const Tensor& w_hh,
                      const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr, Tensor& h, Tensor& c,
                      Tensor& output, Tensor& workspace) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gx.scalar_type(), "rnnkernels_stepwise_forward", [&] {
    forward_impl<cell, scalar_t>(d, steps, gx, w_hh, b_hh, w_hr, h, c, output, workspace);
  });
}

template <Cell cell>
void stepwise_backward(const RecurrenceDims& d, const Steps& steps, const Tensor& grad_output, Tensor& dh,
                       Tensor& dc, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                       const std::optional<Tensor>& w_hr, const Tensor& output, const Tensor& workspace,
                       Tensor& grad_gx, Tensor& grad_gh, Tensor& dh_all, Tensor& m_all) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output.scalar_type(), "rnnkernels_stepwise_backward", [&] {
    backward_impl<cell, scalar_t>(d, steps, grad_output, dh, dc, h0, c0, w_hh, w_hr, output, workspace, grad_gx,
                                  grad_gh, dh_all, m_all);
  });
}

#define RNNKERNELS_INSTANTIATE(cell)                                                                              \
  template void stepwise_forward<cell>(const RecurrenceDims&, const Steps&, const Tensor&, const Tensor&,          \
                                       const std::optional<Tensor>&, const std::optional<Tensor>&, Tensor&,        \
                                       Tensor&, Tensor&, Tensor&);                                                 \
  template void stepwise_backward<cell>(const RecurrenceDims&, const Steps&, const Tensor&, Tensor&, Tensor&,      \
                                        const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, \
                                        const Tensor&, const Tensor&, Tensor&, Tensor&, Tensor&, Tensor&);
RNNKERNELS_FOR_EACH_CELL(RNNKERNELS_INSTANTIATE)

}  // namespace rnnkernels::cuda
