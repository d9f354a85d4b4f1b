// Shapes of the recurrence operators and the host-side checks every backend runs before touching a
// raw pointer. One layer, one direction, time-major:
//   gx      (T, B, G*H)  input projection x W_ih^T + b_ih for all steps; G = 4 (LSTM), 3 (GRU), 1 (RNN)
//   h0      (B, P)       P = proj_size for a projected LSTM, else H
//   c0      (B, H)       LSTM only
//   w_hh    (G*H, P), b_hh (G*H), w_hr (P, H) (projected LSTM only)
//   lengths (B) int64 on the CPU, each in [0, T]: a step t >= lengths[b] leaves the state of sequence b
//           unchanged and writes zeros to its output, as torch.nn does for a PackedSequence.
//   reverse walks t from T-1 down to 0; sequence b then starts at t = lengths[b] - 1.
// The forward keeps, per (t, b), what the backward reads (the workspace, csrc/cpu/recurrence.cpp):
//   LSTM 5H: i, f, g, o (activated), c; GRU 4H: r, z, n, W_hn h + b_hn; RNN nothing.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <tuple>

namespace rnnkernels {

enum class Cell { LSTM, GRU, RNN_TANH, RNN_RELU };

// The cell's name in its operators: rnnkernels::{name}_forward, _backward and _step.
constexpr const char* name_of(Cell cell) {
  return cell == Cell::LSTM ? "lstm" : cell == Cell::GRU ? "gru" : cell == Cell::RNN_TANH ? "rnn_tanh" : "rnn_relu";
}

constexpr int64_t gates_of(Cell cell) {
  return cell == Cell::LSTM ? 4 : cell == Cell::GRU ? 3 : 1;
}

constexpr int64_t workspace_width(Cell cell, int64_t H) {
  return cell == Cell::LSTM ? 5 * H : cell == Cell::GRU ? 4 * H : 0;
}

// What the operators return: forward (output, h_n, c_n, workspace); backward (grad_gx, grad_h0, grad_c0,
// grad_w_hh, grad_b_hh, grad_w_hr); one step (h_next, c_next, workspace).
// Expands M(cell) for every cell: the explicit instantiations of each file's templates.
#define RNNKERNELS_FOR_EACH_CELL(M) M(Cell::LSTM) M(Cell::GRU) M(Cell::RNN_TANH) M(Cell::RNN_RELU)

using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensors6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// An optional tensor made contiguous: every device's kernels take their inputs in that layout.
inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

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

// rnnkernels::linear: x [rows, k], w [n, k], b [n] or none, one dtype.
inline void check_linear_args(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "rnnkernels.linear: expects x [rows, k] and w [n, k], got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(!b.has_value() || (b->dim() == 1 && b->size(0) == w.size(0)),
              "rnnkernels.linear: b must have shape [", w.size(0), "]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && (!b.has_value() || b->scalar_type() == w.scalar_type()),
              "rnnkernels.linear: x, w and b must share a dtype");
  TORCH_CHECK(x.device() == w.device() && (!b.has_value() || b->device() == w.device()),
              "rnnkernels.linear: x, w and b must be on one device");
}

// The one-step operator's arguments: x (B, I), w_ih (G*H, I), b_ih (G*H), the rest as for a sequence of
// one step (h, c as h0, c0). Returns the dims of that sequence, T = 1.
inline RecurrenceDims check_step_args(int64_t gates, const at::Tensor& x, const at::Tensor& h,
                                      const std::optional<at::Tensor>& c, const at::Tensor& w_ih,
                                      const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                      const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr) {
  TORCH_CHECK(x.dim() == 2, "rnnkernels: x must be 2-D (B, input_size), got ", x.dim(), "-D");
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(1) == x.size(1), "rnnkernels: w_ih must be [gates*hidden_size, ",
              x.size(1), "] for x of shape ", x.sizes(), ", got ", w_ih.sizes());
  const RecurrenceDims d =
      check_recurrence_args(gates, {1, x.size(0), w_ih.size(0)}, x, h, c, w_hh, b_hh, w_hr, std::nullopt);
  if (b_ih.has_value()) {
    TORCH_CHECK(b_ih->dim() == 1 && b_ih->size(0) == w_ih.size(0), "rnnkernels: b_ih must have shape [",
                w_ih.size(0), "], got ", b_ih->sizes());
  }
  check_like(x, {w_ih});
  if (b_ih.has_value()) check_like(x, {*b_ih});
  return d;
}

// The backward operator's arguments: those of the forward plus the forward's outputs and their gradients.
inline RecurrenceDims check_backward_args(Cell cell, const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                          const std::optional<at::Tensor>& grad_c_n, const at::Tensor& h0,
                                          const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
                                          const std::optional<at::Tensor>& w_hr,
                                          const std::optional<at::Tensor>& lengths, const at::Tensor& output,
                                          const at::Tensor& workspace) {
  TORCH_CHECK(output.dim() == 3, "rnnkernels: output must be 3-D (T, B, P)");
  const int64_t T = output.size(0), B = output.size(1);
  const RecurrenceDims d = check_recurrence_args(gates_of(cell), {T, B, w_hh.size(0)}, output, h0, c0, w_hh,
                                                 std::nullopt, w_hr, lengths);
  TORCH_CHECK(output.size(2) == d.P, "rnnkernels: output must be [T, B, ", d.P, "], got ", output.sizes());
  TORCH_CHECK(grad_output.sizes() == output.sizes() && grad_h_n.sizes() == h0.sizes(),
              "rnnkernels: gradient shapes must match the forward's outputs");
  TORCH_CHECK(workspace.dim() == 3 && workspace.size(0) == T && workspace.size(1) == B &&
                  workspace.size(2) == workspace_width(cell, d.H),
              "rnnkernels: workspace does not come from this forward, or the forward ran with "
              "keep_workspace=False");
  check_like(output, {grad_output, grad_h_n, workspace});
  if (cell == Cell::LSTM && grad_c_n.has_value()) {
    check_matrix(*grad_c_n, "grad_c_n", B, d.H);
    check_like(output, {*grad_c_n});
  }
  return d;
}

}  // namespace rnnkernels
