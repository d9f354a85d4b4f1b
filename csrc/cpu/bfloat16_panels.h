// bfloat16 panel products: the same tasks, tiles and epilogues as panels.h's float32 ones, so that a
// bfloat16 recurrence also runs one parallel pass a step whose tiles go straight into the gate math, on
// whichever of two instruction sets the CPU has (bfloat16_panels(), which otherwise says float32):
// - AMX, the tile unit of Intel Xeons since Sapphire Rapids: one TDPBF16PS multiplies 16 rows of h by 32
//   inputs of a panel of 16 columns (about 5 ns on one core here);
// - AVX512-BF16 (AMD Zen 4 and 5, Intel Cooper Lake): register tiles as the float32 ones, each
//   VDPBF16PS adding a pair of inputs' products to 16 columns, twice the float32 FMA's work.
// Both sum in float32; oneDNN's per-step GEMM, the other way, costs tens of microseconds a call. Where the
// CPU has neither (AVX2 laptops, ARM), bfloat16 recurrences run on the float32 panels instead, their rows
// widened exactly (recurrence.cpp), which sums the same products in float32 too.
//
// Assumes: an AVX-512 build with AMX-TILE and AMX-BF16, or AVX512-BF16 (the -march=native build of such a
// CPU); the left operand's inputs contiguous (k_stride 1) and an even K; the right operand in pairs
// (pack_panels<c10::BFloat16>). Inputs that are bfloat16 subnormals count as zero, as in oneDNN's kernels.
// RNNKERNELS_CPU_BFLOAT16 names the most that bfloat16 recurrences may use: "avx512_bf16" leaves AMX
// unused, "float32" both (generation's Dots<c10::BFloat16>, chosen at build time, stays).
#pragma once
#include <cstdlib>
#include <cstring>
#include <string>

#include "panels.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define RNNKERNELS_AVX512_BF16 1
#include <immintrin.h>
#endif
#if defined(RNNKERNELS_AVX512_BF16) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define RNNKERNELS_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace rnnkernels {

// What multiplies a bfloat16 recurrence's products, least to most: nothing (the per-step GEMM path), the
// float32 panels, AVX512-BF16 register tiles, AMX tiles.
enum class Bfloat16Panels { none, float32, avx512_bf16, amx };

// What runs bfloat16 panel products in this process: the most that the build has, RNNKERNELS_CPU_BFLOAT16
// allows and, for AMX, Linux grants the tile state to (from 5.16 on it asks each process to request it;
// torch's oneDNN requests it too, but only once it runs AMX itself). Decided once.
inline Bfloat16Panels bfloat16_panels() {
  static const Bfloat16Panels kind = [] {
    const char* setting = std::getenv("RNNKERNELS_CPU_BFLOAT16");
    const std::string most = setting ? setting : "amx";
    TORCH_CHECK(most == "amx" || most == "avx512_bf16" || most == "float32",
                "rnnkernels: RNNKERNELS_CPU_BFLOAT16 takes amx, avx512_bf16 or float32, not '", most, "'");
#if defined(RNNKERNELS_AMX)
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    if (most == "amx" && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0) return Bfloat16Panels::amx;
#endif
#if defined(RNNKERNELS_AVX512_BF16)
    if (most != "float32") return Bfloat16Panels::avx512_bf16;
#endif
    return kPanelGemm ? Bfloat16Panels::float32 : Bfloat16Panels::none;
  }();
  return kind;
}

// Whether bfloat16 products run on bfloat16's own instructions here, not widened to the float32 panels.
inline bool native_bfloat16_panels() {
  return bfloat16_panels() == Bfloat16Panels::avx512_bf16 || bfloat16_panels() == Bfloat16Panels::amx;
}

#if defined(RNNKERNELS_AVX512_BF16)
static_assert(kLanes == 16, "a tile's 16 float32 columns are one AVX-512 panel");

// out (kRows, kPanels * kLanes) = h[rows] W_block^T over all K, on AVX512-BF16: per pair of inputs, each
// row's pair broadcast and multiplied into every panel's pair row, as panel_tile does one input at a time.
template <int kRows, int kPanels>
[[gnu::always_inline]] inline void dpbf16_tile(const c10::BFloat16* __restrict__ h, int64_t row_stride, int64_t K,
                                               const c10::BFloat16* __restrict__ w, int64_t pair_stride,
                                               float* __restrict__ out) {
  __m512 acc[kRows][kPanels];
  for (int r = 0; r < kRows; ++r)
    for (int p = 0; p < kPanels; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2) {
    __m512bh wk[kPanels];
    for (int p = 0; p < kPanels; ++p) wk[p] = (__m512bh)_mm512_loadu_si512(w + (k / 2) * pair_stride + p * 2 * kLanes);
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, h + r * row_stride + k, sizeof(pair));
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      for (int p = 0; p < kPanels; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], wk[p], x);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int p = 0; p < kPanels; ++p) _mm512_storeu_ps(out + (r * kPanels + p) * kLanes, acc[r][p]);
}

