// The CUDA sequence operators and rnnkernels::linear: argument checks (csrc/recurrence_args.h), the choice
// between the persistent and the stepwise path, buffers, and the whole-sequence weight gradients as
// cuBLAS GEMMs after the sweep, with the CPU backward's formulas.
//
// Assumes nothing of the caller's strides or alignment: inputs are made contiguous here, and the buffers
// the kernels read with 16-byte loads are allocated by the paths themselves. lengths lives on the CPU
// (checked there) and is copied to the device per call: no host synchronisation, but not capturable in a
// CUDA graph.
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>

#include "kernels.cuh"
#include "recurrence_cuda.h"

namespace rnnkernels {
namespace {

using at::Tensor;
using cuda::PersistentPlan;
using cuda::Steps;

// The persistent plan for this case, or one saying why not, which sends it down the stepwise path.
// RNNKERNELS_CUDA_PATH=persistent|stepwise forces a path (tests run both); a forced persistent path that
// cannot run raises with the reason rather than quietly testing the other path.
template <Cell cell>
PersistentPlan choose_path(bool backward, at::ScalarType dtype, const RecurrenceDims& d, bool projected,
                           const at::Device& device) {
  const char* env = std::getenv("RNNKERNELS_CUDA_PATH");
  const std::string forced = env ? env : "";
  TORCH_CHECK(forced.empty() || forced == "auto" || forced == "persistent" || forced == "stepwise",
              "rnnkernels: RNNKERNELS_CUDA_PATH must be persistent, stepwise or auto, got '", forced, "'");
  PersistentPlan plan;
  // An empty sweep has nothing for a persistent kernel to do, and H = 0 would plan blocks of 0 units.
  if (forced == "stepwise" || d.T == 0 || d.B == 0 || d.H == 0) {
    plan.why_not = "stepwise chosen";
    return plan;
  }
  plan = cuda::plan_persistent<cell>(backward, dtype, d, projected, device);
  TORCH_CHECK(forced != "persistent" || plan.why_not.empty(),
              "rnnkernels: RNNKERNELS_CUDA_PATH=persistent, but this case cannot run persistently: ", plan.why_not);
  return plan;
}

// The lengths on the device for the kernels (an asynchronous copy from the CPU), undefined when absent.
Tensor device_lengths(const std::optional<Tensor>& lengths, const at::Device& device) {
  return lengths.has_value() ? lengths->to(device, /*non_blocking=*/true) : Tensor();
}

// A (T, B, width) buffer; zeroed where only active (t, b) will be written (the stepwise path with lengths).
Tensor sweep_buffer(bool zeroed, int64_t T, int64_t B, int64_t width, const at::TensorOptions& options) {
  return zeroed ? at::zeros({T, B, width}, options) : at::empty({T, B, width}, options);
}

// h_prev[t, b] = the state step t of sequence b started from (h0 at its first step, else output at the
// previous step), zero where the sequence is inactive: the right operand of dW_hh = d gates^T h_prev.
template <typename scalar_t>
__global__ void previous_states_kernel(Steps steps, int64_t B, int64_t P, const scalar_t* __restrict__ h0,
                                       const scalar_t* __restrict__ output, scalar_t* __restrict__ h_prev) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= steps.T * B * P) return;
  const int64_t t = i / (B * P), b = (i / P) % B, p = i % P;
  scalar_t value = scalar_t(0);
  if (steps.active(t, b)) value = steps.first(t, b) ? h0[b * P + p] : output[(steps.previous(t) * B + b) * P + p];
  h_prev[i] = value;
}

Tensor previous_states(const Steps& steps, const RecurrenceDims& d, const Tensor& h0, const Tensor& output) {
  Tensor h_prev = at::empty({d.T, d.B, d.P}, output.options());
  const int64_t n = h_prev.numel();
  if (n == 0) return h_prev;
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output.scalar_type(), "rnnkernels_previous_states", [&] {
    cuda::launch_kernel(previous_states_kernel<scalar_t>, static_cast<unsigned>((n + threads - 1) / threads), threads,
                        0, steps, d.B, d.P, h0.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
                        h_prev.data_ptr<scalar_t>());
  });
  return h_prev;
}

}  // namespace

