// The float32 CPU kernels built on the vector registers of float_lanes.h, AVX-512, AVX2 with FMA or NEON
// (csrc/cpu/recurrence.cpp decides where they run):
// - panel_product: y = h W^T (+ b) with W in panels of one register's width of output columns (kLanes: 16
//   with AVX-512, 8 with AVX2, 4 with NEON), packed once per sequence or read in place; a CPU analogue of
//   the persistent GPU kernels. Every thread keeps the panels of its own output columns in its cache
//   across the time steps, and each tile of rows x panels (in one register pass, or two with AVX2:
//   kPassPanels) goes straight to an epilogue (a cell's gate math) while in L1. Also the weight gradients (panel_matmul_tn) and products with few output
//   columns (panel_linear).
// - Dots: one step of up to four sequences (generation), each weight row read once.
//
// Assumes: float32 (pack_panels also packs bfloat16 for bfloat16_panels.h, whose products share the tasks,
// tiles and epilogues below, and widens 16-bit weights into float32 panels); AVX-512F, AVX2 and FMA, or
// 64-bit ARM at build time (the build is -march=native by default; elsewhere kPanelGemm is false and the
// callers use oneDNN/BLAS). Output columns are grouped into blocks of 2, 3 or 4 panels: for the LSTM and
// GRU a block holds all gates of kLanes hidden units (panel p = gate p), so that one tile carries whole
// cells; otherwise it holds 4 * kLanes consecutive columns (2 * kLanes where N <= 2 * kLanes). Packed
// columns beyond N are zero; in place, loads past N are masked. Nothing past N is stored.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "buffers.h"
#include "float_lanes.h"

