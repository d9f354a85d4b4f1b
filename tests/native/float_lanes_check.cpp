// Checks the vector registers of csrc/cpu/float_lanes.h as built for the target machine, apart from torch:
// tests/test_portable_build.py builds it for 64-bit ARM and runs it under qemu, so the NEON instructions
// themselves (not SIMDe's x86 definitions of them) meet the rules cell_math.h relies on. Prints what
// failed and exits 1, or prints the count of checks and exits 0.
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "../../csrc/cpu/float_lanes.h"

#if !defined(RNNKERNELS_FLOAT_LANES)
#error "this build has no vector lanes: nothing to check"
#endif

namespace {

using rnnkernels::FloatLanes;
using L = rnnkernels::Lanes<float>;
constexpr int64_t kWidth = L::width;

int64_t checks = 0;
int64_t failures = 0;

void expect(bool ok, const char* what, double x, double got, double want) {
  ++checks;
  if (!ok && ++failures <= 20) std::printf("FAILED %s at x=%.9g: got %.9g, want %.9g\n", what, x, got, want);
}

// f applied to xs, kWidth at a time, the last group through a masked load and store.
template <typename F>
std::vector<float> on_lanes(const std::vector<float>& xs, F f) {
  std::vector<float> out(xs.size());
  for (size_t i = 0; i < xs.size(); i += kWidth) {
    const int64_t count = std::min<int64_t>(kWidth, xs.size() - i);
    L::store(out.data() + i, f(L::load(xs.data() + i, count)), count);
  }
  return out;
}

std::vector<float> special_points() {
  std::vector<float> xs;
  for (int i = -100000; i <= 100000; ++i) xs.push_back(i / 1000.f);
  const float edges[] = {0.f, 1e-30f, -1e-20f, 1e-7f, 0.625f, -0.625f, 0.6249999f, 0.6250001f, 9.f, -9.f, 15.9f,
                         -15.9f, 43.6f, 87.3f, -87.3f, 88.3f, -88.3f, 88.72f, -88.72f, 89.f, -104.f, 1e4f, -1e4f,
                         3e38f, -3e38f};
  for (float e : edges) {
    xs.push_back(e);
    xs.push_back(std::nextafter(e, std::numeric_limits<float>::infinity()));
  }
  return xs;
}

// Within 2 ulps of 1 absolutely and 4 relatively, in [-1, 1], and exactly saturated where float rounds.
void check_sigmoid_and_tanh() {
  const std::vector<float> xs = special_points();
  const auto sigmoid = on_lanes(xs, [](FloatLanes x) { return rnnkernels::sigmoid(x); });
  const auto tanh = on_lanes(xs, [](FloatLanes x) { return rnnkernels::Fn<FloatLanes>::tanh(x); });
  const double eps = std::ldexp(1.0, -24);
  for (size_t i = 0; i < xs.size(); ++i) {
    const double x = xs[i];
    const double exact[2] = {1.0 / (1.0 + std::exp(-x)), std::tanh(x)};
    const float got[2] = {sigmoid[i], tanh[i]};
    const char* names[2] = {"sigmoid", "tanh"};
    for (int f = 0; f < 2; ++f) {
      const double err = std::fabs(got[f] - exact[f]);
      expect(err <= 2 * eps, names[f], x, got[f], exact[f]);
      if (std::fabs(exact[f]) > 1e-30) expect(err / std::fabs(exact[f]) <= 4 * eps, names[f], x, got[f], exact[f]);
      expect(got[f] >= -1.f && got[f] <= 1.f, names[f], x, got[f], exact[f]);
    }
    if (x > 20) expect(sigmoid[i] == 1.f, "sigmoid saturates", x, sigmoid[i], 1);
    if (x < -90) expect(sigmoid[i] < 1e-38f, "sigmoid underflows", x, sigmoid[i], 0);
    if (std::fabs(x) > 10) expect(tanh[i] == std::copysign(1.f, x), "tanh saturates", x, tanh[i], x > 0 ? 1 : -1);
  }
}

// What torch does with non-finite values and signed zeros, lane by lane.
void check_special_values() {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const std::vector<float> xs = {nan, inf, -inf, 0.f, -0.f, -1.f, 2.f, nan, -inf, 1e30f, -1e30f};
  const auto sigmoid = on_lanes(xs, [](FloatLanes x) { return rnnkernels::sigmoid(x); });
  const auto tanh = on_lanes(xs, [](FloatLanes x) { return rnnkernels::Fn<FloatLanes>::tanh(x); });
  const auto relu = on_lanes(xs, [](FloatLanes x) { return rnnkernels::Fn<FloatLanes>::relu(x); });
  const auto positive = on_lanes(xs, [](FloatLanes x) { return rnnkernels::Fn<FloatLanes>::positive(x); });
  for (size_t i = 0; i < xs.size(); ++i) {
    const float x = xs[i];
    if (std::isnan(x)) {
      expect(std::isnan(sigmoid[i]), "sigmoid(NaN)", x, sigmoid[i], nan);
      expect(std::isnan(tanh[i]), "tanh(NaN)", x, tanh[i], nan);
      expect(std::isnan(relu[i]), "relu(NaN)", x, relu[i], nan);
      expect(positive[i] == 1.f, "positive(NaN) passes the gradient", x, positive[i], 1);
      continue;
    }
    if (x == inf) expect(sigmoid[i] == 1.f, "sigmoid(inf)", x, sigmoid[i], 1);
    if (x == -inf) expect(sigmoid[i] >= 0.f && sigmoid[i] < 1e-38f, "sigmoid(-inf)", x, sigmoid[i], 0);
    if (std::isinf(x)) expect(tanh[i] == std::copysign(1.f, x), "tanh at infinity", x, tanh[i], x > 0 ? 1 : -1);
    const float want_relu = x > 0 ? x : 0.f;  // +0 for -0 and negatives, as torch.relu
    expect(relu[i] == want_relu && !std::signbit(relu[i]), "relu", x, relu[i], want_relu);
    expect(positive[i] == (x > 0 ? 1.f : 0.f), "positive", x, positive[i], x > 0);
  }
}

// A row that ends at the edge of an unreadable page: loads and stores of count < width lanes must touch
// nothing past the row (a read there faults), load zeros into the lanes past count and store nothing there.
void check_masked_loads_and_stores() {
  const long page = sysconf(_SC_PAGESIZE);
  char* base = static_cast<char*>(mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED || mprotect(base + page, page, PROT_NONE) != 0) {
    std::printf("FAILED mmap/mprotect\n");
    ++failures;
    return;
  }
  float* edge = reinterpret_cast<float*>(base + page);
  for (int64_t count = 0; count < kWidth; ++count) {
    float* row = edge - count;
    for (int64_t j = 0; j < count; ++j) row[j] = 1.f + j;
    float lanes[kWidth];
    L::store(lanes, L::load(row, count), kWidth);
    for (int64_t j = 0; j < kWidth; ++j)
      expect(lanes[j] == (j < count ? 1.f + j : 0.f), "masked load", count, lanes[j], j < count ? 1.f + j : 0.f);
    float* below = edge - kWidth;  // stores of count lanes into a full register's space
    for (int64_t j = 0; j < kWidth; ++j) below[j] = -1.f;
    L::store(below, FloatLanes(7.f), count);
    for (int64_t j = 0; j < kWidth; ++j)
      expect(below[j] == (j < count ? 7.f : -1.f), "masked store", count, below[j], j < count ? 7.f : -1.f);
  }
  munmap(base, 2 * page);
}

// The cells' forward and backward on lanes against the same formulas in double.
void check_cells() {
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.f, 2.f);
  constexpr int kArgs = 8;
  for (int trial = 0; trial < 2000; ++trial) {
    float in[kArgs][kWidth];
    for (auto& arg : in)
      for (float& v : arg) v = normal(gen);
    for (int64_t j = 0; j < kWidth; ++j) {  // activated gates and states where the backward expects them
      in[4][j] = 1.f / (1.f + std::exp(-in[4][j]));
      in[5][j] = std::tanh(in[5][j]);
    }
    const auto lane = [&](int a) { return L::load(in[a], kWidth); };
    const rnnkernels::LstmForward<FloatLanes> lstm(lane(0), lane(1), lane(2), lane(3), lane(4));
    const rnnkernels::LstmBackward<FloatLanes> lstm_grad(lane(0), lane(1), lane(4), lane(4), lane(5), lane(4),
                                                         lane(2), lane(3));
    const rnnkernels::GruForward<FloatLanes> gru(lane(0), lane(1), lane(2), lane(3), lane(4));
    const rnnkernels::GruBackward<FloatLanes> gru_grad(lane(0), lane(4), lane(4), lane(5), lane(1), lane(2));
    const FloatLanes got[] = {lstm.c, lstm.h, lstm_grad.d_i, lstm_grad.d_f, lstm_grad.d_g, lstm_grad.d_o,
                              lstm_grad.dc_prev, gru.h, gru.n, gru_grad.d_r, gru_grad.d_z, gru_grad.d_hn};
    for (int64_t j = 0; j < kWidth; ++j) {
      const auto d = [&](int a) { return static_cast<double>(in[a][j]); };
      const rnnkernels::LstmForward<double> lstm64(d(0), d(1), d(2), d(3), d(4));
      const rnnkernels::LstmBackward<double> lstm_grad64(d(0), d(1), d(4), d(4), d(5), d(4), d(2), d(3));
      const rnnkernels::GruForward<double> gru64(d(0), d(1), d(2), d(3), d(4));
      const rnnkernels::GruBackward<double> gru_grad64(d(0), d(4), d(4), d(5), d(1), d(2));
      const double want[] = {lstm64.c, lstm64.h, lstm_grad64.d_i, lstm_grad64.d_f, lstm_grad64.d_g,
                             lstm_grad64.d_o, lstm_grad64.dc_prev, gru64.h, gru64.n, gru_grad64.d_r,
                             gru_grad64.d_z, gru_grad64.d_hn};
      for (size_t k = 0; k < std::size(want); ++k) {
        float lanes[kWidth];
        L::store(lanes, got[k], kWidth);
        const double err = std::fabs(lanes[j] - want[k]);
        expect(err <= 1e-5 * (1.0 + std::fabs(want[k])), "cell formula", k, lanes[j], want[k]);
      }
    }
  }
}

