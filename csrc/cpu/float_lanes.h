// The row kernels' arithmetic: Lanes<scalar_t> loads, computes and stores `width` hidden units at a time.
// For float32 that is FloatLanes where the build has AVX-512 (16 lanes), AVX2 with FMA (8 lanes, most x86
// laptops) or 64-bit ARM (NEON, 4 lanes: Apple silicon and other ARM laptops): a vector register as an
// arithmetic type, so that the gate math of cell_math.h, written once for a scalar, runs on a register of
// units at once with its exp and tanh vectorised by hand (the compiler's vectorisation of the scalar code
// took twice the time: its clamps, rounding and blends became compares, blends and integer conversions;
// without AVX-512 it did not vectorise at all, and the gate math took 45% of an LSTM forward); bfloat16
// and float16 load into and store from the same registers. Otherwise one unit at a time, in
// at::opmath_type.
//
// Assumes: loads and stores of `count` < width units are masked, so the rows need no padding.
#pragma once
#include <ATen/OpMathType.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

#include "../cell_math.h"

// RNNKERNELS_EMULATE_NEON: the NEON code on an x86 build, through SIMDe's definitions of the NEON
// intrinsics (tests/test_portable_build.py), since no ARM machine runs the tests.
#if defined(RNNKERNELS_EMULATE_NEON)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/arm/neon.h>
#define RNNKERNELS_NEON 1
#define RNNKERNELS_FLOAT_LANES 1
#if !defined(vdivq_f32)  // not in SIMDe 0.7 (Debian 12): lane by lane, each an IEEE division as NEON's
inline float32x4_t vdivq_f32(float32x4_t a, float32x4_t b) {
  float quotient[4], divisor[4];
  vst1q_f32(quotient, a);
  vst1q_f32(divisor, b);
  for (int i = 0; i < 4; ++i) quotient[i] /= divisor[i];
  return vld1q_f32(quotient);
}
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define RNNKERNELS_NEON 1
#define RNNKERNELS_FLOAT_LANES 1
#elif defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
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
// relies on: where the second operand of minimum or maximum is NaN, the result is NaN; below (a < b) and
// at_most (a <= b) are false where either is NaN.
#if defined(RNNKERNELS_NEON)
struct FloatRegister {
  using type = float32x4_t;
  using mask = uint32x4_t;  // all ones in the lanes that hold
  static constexpr int64_t width = 4;
  static constexpr int registers = 32;
  static constexpr bool memory_operands = false;  // arithmetic on registers only
  static type broadcast(float x) { return vdupq_n_f32(x); }
  static type add(type a, type b) { return vaddq_f32(a, b); }
  static type subtract(type a, type b) { return vsubq_f32(a, b); }
  static type multiply(type a, type b) { return vmulq_f32(a, b); }
  static type fmadd(type a, type b, type c) { return vfmaq_f32(c, a, b); }
  static float sum(type x) { return vaddvq_f32(x); }
  static type divide(type a, type b) { return vdivq_f32(a, b); }
  // NaN in either operand gives NaN, which keeps the rule above.
  static type minimum(type a, type b) { return vminq_f32(a, b); }
  static type maximum(type a, type b) { return vmaxq_f32(a, b); }
  static type round(type x) { return vrndnq_f32(x); }  // half to even, as the x86 forms
  // y * 2^n for integers n in [-126, 127] (host_exp's range), by building 2^n's exponent bits. NaN n
  // converts to 0, which leaves y (NaN there too) NaN.
  static type times_exp2(type y, type n) {
    const int32x4_t exponent = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(exponent));
  }
  static uint32x4_t bits(type x) { return vreinterpretq_u32_f32(x); }
  static uint32x4_t sign() { return vdupq_n_u32(0x80000000u); }
  static type negate(type x) { return vnegq_f32(x); }
  static type magnitude(type x) { return vabsq_f32(x); }
  static type with_sign_of(type m, type x) {
    return vreinterpretq_f32_u32(vorrq_u32(bits(m), vandq_u32(bits(x), sign())));
  }
  static mask below(type a, type b) { return vcltq_f32(a, b); }
  static mask at_most(type a, type b) { return vcleq_f32(a, b); }
  static type select(mask m, type then, type otherwise) { return vbslq_f32(m, then, otherwise); }
  static mask first(int64_t count) {
    const uint32_t lane[width] = {0, 1, 2, 3};
    return vcltq_u32(vld1q_u32(lane), vdupq_n_u32(static_cast<uint32_t>(std::clamp<int64_t>(count, 0, width))));
  }
  static type load(const float* p) { return vld1q_f32(p); }
  // Masked lanes are neither read nor written, so a row's tail needs no padding past its end.
  static type load_masked(const float* p, mask m) {
    uint32_t holds[width];
    vst1q_u32(holds, m);
    float lanes[width] = {};
    for (int64_t i = 0; i < width; ++i)
      if (holds[i]) lanes[i] = p[i];
    return vld1q_f32(lanes);
  }
  static void store(float* p, type v) { vst1q_f32(p, v); }
  static void store_masked(float* p, mask m, type v) {
    uint32_t holds[width];
    float lanes[width];
    vst1q_u32(holds, m);
    vst1q_f32(lanes, v);
    for (int64_t i = 0; i < width; ++i)
      if (holds[i]) p[i] = lanes[i];
  }
};
#elif defined(__AVX512F__)
struct FloatRegister {
  using type = __m512;
  using mask = __mmask16;
  static constexpr int64_t width = 16;
  static constexpr int registers = 32;
  static constexpr bool memory_operands = true;  // an FMA can take an operand, or a broadcast, from memory
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
  static mask below(type a, type b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static mask at_most(type a, type b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
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
  static constexpr bool memory_operands = true;  // an FMA can take an operand from memory
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
  static mask below(type a, type b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static mask at_most(type a, type b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
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
  return FloatLanes(R::select(R::below(a.v, R::broadcast(limit)), then.v, otherwise.v));
}

template <>
struct Fn<FloatLanes> {
  using R = FloatRegister;
  static FloatLanes exp(FloatLanes x) { return host_exp(x); }
  static FloatLanes tanh(FloatLanes x) { return host_tanh(x); }
  static FloatLanes relu(FloatLanes x) {  // as Fn<float>: x where x > 0 or NaN, else +0
    return FloatLanes(R::select(R::at_most(x.v, R::broadcast(0.f)), R::broadcast(0.f), x.v));
  }
  static FloatLanes positive(FloatLanes x) {  // 0 where x <= 0, else 1 (NaN too)
    return FloatLanes(R::select(R::at_most(x.v, R::broadcast(0.f)), R::broadcast(0.f), R::broadcast(1.f)));
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

// bfloat16 and float16 rows: the same float32 registers, converted on the way in (exactly) and out (rounded
// to nearest even, as the scalar path's conversion). Below on AVX-512 and AVX2 in registers; elsewhere
// (NEON) unit by unit through a float buffer, loops that vectorise.
template <typename scalar_t>
struct ConvertedLanes {
  using type = FloatLanes;
  static constexpr int64_t width = FloatRegister::width;
  static type load(const scalar_t* p, int64_t count) {
    alignas(64) float units[width];
    const int64_t n = std::min(count, width);
    for (int64_t i = 0; i < n; ++i) units[i] = static_cast<float>(p[i]);
    return Lanes<float>::load(units, n);
  }
  static void store(scalar_t* p, type v, int64_t count) {
    alignas(64) float units[width];
    Lanes<float>::store(units, v, width);
    const int64_t n = std::min(count, width);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(units[i]);
  }
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(RNNKERNELS_NEON)
// bfloat16 is the high half of a float32, so AVX-512 converts 16 units in a few integer instructions:
// shifts on the way in, and on the way out c10's rounding to nearest even (NaN to 0x7FC0), so that the
// bits stored are those of the conversion above. A float buffer's stores and reloads cost the bfloat16
// LSTM's gate math two thirds of its time (timemachine-char, AMX).
template <>
struct Lanes<c10::BFloat16> {
  using type = FloatLanes;
  static constexpr int64_t width = 16;
  static type load(const c10::BFloat16* p, int64_t count) {
    const __mmask16 lanes = FloatRegister::first(count);
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p));
    return FloatLanes(_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
  }
  static void store(c10::BFloat16* p, type v, int64_t count) {
    const __m512i bits = _mm512_castps_si512(v.v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q);
    const __m512i units = _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(p, FloatRegister::first(count), _mm512_cvtepi32_epi16(units));
  }
};

// float16 through F16C's conversions (every AVX-512 CPU has them), which round to nearest even as c10
// does; NaN stays NaN (c10 makes it 0x7E00 with its sign, as F16C does to a float32 NaN of no payload).
template <>
struct Lanes<c10::Half> {
  using type = FloatLanes;
  static constexpr int64_t width = 16;
  static type load(const c10::Half* p, int64_t count) {
    return FloatLanes(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(FloatRegister::first(count), p)));
  }
  static void store(c10::Half* p, type v, int64_t count) {
    _mm256_mask_storeu_epi16(p, FloatRegister::first(count), _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT));
  }
};
#elif defined(__AVX2__) && defined(__F16C__) && !defined(RNNKERNELS_NEON) && !defined(__AVX512F__)
// AVX2 (with F16C, as every AVX2 CPU): the same conversions on 8 units at a time. AVX2 has no masked 16-bit
// loads or stores, so a row's last few units (count < 8) pass through a register's image in memory.
template <typename scalar_t, typename Convert>
struct Avx2HalfWidthLanes {
  using type = FloatLanes;
  static constexpr int64_t width = 8;
  static type load(const scalar_t* p, int64_t count) {
    if (count >= width) return FloatLanes(Convert::widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    __m128i units = _mm_setzero_si128();
    std::memcpy(&units, p, sizeof(scalar_t) * std::max<int64_t>(count, 0));
    return FloatLanes(Convert::widen(units));
  }
  static void store(scalar_t* p, type v, int64_t count) {
    const __m128i units = Convert::narrow(v.v);
    if (count >= width) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), units);
    std::memcpy(p, &units, sizeof(scalar_t) * std::max<int64_t>(count, 0));
  }
};

struct Bfloat16Conversions {  // as the AVX-512 ones above, bit for bit c10's
  static __m256 widen(__m128i units) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(units), 16));
  }
  static __m128i narrow(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i units = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    // Each unit fits 16 bits, so the saturating pack keeps it as it is.
    return _mm_packus_epi32(_mm256_castsi256_si128(units), _mm256_extracti128_si256(units, 1));
  }
};

struct Float16Conversions {  // F16C, rounding as the AVX-512 specialisation above
  static __m256 widen(__m128i units) { return _mm256_cvtph_ps(units); }
  static __m128i narrow(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
};

template <>
struct Lanes<c10::BFloat16> : Avx2HalfWidthLanes<c10::BFloat16, Bfloat16Conversions> {};
template <>
struct Lanes<c10::Half> : Avx2HalfWidthLanes<c10::Half, Float16Conversions> {};
#else
template <>
struct Lanes<c10::BFloat16> : ConvertedLanes<c10::BFloat16> {};
template <>
struct Lanes<c10::Half> : ConvertedLanes<c10::Half> {};
#endif
#endif

}  // namespace rnnkernels
