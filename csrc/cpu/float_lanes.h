// The row kernels' arithmetic: Lanes<scalar_t> loads, computes and stores `width` hidden units at a time.
// For float32 that is FloatLanes where the build has AVX-512 (16 lanes) or AVX2 with FMA (8 lanes, most
// laptops): a vector register as an arithmetic type, so that the gate math of cell_math.h, written once
// for a scalar, runs on a register of units at once with its exp and tanh vectorised by hand (the
// compiler's vectorisation of the scalar code took twice the time: its clamps, rounding and blends became
// compares, blends and integer conversions; without AVX-512 it did not vectorise at all, and the gate math
// took 45% of an LSTM forward). Otherwise one unit at a time, in at::opmath_type.
//
// Assumes: loads and stores of `count` < width units are masked, so the rows need no padding.
#pragma once
#include <ATen/OpMathType.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "../cell_math.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define RNNKERNELS_FLOAT_LANES 1
#endif

namespace rnnkernels {

template <typename scalar_t>
struct Lanes {
  using type = at::opmath_type<scalar_t>;
  static constexpr int64_t width = 1;
  static type load(const scalar_t* p, int64_t) { return type(*p); }
  static void store(scalar_t* p, type v, int64_t) { *p = scalar_t(v); }
};

// The instructions FloatLanes is made of, for one vector register of floats. NaN rules that cell_math.h
// relies on: where an operand is NaN, minimum and maximum return the second one; comparisons take the
// predicate's own NaN rule.
#if defined(__AVX512F__)
struct FloatRegister {
  using type = __m512;
  using mask = __mmask16;
  static constexpr int64_t width = 16;
  static constexpr int registers = 32;
  static constexpr bool free_masks = true;  // a masked load costs what a plain one does
  static type broadcast(float x) { return _mm512_set1_ps(x); }
  static type add(type a, type b) { return _mm512_add_ps(a, b); }
  static type subtract(type a, type b) { return _mm512_sub_ps(a, b); }
  static type multiply(type a, type b) { return _mm512_mul_ps(a, b); }
  static type fmadd(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(type x) { return _mm512_reduce_add_ps(x); }
  // a times an estimate of 1 / b (14 bits) refined by one Newton step, within about an ulp of a / b for
  // finite normal b (0 and infinite b give NaN; every division in cell_math.h is by 1 + exp(.) >= 1).
  // _mm512_div_ps took about 40% of the LSTM's gate math on Zen 5: one step of 32 x 256 cells, 22 against
  // 12.5 us on one core, at the same worst error of sigmoid and tanh (tests/test_cell_math.py).
  static type divide(type a, type b) {
    const type estimate = _mm512_rcp14_ps(b);
    return _mm512_mul_ps(a, _mm512_fmadd_ps(estimate, _mm512_fnmadd_ps(b, estimate, broadcast(1.f)), estimate));
  }
  static type minimum(type a, type b) { return _mm512_min_ps(a, b); }
  static type maximum(type a, type b) { return _mm512_max_ps(a, b); }
  static type round(type x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static type times_exp2(type y, type n) { return _mm512_scalef_ps(y, n); }
  // Sign bits by integer logic: the float forms of and/or/xor need AVX512DQ.
  static __m512i bits(type x) { return _mm512_castps_si512(x); }
  static __m512i sign() { return _mm512_set1_epi32(INT32_MIN); }
  static type negate(type x) { return _mm512_castsi512_ps(_mm512_xor_si512(bits(x), sign())); }
  static type magnitude(type x) { return _mm512_abs_ps(x); }
  static type with_sign_of(type m, type x) {
    return _mm512_castsi512_ps(_mm512_or_si512(bits(m), _mm512_and_si512(bits(x), sign())));
  }
  template <int kPredicate>
  static mask compare(type a, type b) { return _mm512_cmp_ps_mask(a, b, kPredicate); }
  static type select(mask m, type then, type otherwise) { return _mm512_mask_blend_ps(m, otherwise, then); }
  // The first `count` lanes (none for count <= 0, all from width on).
  static mask first(int64_t count) {
    return static_cast<mask>((uint32_t{1} << std::clamp<int64_t>(count, 0, width)) - 1);
  }
  static type load(const float* p) { return _mm512_loadu_ps(p); }
  static type load_masked(const float* p, mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, type v) { _mm512_storeu_ps(p, v); }
  static void store_masked(float* p, mask m, type v) { _mm512_mask_storeu_ps(p, m, v); }
};
#elif defined(RNNKERNELS_FLOAT_LANES)
struct FloatRegister {
  using type = __m256;
  using mask = __m256;  // all ones in the lanes that hold
  static constexpr int64_t width = 8;
  static constexpr int registers = 16;
  static constexpr bool free_masks = false;  // vmaskmovps: extra instructions
  static type broadcast(float x) { return _mm256_set1_ps(x); }
  static type add(type a, type b) { return _mm256_add_ps(a, b); }
  static type subtract(type a, type b) { return _mm256_sub_ps(a, b); }
  static type multiply(type a, type b) { return _mm256_mul_ps(a, b); }
  static type fmadd(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(type x) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
  }
  // A true division: a 256-bit one costs a few cycles on AVX2 machines, and _mm256_rcp_ps's 12 bits
  // refined once would leave about an ulp of error of their own.
  static type divide(type a, type b) { return _mm256_div_ps(a, b); }
  static type minimum(type a, type b) { return _mm256_min_ps(a, b); }
  static type maximum(type a, type b) { return _mm256_max_ps(a, b); }
  static type round(type x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // y * 2^n for integers n in [-126, 127] (host_exp's range), by building 2^n's exponent bits. NaN n
  // gives a finite factor, which leaves y (NaN there too) NaN.
  static type times_exp2(type y, type n) {
    const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
  }
  static type sign() { return _mm256_set1_ps(-0.f); }
  static type negate(type x) { return _mm256_xor_ps(x, sign()); }
  static type magnitude(type x) { return _mm256_andnot_ps(sign(), x); }
  static type with_sign_of(type m, type x) { return _mm256_or_ps(m, _mm256_and_ps(x, sign())); }
  template <int kPredicate>
  static mask compare(type a, type b) { return _mm256_cmp_ps(a, b, kPredicate); }
  static type select(mask m, type then, type otherwise) { return _mm256_blendv_ps(otherwise, then, m); }
  static mask first(int64_t count) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int lanes = static_cast<int>(std::clamp<int64_t>(count, 0, width));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), lane));
  }
  static type load(const float* p) { return _mm256_loadu_ps(p); }
  // Masked lanes are neither read nor written, so a row's tail needs no padding past its end.
  static type load_masked(const float* p, mask m) { return _mm256_maskload_ps(p, _mm256_castps_si256(m)); }
  static void store(float* p, type v) { _mm256_storeu_ps(p, v); }
  static void store_masked(float* p, mask m, type v) { _mm256_maskstore_ps(p, _mm256_castps_si256(m), v); }
};
#endif

