// CPU recurrence kernels. On AVX-512, AVX2 or 64-bit ARM builds, per time step one parallel pass of the
// panel kernels (panels.h, bfloat16_panels.h) whose tiles go straight into the gate math (forward) or the
// gate gradients (backward): float32, and bfloat16 and float16 (on AMX or AVX512-BF16 for bfloat16, else
// on the float32 panels, rows widened).
// Otherwise per time step one GEMM for the recurrent term, then one fused pass over batch x hidden for
// every gate and the state update; the backward sweep likewise. Either way the weight gradients are
// whole-sequence products at the end. Shapes and checks: csrc/recurrence_args.h.
// Assumes nothing of the caller's strides (inputs are made contiguous here); lengths live on the CPU.
#include "recurrence.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstring>
#include <type_traits>

#include "../cell_math.h"
#include "../recurrence_args.h"
#include "buffers.h"
#include "float_lanes.h"
#include "bfloat16_panels.h"
#include "panels.h"

namespace rnnkernels {
namespace {

using at::Tensor;

// torch ships oneDNN's GEMM behind the operators mkldnn::_linear_pointwise and
// mkldnn::_reorder_linear_weight. For float32 on x86 it runs at AVX-512 speed where MKL's sgemm takes
// its AVX2 path (AMD CPUs: about 2x), and a weight reordered once into oneDNN's blocked layout is
// reused by every time step. Where torch lacks these operators, oneDNN is disabled, or the GEMM is
// tiny, at::addmm (MKL) runs.

// The operator, if this torch has it with the arguments the calls below pass (they are torch-internal).
std::optional<c10::OperatorHandle> find_op(const char* name, size_t arguments) {
  auto op = c10::Dispatcher::singleton().findSchema({name, ""});
  if (op.has_value() && op->schema().arguments().size() != arguments) return std::nullopt;
  return op;
}

// Whether this torch ships both operators, with the arguments the calls below pass.
bool onednn_available() {
  static const bool available = find_op("mkldnn::_linear_pointwise", 6).has_value() &&
                                find_op("mkldnn::_reorder_linear_weight", 2).has_value();
  return available;
}

Tensor onednn_reorder(const Tensor& w, int64_t rows) {
  static const c10::OperatorHandle op = *find_op("mkldnn::_reorder_linear_weight", 2);
  torch::jit::Stack stack{w.contiguous(), c10::IValue(rows)};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// Whether oneDNN's GEMM takes bfloat16 or float16 on this CPU: its reorder refuses where the CPU lacks
// the instructions it wants for them (float16 wants AVX512-FP16 or AVX-NE-CONVERT), and a torch without
// oneDNN's operators (macOS wheels) takes neither. Asked once per dtype.
bool onednn_takes(at::ScalarType dtype) {
  const auto accepts = [](at::ScalarType type) {
    if (!onednn_available()) return false;
    try {
      onednn_reorder(at::zeros({16, 16}, at::TensorOptions().dtype(type)), 16);
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  };
  static const bool bfloat16 = accepts(at::kBFloat16), float16 = accepts(at::kHalf);
  return dtype == at::kBFloat16 ? bfloat16 : dtype == at::kHalf && float16;
}

// Whether x w^T on `rows` rows goes to oneDNN: not tiny (below about a million multiply-adds, as in
// generation at batch 1, oneDNN's fixed cost per call loses to MKL), and float32; or, for the per-step
// products of a recurrence (per_step), bfloat16 and float16 where oneDNN takes them: its reordered weight
// halves at::addmm's time there (timemachine's 32 x 256 x 1024 step in bfloat16: 64 against 126 us).
// Their one-shot products stay with at::addmm, which rounds once where product()'s slices would each round
// (or, where oneDNN does not take them, run widened: linear_once).
bool use_onednn(const Tensor& w, int64_t rows, bool per_step = false) {
  if (!onednn_available() || !at::globalContext().userEnabledMkldnn() || rows * w.numel() < (int64_t{1} << 20)) return false;
  const at::ScalarType dtype = w.scalar_type();
  return dtype == at::kFloat || (per_step && onednn_takes(dtype));
}

// x w^T (+ b) through oneDNN; x and w contiguous or transposes of contiguous matrices (any other
// strides send oneDNN down a reference path hundreds of times slower), b contiguous.
Tensor onednn_linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  static const c10::OperatorHandle op = *find_op("mkldnn::_linear_pointwise", 6);
  torch::jit::Stack stack{x,
                          w,
                          b.has_value() ? c10::IValue(*b) : c10::IValue(),
                          c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<at::Scalar>>()),
                          c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

Tensor blas_linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  return b.has_value() ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
}

// x w^T (+ b) as a sum of product_of(x, w, b) over slices of at most kChunk inputs, added in turn: one
// running sum over many inputs (oneDNN keeps one, and so does MKL for skinny products) is up to several
// times less accurate than BLAS's blocked sums.
template <typename Product>
Tensor sum_over_input_slices(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                             const Product& product_of) {
  Tensor y;
  for (int64_t k = 0; k < x.size(1); k += kChunk) {
    const int64_t count = std::min(kChunk, x.size(1) - k);
    const Tensor part = product_of(x.narrow(1, k, count), w.narrow(1, k, count), k == 0 ? b : std::nullopt);
    y = k == 0 ? part : y.add_(part);
  }
  return y;
}

// x w^T (+ b) as one GEMM: on the panel kernels, or oneDNN, which copies any x that is not contiguous
// and takes w contiguous or transposed (other strides send it down a reference path hundreds of times
// slower), or BLAS where oneDNN is off or the product tiny.
Tensor product(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  // The panel kernels, where they run, take every product but those of at most kChunk inputs into outputs
  // of at least 64 columns and below 32 MB, as timemachine's input projection (28 inputs: oneDNN
  // 0.17 against 0.22 ms). Measured in turn in one process (2 cores, AVX-512):
  // - more inputs: oneDNN sums them in one running sum, at up to 3.6x the error of the panel kernels'
  //   sums in chunks (lyrics' input projection, 1027 inputs: 1.7e-6 against 4.7e-7 of the largest output,
  //   which left its RNN at 2.3x torch.nn's error), at the same speed within 4%, but for ptb-medium's input
  //   gradient (2600 inputs: 6.3 against 7.4 ms). Without the panel kernels, oneDNN takes such products
  //   in slices instead;
  // - fewer than 64 output columns, a block of 4 AVX-512 panels (the input gradient of a character model:
  //   1.6x; the thresholds were measured with AVX-512, and the AVX2 build keeps them);
  // - outputs of 32 MB or more: glibc maps those afresh at every call (its mmap threshold stops there),
  //   and oneDNN's output then takes a page fault per 4 KB, where the panel kernels write into cached
  //   blocks (buffers.h): long-seq's input projection, 16,000 x 1024, 27 against 33 ms.
  constexpr int64_t kPanelsFromRows = 64, kPanelsBelowColumns = 64, kFreshFromBytes = int64_t{32} << 20;
  if (kPanelGemm && x.scalar_type() == at::kFloat && x.size(0) >= kPanelsFromRows && x.size(1) > 0 &&
      (x.size(1) > kChunk || w.size(0) < kPanelsBelowColumns ||
       x.size(0) * w.size(0) * int64_t{sizeof(float)} >= kFreshFromBytes)) {
    return panel_linear(x, w, b);
  }
  if (!use_onednn(w, x.size(0))) return blas_linear(x, w, b);
  const auto onednn = [](const Tensor& xs, const Tensor& ws, const std::optional<Tensor>& bs) {
    const bool w_ok = ws.is_contiguous() || ws.t().is_contiguous();
    return onednn_linear(xs.contiguous(), w_ok ? ws : ws.contiguous(), bs);
  };
  return x.size(1) <= kChunk ? onednn(x, w, b) : sum_over_input_slices(x, w, b, onednn);
}

bool is_transposed(const Tensor& m) {
  return !m.is_contiguous() && m.t().is_contiguous();
}

// x w^T (+ b) for a GEMM done once per call. Where x and w are both transposed views the product is
// A^T B, a sum over the rows of A and B: the whole-sequence weight gradients, over T*B rows that
// torch.nn adds up step by step. Sums over chunks of kChunk rows, then added, keep the error at
// torch.nn's (sum_over_input_slices). The float32 panel kernels sum in chunks anyway; elsewhere the GEMM
// is sliced, and since oneDNN copies a transposed x, x's role goes to the smaller operand. Not in bfloat16
// or float16: their GEMMs sum in float32 and round once, which a slice would do each time. Where oneDNN
// lacks the CPU instructions for them (AVX2, or float16 without AVX512-FP16) their GEMMs run at a small
// fraction of float32's speed (timemachine-char's bfloat16 input projection, 1120 x 28 x 1024, on two
// Zen 3 cores: at::addmm 29 ms, widened and on the panel kernels 0.74 ms, float32's time), so there the
// operands are widened exactly and the float32 product rounded once.
Tensor linear_once(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b_in) {
  const std::optional<Tensor> b = contiguous(b_in);
  const int64_t K = w.size(1);
  const bool reduced_precision = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  if (reduced_precision && kPanelGemm && !onednn_takes(x.scalar_type())) {
    const auto wide = [](const Tensor& t) { return converted_buffer(t, at::kFloat); };
    const std::optional<Tensor> b_float = b.has_value() ? std::optional(wide(*b)) : std::nullopt;
    return converted_buffer(linear_once(wide(x), wide(w), b_float), x.scalar_type());
  }
  if (!is_transposed(x) || !is_transposed(w) || K <= kChunk || reduced_precision) return product(x, w, b);
  if (kPanelGemm && x.scalar_type() == at::kFloat && !b.has_value()) return panel_matmul_tn(x.t(), w.t());
  const bool swap = !b.has_value() && w.size(0) < x.size(0);
  const Tensor y = swap ? sum_over_input_slices(w, x, b, product) : sum_over_input_slices(x, w, b, product);
  return swap ? y.t().contiguous() : y;
}

// h -> h w^T (+ b) for the recurrent GEMM of each of `steps` time steps on `rows` rows. Its reduction
// runs over one hidden state, and its error stays within torch.nn's whole (tests/test_modules.py).
// Reordering w into oneDNN's blocked layout costs a few GEMMs' time and saves 15-30% of each later one,
// so a weight that many steps reuse is reordered once.
class StepLinear {
 public:
  StepLinear(const Tensor& w, const std::optional<Tensor>& b, int64_t rows, int64_t steps)
      : w_(w.contiguous()), b_(contiguous(b)), onednn_(use_onednn(w, rows, /*per_step=*/true)) {
    constexpr int64_t kReorderFromSteps = 8;
    if (onednn_ && steps >= kReorderFromSteps) w_ = onednn_reorder(w_, rows);
  }

  Tensor operator()(const Tensor& x) const { return onednn_ ? onednn_linear(x, w_, b_) : blas_linear(x, w_, b_); }

 private:
  Tensor w_;
  std::optional<Tensor> b_;
  bool onednn_;
};

// a^T b for row-major a (K, M) and b (K, N): the whole-sequence weight gradients.
Tensor matmul_tn(const Tensor& a, const Tensor& b) {
  return linear_once(a.t(), b.t(), std::nullopt);
}

struct Steps {
  int64_t T;
  bool reverse;
  const int64_t* lengths;  // null: every sequence has length T
  int64_t length(int64_t b) const { return lengths ? lengths[b] : T; }
  int64_t time(int64_t step) const { return reverse ? T - 1 - step : step; }
  bool active(int64_t t, int64_t b) const { return t < length(b); }
  // Whether step t is the first one sequence b takes, so its previous state is h0/c0.
  bool first(int64_t t, int64_t b) const { return reverse ? t == length(b) - 1 : t == 0; }
  int64_t previous(int64_t t) const { return reverse ? t + 1 : t - 1; }
};

// Runs fn(b) for every sequence b active at time t, split over threads when the work is worth it.
template <typename F>
void for_active_rows(const Steps& steps, int64_t t, int64_t B, int64_t row_work, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(row_work, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (steps.active(t, b)) fn(b);
    }
  });
}

// A (T, B, width) buffer the sweep writes at every active (t, b). Rows of finished sequences, which no
// step writes, must read as zeros (outputs and gradients, by torch.nn's contract; the rest so that
// every output of the operator is deterministic), so only with lengths does it need clearing.
Tensor sweep_buffer(const Steps& steps, int64_t B, int64_t width, const at::TensorOptions& options) {
  Tensor buffer = empty_buffer({steps.T, B, width}, options);
  return steps.lengths ? buffer.zero_() : buffer;
}

// The rows of a buffer of rows `width` long, by index, its data pointer taken once: the sweeps ask for rows
// tile by tile, and Tensor::data_ptr checks the dtype and the storage on every call (4% of an LSTM
// training step at timemachine-char's sizes on Zen 3, where each call took it). An undefined tensor
// has no rows.
template <typename scalar_t>
struct Rows {
  scalar_t* data;
  int64_t width;
  Rows(const Tensor& t, int64_t width) : data(t.defined() ? t.data_ptr<scalar_t>() : nullptr), width(width) {}
  scalar_t* operator[](int64_t index) const { return data + index * width; }
};

// Row kernels: one (t, b) over `n` hidden units, Lanes<scalar_t>::width at a time (float_lanes.h), the
// gates of a unit `xs` apart in x and the workspace and `rs` apart in the recurrent part r (H for a whole
// row; kLanes for a tile of the panel kernels). L::load(p + j, n - j) reads the units from j on.
// r may be float32 where the rest is bfloat16 or float16: a panel tile's sums, before any rounding.
template <bool keep, typename scalar_t, typename rec_t, typename L = Lanes<scalar_t>, typename LR = Lanes<rec_t>>
void lstm_forward_row(const scalar_t* __restrict__ x, const rec_t* __restrict__ r, scalar_t* __restrict__ ws,
                      scalar_t* __restrict__ c, scalar_t* __restrict__ h, int64_t n, int64_t xs, int64_t rs) {
  for (int64_t j = 0; j < n; j += L::width) {
    const int64_t left = n - j;
    const auto pre = [&](int64_t g) { return L::load(x + g * xs + j, left) + LR::load(r + g * rs + j, left); };
    const LstmForward<typename L::type> s(pre(0), pre(1), pre(2), pre(3), L::load(c + j, left));
    if constexpr (keep) {
      L::store(ws + j, s.i, left);
      L::store(ws + xs + j, s.f, left);
      L::store(ws + 2 * xs + j, s.g, left);
      L::store(ws + 3 * xs + j, s.o, left);
      L::store(ws + 4 * xs + j, s.c, left);
    }
    L::store(c + j, s.c, left);
    L::store(h + j, s.h, left);
  }
}

// h_prev and h may be the same row (the state updated in place).
template <bool keep, typename scalar_t, typename rec_t, typename L = Lanes<scalar_t>, typename LR = Lanes<rec_t>>
void gru_forward_row(const scalar_t* __restrict__ x, const rec_t* __restrict__ r, scalar_t* __restrict__ ws,
                     const scalar_t* h_prev, scalar_t* h, int64_t n, int64_t xs, int64_t rs) {
  for (int64_t j = 0; j < n; j += L::width) {
    const int64_t left = n - j;
    const auto hn = LR::load(r + 2 * rs + j, left);
    const GruForward<typename L::type> s(L::load(x + j, left) + LR::load(r + j, left),
                                         L::load(x + xs + j, left) + LR::load(r + rs + j, left),
                                         L::load(x + 2 * xs + j, left), hn, L::load(h_prev + j, left));
    if constexpr (keep) {
      L::store(ws + j, s.r, left);
      L::store(ws + xs + j, s.z, left);
      L::store(ws + 2 * xs + j, s.n, left);
      L::store(ws + 3 * xs + j, hn, left);
    }
    L::store(h + j, s.h, left);
  }
}

template <typename scalar_t, typename rec_t, typename L = Lanes<scalar_t>, typename LR = Lanes<rec_t>>
void rnn_forward_row(const scalar_t* __restrict__ x, const rec_t* __restrict__ r, scalar_t* __restrict__ h,
                     int64_t n, bool relu) {
  for (int64_t j = 0; j < n; j += L::width) {
    const int64_t left = n - j;
    L::store(h + j, rnn_forward(L::load(x + j, left) + LR::load(r + j, left), relu), left);
  }
}

// The forward row kernel of `cell` (arguments as above): c is the LSTM's cell state, updated in place;
// h_prev the GRU's previous state. n may be a std::integral_constant, kept constant through inlining.
template <Cell cell, typename scalar_t, typename rec_t>
inline void cell_forward_row(bool keep, const scalar_t* x, const rec_t* r, scalar_t* ws, scalar_t* c,
                             const scalar_t* h_prev, scalar_t* h, auto n, int64_t xs, int64_t rs) {
  if constexpr (cell == Cell::LSTM) {
    keep ? lstm_forward_row<true>(x, r, ws, c, h, n, xs, rs) : lstm_forward_row<false>(x, r, ws, c, h, n, xs, rs);
  } else if constexpr (cell == Cell::GRU) {
    keep ? gru_forward_row<true>(x, r, ws, h_prev, h, n, xs, rs) : gru_forward_row<false>(x, r, ws, h_prev, h, n, xs, rs);
  } else {
    rnn_forward_row(x, r, h, n, cell == Cell::RNN_RELU);
  }
}

// Backward row kernels: `n` units of one (t, b), the gates of a unit H apart.
template <typename scalar_t, typename L = Lanes<scalar_t>>
void lstm_backward_row(const scalar_t* __restrict__ dh, const scalar_t* __restrict__ ws,
                       const scalar_t* __restrict__ c_prev, scalar_t* __restrict__ dc, scalar_t* __restrict__ dx,
                       int64_t n, int64_t H) {
  for (int64_t j = 0; j < n; j += L::width) {
    const int64_t left = n - j;
    const auto gate = [&](int64_t g) { return L::load(ws + g * H + j, left); };
    const LstmBackward<typename L::type> s(L::load(dh + j, left), L::load(dc + j, left), gate(0), gate(1), gate(2),
                                           gate(3), gate(4), L::load(c_prev + j, left));
    L::store(dx + j, s.d_i, left);
    L::store(dx + H + j, s.d_f, left);
    L::store(dx + 2 * H + j, s.d_g, left);
    L::store(dx + 3 * H + j, s.d_o, left);
    L::store(dc + j, s.dc_prev, left);
  }
}

// The projected LSTM's pre-projection output o * tanh(c), recomputed for dW_hr.
template <typename scalar_t, typename L = Lanes<scalar_t>>
void lstm_unprojected_row(const scalar_t* __restrict__ ws, scalar_t* __restrict__ m, int64_t n, int64_t H) {
  for (int64_t j = 0; j < n; j += L::width) {
    const int64_t left = n - j;
    L::store(m + j, L::load(ws + 3 * H + j, left) * Fn<typename L::type>::tanh(L::load(ws + 4 * H + j, left)), left);
  }
}

template <typename scalar_t, typename L = Lanes<scalar_t>>
void gru_backward_row(const scalar_t* __restrict__ dh, const scalar_t* __restrict__ ws,
                      const scalar_t* __restrict__ h_prev, scalar_t* __restrict__ dx, scalar_t* __restrict__ dhh,
                      scalar_t* __restrict__ direct, int64_t n, int64_t H) {
  for (int64_t j = 0; j < n; j += L::width) {
    const int64_t left = n - j;
    const auto gate = [&](int64_t g) { return L::load(ws + g * H + j, left); };
    const GruBackward<typename L::type> s(L::load(dh + j, left), gate(0), gate(1), gate(2), gate(3),
                                          L::load(h_prev + j, left));
    L::store(dx + j, s.d_r, left);
    L::store(dx + H + j, s.d_z, left);
    L::store(dx + 2 * H + j, s.d_xn, left);
    L::store(dhh + j, s.d_r, left);
    L::store(dhh + H + j, s.d_z, left);
    L::store(dhh + 2 * H + j, s.d_hn, left);
    L::store(direct + j, s.dh_direct, left);
  }
}

template <typename scalar_t, typename L = Lanes<scalar_t>>
void rnn_backward_row(const scalar_t* __restrict__ dh, const scalar_t* __restrict__ h, scalar_t* __restrict__ dx,
                      int64_t n, bool relu) {
  for (int64_t j = 0; j < n; j += L::width) {
    const int64_t left = n - j;
    L::store(dx + j, rnn_backward(L::load(dh + j, left), L::load(h + j, left), relu), left);
  }
}

// Asks for the cache lines of units [j0, j0 + n) of `rows` rows `stride` apart from p on, a step ahead of
// their use: a tile touches a few lines of each row of the sweep's big (T, B, ...) buffers, which stream
// from memory, in a pattern the hardware prefetcher does not follow. for_write: lines about to be written.
template <bool for_write = false, typename scalar_t>
inline void prefetch_rows(const scalar_t* p, int64_t rows, int64_t stride, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t g = 0; g < rows; ++g) {
    for (int64_t j = 0; j < n; j += kLine) __builtin_prefetch(p + g * stride + j, for_write ? 1 : 0);
  }
}