namespace rnnkernels {

#if defined(RNNKERNELS_FLOAT_LANES)
constexpr bool kPanelGemm = true;
constexpr int64_t kLanes = FloatRegister::width;  // the width of a panel
#else
constexpr bool kPanelGemm = false;
constexpr int64_t kLanes = 16;  // unused: no panel product runs
#endif

// Inputs per running sum: a panel product sums K in chunks of kChunk and then adds the chunks' sums, as
// BLAS kernels split K. One running sum over thousands of inputs (the input gradient of ptb-medium sums
// over 2600, a weight gradient over T * B) falls short of torch.nn's accuracy.
constexpr int64_t kChunk = 256;

// The right operand of a panel product. Block `blk` is a (K, panels * kLanes) row-major matrix, row k at
// data + blk * block_stride + k * k_stride holding the weights of the block's columns against input k,
// so the tile loop streams through it once per row group. bfloat16 (bfloat16_panels.h) pairs the rows
// instead: row pair k / 2 at data + blk * block_stride + (k / 2) * k_stride holds each column's weights against inputs
// k and k + 1 side by side, the layout of AMX's right operand, with K padded to a whole tile step.
template <typename scalar_t>
struct PanelWeightOf {
  at::Tensor storage;     // what data points into: a packed copy, or the operand itself
  const scalar_t* data = nullptr;
  int64_t k_stride = 0, block_stride = 0;
  at::Tensor bias;        // (blocks, panels * kLanes) float32, zeros where there is no bias
  int64_t panels = 0;     // panels per block: 2, 3 or 4
  int64_t units = 0;      // output units per block that the epilogue sees (kLanes, or panels * kLanes)
  int64_t blocks = 0;
  int64_t outputs = 0;    // output units in all (H, or N)
  int64_t K = 0;
  int64_t columns = 0;    // columns that may be read: past them, the last block's loads are masked
};
using PanelWeight = PanelWeightOf<float>;

// Rows of the pair layout that a bfloat16 block pads K to: AMX's step of 32 inputs.
constexpr int64_t kPairStep = 32;

// Panels per block of plain columns: 4 (64 columns), or 2 where there are at most 32 columns, which
// would leave most lanes of a block of 64 idle (the input gradient of a character model: 28 columns).
inline int64_t column_panels(int64_t columns) {
  return columns <= 2 * kLanes ? 2 : 4;
}

// A row-major (K, N) matrix m as the right operand, read in place (products h m): blocks of column_panels.
inline PanelWeight panels_in_place(const at::Tensor& m) {
  PanelWeight p;
  p.storage = m.contiguous();
  p.data = p.storage.data_ptr<float>();
  p.panels = column_panels(m.size(1));
  p.units = p.panels * kLanes;
  p.K = m.size(0);
  p.columns = p.outputs = m.size(1);
  p.blocks = (p.columns + p.units - 1) / p.units;
  p.k_stride = p.columns;
  p.block_stride = p.units;
  p.bias = at::zeros({p.blocks, p.units}, m.options());
  return p;
}

// Packing runs along k in strips of this many packed rows, so that the strip being written stays in L1.
constexpr int64_t kPackStrip = 16;

// Packed rows [kr0, kr2) of a panel of `count` columns as 32-bit words: in packed row kr, column c holds
// word kr of column c's row of w (at rows + c * sn elements) for kr < kr1, and zero from kr1 on, as do
// the columns from count on. Through a tile of kLanes x kPackStrip words: copied in rows, written out in
// columns.
template <typename scalar_t>
inline void transpose_words(const scalar_t* rows, int64_t sn, int64_t kr0, int64_t kr1, int64_t kr2, int64_t count,
                            scalar_t* out, int64_t width) {
  constexpr int64_t kPair = sizeof(uint32_t) / sizeof(scalar_t);
  uint32_t tile[kLanes][kPackStrip] = {};
  const int64_t words = std::max<int64_t>(kr1 - kr0, 0);
  for (int64_t c = 0; words > 0 && c < count; ++c) {
    const scalar_t* in = rows + c * sn + kr0 * kPair;
    // A whole strip as a constant size, which the compiler copies inline rather than calling memcpy.
    if (words == kPackStrip) {
      std::memcpy(tile[c], in, sizeof(tile[c]));
    } else {
      std::memcpy(tile[c], in, sizeof(uint32_t) * words);
    }
  }
  for (int64_t kr = kr0; kr < kr2; ++kr) {
    uint32_t row[kLanes];
    for (int64_t c = 0; c < kLanes; ++c) row[c] = tile[c][kr - kr0];  // zero past kr1 and count
    std::memcpy(out + kr * kPair * width, row, sizeof(row));
  }
}

// Packs w (N, K), given by strides so that a transposed view needs no copy. gates > 1 (LSTM 4, GRU 3):
// N = gates * H and a block is the rows g * H + j of kLanes units j; gates == 1: a block is
// column_panels(N) * kLanes rows. float32 in rows, bfloat16 in row pairs (PanelWeightOf); float32 panels
// also take a bfloat16 or float16 w and b, widened exactly (16-bit recurrences on the float32 panels).
template <typename scalar_t = float>
PanelWeightOf<scalar_t> pack_panels(const at::Tensor& w_in, const std::optional<at::Tensor>& b_in, int64_t gates) {
  constexpr bool pairs = std::is_same_v<scalar_t, c10::BFloat16>;
  static_assert(pairs || std::is_same_v<scalar_t, float>, "panels hold float32 or bfloat16");
  constexpr at::ScalarType kType = c10::CppTypeToScalarType<scalar_t>::value;
  const at::ScalarType given = w_in.scalar_type();
  TORCH_CHECK((given == kType || (!pairs && (given == at::kBFloat16 || given == at::kHalf))) && w_in.dim() == 2 &&
                  (gates == 1 || gates == 3 || gates == 4),
              "rnnkernels: panel packing takes a float32, bfloat16 or float16 matrix of 1, 3 or 4 gates");
  const at::Tensor w = w_in.to(kType);
  const std::optional<at::Tensor> b = b_in.has_value() ? std::optional(b_in->to(kType)) : std::nullopt;
  PanelWeightOf<scalar_t> p;
  const int64_t N = w.size(0), K = w.size(1), H = N / gates;
  p.panels = gates > 1 ? gates : column_panels(N);
  p.units = gates > 1 ? kLanes : p.panels * kLanes;
  p.blocks = (H + p.units - 1) / p.units;
  p.outputs = H;
  p.K = K;
  const int64_t width = p.panels * kLanes, K_rows = pairs ? (K + kPairStep - 1) / kPairStep * kPairStep : K;
  p.columns = p.blocks * width;
  p.k_stride = pairs ? 2 * width : width;
  p.block_stride = K_rows * width;
  const at::Tensor storage = empty_buffer({p.blocks, K_rows, width}, w.options());
  const at::Tensor packed_bias = at::zeros({p.blocks, width}, w.options().dtype(at::kFloat));
  p.storage = storage;
  p.bias = packed_bias;
  p.data = storage.data_ptr<scalar_t>();
  const scalar_t* src = w.data_ptr<scalar_t>();
  const int64_t sn = w.stride(0), sk = w.stride(1);
  const scalar_t* bias = b.has_value() ? b->data_ptr<scalar_t>() : nullptr;
  scalar_t* dst = storage.data_ptr<scalar_t>();
  float* dst_bias = packed_bias.data_ptr<float>();
  // Where w is contiguous along k (W_hh itself, not a transposed view), a packed row's kLanes columns are
  // a transposition of 32-bit words: a float32, or a bfloat16 pair (inputs 2kr and 2kr + 1 of a column,
  // adjacent in w). Element by element, packing ptb-medium's W_hh (2600 x 650) took 0.6-1.0 ms in
  // float32 and 0.95 in bfloat16 on two Zen 4 cores; as words, 0.26 and 0.13.
  const bool words_along_k = sk == 1 && (!pairs || (sn % 2 == 0 && K % 2 == 0 &&
                                                    reinterpret_cast<std::uintptr_t>(src) % 4 == 0));
  // Panel q of block blk holds rows first .. first + count - 1 of w (gate q of units blk * kLanes.., or
  // the plain rows blk * p.units + q * kLanes..), zeros after them and, in pairs, below K.
  constexpr int64_t kPair = pairs ? 2 : 1;  // inputs a packed row holds per column
  at::parallel_for(0, p.blocks * p.panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t blk = panel / p.panels, q = panel % p.panels;
      const int64_t unit = gates > 1 ? blk * kLanes : blk * p.units + q * kLanes;
      const int64_t count = std::clamp<int64_t>(H - unit, 0, kLanes);
      const int64_t first = count > 0 ? (gates > 1 ? q * H + unit : unit) : 0;
      const scalar_t* rows = src + first * sn;
      scalar_t* out = dst + blk * K_rows * width + q * kLanes * kPair;
      for (int64_t c = 0; bias && c < count; ++c) {
        dst_bias[blk * width + q * kLanes + c] = static_cast<float>(bias[first + c]);
      }
      const auto weight = [&](int64_t k, int64_t c) { return k < K ? rows[c * sn + k * sk] : scalar_t(0); };
      // Along whichever of w's dimensions is contiguous in memory, in strips of kPackStrip packed rows.
      // Packed row kr holds inputs kr * kPair + i.
      for (int64_t kr0 = 0; kr0 < K_rows / kPair; kr0 += kPackStrip) {
        const int64_t kr1 = std::min(K_rows / kPair, kr0 + kPackStrip);
        const auto put = [&](int64_t kr, int64_t c) {
          for (int64_t i = 0; i < kPair; ++i) out[kr * kPair * width + c * kPair + i] = weight(kr * kPair + i, c);
        };
        if (words_along_k) {
          transpose_words(rows, sn, kr0, std::min(kr1, K / kPair), kr1, count, out, width);
          continue;
        }
        if (sn == 1) {  // a transposed view: the columns of an input are contiguous in w
          for (int64_t kr = kr0; kr < kr1; ++kr) {
            if ((kr + 1) * kPair > K) {
              for (int64_t c = 0; c < count; ++c) put(kr, c);
              continue;
            }
            scalar_t* o = out + kr * kPair * width;
            const scalar_t* in = rows + kr * kPair * sk;
            for (int64_t c = 0; c < count; ++c)
              for (int64_t i = 0; i < kPair; ++i) o[c * kPair + i] = in[c + i * sk];
          }
        } else {
          for (int64_t c = 0; c < count; ++c)
            for (int64_t kr = kr0; kr < kr1; ++kr) put(kr, c);
        }
        for (int64_t kr = kr0; kr < kr1; ++kr) {
          std::fill_n(out + kr * kPair * width + count * kPair, (kLanes - count) * kPair, scalar_t(0));
        }
      }
    }
  });
  return p;
}

