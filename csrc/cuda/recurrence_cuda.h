// CUDA implementations of the rnnkernels operators (schemas in csrc/ops.cpp), registered there under
// RNNKERNELS_WITH_CUDA. Plain C++ declarations: ops.cpp is compiled by the host compiler.
//
// Paths (chosen per call on the host, csrc/cuda/recurrence.cu): "persistent" (one cooperative kernel for
// the whole sequence, csrc/cuda/persistent.cu) where the weights fit in the co-resident blocks' shared
// memory, else "stepwise" (per step a cuBLAS GEMM and one fused pointwise kernel, csrc/cuda/stepwise.cu).
// RNNKERNELS_CUDA_PATH=persistent|stepwise forces one (an impossible forced choice raises with the reason).
//
// CUDA graphs: no host synchronisation and every allocation through the torch allocator, so layers can be
// captured; but `lengths` (PackedSequence input) lives on the CPU and is copied to the device per call,
// which graph capture does not allow: capture unpacked input only.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "../recurrence_args.h"

namespace rnnkernels {

template <Cell cell>
Tensors4 forward_cuda(const at::Tensor& gx, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
                      const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                      const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
                      bool reverse, bool keep_workspace);

template <Cell cell>
Tensors6 backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                       const std::optional<at::Tensor>& grad_c_n, const at::Tensor& h0,
                       const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
                       const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
                       bool reverse, const at::Tensor& output, const at::Tensor& workspace);

template <Cell cell>
Tensors3 step_cuda(const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
                   const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                   const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
                   bool keep_workspace);

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b);

}  // namespace rnnkernels