// Whether the panel kernels run a recurrence of `steps` steps: where the build has them (panels.h), in
// float32, bfloat16 and float16; no projection (its second product per step stays below), and enough
// steps to repay packing the weight.
template <typename scalar_t>
bool use_panels(int64_t steps, bool projected) {
  constexpr int64_t kPackFromSteps = 4;
  return kPanelGemm && !projected && steps >= kPackFromSteps && !std::is_same_v<scalar_t, double>;
}

// Whether a bfloat16 recurrence over H units multiplies on bfloat16's own instructions (bfloat16_panels.h):
// where the CPU has them and H is even (the inputs of a step's product come in pairs).
inline bool on_native_panels(int64_t H) {
  return native_bfloat16_panels() && H % 2 == 0;
}

// What the panel products of a recurrence in scalar_t multiply: float32, or bfloat16 on its own
// instructions (native: on_native_panels); else float32, the 16-bit rows widened exactly (PanelInput),
// so that the products are exact and summed in float32 as the native ones are.
template <typename scalar_t, bool native>
using panel_type_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16> && native, c10::BFloat16, float>;

// fn(std::type_identity<panel_t>()) with panel_t what the panel products of a recurrence in scalar_t over
// H units multiply.
template <typename scalar_t, typename F>
void with_panel_type(int64_t H, const F& fn) {
  if (on_native_panels(H)) return fn(std::type_identity<panel_type_t<scalar_t, true>>());
  fn(std::type_identity<panel_type_t<scalar_t, false>>());
}