template <int kPanels, int kRows = kTileRows<kPanels>>
[[gnu::always_inline]] inline void dpbf16_tile_rows(int rows, const c10::BFloat16* h, int64_t row_stride, int64_t K,
                                                    const c10::BFloat16* w, int64_t pair_stride, float* out) {
  if constexpr (kRows > 0) {
    if (rows == kRows) return dpbf16_tile<kRows, kPanels>(h, row_stride, K, w, pair_stride, out);
    return dpbf16_tile_rows<kPanels, kRows - 1>(rows, h, row_stride, K, w, pair_stride, out);
  }
}

// Dots (panels.h) of bfloat16 rows and vectors: each VDPBF16PS adds 32 inputs' products into 16 float32
// sums, straight from the rows as they lie (no packing, no conversion); a step of generation at hidden
// 1024 streams 16 MB of weights, half of float32's. All four rows at once: 16 sums, 4 vectors and a row's
// inputs fit AVX-512's 32 registers. A tail's inputs past K load as zeros.
template <>
struct Dots<c10::BFloat16> {
  template <int kVectors>
  static void run(const c10::BFloat16* w, int64_t ldw, int count, const c10::BFloat16* v, int64_t ldv, int64_t K,
                  float (*out)[kDotRows]) {
    constexpr int64_t kInputs = 2 * kLanes;
    constexpr int64_t kAhead = 1024 / sizeof(c10::BFloat16);  // as Dots<float>: 1 KiB ahead on each row
    const c10::BFloat16* rows[kDotRows];
    for (int q = 0; q < kDotRows; ++q) rows[q] = w + std::min(q, count - 1) * ldw;  // past count: unused
    __m512 acc[kDotRows][kVectors];
    for (int q = 0; q < kDotRows; ++q)
      for (int r = 0; r < kVectors; ++r) acc[q][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += kInputs) {
      const __mmask32 inputs = K - k >= kInputs ? ~__mmask32{0} : (__mmask32{1} << (K - k)) - 1;
      __m512bh vk[kVectors];
      for (int r = 0; r < kVectors; ++r) vk[r] = (__m512bh)_mm512_maskz_loadu_epi16(inputs, v + r * ldv + k);
      for (int q = 0; q < kDotRows; ++q) {
        __builtin_prefetch(rows[q] + k + kAhead, 0, 3);
        const __m512bh wk = (__m512bh)_mm512_maskz_loadu_epi16(inputs, rows[q] + k);
        for (int r = 0; r < kVectors; ++r) acc[q][r] = _mm512_dpbf16_ps(acc[q][r], wk, vk[r]);
      }
    }
    for (int q = 0; q < count; ++q)
      for (int r = 0; r < kVectors; ++r) out[q][r] = _mm512_reduce_add_ps(acc[q][r]);
  }
};
#endif

#if defined(RNNKERNELS_AMX)
// Rows of h per AMX tile. At namespace scope: as panel_product's own constant, used inside its lambda, it
// made GCC 12.2 stop with an internal compiler error (as kTilesPerTask in panels.h).
constexpr int64_t kAmxRows = 16;

// Tiles: 0-3 the sums of the block's panels, 4 the rows of h, 5 and 6 the panels' weights in turn.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};

  explicit TileConfig(int h_rows) {
    for (int t = 0; t < 7; ++t) {
      rows[t] = static_cast<uint8_t>(t < 5 ? h_rows : kPairStep / 2);
      bytes_per_row[t] = 64;
    }
  }
};

// Sums of rows [0, rows) of h against one block, over all K, into `out` (rows x panels * kLanes, float32),
// on AMX tiles configured for `rows`. The tiles hold h's rows as they lie; the last step's inputs past K,
// which lie in the next row or past the end, are copied with zeros after them into `tail`, so nothing
// beyond h is read.
template <int kPanels>
inline void amx_tile(const c10::BFloat16* h, int64_t row_stride, int rows, int64_t K, const c10::BFloat16* w,
                     int64_t pair_stride, c10::BFloat16* tail, float* out) {
  static_assert(kPanels >= 2 && kPanels <= 4, "a block has 2, 3 or 4 panels");
  constexpr int64_t kWidth = kPanels * kLanes;
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kPanels > 2) _tile_zero(2);
  if constexpr (kPanels > 3) _tile_zero(3);
  const auto step = [&](const c10::BFloat16* a, int64_t a_stride, int64_t k0) {
    _tile_loadd(4, a, a_stride * int64_t{sizeof(c10::BFloat16)});
    const c10::BFloat16* wk = w + (k0 / 2) * pair_stride;
    constexpr int64_t kPanelPairs = 2 * kLanes;  // a panel's 16 columns of pairs
    const int64_t stride = pair_stride * int64_t{sizeof(c10::BFloat16)};
    _tile_loadd(5, wk, stride);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, wk + kPanelPairs, stride);
    _tile_dpbf16ps(1, 4, 6);
    if constexpr (kPanels > 2) {
      _tile_loadd(5, wk + 2 * kPanelPairs, stride);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (kPanels > 3) {
      _tile_loadd(6, wk + 3 * kPanelPairs, stride);
      _tile_dpbf16ps(3, 4, 6);
    }
  };
  const int64_t whole = K / kPairStep * kPairStep;
  for (int64_t k0 = 0; k0 < whole; k0 += kPairStep) step(h + k0, row_stride, k0);
  if (whole < K) {
    for (int r = 0; r < rows; ++r) {
      c10::BFloat16* dst = tail + r * kPairStep;
      std::copy_n(h + r * row_stride + whole, K - whole, dst);
      std::fill(dst + (K - whole), dst + kPairStep, c10::BFloat16(0.f));
    }
    step(tail, kPairStep, whole);
  }
  const int64_t out_stride = kWidth * int64_t{sizeof(float)};
  _tile_stored(0, out, out_stride);
  _tile_stored(1, out + kLanes, out_stride);
  if constexpr (kPanels > 2) _tile_stored(2, out + 2 * kLanes, out_stride);
  if constexpr (kPanels > 3) _tile_stored(3, out + 3 * kLanes, out_stride);
}
#endif

