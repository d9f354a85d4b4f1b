// The per-step recurrent product y = h W^T (+ b) of the float32 CPU kernels, on a weight packed once per
// sequence into panels of 16 output columns, as a CPU analogue of the persistent GPU kernels: every thread
// keeps the panels of its own output columns in its L2 cache across the time steps, and a tile of rows x
// panels is finished in registers and handed straight to the cell's gate math while it is in L1.
//
// Assumes: float32; AVX-512F at build time (the build is -march=native by default; elsewhere
// kPanelGemm is false and the recurrence falls back to oneDNN/BLAS per step); h rows contiguous in K.
// Output columns are grouped into blocks of kPanels panels: for the LSTM and GRU a block holds all gates
// of 16 hidden units (panel p = gate p), so that one tile carries whole cells; otherwise it holds
// kPanels * 16 consecutive columns. Columns beyond N read zero weights and are never stored.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rnnkernels {

#if defined(__AVX512F__)
constexpr bool kPanelGemm = true;
#else
constexpr bool kPanelGemm = false;
#endif

constexpr int64_t kLanes = 16;  // float32 lanes of one AVX-512 register: the width of a panel

// The packed weight. Block `blk` is a (K, panels * 16) row-major matrix: row k holds the weights of the
// block's columns against input k, so the tile loop streams through it once per row group.
struct PanelWeight {
  at::Tensor data;        // (blocks, K, panels * 16)
  at::Tensor bias;        // (blocks, panels * 16), zeros where there is no bias
  int64_t panels = 0;     // panels per block: 3 or 4
  int64_t units = 0;      // output units per block that the epilogue sees (16, or panels * 16)
  int64_t blocks = 0;
  int64_t K = 0;
  int64_t gate_stride = 0;  // distance in W's rows between gates of one unit (H), or 0 for plain columns
};

// Packs w (N, K), given by strides so that a transposed view needs no copy. gates > 1 (LSTM 4, GRU 3):
// N = gates * H and a block is the rows g * H + j of 16 units j; gates == 1: a block is 64 rows.
inline PanelWeight pack_panels(const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t gates) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && (gates == 1 || gates == 3 || gates == 4),
              "rnnkernels: panel packing takes a float32 matrix of 1, 3 or 4 gates");
  PanelWeight p;
  const int64_t N = w.size(0), K = w.size(1), H = N / gates;
  p.panels = gates > 1 ? gates : 4;
  p.units = gates > 1 ? kLanes : p.panels * kLanes;
  p.blocks = (H + p.units - 1) / p.units;
  p.K = K;
  p.gate_stride = gates > 1 ? H : 0;
  const int64_t width = p.panels * kLanes;
  p.data = at::zeros({p.blocks, K, width}, w.options());
  p.bias = at::zeros({p.blocks, width}, w.options());
  const float* src = w.data_ptr<float>();
  const int64_t sn = w.stride(0), sk = w.stride(1);
  const float* bias = b.has_value() ? b->data_ptr<float>() : nullptr;
  float* dst = p.data.data_ptr<float>();
  float* dst_bias = p.bias.data_ptr<float>();
  at::parallel_for(0, p.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      for (int64_t col = 0; col < width; ++col) {
        // Column col of the block: gate col / 16 of unit blk * 16 + col % 16, or plain column.
        const int64_t unit = gates > 1 ? blk * kLanes + col % kLanes : blk * p.units + col;
        if (unit >= H) continue;
        const int64_t n = gates > 1 ? (col / kLanes) * H + unit : unit;
        if (bias) dst_bias[blk * width + col] = bias[n];
        float* column = dst + blk * K * width + col;
        for (int64_t k = 0; k < K; ++k) column[k * width] = src[n * sn + k * sk];
      }
    }
  });
  return p;
}