template <Cell cell>
Tensors4 forward_cuda(const Tensor& gx_in, const Tensor& h0_in, const std::optional<Tensor>& c0_in,
                      const Tensor& w_hh_in, const std::optional<Tensor>& b_hh_in,
                      const std::optional<Tensor>& w_hr_in, const std::optional<Tensor>& lengths_in, bool reverse,
                      bool keep_workspace) {
  const RecurrenceDims d = check_recurrence_args(gates_of(cell), gx_in.sizes(), gx_in, h0_in, c0_in, w_hh_in,
                                                 b_hh_in, w_hr_in, lengths_in);
  const c10::cuda::CUDAGuard guard(gx_in.device());
  const Tensor gx = gx_in.contiguous(), h0 = h0_in.contiguous(), w_hh = w_hh_in.contiguous();
  const Tensor c0 = cell == Cell::LSTM ? c0_in->contiguous() : Tensor();
  const std::optional<Tensor> b_hh = contiguous(b_hh_in), w_hr = contiguous(w_hr_in);
  const Tensor lengths = device_lengths(lengths_in, gx.device());
  const Steps steps{d.T, reverse, lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
  const int64_t W = keep_workspace ? workspace_width(cell, d.H) : 0;
  const auto opts = gx.options();
  const PersistentPlan plan = choose_path<cell>(false, gx.scalar_type(), d, w_hr.has_value(), gx.device());
  if (plan.why_not.empty()) {
    Tensor output = at::empty({d.T, d.B, d.P}, opts), workspace = at::empty({d.T, d.B, W}, opts);
    Tensor h_n = at::empty_like(h0), c_n = cell == Cell::LSTM ? at::empty_like(c0) : at::empty({0}, opts);
    cuda::persistent_forward<cell>(plan, d, steps, gx, h0, c0, w_hh, b_hh, output, h_n, c_n, workspace);
    return {output, h_n, c_n, workspace};
  }
  const bool zeroed = lengths.defined();
  Tensor output = sweep_buffer(zeroed, d.T, d.B, d.P, opts), workspace = sweep_buffer(zeroed, d.T, d.B, W, opts);
  Tensor h = h0.clone(), c = cell == Cell::LSTM ? c0.clone() : at::empty({0}, opts);
  if (d.T > 0 && d.B > 0) cuda::stepwise_forward<cell>(d, steps, gx, w_hh, b_hh, w_hr, h, c, output, workspace);
  return {output, h, c, workspace};
}

template <Cell cell>
Tensors6 backward_cuda(const Tensor& grad_output_in, const Tensor& grad_h_n, const std::optional<Tensor>& grad_c_n,
                       const Tensor& h0_in, const std::optional<Tensor>& c0_in, const Tensor& w_hh_in,
                       const std::optional<Tensor>& w_hr_in, const std::optional<Tensor>& lengths_in, bool reverse,
                       const Tensor& output_in, const Tensor& workspace_in) {
  const RecurrenceDims d = check_backward_args(cell, grad_output_in, grad_h_n, grad_c_n, h0_in, c0_in, w_hh_in,
                                               w_hr_in, lengths_in, output_in, workspace_in);
  const c10::cuda::CUDAGuard guard(output_in.device());
  const int64_t T = d.T, B = d.B, GH = d.G * d.H;
  const Tensor grad_output = grad_output_in.contiguous(), h0 = h0_in.contiguous(), w_hh = w_hh_in.contiguous(),
               output = output_in.contiguous(), workspace = workspace_in.contiguous();
  const Tensor c0 = cell == Cell::LSTM ? c0_in->contiguous() : Tensor();
  const Tensor grad_c_n_in = cell == Cell::LSTM && grad_c_n.has_value() ? grad_c_n->contiguous() : Tensor();
  const std::optional<Tensor> w_hr = contiguous(w_hr_in);
  const bool projected = w_hr.has_value();
  const Tensor lengths = device_lengths(lengths_in, output.device());
  const Steps steps{T, reverse, lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
  const auto opts = output.options();
  const PersistentPlan plan = choose_path<cell>(true, output.scalar_type(), d, projected, output.device());
  const bool persistent = plan.why_not.empty(), zeroed = lengths.defined() && !persistent;
  Tensor grad_gx = sweep_buffer(zeroed, T, B, GH, opts);
  Tensor grad_gh = cell == Cell::GRU ? sweep_buffer(zeroed, T, B, GH, opts) : grad_gx;
  Tensor dh_all = projected ? sweep_buffer(zeroed, T, B, d.P, opts) : Tensor();
  Tensor m_all = projected ? sweep_buffer(zeroed, T, B, d.H, opts) : Tensor();
  Tensor grad_h0, grad_c0;
  if (persistent) {
    grad_h0 = at::empty_like(h0);
    grad_c0 = cell == Cell::LSTM ? at::empty({B, d.H}, opts) : at::empty({0}, opts);
    cuda::persistent_backward<cell>(plan, d, steps, grad_output, grad_h_n.contiguous(), grad_c_n_in, h0, c0, w_hh,
                                    output, workspace, grad_gx, grad_gh, grad_h0, grad_c0);
  } else {
    grad_h0 = grad_h_n.contiguous().clone();
    grad_c0 = cell != Cell::LSTM    ? at::empty({0}, opts)
              : grad_c_n_in.defined() ? grad_c_n_in.clone()
                                      : at::zeros({B, d.H}, opts);
    if (T > 0 && B > 0) {
      cuda::stepwise_backward<cell>(d, steps, grad_output, grad_h0, grad_c0, h0, c0, w_hh, w_hr, output, workspace,
                                    grad_gx, grad_gh, dh_all, m_all);
    }
  }
  const Tensor grad_gh_rows = grad_gh.view({T * B, GH});
  Tensor grad_w_hh = at::mm(grad_gh_rows.t(), previous_states(steps, d, h0, output).view({T * B, d.P}));
  Tensor grad_b_hh = grad_gh_rows.sum(0);
  Tensor grad_w_hr = projected ? at::mm(dh_all.view({T * B, d.P}).t(), m_all.view({T * B, d.H}))
                               : at::empty({0}, opts);
  return {grad_gx, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr};
}

Tensor linear_cuda(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  check_linear_args(x, w, b);
  const c10::cuda::CUDAGuard guard(x.device());
  return b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

#define RNNKERNELS_INSTANTIATE(cell)                                                                               \
  template Tensors4 forward_cuda<cell>(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,  \
                                       const std::optional<Tensor>&, const std::optional<Tensor>&,                 \
                                       const std::optional<Tensor>&, bool, bool);                                  \
  template Tensors6 backward_cuda<cell>(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, \
                                        const std::optional<Tensor>&, const Tensor&, const std::optional<Tensor>&, \
                                        const std::optional<Tensor>&, bool, const Tensor&, const Tensor&);
RNNKERNELS_FOR_EACH_CELL(RNNKERNELS_INSTANTIATE)

}  // namespace rnnkernels