// The left operand of a recurrence's panel products, rows of `width` written step by step: the rows
// themselves where the panels take scalar_t; else float32 copies, widened as each row is written, in two
// buffers (a step's product reads one while the step writes the other).
template <typename scalar_t, typename panel_t>
class PanelInput {
 public:
  static constexpr bool widened = !std::is_same_v<scalar_t, panel_t>;

  PanelInput(int64_t rows, int64_t width, const at::TensorOptions& options) : size_(rows * width) {
    if constexpr (widened) {
      copies_ = at::zeros({2, rows, width}, options.dtype(at::kFloat));
      copies_data_ = copies_.data_ptr<float>();
    }
  }

  // The rows that the product of step `step` reads, `own` being where they lie in scalar_t.
  const panel_t* rows(int64_t step, const scalar_t* own) const {
    if constexpr (widened) {
      return copies_data_ + (step % 2) * size_;
    } else {
      return own;
    }
  }

  // Tells that n elements at `own`, element `offset` of the rows that step `step` reads, were written.
  void wrote(int64_t step, int64_t offset, const scalar_t* own, int64_t n) const {
    if constexpr (widened) {
      using L = Lanes<scalar_t>;
      float* copy = copies_data_ + (step % 2) * size_ + offset;
      for (int64_t j = 0; j < n; j += L::width) Lanes<float>::store(copy + j, L::load(own + j, n - j), n - j);
    }
  }

