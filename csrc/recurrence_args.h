// Shapes of the recurrence operators and the host-side checks every backend runs before touching a
// raw pointer. One layer, one direction, time-major:
//   gx      (T, B, G*H)  input projection x W_ih^T + b_ih for all steps; G = 4 (LSTM), 3 (GRU), 1 (RNN)
//   h0      (B, P)       P = proj_size for a projected LSTM, else H
//   c0      (B, H)       LSTM only
//   w_hh    (G*H, P), b_hh (G*H), w_hr (P, H) (projected LSTM only)
//   lengths (B) int64 on the CPU, each in [0, T]: a step t >= lengths[b] leaves the state of sequence b
//           unchanged and writes zeros to its output, as torch.nn does for a PackedSequence.
//   reverse walks t from T-1 down to 0; sequence b then starts at t = lengths[b] - 1.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>

namespace rnnkernels {

struct RecurrenceDims {
  int64_t T, B, H, P, G;
};

inline void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "rnnkernels: ", name,
              " must have shape [", rows, ", ", cols, "], got ", t.sizes());
}

inline void check_like(const at::Tensor& like, std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(),
                "rnnkernels: all tensors must share the input's dtype and device (", like.scalar_type(), ", ",
                like.device(), "), got ", t.scalar_type(), " on ", t.device());
  }
}

// gx_sizes is the input projection's shape; like carries the dtype and device every tensor must share.
inline RecurrenceDims check_recurrence_args(int64_t gates, at::IntArrayRef gx_sizes, const at::Tensor& like,
                                            const at::Tensor& h0,
                                            const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
                                            const std::optional<at::Tensor>& b_hh,
                                            const std::optional<at::Tensor>& w_hr,
                                            const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(gx_sizes.size() == 3, "rnnkernels: the input projection must be 3-D (T, B, gates*H), got ",
              gx_sizes.size(), "-D");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % gates == 0 && w_hh.size(0) == gx_sizes[2],
              "rnnkernels: w_hh must be [", gates, "*hidden_size, P] matching the input projection's last "
              "dimension ", gx_sizes[2], ", got ", w_hh.sizes());
  RecurrenceDims d{gx_sizes[0], gx_sizes[1], w_hh.size(0) / gates, w_hh.size(1), gates};
  TORCH_CHECK(d.T < (int64_t{1} << 40) && d.B * d.H * d.G < (int64_t{1} << 40),
              "rnnkernels: sizes out of range");
  check_matrix(h0, "h0", d.B, d.P);
  if (w_hr.has_value()) {
    TORCH_CHECK(gates == 4, "rnnkernels: w_hr (proj_size) belongs to the LSTM only");
    check_matrix(*w_hr, "w_hr", d.P, d.H);
  } else {
    TORCH_CHECK(d.P == d.H, "rnnkernels: w_hh must be [", gates, "*H, H] without a projection, got ",
                w_hh.sizes());
  }
  if (gates == 4) {
    TORCH_CHECK(c0.has_value(), "rnnkernels: the LSTM recurrence needs c0");
    check_matrix(*c0, "c0", d.B, d.H);
  }
  if (b_hh.has_value()) {
    TORCH_CHECK(b_hh->dim() == 1 && b_hh->size(0) == d.G * d.H, "rnnkernels: b_hh must have shape [",
                d.G * d.H, "], got ", b_hh->sizes());
  }
  check_like(like, {h0, w_hh});
  for (const auto* t : {&c0, &b_hh, &w_hr}) {
    if (t->has_value()) check_like(like, {**t});
  }
  if (lengths.has_value()) {
    const at::Tensor& len = *lengths;
    TORCH_CHECK(len.dim() == 1 && len.size(0) == d.B && len.scalar_type() == at::kLong && len.is_cpu(),
                "rnnkernels: lengths must be a CPU int64 tensor of shape [", d.B, "], got ",
                len.scalar_type(), " ", len.sizes(), " on ", len.device());
    if (d.B > 0) {
      TORCH_CHECK(len.min().item<int64_t>() >= 0 && len.max().item<int64_t>() <= d.T,
                  "rnnkernels: lengths must lie in [0, ", d.T, "]");
    }
  }
  return d;
}

}  // namespace rnnkernels
