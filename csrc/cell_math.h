// Gate math of the three cells, one element at a time, shared by the CPU and CUDA kernels.
//
// T is the arithmetic type, float or double (bfloat16 and half compute in float). Pre-activations arrive as
// the sum of the input part (x W_ih^T + b_ih) and the recurrent part (h W_hh^T + b_hh); the formulas
// are torch.nn's, written once in rnnkernels/reference.py as well, and tests hold the two together.
#pragma once
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RK_HD __host__ __device__ __forceinline__
#else
#define RK_HD inline
#endif

namespace rnnkernels {

template <typename T>
struct Fn;

#if !defined(__CUDA_ARCH__)
// Host float exp and tanh without branches or library calls, so that they vectorise (glibc's expf/tanhf
// are scalar calls): Cephes' expf reduction and polynomial; tanh by its odd polynomial near 0 and by exp
// further out. Both within a few float ulps, which tests/test_cell_math.py checks against float64.
// T is float, or the 16 lanes of csrc/cpu/float_lanes.h, which defines these primitives for them.

// x clamped to [lo, hi]; NaN stays NaN.
inline float clamped(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// x rounded to an integer, half to even. NaN gives 0, so that NaN goes on through x, not an int cast.
inline float rounded(float x) {
  const float round_magic = 12582912.f;  // 1.5 * 2^23: adding and subtracting rounds to an integer
  const float r = (x + round_magic) - round_magic;
  return r == r ? r : 0.f;
}

// y * 2^n for an integer n in [-126, 127].
inline float times_exp2(float y, float n) { return y * __builtin_bit_cast(float, (static_cast<int>(n) + 127) << 23); }

inline float magnitude(float x) { return x < 0.f ? -x : x; }

// m >= 0 with the sign of x.
inline float with_sign_of(float m, float x) { return x < 0.f ? -m : m; }

// a < limit ? then : otherwise, false for NaN.
inline float where_below(float a, float limit, float then, float otherwise) { return a < limit ? then : otherwise; }

template <typename T>
inline T host_exp(T x) {
  x = clamped(x, -87.3f, 88.3f);
  const T n = rounded(x * 1.44269504088896341f);
  x = x - n * 0.693359375f - n * -2.12194440e-4f;
  T p = 1.9875691500e-4f;
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  return times_exp2(p * x * x + x + 1.f, n);
}

template <typename T>
inline T host_tanh(T x) {
  const T z = x * x;
  T p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const T near_zero = p * z * x + x;
  const T ax = magnitude(x);
  const T far = T(1.f) - T(2.f) / (host_exp(ax + ax) + 1.f);
  return where_below(ax, 0.625f, near_zero, with_sign_of(far, x));
}
#endif

template <>
struct Fn<float> {
#if defined(__CUDA_ARCH__)
  static RK_HD float exp(float x) { return ::expf(x); }
  static RK_HD float tanh(float x) { return ::tanhf(x); }
#else
  static RK_HD float exp(float x) { return host_exp(x); }
  static RK_HD float tanh(float x) { return host_tanh(x); }
#endif
  static RK_HD float relu(float x) { return x > 0.f || x != x ? x : 0.f; }  // NaN stays NaN
  static RK_HD float positive(float x) { return x <= 0.f ? 0.f : 1.f; }  // as torch: NaN passes
};

template <>
struct Fn<double> {
  static RK_HD double exp(double x) { return ::exp(x); }
  static RK_HD double tanh(double x) { return ::tanh(x); }
  static RK_HD double relu(double x) { return x > 0. || x != x ? x : 0.; }
  static RK_HD double positive(double x) { return x <= 0. ? 0. : 1.; }
};

template <typename T>
RK_HD T sigmoid(T x) {
  return T(1) / (T(1) + Fn<T>::exp(-x));
}

// LSTM: gates in torch.nn's order i, f, g, o. Returns activated gates, the new cell and hidden state.
template <typename T>
struct LstmForward {
  T i, f, g, o, c, h;
  RK_HD LstmForward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev)
      : i(sigmoid(pre_i)), f(sigmoid(pre_f)), g(Fn<T>::tanh(pre_g)), o(sigmoid(pre_o)) {
    c = f * c_prev + i * g;
    h = o * Fn<T>::tanh(c);
  }
};

// Given dL/dh_t (dh) and dL/dc_t from the step after (dc_next), the gradients of the four
// pre-activations and of c_{t-1}.
template <typename T>
struct LstmBackward {
  T d_i, d_f, d_g, d_o, dc_prev;
  RK_HD LstmBackward(T dh, T dc_next, T i, T f, T g, T o, T c, T c_prev) {
    const T tanh_c = Fn<T>::tanh(c);
    const T dc = dc_next + dh * o * (T(1) - tanh_c * tanh_c);
    d_i = dc * g * i * (T(1) - i);
    d_f = dc * c_prev * f * (T(1) - f);
    d_g = dc * i * (T(1) - g * g);
    d_o = dh * tanh_c * o * (T(1) - o);
    dc_prev = dc * f;
  }
};

// GRU: gates r, z, n. hn is the recurrent part of the n gate, W_hn h + b_hn, which r scales.
template <typename T>
struct GruForward {
  T r, z, n, h;
  RK_HD GruForward(T pre_r, T pre_z, T x_n, T hn, T h_prev)
      : r(sigmoid(pre_r)), z(sigmoid(pre_z)) {
    n = Fn<T>::tanh(x_n + r * hn);
    h = (T(1) - z) * n + z * h_prev;
  }
};

// d_xn is the gradient of the input part of the n gate; d_hn = d_xn * r that of its recurrent part.
// dh_direct is the share of dL/dh_{t-1} that bypasses W_hh.
template <typename T>
struct GruBackward {
  T d_r, d_z, d_xn, d_hn, dh_direct;
  RK_HD GruBackward(T dh, T r, T z, T n, T hn, T h_prev) {
    d_xn = dh * (T(1) - z) * (T(1) - n * n);
    d_hn = d_xn * r;
    d_r = d_xn * hn * r * (T(1) - r);
    d_z = dh * (h_prev - n) * z * (T(1) - z);
    dh_direct = dh * z;
  }
};

// Elman RNN with tanh or relu; the backward needs only the output h.
template <typename T>
RK_HD T rnn_forward(T pre, bool relu) {
  return relu ? Fn<T>::relu(pre) : Fn<T>::tanh(pre);
}

template <typename T>
RK_HD T rnn_backward(T dh, T h, bool relu) {
  return relu ? dh * Fn<T>::positive(h) : dh * (T(1) - h * h);
}

}  // namespace rnnkernels