 private:
  at::Tensor copies_;
  float* copies_data_ = nullptr;  // taken once, as Rows does
  int64_t size_;
};

// The forward sweep on the panel kernels: per step one parallel pass in which each tile's recurrent
// product goes straight into its cells. Every tile reads the whole previous state, so the new one is
// written elsewhere: into the output row of the step itself where all sequences run every step, else
// into a second state buffer (a finished sequence keeps its state but must output zeros).
template <Cell cell, typename scalar_t, typename panel_t>
void forward_panels(const RecurrenceDims& d, const Steps& steps, const Tensor& gx, const Tensor& w_hh,
                    const std::optional<Tensor>& b_hh, Tensor& h, Tensor& c, Tensor& output, Tensor& workspace) {
  const int64_t B = d.B, H = d.H, GH = d.G * d.H, W = workspace_width(cell, H);
  const bool keep = workspace.size(2) > 0, state_in_output = steps.lengths == nullptr;
  const PanelInput<scalar_t, panel_t> input(B, H, h.options());
  const PanelWeightOf<panel_t> pw = pack_panels<panel_t>(w_hh, b_hh, d.G);
  // pw.units (but for the RNN at H <= 2 * kLanes: 2 * kLanes, which then takes the general n)
  constexpr int64_t kBlockUnits = cell == Cell::LSTM || cell == Cell::GRU ? kLanes : 4 * kLanes;
  Tensor h_other = state_in_output ? Tensor() : at::empty_like(h);
  const scalar_t* const gx_data = gx.data_ptr<scalar_t>();
  scalar_t* const ws_data = keep ? workspace.data_ptr<scalar_t>() : nullptr;
  scalar_t* const c_data = cell == Cell::LSTM ? c.data_ptr<scalar_t>() : nullptr;
  const scalar_t* cur = h.data_ptr<scalar_t>();
  input.wrote(0, 0, cur, B * H);
  for (int64_t step = 0; step < d.T; ++step) {
    const int64_t t = steps.time(step);
    scalar_t* const out_t = output.data_ptr<scalar_t>() + t * B * H;
    scalar_t* const next = state_in_output ? out_t : (step % 2 ? h : h_other).data_ptr<scalar_t>();
    // Row b, units [j0, j0 + n) (n constant for whole blocks: with_units).
    const auto cells = [&](int64_t b, int64_t j0, const float* pre, auto n) {
      const scalar_t* h_prev = cur + b * H + j0;
      scalar_t* h_next = next + b * H + j0;
      if (!steps.active(t, b)) {
        std::memcpy(h_next, h_prev, sizeof(scalar_t) * n);
        input.wrote(step + 1, b * H + j0, h_next, n);
        return;
      }
      const scalar_t* x = gx_data + (t * B + b) * GH + j0;
      scalar_t* ws = keep ? ws_data + (t * B + b) * W + j0 : nullptr;
      scalar_t* c_row = cell == Cell::LSTM ? c_data + b * H + j0 : nullptr;
      cell_forward_row<cell>(keep, x, pre, ws, c_row, h_prev, h_next, n, H, kLanes);
      input.wrote(step + 1, b * H + j0, h_next, n);
      if (!state_in_output) std::memcpy(out_t + b * H + j0, h_next, sizeof(scalar_t) * n);
      if (step + 1 < d.T) {
        const int64_t ahead = steps.time(step + 1) * B + b;
        prefetch_rows(gx_data + ahead * GH + j0, d.G, H, n);
        if (keep) prefetch_rows<true>(ws_data + ahead * W + j0, W / H, H, n);
      }
    };
    panel_product(pw, PanelRowsOf<panel_t>{input.rows(step, cur), B, H, 1}, [&](const PanelTile& tile) {
      for (int r = 0; r < tile.rows; ++r) {
        with_units<kBlockUnits>(tile.n, [&](auto n) { cells(tile.r0 + r, tile.j0, tile.row(r), n); });
      }
    });
    cur = next;
  }
  if (cur != h.data_ptr<scalar_t>()) h.copy_(at::from_blob(const_cast<scalar_t*>(cur), {B, H}, h.options()));
}