// The rows of weights a tile prefetches into L2 while it runs: the same panels of the chunk its block reads
// next (or of the next block), so that they are there when the next pass over them begins. Without it,
// each pass's first tile waits on its chunk's weights: once W_hh outgrows the threads' L2 (an LSTM's above
// hidden 256 in float32 on two Zen 3 cores of 512 KB) the sweep of ptb-medium's LSTM (hidden 650, batch
// 20) ran at 18 GFLOP/s a Zen 3 core against oneDNN's 25, most likely because the hardware prefetchers do
// not follow the stride of a pass (every other cache line with AVX2); the VM measured on has no cache
// counters to confirm it, only the timings with and without this. rows == 0: nothing to prefetch.
struct NextRows {
  const float* data = nullptr;
  int64_t rows = 0;
};
constexpr int64_t kLineFloats = 64 / sizeof(float);

#if defined(RNNKERNELS_FLOAT_LANES)
// out (rows, kPanels * kLanes), its rows out_width floats apart, = bias + h[rows] W^T over inputs [k0, k1)
// for the kPanels panels at w, or out += that sum without the bias where `accumulate`;
// h[r][k] = h[r * row_stride + k * k_stride]. kMasked: the block's columns
// end within it, so its loads are masked (a masked load costs extra instructions with AVX2). This and
// panel_tile_rows are always inlined: emitted out of line (as GCC 12 chose for a caller of its own), the
// tile kept its accumulators in memory, at a third of the speed.
template <int kRows, int kPanels, bool kMasked>
[[gnu::always_inline]] inline void panel_tile(const float* __restrict__ h, int64_t row_stride, int64_t k_stride,
                                              const float* __restrict__ w, int64_t w_stride,
                                              const FloatRegister::mask* masks, const float* __restrict__ bias,
                                              int64_t k0, int64_t k1, bool accumulate, float* __restrict__ out,
                                              int64_t out_width, const NextRows& next) {
  using R = FloatRegister;
  R::type acc[kRows][kPanels];
  for (int p = 0; p < kPanels; ++p) {
    const R::type b = accumulate ? R::broadcast(0.f) : R::load(bias + p * kLanes);
    for (int r = 0; r < kRows; ++r) acc[r][p] = b;
  }
  for (int64_t k = k0; k < k1; ++k) {
    for (int64_t n = k - k0; n < next.rows; n += k1 - k0) {
      for (int64_t f = 0; f < kPanels * kLanes; f += kLineFloats) __builtin_prefetch(next.data + n * w_stride + f, 0, 2);
    }
    R::type wk[kPanels];
    for (int p = 0; p < kPanels; ++p) {
      const float* wp = w + k * w_stride + p * kLanes;
      wk[p] = kMasked ? R::load_masked(wp, masks[p]) : R::load(wp);
    }
    for (int r = 0; r < kRows; ++r) {
      const R::type x = R::broadcast(h[r * row_stride + k * k_stride]);
      for (int p = 0; p < kPanels; ++p) acc[r][p] = R::fmadd(wk[p], x, acc[r][p]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int p = 0; p < kPanels; ++p) {
      float* o = out + r * out_width + p * kLanes;
      R::store(o, accumulate ? R::add(R::load(o), acc[r][p]) : acc[r][p]);
    }
  }
}

// Panels whose sums a tile of a block of kPanels keeps in registers at once: the tile runs over K once per
// group of them, writing its columns of the block's result. AVX2 (16 registers): 2, so that 12 sums (6
// rows), the 2 panels' weights and a row's input fit and each weight loads once per input. 3 or 4 panels
// at once left room for 12 sums only with the weights taken as FMA memory operands, loaded again for
// every row: 15-16 loads for 12 FMAs, past the two 256-bit loads a cycle of Zen 3 (and of Intel's cores
// before Golden Cove). Measured on one Zen 3 core, 32 rows x 16 blocks of K = 256: 4 panels 53 GFLOP/s as
// tiles of 3 x 4, 88 as two passes of 6 x 2; 3 panels 50 as 4 x 3, 81 as 6 x 2 then 6 x 1. AVX-512 and
// NEON (32 registers) take the whole block at once.
template <int kPanels>
constexpr int kPassPanels = FloatRegister::registers == 16 ? std::min(kPanels, 2) : kPanels;

// Rows per tile: enough accumulators to cover the FMA latency (24 at most), within the vector registers
// less four. AVX-512: 12, 8 and 6 rows of 2, 3 and 4 panels; AVX2: 6 rows of 2 panels a pass. NEON's FMAs
// take no operand from memory, and GCC loads every row's input of a step before its FMAs, so a row costs
// panels + 1 registers and the weights one a panel: 10, 7 and 5 rows (20-21 accumulators; 12 rows of 2
// panels spilled accumulators to the stack in the inner loop).
template <int kPanels>
constexpr int kTileRows = FloatRegister::memory_operands
                              ? std::min(24 / kPassPanels<kPanels>, (FloatRegister::registers - 4) / kPassPanels<kPanels>)
                              : (FloatRegister::registers - kPanels) / (kPanels + 1);

template <int kPanels, bool kMasked, int kRows = kTileRows<kPanels>>
[[gnu::always_inline]] inline void panel_tile_rows(int rows, const float* h, int64_t row_stride, int64_t k_stride,
                                                   const float* w, int64_t w_stride, const FloatRegister::mask* masks,
                                                   const float* bias, int64_t k0, int64_t k1, bool accumulate,
                                                   float* out, int64_t out_width, const NextRows& next) {
  if constexpr (kRows > 0) {
    if (rows == kRows) {
      return panel_tile<kRows, kPanels, kMasked>(h, row_stride, k_stride, w, w_stride, masks, bias, k0, k1,
                                                 accumulate, out, out_width, next);
    }
    return panel_tile_rows<kPanels, kMasked, kRows - 1>(rows, h, row_stride, k_stride, w, w_stride, masks, bias,
                                                        k0, k1, accumulate, out, out_width, next);
  }
}
#endif

// The left operand of a panel product: element (r, k) at data[r * row_stride + k * k_stride].
template <typename scalar_t>
struct PanelRowsOf {
  const scalar_t* data;
  int64_t rows, row_stride, k_stride;
};
using PanelRows = PanelRowsOf<float>;

// A finished tile of a panel product: rows [r0, r0 + rows) of h against output units [j0, j0 + n), row r
// at row(r): the unit's gates kLanes apart in a block of gates, else the n units in a row.
struct PanelTile {
  int64_t j0, n, r0;
  int rows;
  const float* data;
  int64_t width;
  const float* row(int r) const { return data + r * width; }
};

// Calls fn(n) with n a compile-time constant where it is a whole block of kUnits, so that what is inlined
// into fn (the epilogues' copies and sums, and a row kernel where the compiler inlines it) sees whole
// vectors with no remainder.
template <int64_t kUnits, typename F>
inline void with_units(int64_t n, const F& fn) {
  if (n == kUnits) {
    fn(std::integral_constant<int64_t, kUnits>());
  } else {
    fn(n);
  }
}

// Stores the tile into rows of a row-major result with `ld` columns.
inline void store_tile(const PanelTile& tile, float* dst, int64_t ld) {
  for (int r = 0; r < tile.rows; ++r) {
    std::memcpy(dst + (tile.r0 + r) * ld + tile.j0, tile.row(r), sizeof(float) * tile.n);
  }
}

// How a product's row tiles split into groups, a task being one block against one group: groups of at
// most `most` tiles, and more of them where blocks alone are fewer than threads (a product with one
// block, at most 32 or 64 columns, would otherwise run on one thread), their sizes as even as can be.
struct RowGroups {
  int64_t groups, tiles;  // groups, and tiles per group (the last one may have fewer)
};
inline RowGroups row_groups(int64_t row_tiles, int64_t blocks, int64_t most) {
  if (row_tiles == 0) return {0, 1};  // an empty batch
  const int64_t shares = std::min(row_tiles, (at::get_num_threads() + blocks - 1) / blocks);
  const int64_t wanted = std::max((row_tiles + most - 1) / most, shares);
  const int64_t tiles = (row_tiles + wanted - 1) / wanted;
  return {(row_tiles + tiles - 1) / tiles, tiles};  // no group left empty
}

#if defined(RNNKERNELS_FLOAT_LANES)
// Row tiles per task of panel_product where its caller does not ask for all of them, and the floats of
// the largest tile. At namespace scope: as the function's own constants, used inside its lambda, they
// made GCC 12.2 stop with an internal compiler error.
constexpr int64_t kTilesPerTask = 8;
constexpr int64_t kTileFloats = std::max({kTileRows<2> * 2, kTileRows<3> * 3, kTileRows<4> * 4}) * kLanes;
#endif

// For every tile of (rows of h) x (block of W), epilogue(PanelTile) finishes the tile's result. A task is a
// block and a group of row tiles (row_groups): up to kTilesPerTask, or all of them where `all_row_tiles`
// (a block is then read from memory once, not once per group: the weight gradients, over T * B rows). It
// runs chunk by chunk of K, so that the chunk of the block stays in cache across its tiles; a block read
// in place whose rows lie further apart than its own width (the weight gradients' operand of 1024
// columns: 4 KB, a page each and the same few L1 sets) is first copied, chunk by chunk, into a buffer of
// the task's, where at least kCopyFromTiles row tiles share the copy. In a recurrence one call is one
// time step: the threads split the blocks, each thread always the same ones, so that its panels stay in
// its cache from step to step.
template <typename Epilogue>
void panel_product(const PanelWeight& w, const PanelRows& h, const Epilogue& epilogue, bool all_row_tiles = false) {
#if defined(RNNKERNELS_FLOAT_LANES)
  // As many tiles as the register budget needs, their rows spread evenly (AVX-512, 32 rows: 6 tiles of 5
  // or 6, not five of 6 and one of 2, which runs at a third of the speed).
  const int64_t max_rows = w.panels == 2 ? kTileRows<2> : w.panels == 3 ? kTileRows<3> : kTileRows<4>;
  const int64_t width = w.panels * kLanes;
  const int64_t row_tiles = (h.rows + max_rows - 1) / max_rows;
  const RowGroups grouping = row_groups(row_tiles, w.blocks, all_row_tiles ? row_tiles : kTilesPerTask);
  constexpr int64_t kCopyFromTiles = 8;
  const bool copy = w.k_stride > width && grouping.tiles >= kCopyFromTiles;
  const float* bias = w.bias.data_ptr<float>();
  at::parallel_for(0, w.blocks * grouping.groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float tiles_here[kTilesPerTask * kTileFloats];
    std::vector<float> tiles_on_heap(grouping.tiles > kTilesPerTask ? grouping.tiles * kTileFloats : 0);
    float* const out = tiles_on_heap.empty() ? tiles_here : tiles_on_heap.data();
    std::vector<float> chunk(copy ? kChunk * width : 0);
    FloatRegister::mask masks[4];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task / grouping.groups, first = (task % grouping.groups) * grouping.tiles;
      const int64_t last = std::min(row_tiles, first + grouping.tiles);
      const int64_t columns = std::clamp<int64_t>(w.columns - blk * width, 0, width);  // readable in the block
      for (int64_t p = 0; p < w.panels; ++p) masks[p] = FloatRegister::first(columns - p * kLanes);
      // The loads of a block that ends within its width are masked, unless the chunk copy pads it with zeros.
      const bool masked = columns < width && !copy;
      const float* wb = w.data + blk * w.block_stride;
      const float* bb = bias + blk * width;
      const auto first_row = [&](int64_t tile) { return tile * h.rows / row_tiles; };
      for (int64_t k0 = 0; k0 < w.K; k0 += kChunk) {
        const int64_t k1 = std::min(w.K, k0 + kChunk);
        for (int64_t k = k0; copy && k < k1; ++k) {
          float* row = chunk.data() + (k - k0) * width;
          std::memcpy(row, wb + k * w.k_stride, sizeof(float) * columns);
          std::fill(row + columns, row + width, 0.f);
        }
        const float* wk = copy ? chunk.data() : wb + k0 * w.k_stride;
        // What this thread reads after the chunk: the block's next chunk, else the next task's block where
        // that is another one. A copied chunk comes through memcpy, which the hardware prefetches well.
        NextRows next;
        const int64_t next_blk = (task + 1) / grouping.groups;
        if (!copy && k1 < w.K) {
          next = {wb + k1 * w.k_stride, std::min(w.K, k1 + kChunk) - k1};
        } else if (!copy && task + 1 < end && next_blk != blk) {
          next = {w.data + next_blk * w.block_stride, std::min(w.K, kChunk)};
        }
        // The chunk's tiles, the number of panels and the masking constants: chosen per tile, the panels
        // cost the weight gradients 4% (GCC 12).
        // One pass over the tiles per group of kPassPanels panels, so that the group's chunk stays in L1.
        const auto chunk_tiles = [&](auto panels, auto with_masks) {
          constexpr int kPanels = decltype(panels)::value, kPass = kPassPanels<kPanels>;
          static_assert(kPanels <= 2 * kPass, "a block takes at most two passes");
          const auto pass = [&](auto pass_panels, int p0) {
            for (int64_t tile = first; tile < last; ++tile) {
              const int64_t r0 = first_row(tile);
              const float* hk = h.data + r0 * h.row_stride + k0 * h.k_stride;
              panel_tile_rows<decltype(pass_panels)::value, decltype(with_masks)::value, kTileRows<kPanels>>(
                  static_cast<int>(first_row(tile + 1) - r0), hk, h.row_stride, h.k_stride, wk + p0 * kLanes,
                  copy ? width : w.k_stride, masks + p0, bb + p0 * kLanes, 0, k1 - k0, k0 > 0,
                  out + (tile - first) * kTileFloats + p0 * kLanes, width,
                  tile == first && next.rows > 0 ? NextRows{next.data + p0 * kLanes, next.rows} : NextRows{});
            }
          };
          pass(std::integral_constant<int, kPass>(), 0);
          if constexpr (kPanels > kPass) pass(std::integral_constant<int, kPanels - kPass>(), kPass);
        };
        const auto with_panels = [&](auto panels) {
          masked ? chunk_tiles(panels, std::true_type()) : chunk_tiles(panels, std::false_type());
        };
        if (w.panels == 2) {
          with_panels(std::integral_constant<int, 2>());
        } else if (w.panels == 3) {
          with_panels(std::integral_constant<int, 3>());
        } else {
          with_panels(std::integral_constant<int, 4>());
        }
      }
      const int64_t j0 = blk * w.units, n = std::min(w.units, w.outputs - j0);
      for (int64_t tile = first; tile < last; ++tile) {
        const int64_t r0 = first_row(tile);
        epilogue(PanelTile{j0, n, r0, static_cast<int>(first_row(tile + 1) - r0), out + (tile - first) * kTileFloats,
                           width});
      }
    }
  });