// panel_product (panels.h) for bfloat16 rows and pair-packed weights: tiles of up to 16 rows on AMX, of
// kTileRows on AVX512-BF16, the bias added to each finished tile before its epilogue.
template <typename Epilogue>
void panel_product(const PanelWeightOf<c10::BFloat16>& w, const PanelRowsOf<c10::BFloat16>& h,
                   const Epilogue& epilogue) {
  TORCH_CHECK(native_bfloat16_panels() && h.k_stride == 1 && w.K % 2 == 0,
              "rnnkernels: the bfloat16 panel product needs AMX or AVX512-BF16, contiguous inputs and an even K");
#if defined(RNNKERNELS_AVX512_BF16)
  const bool amx = bfloat16_panels() == Bfloat16Panels::amx;
  const int64_t width = w.panels * kLanes;
  const int64_t max_rows = w.panels == 2 ? kTileRows<2> : w.panels == 3 ? kTileRows<3> : kTileRows<4>;
#if defined(RNNKERNELS_AMX)
  const int64_t tile_rows = amx ? kAmxRows : max_rows;
#else
  const int64_t tile_rows = max_rows;
#endif
  const int64_t row_tiles = (h.rows + tile_rows - 1) / tile_rows;
  const RowGroups grouping = row_groups(row_tiles, w.blocks, kTilesPerTask);
  const float* bias = w.bias.data_ptr<float>();
  at::parallel_for(0, w.blocks * grouping.groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float out[16 * 4 * kLanes];  // the largest tile: 16 rows of 4 panels
    [[maybe_unused]] alignas(64) c10::BFloat16 tail[16 * kPairStep];
    int configured_rows = 0;  // AMX: loading a configuration zeroes the tiles, so only where the rows change
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task / grouping.groups, first = (task % grouping.groups) * grouping.tiles;
      const int64_t last = std::min(row_tiles, first + grouping.tiles);
      const c10::BFloat16* wb = w.data + blk * w.block_stride;
      const int64_t j0 = blk * w.units, n = std::min(w.units, w.outputs - j0);
      for (int64_t tile = first; tile < last; ++tile) {
        const int64_t r0 = tile * h.rows / row_tiles;
        const int rows = static_cast<int>((tile + 1) * h.rows / row_tiles - r0);
        const c10::BFloat16* hr = h.data + r0 * h.row_stride;
        const auto compute = [&](auto panels) {
          constexpr int kPanels = decltype(panels)::value;
#if defined(RNNKERNELS_AMX)
          if (amx) {
            if (rows != configured_rows) {
              const TileConfig config(rows);
              _tile_loadconfig(&config);
              configured_rows = rows;
            }
            return amx_tile<kPanels>(hr, h.row_stride, rows, w.K, wb, w.k_stride, tail, out);
          }
#endif
          dpbf16_tile_rows<kPanels>(rows, hr, h.row_stride, w.K, wb, w.k_stride, out);
        };
        if (w.panels == 2) {
          compute(std::integral_constant<int, 2>());
        } else if (w.panels == 3) {
          compute(std::integral_constant<int, 3>());
        } else {
          compute(std::integral_constant<int, 4>());
        }
        for (int r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < width; c += kLanes) {
            float* o = out + r * width + c;
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_loadu_ps(bias + blk * width + c)));
          }
        }
        epilogue(PanelTile{j0, n, r0, rows, out, width});
      }
    }
#if defined(RNNKERNELS_AMX)
    if (configured_rows > 0) _tile_release();
#endif
  });
#else
  (void)epilogue;
#endif
}

}  // namespace rnnkernels