template <Cell cell, typename scalar_t>
void forward_impl(const RecurrenceDims& d, const Steps& steps, const Tensor& gx, const Tensor& w_hh,
                  const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr, Tensor& h,
                  Tensor& c, Tensor& output, Tensor& workspace) {
  const int64_t T = d.T, B = d.B, H = d.H, P = d.P, GH = d.G * d.H, W = workspace_width(cell, H);
  const bool projected = w_hr.has_value(), keep = workspace.size(2) > 0;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (use_panels<scalar_t>(T, projected)) {
      return with_panel_type<scalar_t>(H, [&](auto panel) {
        forward_panels<cell, scalar_t, typename decltype(panel)::type>(d, steps, gx, w_hh, b_hh, h, c, output,
                                                                       workspace);
      });
    }
  }
  Tensor m = projected ? at::empty({B, H}, gx.options()) : Tensor();
  const StepLinear recurrent(w_hh, b_hh, B, T);
  const std::optional<StepLinear> projection =
      projected ? std::optional<StepLinear>(std::in_place, *w_hr, std::nullopt, B, T) : std::nullopt;
  const Rows<scalar_t> gx_rows(gx, GH), h_rows(h, P), ws_rows(workspace, W), c_rows(c, H), m_rows(m, H),
      out_rows(output, P);
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = steps.time(step);
    const Tensor gh = recurrent(h).contiguous();
    const Rows<scalar_t> gh_rows(gh, GH);
    for_active_rows(steps, t, B, GH, [&](int64_t b) {
      scalar_t* hb = h_rows[b];
      scalar_t* ws = keep ? ws_rows[t * B + b] : nullptr;
      scalar_t* c_row = cell == Cell::LSTM ? c_rows[b] : nullptr;
      scalar_t* h_row = projected ? m_rows[b] : hb;  // the LSTM's pre-projection output
      cell_forward_row<cell>(keep, gx_rows[t * B + b], gh_rows[b], ws, c_row, hb, h_row, H, H, H);
      if (!projected) std::memcpy(out_rows[t * B + b], hb, sizeof(scalar_t) * P);
    });
    if (projected) {
      const Tensor hp = (*projection)(m).contiguous();
      const Rows<scalar_t> hp_rows(hp, P);
      for_active_rows(steps, t, B, P, [&](int64_t b) {
        std::memcpy(h_rows[b], hp_rows[b], sizeof(scalar_t) * P);
        std::memcpy(out_rows[t * B + b], hp_rows[b], sizeof(scalar_t) * P);
      });
    }
  }
}