#else
  (void)w, (void)h, (void)epilogue;
  TORCH_CHECK(false, "rnnkernels: the panel kernels need AVX-512, AVX2 with FMA or NEON at build time");
#endif
}

// m^T, row-major, of a float32 matrix m, in blocks of 32 x 32 split over the threads: Tensor::contiguous()
// of the transposed view runs 2-2.5x slower (16,000 x 256: 3.0 against 1.2 ms).
inline at::Tensor transposed(const at::Tensor& m_in) {
  const at::Tensor m = m_in.contiguous();
  const int64_t R = m.size(0), C = m.size(1);
  at::Tensor out = empty_buffer({C, R}, m.options());
  const float* src = m.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  constexpr int64_t kBlock = 32;
  at::parallel_for(0, (R + kBlock - 1) / kBlock, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin * kBlock; r0 < std::min(R, end * kBlock); r0 += kBlock) {
      const int64_t r1 = std::min(R, r0 + kBlock);
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        for (int64_t c = c0; c < std::min(C, c0 + kBlock); ++c) {
          for (int64_t r = r0; r < r1; ++r) dst[c * R + r] = src[r * C + c];
        }
      }
    }
  });
  return out;
}

// a^T b for row-major a (R, M) and b (R, N), float32: the whole-sequence weight gradients, summing over
// the R = T * B rows. The tiles read their rows along K, so the operand with fewer columns is transposed
// into that role; the other is read in place, each block once for all row tiles.
inline at::Tensor panel_matmul_tn(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.size(0) > 0, "rnnkernels: panel_matmul_tn sums over at least one row");
  const bool swap = b.size(1) < a.size(1);  // then the tiles compute b^T a, the transpose of the result
  const at::Tensor rows = transposed(swap ? b : a);
  const PanelWeight w = panels_in_place(swap ? a : b);
  const int64_t M = rows.size(0), N = w.outputs, R = rows.size(1);
  at::Tensor result = at::empty({a.size(1), b.size(1)}, a.options());
  float* dst = result.data_ptr<float>();
  panel_product(
      w, PanelRows{rows.data_ptr<float>(), M, R, 1},
      [&](const PanelTile& tile) {
        if (!swap) return store_tile(tile, dst, N);
        // Transposed: the tile's rows r0.. are consecutive in each row j0 + j of the result.
        for (int64_t j = 0; j < tile.n; ++j) {
          float* out = dst + (tile.j0 + j) * M + tile.r0;
          for (int r = 0; r < tile.rows; ++r) out[r] = tile.row(r)[j];
        }
      },
      /*all_row_tiles=*/true);
  return result;
}