#if defined(__AVX512F__)
// out (rows, panels * 16) = bias + h[rows] W_block^T, where h[r][k] = h[r * row_stride + k * k_stride]. Each
// element sums K in one running sum per chunk of `chunk` inputs, and the chunks' sums are then added.
template <int kRows, int kPanels>
inline void panel_tile(const float* __restrict__ h, int64_t row_stride, int64_t k_stride,
                       const float* __restrict__ w, const float* __restrict__ bias, int64_t K, int64_t chunk,
                       float* __restrict__ out) {
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    __m512 acc[kRows][kPanels];
    for (int p = 0; p < kPanels; ++p) {
      const __m512 b = k0 == 0 ? _mm512_loadu_ps(bias + p * kLanes) : _mm512_setzero_ps();
      for (int r = 0; r < kRows; ++r) acc[r][p] = b;
    }
    const int64_t k1 = std::min(K, k0 + chunk);
    for (int64_t k = k0; k < k1; ++k) {
      __m512 wk[kPanels];
      for (int p = 0; p < kPanels; ++p) wk[p] = _mm512_loadu_ps(w + (k * kPanels + p) * kLanes);
      for (int r = 0; r < kRows; ++r) {
        const __m512 x = _mm512_set1_ps(h[r * row_stride + k * k_stride]);
        for (int p = 0; p < kPanels; ++p) acc[r][p] = _mm512_fmadd_ps(wk[p], x, acc[r][p]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      for (int p = 0; p < kPanels; ++p) {
        float* o = out + (r * kPanels + p) * kLanes;
        _mm512_storeu_ps(o, k0 == 0 ? acc[r][p] : _mm512_add_ps(_mm512_loadu_ps(o), acc[r][p]));
      }
    }
  }
}

// Rows per tile: enough accumulators to cover the FMA latency, within the 32 vector registers.
template <int kPanels>
constexpr int kTileRows = kPanels == 3 ? 8 : 6;

template <int kPanels, int kRows = kTileRows<kPanels>>
inline void panel_tile_rows(int rows, const float* h, int64_t row_stride, int64_t k_stride, const float* w,
                            const float* bias, int64_t K, int64_t chunk, float* out) {
  if constexpr (kRows > 0) {
    if (rows == kRows) return panel_tile<kRows, kPanels>(h, row_stride, k_stride, w, bias, K, chunk, out);
    return panel_tile_rows<kPanels, kRows - 1>(rows, h, row_stride, k_stride, w, bias, K, chunk, out);
  }
}
#endif

// The left operand of a panel product: element (r, k) at data[r * row_stride + k * k_stride], summed
// over k in chunks of `chunk` (see panel_tile).
struct PanelRows {
  const float* data;
  int64_t rows, row_stride, k_stride, chunk;
};

// For every tile of (rows of h) x (block of W), epilogue(block, first row, rows, out) gets the tile's
// result, out[r * panels * 16 + col], to finish. In a recurrence one call is one time step: the threads
// split the blocks, each thread always the same ones, so that its panels stay in its cache.
template <typename Epilogue>
void panel_product(const PanelWeight& w, const PanelRows& h, const Epilogue& epilogue) {
#if defined(__AVX512F__)
  // As many tiles as the register budget needs, their rows spread evenly (32 rows: 6 tiles of 5 or 6,
  // not five of 6 and one of 2, which runs at a third of the speed).
  const int64_t max_rows = w.panels == 3 ? kTileRows<3> : kTileRows<4>;
  const int64_t width = w.panels * kLanes;
  const int64_t row_tiles = (h.rows + max_rows - 1) / max_rows;
  const float* data = w.data.data_ptr<float>();
  const float* bias = w.bias.data_ptr<float>();
  at::parallel_for(0, w.blocks * row_tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float out[8 * 4 * kLanes];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task / row_tiles, tile = task % row_tiles;
      const int64_t r0 = tile * h.rows / row_tiles;
      const int n = static_cast<int>((tile + 1) * h.rows / row_tiles - r0);
      const float* wb = data + blk * w.K * width;
      const float* hb = h.data + r0 * h.row_stride;
      w.panels == 3
          ? panel_tile_rows<3>(n, hb, h.row_stride, h.k_stride, wb, bias + blk * width, w.K, h.chunk, out)
          : panel_tile_rows<4>(n, hb, h.row_stride, h.k_stride, wb, bias + blk * width, w.K, h.chunk, out);
      epilogue(blk, r0, n, static_cast<const float*>(out));
    }
  });
#else
  (void)w, (void)h, (void)epilogue;
  TORCH_CHECK(false, "rnnkernels: the panel kernels need AVX-512 at build time");
#endif
}

// a^T b for row-major a (R, M) and b (R, N), float32: the whole-sequence weight gradients, summing over
// the R = T * B rows in chunks of `chunk` (see linear_once in recurrence.cpp).
inline at::Tensor panel_matmul_tn(const at::Tensor& a_in, const at::Tensor& b_in, int64_t chunk) {
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t M = a.size(1), N = b.size(1);
  const PanelWeight w = pack_panels(b.t(), std::nullopt, 1);
  at::Tensor result = at::empty({M, N}, a.options());
  float* dst = result.data_ptr<float>();
  const int64_t width = w.panels * kLanes;
  panel_product(w, PanelRows{a.data_ptr<float>(), M, 1, M, chunk}, [&](int64_t blk, int64_t r0, int rows, const float* tile) {
    const int64_t j0 = blk * w.units, n = std::min(w.units, N - j0);
    for (int r = 0; r < rows; ++r) std::memcpy(dst + (r0 + r) * N + j0, tile + r * width, sizeof(float) * n);
  });
  return result;
}

}  // namespace rnnkernels