// The backward sweep; panel_t: what its panel products multiply (panel_type_t), where use_panels.
template <Cell cell, typename scalar_t, typename panel_t>
void backward_impl(const RecurrenceDims& d, const Steps& steps, const Tensor& grad_output, Tensor& dh,
                   Tensor& dc, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                   const std::optional<Tensor>& w_hr, const Tensor& output, const Tensor& workspace,
                   Tensor& grad_gx, Tensor& grad_gh, Tensor& dh_all, Tensor& m_all) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t T = d.T, B = d.B, H = d.H, P = d.P, GH = d.G * d.H, W = workspace_width(cell, H);
  const bool projected = w_hr.has_value();
  // dL/dh_{t-1} = dL/dgates W_hh: on the panel kernels (W_hh^T packed), or one oneDNN/BLAS product a step.
  constexpr bool has_panels = !std::is_same_v<scalar_t, double>;
  const bool panels = use_panels<scalar_t>(T, projected);
  const std::optional<PanelWeightOf<panel_t>> packed_t =
      panels ? std::optional(pack_panels<panel_t>(w_hh.t(), std::nullopt, 1)) : std::nullopt;
  const std::optional<StepLinear> recurrent_t =
      panels ? std::nullopt : std::optional<StepLinear>(std::in_place, w_hh.t(), std::nullopt, B, T);
  const std::optional<StepLinear> projection_t =
      projected ? std::optional<StepLinear>(std::in_place, w_hr->t(), std::nullopt, B, T) : std::nullopt;
  Tensor dh_direct = cell == Cell::GRU ? at::empty({B, H}, dh.options()) : Tensor();
  const Rows<scalar_t> dh_rows(dh, P), grad_output_rows(grad_output, P), dh_all_rows(dh_all, P), ws_rows(workspace, W),
      grad_gx_rows(grad_gx, GH), grad_gh_rows(grad_gh, GH), c0_rows(c0, H), dc_rows(dc, H), m_all_rows(m_all, H),
      h0_rows(h0, P), out_rows(output, P), dh_direct_rows(dh_direct, H);
  // Adds the output's gradient at step t to units [j0, j0 + n) of dL/dh_t, row b.
  const auto add_output_grad = [&](int64_t t, int64_t b, int64_t j0, auto n) {
    scalar_t* __restrict__ g = dh_rows[b] + j0;
    const scalar_t* __restrict__ go = grad_output_rows[t * B + b] + j0;
    for (int64_t j = 0; j < n; ++j) g[j] = opmath_t(g[j]) + opmath_t(go[j]);
    if (projected) std::memcpy(dh_all_rows[t * B + b] + j0, g, sizeof(scalar_t) * n);
  };
  // The gate gradients of step t for units [j0, j0 + n) of row b, from dL/dm_t there (g: dL/dh_t, or
  // its share before the projection) and, for the LSTM, dL/dc_t (dc, which becomes dL/dc_{t-1}).
  const auto gate_grads = [&](int64_t t, int64_t b, const scalar_t* g, int64_t j0, auto n) {
    const bool first = steps.first(t, b);
    const int64_t prev = steps.previous(t);
    const scalar_t* ws = W ? ws_rows[t * B + b] + j0 : nullptr;
    scalar_t* dx = grad_gx_rows[t * B + b] + j0;
    if constexpr (cell == Cell::LSTM) {
      const scalar_t* c_prev = first ? c0_rows[b] : ws_rows[prev * B + b] + 4 * H;
      lstm_backward_row(g, ws, c_prev + j0, dc_rows[b] + j0, dx, n, H);
      if (projected) lstm_unprojected_row(ws, m_all_rows[t * B + b] + j0, n, H);
    } else if constexpr (cell == Cell::GRU) {
      const scalar_t* h_prev = first ? h0_rows[b] : out_rows[prev * B + b];
      gru_backward_row(g, ws, h_prev + j0, dx, grad_gh_rows[t * B + b] + j0,
                       dh_direct_rows[b] + j0, n, H);
    } else {
      rnn_backward_row(g, out_rows[t * B + b] + j0, dx, n, cell == Cell::RNN_RELU);
    }
  };
  // Units [j0, j0 + n) of row b of dL/dh_{t-1}, given their recurrent share rec (a panel tile's float32
  // sums, or a product's rows).
  const auto set_dh = [&](int64_t b, const auto* __restrict__ rec, int64_t j0, auto n) {
    scalar_t* __restrict__ g = dh_rows[b] + j0;
    if constexpr (cell == Cell::GRU) {
      const scalar_t* __restrict__ direct = dh_direct_rows[b] + j0;
      for (int64_t j = 0; j < n; ++j) g[j] = opmath_t(rec[j]) + opmath_t(direct[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) g[j] = static_cast<scalar_t>(rec[j]);
    }
  };
  if constexpr (has_panels) {
    if (panels) {
      // One parallel pass a step: each tile of dL/dh_{t-1} = dL/dgates_t W_hh goes straight on into the
      // gate gradients of step t-1 for its units (all a unit's gates depend on only its own dL/dh, dL/dc).
      const PanelInput<scalar_t, panel_t> input(B, GH, grad_gh.options());
      // Units [j0, j0 + n) of every gate of row b's gradients at step `step`, written: for the product
      // of that step.
      const auto wrote = [&](int64_t step, int64_t b, int64_t j0, int64_t n) {
        const scalar_t* own = grad_gh_rows[steps.time(step) * B + b];
        for (int64_t g = 0; g < d.G; ++g) input.wrote(step, b * GH + g * H + j0, own + g * H + j0, n);
      };
      const int64_t t_last = steps.time(T - 1);
      for_active_rows(steps, t_last, B, GH, [&](int64_t b) {
        add_output_grad(t_last, b, 0, H);
        gate_grads(t_last, b, dh_rows[b], 0, H);
        wrote(T - 1, b, 0, H);
      });
      for (int64_t step = T - 1; step >= 0; --step) {
        const int64_t t = steps.time(step), t_next = step > 0 ? steps.time(step - 1) : -1;
        const PanelRowsOf<panel_t> rows{input.rows(step, grad_gh_rows[t * B]), B, GH, 1};
        panel_product(*packed_t, rows, [&](const PanelTile& tile) {
          const int64_t j0 = tile.j0;
          for (int r = 0; r < tile.rows; ++r) {
            const int64_t b = tile.r0 + r;
            with_units<4 * kLanes>(tile.n, [&](auto n) {
              if (steps.active(t, b)) set_dh(b, tile.row(r), j0, n);
              if (t_next >= 0 && steps.active(t_next, b)) {
                add_output_grad(t_next, b, j0, n);
                gate_grads(t_next, b, dh_rows[b] + j0, j0, n);
                wrote(step - 1, b, j0, n);
              }
              if (step >= 2) {
                const int64_t ahead = steps.time(step - 2) * B + b;
                if (W) prefetch_rows(ws_rows[ahead] + j0, W / H, H, n);
                prefetch_rows(grad_output_rows[ahead] + j0, 1, 0, n);
                prefetch_rows<true>(grad_gx_rows[ahead] + j0, d.G, H, n);
              }
            });
          }
        });
      }
      return;
    }
  }
  for (int64_t step = T - 1; step >= 0; --step) {
    const int64_t t = steps.time(step);
    for_active_rows(steps, t, B, P, [&](int64_t b) { add_output_grad(t, b, 0, P); });
    const Tensor dm = projected ? (*projection_t)(dh).contiguous() : dh;
    const Rows<scalar_t> dm_rows(dm, H);
    for_active_rows(steps, t, B, GH, [&](int64_t b) { gate_grads(t, b, dm_rows[b], 0, H); });
    const Tensor dh_rec = (*recurrent_t)(grad_gh[t]).contiguous();
    const Rows<scalar_t> dh_rec_rows(dh_rec, P);
    for_active_rows(steps, t, B, P, [&](int64_t b) { set_dh(b, dh_rec_rows[b], 0, P); });
  }
}

