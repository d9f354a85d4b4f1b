#include "step_autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <string>

namespace rnnkernels {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <Cell cell>
const auto& step_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow((std::string("rnnkernels::") + name_of(cell) + "_step").c_str(), "")
                             .typed<decltype(step_autograd<cell>)>();
  return op;
}

template <Cell cell>
const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow((std::string("rnnkernels::") + name_of(cell) + "_backward").c_str(), "")
          .typed<Tensors6(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                          const std::optional<Tensor>&, const Tensor&, const std::optional<Tensor>&,
                          const std::optional<Tensor>&, bool, const Tensor&, const Tensor&)>();
  return op;
}

const auto& linear_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rnnkernels::linear", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&)>();
  return op;
}

Tensor or_undefined(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

std::optional<Tensor> or_none(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

template <Cell cell>
struct Step : torch::autograd::Function<Step<cell>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h, const std::optional<Tensor>& c,
                               const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                               const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
                               bool keep_workspace) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [h_next, c_next, workspace] = step_op<cell>().call(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, keep_workspace);
    ctx->save_for_backward({x, h, or_undefined(c), w_ih, w_hh, or_undefined(w_hr), h_next, workspace});
    ctx->saved_data["b_ih"] = b_ih.has_value();
    ctx->saved_data["b_hh"] = b_hh.has_value();
    // Unused outputs (the workspace, c_next of the last step) get no zero-filled gradient.
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({workspace});
    return {h_next, c_next, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "rnnkernels: the compiled backward is not differentiable (create_graph=True); "
                "run double backward on backend='reference'");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &h = saved[1], &c = saved[2], &w_ih = saved[3], &w_hh = saved[4], &w_hr = saved[5],
                 &h_next = saved[6], &workspace = saved[7];
    const Tensor grad_h_next = grads[0].defined() ? grads[0] : at::zeros_like(h_next);
    const std::optional<Tensor> grad_c_next = cell == Cell::LSTM ? or_none(grads[1]) : std::nullopt;
    auto [grad_gx, grad_h, grad_c, grad_w_hh, grad_b_hh, grad_w_hr] =
        backward_op<cell>().call(grad_h_next.unsqueeze(0), at::zeros_like(h), grad_c_next, h, or_none(c), w_hh,
                                 or_none(w_hr), std::nullopt, false, h_next.unsqueeze(0), workspace.unsqueeze(0));
    const Tensor dgx = grad_gx[0];
    // The input projection x w_ih^T + b_ih: its gradients from the gates' input parts. needs_input_grad
    // counts tensor inputs only: x, h, c if given, w_ih, w_hh, b_ih if given, ...
    const bool b_ih = ctx->saved_data["b_ih"].toBool(), b_hh = ctx->saved_data["b_hh"].toBool();
    const size_t w_ih_input = c.defined() ? 3 : 2;
    const Tensor grad_x = ctx->needs_input_grad(0) ? linear_op().call(dgx, w_ih.t(), std::nullopt) : Tensor();
    const Tensor grad_w_ih =
        ctx->needs_input_grad(w_ih_input) ? linear_op().call(dgx.t(), x.t(), std::nullopt) : Tensor();
    const Tensor grad_b_ih = b_ih && ctx->needs_input_grad(w_ih_input + 2) ? dgx.sum(0) : Tensor();
    return {grad_x,    grad_h,    cell == Cell::LSTM ? grad_c : Tensor(),     grad_w_ih,
            grad_w_hh, grad_b_ih, b_hh ? grad_b_hh : Tensor(), w_hr.defined() ? grad_w_hr : Tensor(),
            Tensor()};
  }
};

bool requires_grad(const Tensor& t) { return t.requires_grad(); }

bool requires_grad(const std::optional<Tensor>& t) { return t.has_value() && t->requires_grad(); }

}  // namespace

template <Cell cell>
Tensors3 step_autograd(const Tensor& x, const Tensor& h, const std::optional<Tensor>& c, const Tensor& w_ih,
                       const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                       const std::optional<Tensor>& w_hr, bool keep_workspace) {
  const bool recorded = at::GradMode::is_enabled() &&
                        (requires_grad(x) || requires_grad(h) || requires_grad(c) || requires_grad(w_ih) ||
                         requires_grad(w_hh) || requires_grad(b_ih) || requires_grad(b_hh) || requires_grad(w_hr));
  if (!recorded) {  // inference: straight to the device's kernel
    at::AutoDispatchBelowADInplaceOrView below;
    return step_op<cell>().call(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, keep_workspace);
  }
  const variable_list out = Step<cell>::apply(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, keep_workspace);
  return {out[0], out[1], out[2]};
}

#define RNNKERNELS_INSTANTIATE(cell)                                                                               \
  template Tensors3 step_autograd<cell>(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, \
                                        const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, \
                                        const std::optional<Tensor>&, bool);
RNNKERNELS_FOR_EACH_CELL(RNNKERNELS_INSTANTIATE)

}  // namespace rnnkernels