// x w^T (+ b) for row-major x (M, K) and w (N, K) given by any strides, float32.
inline at::Tensor panel_linear(const at::Tensor& x_in, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  const at::Tensor x = x_in.contiguous();
  // Packed, even where w is a transposed view (the input gradient's W_ih^T), which is already the right
  // operand's layout: read in place, each task would copy its block's chunks again for every group of row
  // tiles. On two Zen 4 cores, in place against packed, in turn three times: ptb-medium's input gradient
  // (700 x 2600 against 650 columns) 15.4-15.9 against 14.2-14.3 ms, ptb-large's (1500 columns) 35-37
  // against 29-32, a character model's (1120 x 1024 against 28) 0.52-0.55 against 0.54-0.56. With AVX2,
  // whose masked loads cost extra, a partial last block was packed already: 1792 x 512 against 28 columns,
  // 545 us in place, 285 packed (Zen 3).
  const int64_t N = w.size(0);
  const PanelWeight pw = pack_panels(w, b, 1);
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = empty_buffer({M, N}, x.options());
  float* dst = y.data_ptr<float>();
  panel_product(pw, PanelRows{x.data_ptr<float>(), M, K, 1}, [&](const PanelTile& tile) { store_tile(tile, dst, N); });
  return y;
}

// Dot products of weight rows with up to kDotRows vectors: a step of generation reads each weight once
// this way, with no packing to repay (panel_product packs per call).
constexpr int kDotRows = 4;

