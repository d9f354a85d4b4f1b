// The row kernels' arithmetic: Lanes<scalar_t> loads, computes and stores `width` hidden units at a time.
// For float32 on AVX-512 builds that is FloatLanes, the 16 lanes of a register as an arithmetic type, so
// that the gate math of cell_math.h, written once for a scalar, runs on 16 units at once with its exp and
// tanh vectorised by hand (the compiler's vectorisation of the scalar code took twice the time: its
// clamps, rounding and blends became compares, blends and integer conversions). Otherwise one unit at a
// time, in at::opmath_type.
//
// Assumes: loads and stores of `count` < width units are masked, so the rows need no padding.
#pragma once
#include <ATen/OpMathType.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "../cell_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rnnkernels {

template <typename scalar_t>
struct Lanes {
  using type = at::opmath_type<scalar_t>;
  static constexpr int64_t width = 1;
  static type load(const scalar_t* p, int64_t) { return type(*p); }
  static void store(scalar_t* p, type v, int64_t) { *p = scalar_t(v); }
};

#if defined(__AVX512F__)
struct FloatLanes {
  __m512 v;
  FloatLanes() = default;  // as a float member: set in the constructor's body (cell_math.h)
  FloatLanes(float x) : v(_mm512_set1_ps(x)) {}  // NOLINT: implicit, so that the formulas' constants broadcast
  explicit FloatLanes(__m512 x) : v(x) {}
};

inline FloatLanes operator+(FloatLanes a, FloatLanes b) { return FloatLanes(_mm512_add_ps(a.v, b.v)); }
inline FloatLanes operator-(FloatLanes a, FloatLanes b) { return FloatLanes(_mm512_sub_ps(a.v, b.v)); }
inline FloatLanes operator*(FloatLanes a, FloatLanes b) { return FloatLanes(_mm512_mul_ps(a.v, b.v)); }
// a times an estimate of 1 / b (14 bits) refined by one Newton step, within about an ulp of a / b for
// finite normal b (0 and infinite b give NaN; every division in cell_math.h is by 1 + exp(.) >= 1).
// _mm512_div_ps took about 40% of the LSTM's gate math on Zen 5: one step of 32 x 256 cells, 22 against
// 12.5 us on one core, at the same worst error of sigmoid and tanh (tests/test_cell_math.py).
inline FloatLanes operator/(FloatLanes a, FloatLanes b) {
  const __m512 estimate = _mm512_rcp14_ps(b.v);
  const __m512 reciprocal =
      _mm512_fmadd_ps(estimate, _mm512_fnmadd_ps(b.v, estimate, _mm512_set1_ps(1.f)), estimate);
  return FloatLanes(_mm512_mul_ps(a.v, reciprocal));
}
// Sign bits by integer logic: the float forms of and/or/xor need AVX512DQ.
inline __m512i bits(__m512 x) { return _mm512_castps_si512(x); }
inline FloatLanes operator-(FloatLanes a) {
  return FloatLanes(_mm512_castsi512_ps(_mm512_xor_si512(bits(a.v), _mm512_set1_epi32(INT32_MIN))));
}

// The primitives of cell_math.h's host_exp and host_tanh, lane by lane as there. Where an operand is NaN,
// _mm512_max_ps and _mm512_min_ps return the second one: x here, so that NaN stays NaN.
inline FloatLanes clamped(FloatLanes x, float lo, float hi) {
  return FloatLanes(_mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), x.v)));
}
inline FloatLanes rounded(FloatLanes x) {  // NaN stays NaN, harmless to times_exp2
  return FloatLanes(_mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline FloatLanes times_exp2(FloatLanes y, FloatLanes n) { return FloatLanes(_mm512_scalef_ps(y.v, n.v)); }
inline FloatLanes magnitude(FloatLanes x) { return FloatLanes(_mm512_abs_ps(x.v)); }
inline FloatLanes with_sign_of(FloatLanes m, FloatLanes x) {
  const __m512i sign = _mm512_and_si512(bits(x.v), _mm512_set1_epi32(INT32_MIN));
  return FloatLanes(_mm512_castsi512_ps(_mm512_or_si512(bits(m.v), sign)));
}
inline FloatLanes where_below(FloatLanes a, float limit, FloatLanes then, FloatLanes otherwise) {
  return FloatLanes(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, _mm512_set1_ps(limit), _CMP_LT_OQ), otherwise.v,
                                         then.v));
}

template <>
struct Fn<FloatLanes> {
  static FloatLanes exp(FloatLanes x) { return host_exp(x); }
  static FloatLanes tanh(FloatLanes x) { return host_tanh(x); }
  static FloatLanes relu(FloatLanes x) {  // as Fn<float>: x where x > 0 or NaN, else +0
    return FloatLanes(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_NLE_UQ), x.v));
  }
  static FloatLanes positive(FloatLanes x) {  // 0 where x <= 0, else 1 (NaN too)
    return FloatLanes(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_LE_OQ),
                                           _mm512_set1_ps(1.f), _mm512_setzero_ps()));
  }
};

template <>
struct Lanes<float> {
  using type = FloatLanes;
  static constexpr int64_t width = 16;
  // The first `count` lanes (none for count <= 0, all 16 from 16 on).
  static __mmask16 mask(int64_t count) {
    return static_cast<__mmask16>((uint32_t{1} << std::clamp<int64_t>(count, 0, 16)) - 1);
  }
  static type load(const float* p, int64_t count) {
    return FloatLanes(count >= width ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask(count), p));
  }
  static void store(float* p, type v, int64_t count) {
    count >= width ? _mm512_storeu_ps(p, v.v) : _mm512_mask_storeu_ps(p, mask(count), v.v);
  }
};
#endif

}  // namespace rnnkernels
