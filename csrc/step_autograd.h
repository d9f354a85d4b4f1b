// Autograd of the one-step operators rnnkernels::{cell}_step, in C++ rather than through
// torch.library.register_autograd: generation calls them once per token, and a Python autograd kernel
// costs several microseconds per call even under no_grad, about as much as the rest of the call.
// Registered for every device in csrc/ops.cpp. The backward is the sequence backward operator at T = 1,
// plus the input projection's gradients.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "recurrence_args.h"

namespace rnnkernels {

template <Cell cell>
Tensors3 step_autograd(const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
                       const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                       const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
                       bool keep_workspace);

}  // namespace rnnkernels
