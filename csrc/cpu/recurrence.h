// CPU implementations of the rnnkernels recurrence operators (schemas in csrc/ops.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../recurrence_args.h"

namespace rnnkernels {

template <Cell cell>
Tensors4 forward_cpu(const at::Tensor& gx, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
                     const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                     const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
                     bool reverse, bool keep_workspace);

template <Cell cell>
Tensors6 backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                      const std::optional<at::Tensor>& grad_c_n, const at::Tensor& h0,
                      const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
                      const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths,
                      bool reverse, const at::Tensor& output, const at::Tensor& workspace);

// float32 units per vector register of the CPU kernels as built: 16 (AVX-512), 8 (AVX2 with FMA), 4 (NEON),
// or 1 where the build targets none of them (csrc/cpu/float_lanes.h).
int64_t cpu_float_lanes();

// What runs the per-step products of bfloat16 recurrences (csrc/cpu/bfloat16_panels.h): "amx",
// "avx512_bf16", or "" where neither is built (they then take a oneDNN or BLAS GEMM a step).
const char* cpu_bfloat16_panels();

// One time step with its input projection: the sequence forward at T = 1 behind one operator call, so
// that generation pays one dispatch per layer and step.
template <Cell cell>
Tensors3 step_cpu(const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
                  const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                  const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
                  bool keep_workspace);

// x w^T + b for 2-D x (any strides): the input projection and its gradients on the CPU.
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b);

}  // namespace rnnkernels