#if defined(RNNKERNELS_FLOAT_LANES)
struct FloatLanes {
  using R = FloatRegister;
  R::type v;
  FloatLanes() = default;  // as a float member: set in the constructor's body (cell_math.h)
  FloatLanes(float x) : v(R::broadcast(x)) {}  // NOLINT: implicit, so that the formulas' constants broadcast
  explicit FloatLanes(R::type x) : v(x) {}
};

inline FloatLanes operator+(FloatLanes a, FloatLanes b) { return FloatLanes(FloatRegister::add(a.v, b.v)); }
inline FloatLanes operator-(FloatLanes a, FloatLanes b) { return FloatLanes(FloatRegister::subtract(a.v, b.v)); }
inline FloatLanes operator*(FloatLanes a, FloatLanes b) { return FloatLanes(FloatRegister::multiply(a.v, b.v)); }
inline FloatLanes operator/(FloatLanes a, FloatLanes b) { return FloatLanes(FloatRegister::divide(a.v, b.v)); }
inline FloatLanes operator-(FloatLanes a) { return FloatLanes(FloatRegister::negate(a.v)); }

// The primitives of cell_math.h's host_exp and host_tanh, lane by lane as there.
inline FloatLanes clamped(FloatLanes x, float lo, float hi) {  // NaN stays NaN: x is the second operand
  using R = FloatRegister;
  return FloatLanes(R::minimum(R::broadcast(hi), R::maximum(R::broadcast(lo), x.v)));
}
// NaN stays NaN, harmless to times_exp2
inline FloatLanes rounded(FloatLanes x) { return FloatLanes(FloatRegister::round(x.v)); }
inline FloatLanes times_exp2(FloatLanes y, FloatLanes n) { return FloatLanes(FloatRegister::times_exp2(y.v, n.v)); }
inline FloatLanes magnitude(FloatLanes x) { return FloatLanes(FloatRegister::magnitude(x.v)); }
inline FloatLanes with_sign_of(FloatLanes m, FloatLanes x) { return FloatLanes(FloatRegister::with_sign_of(m.v, x.v)); }
inline FloatLanes where_below(FloatLanes a, float limit, FloatLanes then, FloatLanes otherwise) {
  using R = FloatRegister;
  return FloatLanes(R::select(R::compare<_CMP_LT_OQ>(a.v, R::broadcast(limit)), then.v, otherwise.v));
}

template <>
struct Fn<FloatLanes> {
  using R = FloatRegister;
  static FloatLanes exp(FloatLanes x) { return host_exp(x); }
  static FloatLanes tanh(FloatLanes x) { return host_tanh(x); }
  static FloatLanes relu(FloatLanes x) {  // as Fn<float>: x where x > 0 or NaN, else +0
    return FloatLanes(R::select(R::compare<_CMP_NLE_UQ>(x.v, R::broadcast(0.f)), x.v, R::broadcast(0.f)));
  }
  static FloatLanes positive(FloatLanes x) {  // 0 where x <= 0, else 1 (NaN too)
    return FloatLanes(R::select(R::compare<_CMP_LE_OQ>(x.v, R::broadcast(0.f)), R::broadcast(0.f), R::broadcast(1.f)));
  }
};

template <>
struct Lanes<float> {
  using type = FloatLanes;
  static constexpr int64_t width = FloatRegister::width;
  using R = FloatRegister;
  static type load(const float* p, int64_t count) {
    return FloatLanes(count >= width ? R::load(p) : R::load_masked(p, R::first(count)));
  }
  static void store(float* p, type v, int64_t count) {
    count >= width ? R::store(p, v.v) : R::store_masked(p, R::first(count), v.v);
  }
};
#endif

}  // namespace rnnkernels
