// The rnnkernels operators: their schemas (the only place they are written) and the device
// implementations. Fake implementations and autograd live in rnnkernels/ops.py.
#include <ATen/autocast_mode.h>
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

#include "cpu/recurrence.h"
#include "step_autograd.h"
#ifdef RNNKERNELS_WITH_CUDA
#include "cuda/recurrence_cuda.h"
#endif

namespace {

// One forward and one backward operator per cell, all with the same signature, over one layer and one
// direction of a whole sequence (shapes: csrc/recurrence_args.h). c_n, grad_c0 and grad_w_hr are
// empty where the cell has no cell state or no projection. The workspace, what the backward reads, is
// (T, B, 0) when keep_workspace is false: inference skips writing it.
const char* kForwardArgs =
    "(Tensor gx, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, "
    "bool reverse, bool keep_workspace=True) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor workspace)";
const char* kBackwardArgs =
    "(Tensor grad_output, Tensor grad_h_n, Tensor? grad_c_n, Tensor h0, Tensor? c0, Tensor w_hh, "
    "Tensor? w_hr, Tensor? lengths, bool reverse, Tensor output, Tensor workspace) -> (Tensor grad_gx, "
    "Tensor grad_h0, Tensor grad_c0, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_w_hr)";
// One time step for generation: x (B, I) and the state, both projections inside. h_next (B, P), c_next
// (B, H) for LSTM else empty; the workspace (B, W) is one step of the sequence forward's, so that autograd
// runs the backward operator with T = 1; (B, 0) when keep_workspace is false.
const char* kStepArgs =
    "(Tensor x, Tensor h, Tensor? c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, "
    "bool keep_workspace=True) -> (Tensor h_next, Tensor c_next, Tensor workspace)";
constexpr rnnkernels::Cell kCells[] = {rnnkernels::Cell::LSTM, rnnkernels::Cell::GRU, rnnkernels::Cell::RNN_TANH,
                                       rnnkernels::Cell::RNN_RELU};

// Every operator, (name, arguments). First the input projection x w^T + b of all time steps as one GEMM,
// on the CPU through oneDNN, which is up to twice as fast as the BLAS behind F.linear on some CPUs;
// elsewhere F.linear runs instead.
std::vector<std::pair<std::string, std::string>> schemas() {
  std::vector<std::pair<std::string, std::string>> all = {{"linear", "(Tensor x, Tensor w, Tensor? b) -> Tensor"}};
  for (const rnnkernels::Cell cell : kCells) {
    const std::string name = rnnkernels::name_of(cell);
    all.emplace_back(name + "_forward", kForwardArgs);
    all.emplace_back(name + "_backward", kBackwardArgs);
    all.emplace_back(name + "_step", kStepArgs);
  }
  return all;
}

// The kernels call ATen (the oneDNN and cuBLAS GEMMs) on tensors of their inputs' dtype; under
// torch.autocast those calls would answer in the autocast dtype, which the rest of a kernel does not
// expect. So every operator runs as if autocast were off, at the dtype it is given: the modules apply
// autocast's casts before they call (rnnkernels/functional.py, autocast_dtype).
void run_without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

void register_without_autocast(torch::Library& m) {
  for (const auto& [name, args] : schemas()) {
    m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&run_without_autocast>());
  }
}

// autocast's cast of each tensor, through autocast's own cache as torch's operators cast: a float32
// parameter that requires grad is cast once per autocast region. Python has no other way to that cache;
// the modules take it where autograd records nothing, as in generation (rnnkernels/functional.py).
std::vector<at::Tensor> autocast_cast(at::TensorList tensors, at::ScalarType dtype) {
  std::vector<at::Tensor> cast;
  cast.reserve(tensors.size());
  for (const at::Tensor& tensor : tensors) {
    cast.push_back(at::autocast::cached_cast(dtype, tensor, tensor.device().type()));
  }
  return cast;
}

}  // namespace

TORCH_LIBRARY(rnnkernels, m) {
  for (const auto& [name, args] : schemas()) m.def((name + args).c_str());
  m.def("autocast_cast(Tensor[] tensors, ScalarType dtype) -> Tensor[]");
}

// Above autograd, which records the casts themselves, as it records autocast's.
TORCH_LIBRARY_IMPL(rnnkernels, CompositeImplicitAutograd, m) { m.impl("autocast_cast", &autocast_cast); }

TORCH_LIBRARY_IMPL(rnnkernels, AutocastCPU, m) { register_without_autocast(m); }
TORCH_LIBRARY_IMPL(rnnkernels, AutocastCUDA, m) { register_without_autocast(m); }