// Dot products as the panel and step kernels form them: fmadd over whole registers and a masked tail, then
// sum across the lanes; against float64 within float's rounding of the absolute sum.
void check_dot_products() {
  using R = rnnkernels::FloatRegister;
  std::mt19937 gen(11);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int64_t K = 1; K <= 9 * kWidth + 3; ++K) {
    std::vector<float> a(K), b(K);
    for (int64_t k = 0; k < K; ++k) a[k] = normal(gen), b[k] = normal(gen);
    R::type acc = R::broadcast(0.f);
    for (int64_t k = 0; k < K; k += kWidth)
      acc = R::fmadd(L::load(a.data() + k, K - k).v, L::load(b.data() + k, K - k).v, acc);
    double want = 0, scale = 0;
    for (int64_t k = 0; k < K; ++k) want += double(a[k]) * b[k], scale += std::fabs(double(a[k]) * b[k]);
    const float got = R::sum(acc);
    expect(std::fabs(got - want) <= 1e-6 * (K + 4) * scale, "dot product", K, got, want);
  }
}

// bfloat16 and float16 rows load and store bit for bit as c10's scalar conversions: every 16-bit value on
// the way in; on the way out every value of the form u << shift | low, low the neighbours and ties of the
// 16-bit values (rounded to even), across the whole float range (overflow, subnormals, zero), NaNs of
// both signs (bfloat16: c10's 0x7FC0; float16: NaN, whose payload c10 and F16C keep differently); a
// masked tail leaves the units past it untouched.
template <typename scalar_t>
void check_16_bit_conversions(const char* name, int shift) {
  using B = rnnkernels::Lanes<scalar_t>;
  const auto bits_of = [](float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    return u;
  };
  const auto from_bits = [](uint32_t u) {
    float x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
  };
  std::vector<scalar_t> all(65536);
  for (uint32_t u = 0; u < 65536; ++u) all[u] = scalar_t(static_cast<uint16_t>(u), scalar_t::from_bits());
  for (size_t i = 0; i < all.size(); i += kWidth) {
    const int64_t count = (i / kWidth) % 2 ? kWidth : kWidth - 3;  // whole registers and masked tails
    float lanes[kWidth];
    L::store(lanes, B::load(all.data() + i, count), kWidth);
    for (int64_t j = 0; j < count; ++j) {
      const float want = static_cast<float>(all[i + j]);
      ++checks;
      if (bits_of(lanes[j]) != bits_of(want) && !(std::isnan(want) && std::isnan(lanes[j])) && ++failures <= 20) {
        std::printf("FAILED %s load of 0x%04x: got 0x%08x\n", name, static_cast<unsigned>(i + j), bits_of(lanes[j]));
      }
    }
  }
  std::vector<float> xs;
  const uint32_t half = 1u << (shift - 1);
  for (uint32_t u = 0; u < (1u << (32 - shift)); ++u) {
    for (const uint32_t low : {0u, 1u, half - 1, half, half + 1, 2 * half - 1}) {
      xs.push_back(from_bits(u << shift | low));
    }
  }
  const scalar_t sentinel(static_cast<uint16_t>(0x1234), scalar_t::from_bits());
  for (size_t i = 0; i < xs.size(); i += kWidth) {
    const int64_t count = std::min<int64_t>(kWidth, xs.size() - i) - ((i / kWidth) % 3 == 0 ? 2 : 0);
    scalar_t out[kWidth];
    std::fill_n(out, kWidth, sentinel);
    B::store(out, L::load(xs.data() + i, count), count);
    for (int64_t j = 0; j < kWidth; ++j) {
      const scalar_t want = j < count ? scalar_t(xs[i + j]) : sentinel;
      const bool both_nan = j < count && std::isnan(xs[i + j]) && std::isnan(static_cast<float>(out[j]));
      ++checks;
      if (out[j].x != want.x && !(both_nan && std::is_same_v<scalar_t, c10::Half>) && ++failures <= 20) {
        std::printf("FAILED %s store of 0x%08x (lane %lld of %lld): got 0x%04x, want 0x%04x\n", name,
                    bits_of(j < count ? xs[i + j] : 0.f), static_cast<long long>(j), static_cast<long long>(count),
                    static_cast<unsigned>(out[j].x), static_cast<unsigned>(want.x));
      }
    }
  }
}

}  // namespace

int main() {
  check_sigmoid_and_tanh();
  check_special_values();
  check_masked_loads_and_stores();
  check_cells();
  check_dot_products();
  check_16_bit_conversions<c10::BFloat16>("bfloat16", 16);  // a float32's high half
  check_16_bit_conversions<c10::Half>("float16", 13);  // 10 of a float32's 23 mantissa bits
  std::printf("float_lanes_check: %lld lanes, %lld checks, %lld failed\n", static_cast<long long>(kWidth),
              static_cast<long long>(checks), static_cast<long long>(failures));
  return failures == 0 ? 0 : 1;
}