// The state each active (t, b) started from, row by row, for the whole-sequence dW_hh GEMM.
template <typename scalar_t>
Tensor previous_states(const RecurrenceDims& d, const Steps& steps, const Tensor& h0, const Tensor& output) {
  Tensor h_prev = sweep_buffer(steps, d.B, d.P, output.options());
  const Rows<scalar_t> h0_rows(h0, d.P), out_rows(output, d.P), h_prev_rows(h_prev, d.P);
  at::parallel_for(0, d.T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t b = 0; b < d.B; ++b) {
        if (!steps.active(t, b)) continue;
        const scalar_t* src = steps.first(t, b) ? h0_rows[b] : out_rows[steps.previous(t) * d.B + b];
        std::memcpy(h_prev_rows[t * d.B + b], src, sizeof(scalar_t) * d.P);
      }
    }
  });
  return h_prev;
}

}  // namespace

template <Cell cell>
Tensors4 forward_cpu(const Tensor& gx_in, const Tensor& h0, const std::optional<Tensor>& c0,
                     const Tensor& w_hh_in, const std::optional<Tensor>& b_hh_in,
                     const std::optional<Tensor>& w_hr_in, const std::optional<Tensor>& lengths_in,
                     bool reverse, bool keep_workspace) {
  const RecurrenceDims d =
      check_recurrence_args(gates_of(cell), gx_in.sizes(), gx_in, h0, c0, w_hh_in, b_hh_in, w_hr_in, lengths_in);
  const Tensor gx = gx_in.contiguous(), w_hh = w_hh_in.contiguous();
  const std::optional<Tensor> b_hh = contiguous(b_hh_in), w_hr = contiguous(w_hr_in),
                              lengths = contiguous(lengths_in);
  const Steps steps{d.T, reverse, lengths ? lengths->data_ptr<int64_t>() : nullptr};
  Tensor output = sweep_buffer(steps, d.B, d.P, gx.options());
  Tensor workspace = sweep_buffer(steps, d.B, keep_workspace ? workspace_width(cell, d.H) : 0, gx.options());
  Tensor h = h0.contiguous().clone();
  Tensor c = cell == Cell::LSTM ? c0->contiguous().clone() : at::empty({0}, gx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gx.scalar_type(), "rnnkernels_forward_cpu", [&] {
    forward_impl<cell, scalar_t>(d, steps, gx, w_hh, b_hh, w_hr, h, c, output, workspace);
  });
  return {output, h, c, workspace};
}

template <Cell cell>
Tensors6 backward_cpu(const Tensor& grad_output_in, const Tensor& grad_h_n,
                      const std::optional<Tensor>& grad_c_n, const Tensor& h0_in,
                      const std::optional<Tensor>& c0, const Tensor& w_hh_in,
                      const std::optional<Tensor>& w_hr_in, const std::optional<Tensor>& lengths_in,
                      bool reverse, const Tensor& output_in, const Tensor& workspace_in) {
  const int64_t G = gates_of(cell);
  const RecurrenceDims d = check_backward_args(cell, grad_output_in, grad_h_n, grad_c_n, h0_in, c0, w_hh_in,
                                               w_hr_in, lengths_in, output_in, workspace_in);
  const int64_t T = d.T, B = d.B;
  const Tensor grad_output = contiguous_buffer(grad_output_in), h0 = h0_in.contiguous(),
               w_hh = w_hh_in.contiguous(), output = output_in.contiguous(),
               workspace = workspace_in.contiguous();
  const std::optional<Tensor> w_hr = contiguous(w_hr_in), lengths = contiguous(lengths_in);
  const auto opts = output.options();
  Tensor dh = grad_h_n.contiguous().clone();
  Tensor dc = cell == Cell::LSTM ? (grad_c_n.has_value() ? grad_c_n->contiguous().clone()
                                                         : at::zeros({B, d.H}, opts))
                                 : at::empty({0}, opts);
  const Tensor c0c = cell == Cell::LSTM ? c0->contiguous() : Tensor();
  const Steps steps{T, reverse, lengths ? lengths->data_ptr<int64_t>() : nullptr};
  Tensor grad_gx = sweep_buffer(steps, B, G * d.H, opts);
  Tensor grad_gh = cell == Cell::GRU ? sweep_buffer(steps, B, G * d.H, opts) : grad_gx;
  const bool projected = w_hr.has_value();
  Tensor dh_all = projected ? sweep_buffer(steps, B, d.P, opts) : Tensor();
  Tensor m_all = projected ? sweep_buffer(steps, B, d.H, opts) : Tensor();
  Tensor h_prev;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output.scalar_type(), "rnnkernels_backward_cpu", [&] {
    with_panel_type<scalar_t>(d.H, [&](auto panel) {
      backward_impl<cell, scalar_t, typename decltype(panel)::type>(
          d, steps, grad_output, dh, dc, h0, c0c, w_hh, w_hr, output, workspace, grad_gx, grad_gh, dh_all, m_all);
    });
    h_prev = previous_states<scalar_t>(d, steps, h0, output);
  });
  const Tensor grad_gh_rows = grad_gh.view({T * B, G * d.H});
  Tensor grad_w_hh = matmul_tn(grad_gh_rows, h_prev.view({T * B, d.P}));
  Tensor grad_b_hh = grad_gh_rows.sum(0);
  Tensor grad_w_hr = projected ? matmul_tn(dh_all.view({T * B, d.P}), m_all.view({T * B, d.H}))
                               : at::empty({0}, opts);
  return {grad_gx, dh, dc, grad_w_hh, grad_b_hh, grad_w_hr};
}

int64_t cpu_float_lanes() {
  return Lanes<float>::width;
}

const char* cpu_bfloat16_panels() {
  switch (bfloat16_panels()) {
    case Bfloat16Panels::amx: return "amx";
    case Bfloat16Panels::avx512_bf16: return "avx512_bf16";
    case Bfloat16Panels::float32: return "float32";
    default: return "";
  }
}

Tensor linear_cpu(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  check_linear_args(x, w, b);
  return linear_once(x, w, b);
}