// out[q][r] = sum_k w[q * ldw + k] v[r * ldv + k] for the `count` <= kDotRows rows q of w and kVectors
// vectors r, all of one type, summed in float32: bfloat16 and float16 widened to float32 registers as they
// load (Lanes, float_lanes.h), which halves the weights' stream against float32's; bfloat16 on its own dot
// products where the CPU has them (bfloat16_panels.h). Several rows at a time (all four, but for AVX2's 16
// registers with 4 vectors: two) so that the sums advance in independent chains.
template <typename scalar_t>
struct Dots {
  template <int kVectors>
  static void run(const scalar_t* w, int64_t ldw, int count, const scalar_t* v, int64_t ldv, int64_t K,
                  float (*out)[kDotRows]) {
#if defined(RNNKERNELS_FLOAT_LANES)
    using R = FloatRegister;
    using L = Lanes<scalar_t>;
    static_assert(L::width == kLanes, "a row's loads fill whole float32 registers");
    constexpr int kRowsAtOnce = std::min(kDotRows, (R::registers - kVectors - 1) / kVectors);
    // 1 KiB ahead on each row: the hardware prefetcher alone leaves a step at hidden 1024, which streams
    // 32 MB of float32 weights, at half the memory bandwidth.
    constexpr int64_t kAhead = 1024 / sizeof(scalar_t);
    for (int q0 = 0; q0 < count; q0 += kRowsAtOnce) {
      const scalar_t* rows[kRowsAtOnce];
      for (int q = 0; q < kRowsAtOnce; ++q) rows[q] = w + std::min(q0 + q, count - 1) * ldw;  // past count: unused
      R::type acc[kRowsAtOnce][kVectors];
      for (int q = 0; q < kRowsAtOnce; ++q)
        for (int r = 0; r < kVectors; ++r) acc[q][r] = R::broadcast(0.f);
      for (int64_t k = 0; k < K; k += kLanes) {
        R::type vk[kVectors];
        for (int r = 0; r < kVectors; ++r) vk[r] = L::load(v + r * ldv + k, K - k).v;
        for (int q = 0; q < kRowsAtOnce; ++q) {
          __builtin_prefetch(rows[q] + k + kAhead, 0, 3);
          const R::type wk = L::load(rows[q] + k, K - k).v;
          for (int r = 0; r < kVectors; ++r) acc[q][r] = R::fmadd(wk, vk[r], acc[q][r]);
        }
      }
      for (int q = 0; q < std::min(kRowsAtOnce, count - q0); ++q)
        for (int r = 0; r < kVectors; ++r) out[q0 + q][r] = R::sum(acc[q][r]);
    }
#else
    (void)w, (void)ldw, (void)count, (void)v, (void)ldv, (void)K, (void)out;
    TORCH_CHECK(false, "rnnkernels: the dot products need AVX-512, AVX2 with FMA or NEON at build time");
#endif
  }
};

template <typename scalar_t>
inline void dots_of(int vectors, const scalar_t* w, int64_t ldw, int count, const scalar_t* v, int64_t ldv,
                    int64_t K, float (*out)[kDotRows]) {
  switch (vectors) {
    case 0: return;
    case 1: return Dots<scalar_t>::template run<1>(w, ldw, count, v, ldv, K, out);
    case 2: return Dots<scalar_t>::template run<2>(w, ldw, count, v, ldv, K, out);
    case 3: return Dots<scalar_t>::template run<3>(w, ldw, count, v, ldv, K, out);
    default: return Dots<scalar_t>::template run<4>(w, ldw, count, v, ldv, K, out);
  }
}

}  // namespace rnnkernels