TORCH_LIBRARY_IMPL(rnnkernels, CPU, m) {
  using rnnkernels::Cell;
  m.impl("linear", &rnnkernels::linear_cpu);
  m.impl("lstm_forward", &rnnkernels::forward_cpu<Cell::LSTM>);
  m.impl("lstm_backward", &rnnkernels::backward_cpu<Cell::LSTM>);
  m.impl("lstm_step", &rnnkernels::step_cpu<Cell::LSTM>);
  m.impl("gru_forward", &rnnkernels::forward_cpu<Cell::GRU>);
  m.impl("gru_backward", &rnnkernels::backward_cpu<Cell::GRU>);
  m.impl("gru_step", &rnnkernels::step_cpu<Cell::GRU>);
  m.impl("rnn_tanh_forward", &rnnkernels::forward_cpu<Cell::RNN_TANH>);
  m.impl("rnn_tanh_backward", &rnnkernels::backward_cpu<Cell::RNN_TANH>);
  m.impl("rnn_tanh_step", &rnnkernels::step_cpu<Cell::RNN_TANH>);
  m.impl("rnn_relu_forward", &rnnkernels::forward_cpu<Cell::RNN_RELU>);
  m.impl("rnn_relu_backward", &rnnkernels::backward_cpu<Cell::RNN_RELU>);
  m.impl("rnn_relu_step", &rnnkernels::step_cpu<Cell::RNN_RELU>);
}

// The one-step operators' autograd, for every device (the other operators' is registered from Python,
// rnnkernels/ops.py, where it is shared with the Triton backend's).
TORCH_LIBRARY_IMPL(rnnkernels, Autograd, m) {
  using rnnkernels::Cell;
  m.impl("lstm_step", &rnnkernels::step_autograd<Cell::LSTM>);
  m.impl("gru_step", &rnnkernels::step_autograd<Cell::GRU>);
  m.impl("rnn_tanh_step", &rnnkernels::step_autograd<Cell::RNN_TANH>);
  m.impl("rnn_relu_step", &rnnkernels::step_autograd<Cell::RNN_RELU>);
}

#ifdef RNNKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(rnnkernels, CUDA, m) {
  using rnnkernels::Cell;
  m.impl("linear", &rnnkernels::linear_cuda);
  m.impl("lstm_forward", &rnnkernels::forward_cuda<Cell::LSTM>);
  m.impl("lstm_backward", &rnnkernels::backward_cuda<Cell::LSTM>);
  m.impl("lstm_step", &rnnkernels::step_cuda<Cell::LSTM>);
  m.impl("gru_forward", &rnnkernels::forward_cuda<Cell::GRU>);
  m.impl("gru_backward", &rnnkernels::backward_cuda<Cell::GRU>);
  m.impl("gru_step", &rnnkernels::step_cuda<Cell::GRU>);
  m.impl("rnn_tanh_forward", &rnnkernels::forward_cuda<Cell::RNN_TANH>);
  m.impl("rnn_tanh_backward", &rnnkernels::backward_cuda<Cell::RNN_TANH>);
  m.impl("rnn_tanh_step", &rnnkernels::step_cuda<Cell::RNN_TANH>);
  m.impl("rnn_relu_forward", &rnnkernels::forward_cuda<Cell::RNN_RELU>);
  m.impl("rnn_relu_backward", &rnnkernels::backward_cuda<Cell::RNN_RELU>);
  m.impl("rnn_relu_step", &rnnkernels::step_cuda<Cell::RNN_RELU>);
}
#endif

// Importing rnnkernels._C runs the registrations above; the module itself holds two facts of the build on
// this machine (rnnkernels.ops, the benchmark's metadata): CPU_FLOAT_LANES, the vector width of the CPU
// kernels, and CPU_BFLOAT16_PANELS, what runs the products of their bfloat16 recurrences.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  const long lanes = static_cast<long>(rnnkernels::cpu_float_lanes());
  const char* panels = nullptr;
  try {
    panels = rnnkernels::cpu_bfloat16_panels();
  } catch (const c10::Error& error) {  // a setting it refuses: the import fails, saying why
    PyErr_SetString(PyExc_ImportError, error.what_without_backtrace());
  }
  if (m != nullptr && (panels == nullptr || PyModule_AddIntConstant(m, "CPU_FLOAT_LANES", lanes) < 0 ||
                       PyModule_AddStringConstant(m, "CPU_BFLOAT16_PANELS", panels) < 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