// One step of a small batch (generation), float32, bfloat16 or float16: per block of kLanes hidden units,
// the dot products of the block's rows of W_ih and W_hh with each sequence's input and state, then its
// cells, in one parallel pass that reads each weight once. The sums are float32; as in the sequence
// forward on the panels, the input part reaches the cells in scalar_t and the recurrent part as it is.
// The workspace is the sequence forward's at T = 1.
template <Cell cell, typename scalar_t>
Tensors3 step_small_batch(const Tensor& x_in, const Tensor& h_in, const std::optional<Tensor>& c_in,
                          const Tensor& w_ih_in, const Tensor& w_hh_in, const std::optional<Tensor>& b_ih_in,
                          const std::optional<Tensor>& b_hh_in, bool keep) {
  const Tensor x = x_in.contiguous(), h = h_in.contiguous(), w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const std::optional<Tensor> b_ih = contiguous(b_ih_in), b_hh = contiguous(b_hh_in);
  const int64_t B = x.size(0), I = x.size(1), H = h.size(1), G = gates_of(cell), W = workspace_width(cell, H);
  Tensor h_next = at::empty({B, H}, x.options());
  Tensor c_next = cell == Cell::LSTM ? c_in->contiguous().clone() : at::empty({0}, x.options());
  Tensor workspace = at::empty({B, keep ? W : 0}, x.options());
  const scalar_t *xp = x.data_ptr<scalar_t>(), *hp = h.data_ptr<scalar_t>(), *wi = w_ih.data_ptr<scalar_t>(),
                 *wh = w_hh.data_ptr<scalar_t>(), *bi = b_ih ? b_ih->data_ptr<scalar_t>() : nullptr,
                 *bh = b_hh ? b_hh->data_ptr<scalar_t>() : nullptr;
  scalar_t *h_out = h_next.data_ptr<scalar_t>(), *c_out = cell == Cell::LSTM ? c_next.data_ptr<scalar_t>() : nullptr,
           *ws_out = keep ? workspace.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, (H + kLanes - 1) / kLanes, 1, [&](int64_t begin, int64_t end) {
    // Per sequence, the input and recurrent parts of the block's pre-activations, gate g at g * kLanes.
    scalar_t pre_x[kDotRows][4 * kLanes], ws[5 * kLanes];
    float pre_h[kDotRows][4 * kLanes], part[4][kDotRows];
    const int vectors = static_cast<int>(B);
    const auto bias = [](const scalar_t* b, int64_t i) { return b ? static_cast<float>(b[i]) : 0.f; };
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t j0 = blk * kLanes, n = std::min(kLanes, H - j0);
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t l0 = 0; l0 < n; l0 += 4) {
          const int64_t first_row = g * H + j0 + l0;
          const int count = static_cast<int>(std::min<int64_t>(4, n - l0));
          dots_of(vectors, wi + first_row * I, I, count, xp, I, I, part);
          for (int q = 0; q < count; ++q)
            for (int64_t b = 0; b < B; ++b) pre_x[b][g * kLanes + l0 + q] = part[q][b] + bias(bi, first_row + q);
          dots_of(vectors, wh + first_row * H, H, count, hp, H, H, part);
          for (int q = 0; q < count; ++q)
            for (int64_t b = 0; b < B; ++b) pre_h[b][g * kLanes + l0 + q] = part[q][b] + bias(bh, first_row + q);
        }
      }
      for (int64_t b = 0; b < B; ++b) {
        scalar_t* c_row = cell == Cell::LSTM ? c_out + b * H + j0 : nullptr;
        cell_forward_row<cell>(keep, pre_x[b], pre_h[b], ws, c_row, hp + b * H + j0, h_out + b * H + j0, n, kLanes,
                               kLanes);
        for (int64_t q = 0; keep && q < W / H; ++q) {
          std::memcpy(ws_out + b * W + q * H + j0, ws + q * kLanes, sizeof(scalar_t) * n);
        }
      }
    }
  });
  return {h_next, c_next, workspace};
}

template <Cell cell>
Tensors3 step_cpu(const Tensor& x, const Tensor& h, const std::optional<Tensor>& c, const Tensor& w_ih,
                  const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                  const std::optional<Tensor>& w_hr, bool keep_workspace) {
  check_step_args(gates_of(cell), x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr);
  if constexpr (kPanelGemm) {
    if (!w_hr.has_value() && x.size(0) > 0 && x.size(0) <= kDotRows) {
      switch (x.scalar_type()) {
        case at::kFloat: return step_small_batch<cell, float>(x, h, c, w_ih, w_hh, b_ih, b_hh, keep_workspace);
        case at::kBFloat16:
          return step_small_batch<cell, c10::BFloat16>(x, h, c, w_ih, w_hh, b_ih, b_hh, keep_workspace);
        case at::kHalf: return step_small_batch<cell, c10::Half>(x, h, c, w_ih, w_hh, b_ih, b_hh, keep_workspace);
        default: break;  // float64: below
      }
    }
  }
  // A step's projection sums over input_size only, as torch.nn's cells do: one GEMM, no K slices (whose
  // column views of w_ih oneDNN would need copied, at every step).
  const Tensor gx = StepLinear(w_ih, b_ih, x.size(0), 1)(x.contiguous()).unsqueeze(0);
  auto [output, h_next, c_next, workspace] =
      forward_cpu<cell>(gx, h, c, w_hh, b_hh, w_hr, std::nullopt, false, keep_workspace);
  return {h_next, c_next, workspace.squeeze(0)};
}

#define RNNKERNELS_INSTANTIATE(cell)                                                                     \
  template Tensors4 forward_cpu<cell>(const Tensor&, const Tensor&, const std::optional<Tensor>&,        \
                                      const Tensor&, const std::optional<Tensor>&,                       \
                                      const std::optional<Tensor>&, const std::optional<Tensor>&, bool,   \
                                      bool);                                                             \
  template Tensors6 backward_cpu<cell>(const Tensor&, const Tensor&, const std::optional<Tensor>&,       \
                                       const Tensor&, const std::optional<Tensor>&, const Tensor&,       \
                                       const std::optional<Tensor>&, const std::optional<Tensor>&, bool, \
                                       const Tensor&, const Tensor&);                                     \
  template Tensors3 step_cpu<cell>(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, \
                                   const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, \
                                   const std::optional<Tensor>&, bool);
RNNKERNELS_FOR_EACH_CELL(RNNKERNELS_INSTANTIATE)

}  // namespace rnnkernels
