// X-volution's pixel shift self-attention on the CPU: the products of a map
// with its copies shifted over the 3x3 taps, weighted by a dense matrix,
//
//   out[n, o, i, j] (+)= sum_{c, t} weight[o, 9 c + t] * x[n, c, s i, s j]
//                        * x[n, c, s i + L dy_t, s j + L dx_t]
//
// for the taps (dy_t, dx_t) in {-1, 0, 1}^2 (row-major), zero outside the
// map.  This is both the PSSA branch and, added onto a convolution's
// output, the deployed X-volution's dynamic kernel.
//
// The output is cut into tiles of whole rows and the channels into blocks.
// The products of one tile and block go into a buffer of the thread's own,
// small enough to stay in its core's cache, and are weighted there by a
// single-threaded GEMM: the 9 C-fold map never travels to memory and back.
// The backward recomputes each tile's products, for the weight's gradient
// and to scatter the products' gradient into the input's; tiles that could
// write the same input rows never run at the same time.  Nothing is padded
// and the scratch buffers live as long as their thread: on machines where
// fresh memory is slow to fault in, a map-sized copy per call would cost as
// much as the arithmetic.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "common.h"

namespace mmacmix {
namespace {

constexpr int64_t kTaps = 9;

// Sizes of the map and its output, the tiling, and for each tap the output
// columns [lo, hi) whose shifted pixel is inside the map.  Each image's
// output rows are cut into `tiles` tiles of about `positions` pixels, of
// max_rows or max_rows - 1 rows (tile k: rows [k ho / tiles, (k + 1) ho /
// tiles)), and the output channels into `parts` parts, as many units (tile,
// part) in all as a multiple of the threads where the map allows.  The
// input channels are cut into blocks whose products take about
// `block_bytes` (for tiles of up to `positions` pixels: larger ones keep as
// many channels, so that the GEMMs' inner dimension does not shrink).
//
// Given `out_channels` (the forward), maps too small to give every thread a
// tile are split in two parts: each tile's GEMMs read the whole weight, so
// two threads sharing a tile's products, each forming them, beat two
// half-sized tiles.
struct ShiftGeometry {
  int64_t n, c, h, w, ho, wo, s, dist, parts, tiles, min_rows, max_rows,
      channels, blocks;
  std::array<int64_t, 3> lo, hi;

  ShiftGeometry(const at::Tensor& x, int64_t distance, int64_t stride,
                int64_t positions, int64_t block_bytes,
                int64_t out_channels = 0) {
    n = x.size(0);
    c = x.size(1);
    h = x.size(2);
    w = x.size(3);
    ho = (h + stride - 1) / stride;
    wo = (w + stride - 1) / stride;
    s = stride;
    dist = distance;
    const int64_t threads = std::max(at::get_num_threads(), 1);
    parts = threads > 1 && n * ho * wo < threads * positions &&
                    out_channels >= 32
                ? 2
                : 1;
    tiles = std::max<int64_t>(1, ho * wo / positions);
    // Every thread gets the same number of units (a thread with one more
    // would finish last by a whole unit).
    while (tiles < ho && (n * tiles * parts) % threads != 0) ++tiles;
    tiles = std::clamp<int64_t>(tiles, 1, std::max<int64_t>(ho, 1));
    min_rows = ho / tiles;
    max_rows = (ho + tiles - 1) / tiles;
    const int64_t per_channel =
        kTaps * std::min(max_rows * wo, positions) * x.element_size();
    channels = std::clamp<int64_t>(block_bytes / per_channel, 1,
                                   std::max<int64_t>(c, 1));
    blocks = (c + channels - 1) / channels;
    for (int64_t dx = -1; dx <= 1; ++dx) {
      // Columns j with 0 <= j s + dx L < w.
      const int64_t offset = dx * dist;
      const int64_t first = offset < 0 ? (-offset + s - 1) / s : 0;
      const int64_t last = w - 1 - offset < 0 ? -1 : (w - 1 - offset) / s;
      lo[dx + 1] = std::min(first, wo);
      hi[dx + 1] = std::clamp<int64_t>(last + 1, lo[dx + 1], wo);
    }
  }

  int64_t block_size() const { return kTaps * channels * max_rows * wo; }
};

// A tile: output rows [r0, r1) of image b, channels [c0, c1).  Its
// products form a (9 (c1 - c0), len) matrix, row 9 c + t for channel
// c0 + c and tap t: the order of the weight's columns.
struct Tile {
  int64_t b, r0, r1, c0, c1;

  int64_t len(const ShiftGeometry& g) const { return (r1 - r0) * g.wo; }
  int64_t products() const { return kTaps * (c1 - c0); }
};

// The pixels of one plane that the products of output row i and tap t
// multiply: row `centre`, and row `shifted` (nullptr outside the map) read
// `offset` columns away, for the output columns [lo, hi).
template <typename T>
struct TapRows {
  T* centre;
  T* shifted;
  int64_t offset, lo, hi;

  TapRows(T* plane, const ShiftGeometry& g, int64_t i, int64_t t) {
    const int64_t dy = t / 3 - 1, dx = t % 3 - 1;
    const int64_t y = i * g.s + dy * g.dist;
    centre = plane + i * g.s * g.w;
    shifted = y >= 0 && y < g.h ? plane + y * g.w : nullptr;
    offset = dx * g.dist;
    lo = g.lo[dx + 1];
    hi = shifted ? g.hi[dx + 1] : lo;
  }
};

// dst[j] = a[j s] * b[j s] for j in [lo, hi), 0 elsewhere in [0, len).
template <typename T>
MMACMIX_INLINE void row_products(T* MMACMIX_RESTRICT dst, const T* a,
                                 const T* b, int64_t lo, int64_t hi,
                                 int64_t len, int64_t s) {
  std::fill(dst, dst + lo, T(0));
  if (s == 1) {
    for (int64_t j = lo; j < hi; ++j) dst[j] = a[j] * b[j];
  } else {
    for (int64_t j = lo; j < hi; ++j) dst[j] = a[j * s] * b[j * s];
  }
  std::fill(dst + hi, dst + len, T(0));
}

// y[j s] += a[j] * b[j s] for j in [lo, hi).
template <typename T>
MMACMIX_INLINE void row_add_products(T* MMACMIX_RESTRICT y,
                                     const T* MMACMIX_RESTRICT a,
                                     const T* MMACMIX_RESTRICT b, int64_t lo,
                                     int64_t hi, int64_t s) {
  if (s == 1) {
    for (int64_t j = lo; j < hi; ++j) y[j] += a[j] * b[j];
  } else {
    for (int64_t j = lo; j < hi; ++j) y[j * s] += a[j] * b[j * s];
  }
}

// Tap t over a tile's output rows [r0, r1) at stride 1, in flat indices of
// the plane: output pixel k pairs with pixel k + offset.  Rows [first,
// last) have their shifted row inside the map; within them the pixels
// [begin, end) read inside the plane (the ones cut off are edge columns).
// In each of those rows the tap looks past the map at `count` columns from
// column `edge`.
struct FlatTap {
  int64_t offset, first, last, begin, end, edge, count;

  FlatTap(const ShiftGeometry& g, int64_t r0, int64_t r1, int64_t t) {
    const int64_t dy = t / 3 - 1, dx = t % 3 - 1, w = g.w;
    offset = (dy * w + dx) * g.dist;
    first = std::clamp<int64_t>(-dy * g.dist, r0, r1);
    last = std::clamp<int64_t>(g.h - dy * g.dist, first, r1);
    begin = std::clamp(-offset, first * w, last * w);
    end = std::clamp(g.h * w - offset, begin, last * w);
    count = dx == 0 ? 0 : std::min(g.dist, w);
    edge = dx < 0 ? 0 : w - count;
  }

  // Zeroes the edge columns of rows [first, last) of a map indexed like
  // the plane (a single store per row where it is one column: a call per
  // row would cost as much as the products).
  template <typename T>
  MMACMIX_INLINE void zero_edges(T* map, int64_t w) const {
    T* row = map + first * w + edge;
    if (count == 1) {
      for (int64_t i = first; i < last; ++i, row += w) *row = T(0);
    } else if (count > 1) {
      for (int64_t i = first; i < last; ++i, row += w) {
        std::fill(row, row + count, T(0));
      }
    }
  }
};

// The products of one channel's plane and tap over the tile's rows [r0,
// r1) at stride 1: one long loop over the rows whose neighbours are in the
// map, then zeros where they are not.
template <typename T>
MMACMIX_INLINE void plane_products(T* dst, const T* plane,
                                   const ShiftGeometry& g, int64_t r0,
                                   int64_t r1, int64_t t) {
  const FlatTap tap(g, r0, r1, t);
  const int64_t start = r0 * g.w;
  row_products(dst, plane + start, plane + start + tap.offset,
               tap.begin - start, tap.end - start, (r1 - r0) * g.w, 1);
  tap.zero_edges(dst - start, g.w);
}

// The backward of plane_products: adds the products' gradient (`grads`,
// zeroed here where a product reads outside the map) to both pixels of
// each product.
template <typename T>
MMACMIX_INLINE void plane_scatter(T* grad_plane, const T* plane, T* grads,
                                  const ShiftGeometry& g, int64_t r0,
                                  int64_t r1, int64_t t) {
  const FlatTap tap(g, r0, r1, t);
  T* grad = grads - r0 * g.w;
  tap.zero_edges(grad, g.w);
  row_add_products(grad_plane, grad, plane + tap.offset, tap.begin, tap.end,
                   1);
  row_add_products(grad_plane + tap.offset, grad, plane, tap.begin, tap.end,
                   1);
}

template <typename T>
MMACMIX_INLINE void tile_products(T* buffer, const T* x,
                                  const ShiftGeometry& g, const Tile& tile) {
  const int64_t len = tile.len(g);
  for (int64_t c = tile.c0; c < tile.c1; ++c) {
    const T* plane = x + (tile.b * g.c + c) * g.h * g.w;
    for (int64_t t = 0; t < kTaps; ++t) {
      T* dst = buffer + ((c - tile.c0) * kTaps + t) * len;
      if (g.s == 1) {
        plane_products(dst, plane, g, tile.r0, tile.r1, t);
        continue;
      }
      for (int64_t i = tile.r0; i < tile.r1; ++i, dst += g.wo) {
        const TapRows<const T> rows(plane, g, i, t);
        if (rows.shifted) {
          row_products(dst, rows.centre, rows.shifted + rows.offset, rows.lo,
                       rows.hi, g.wo, g.s);
        } else {
          std::fill(dst, dst + g.wo, T(0));
        }
      }
    }
  }
}

// Adds the gradient of the tile's products (`grads`, laid out like them)
// to the input's: product t at p is centre(p) * shifted_t(p), so its
// gradient goes to both pixels (`grads` is overwritten with zeros where a
// product reads outside the map).
template <typename T>
MMACMIX_INLINE void tile_scatter(T* grad_x, const T* x, T* grads,
                                 const ShiftGeometry& g, const Tile& tile) {
  const int64_t len = tile.len(g);
  for (int64_t c = tile.c0; c < tile.c1; ++c) {
    const int64_t plane = (tile.b * g.c + c) * g.h * g.w;
    for (int64_t t = 0; t < kTaps; ++t) {
      T* grad_row = grads + ((c - tile.c0) * kTaps + t) * len;
      if (g.s == 1) {
        plane_scatter(grad_x + plane, x + plane, grad_row, g, tile.r0,
                      tile.r1, t);
        continue;
      }
      for (int64_t i = tile.r0; i < tile.r1; ++i, grad_row += g.wo) {
        const TapRows<const T> rows(x + plane, g, i, t);
        if (!rows.shifted) continue;
        const TapRows<T> grad_rows(grad_x + plane, g, i, t);
        row_add_products(grad_rows.centre, grad_row,
                         rows.shifted + rows.offset, rows.lo, rows.hi, g.s);
        row_add_products(grad_rows.shifted + rows.offset, grad_row,
                         rows.centre, rows.lo, rows.hi, g.s);
      }
    }
  }
}

// The loops compiled once per instruction set (see MMACMIX_CLONES).
#define MMACMIX_SHIFT_LOOPS(T, SUFFIX)                                        \
  MMACMIX_CLONES void tile_products_##SUFFIX(T* buffer, const T* x,           \
                                             const ShiftGeometry& g,          \
                                             const Tile& tile) {              \
    tile_products<T>(buffer, x, g, tile);                                     \
  }                                                                           \
  MMACMIX_CLONES void tile_scatter_##SUFFIX(T* grad_x, const T* x,            \
                                            T* grads,                         \
                                            const ShiftGeometry& g,           \
                                            const Tile& tile) {               \
    tile_scatter<T>(grad_x, x, grads, g, tile);                               \
  }                                                                           \
  void tile_products_any(T* buffer, const T* x, const ShiftGeometry& g,       \
                         const Tile& tile) {                                  \
    tile_products_##SUFFIX(buffer, x, g, tile);                               \
  }                                                                           \
  void tile_scatter_any(T* grad_x, const T* x, T* grads,                      \
                        const ShiftGeometry& g, const Tile& tile) {           \
    tile_scatter_##SUFFIX(grad_x, x, grads, g, tile);                         \
  }

MMACMIX_SHIFT_LOOPS(float, f32)
MMACMIX_SHIFT_LOOPS(double, f64)
#undef MMACMIX_SHIFT_LOOPS

// A buffer of the calling thread's, kept between calls (slot 0: products,
// 1: their gradient, 2: a partial weight gradient).
at::Tensor scratch(int slot, int64_t count, const at::TensorOptions& options) {
  thread_local std::array<std::vector<char>, 3> buffers;
  std::vector<char>& buffer = buffers[slot];
  const size_t bytes = count * options.dtype().itemsize();
  if (buffer.size() < bytes) buffer.resize(bytes);
  return at::from_blob(buffer.data(), {count}, options);
}

void check_shift_inputs(const at::Tensor& x, const at::Tensor& weight,
                        int64_t distance, int64_t stride,
                        int64_t tile_positions, int64_t block_bytes) {
  TORCH_CHECK(tile_positions >= 1 && block_bytes >= 1,
              "pixel_shift: tile sizes must be positive");
  TORCH_CHECK(distance >= 1, "pixel_shift: distance must be >= 1, got ",
              distance);
  TORCH_CHECK(stride >= 1, "pixel_shift: stride must be >= 1, got ", stride);
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "pixel_shift: CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(),
              "pixel_shift: x must be a contiguous (N, C, H, W) tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() &&
                  weight.size(1) == kTaps * x.size(1),
              "pixel_shift: weight must be a contiguous (C_out, 9 C) matrix");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(),
              "pixel_shift: x and weight must share a dtype");
}

void check_output_shape(const at::Tensor& map, const char* name,
                        const at::Tensor& x, const at::Tensor& weight,
                        const ShiftGeometry& g) {
  TORCH_CHECK(map.is_contiguous() && map.scalar_type() == x.scalar_type() &&
                  map.dim() == 4 && map.size(0) == g.n &&
                  map.size(1) == weight.size(0) && map.size(2) == g.ho &&
                  map.size(3) == g.wo,
              "pixel_shift: ", name,
              " must be a contiguous (N, C_out, ceil(H / stride), "
              "ceil(W / stride)) tensor of x's dtype");
}

// The (C_out, len) block of image b's output (or its gradient) at the
// tile's rows: a view with the map's row stride.
at::Tensor output_block(const at::Tensor& map, const ShiftGeometry& g,
                        const Tile& tile) {
  return map.select(0, tile.b)
      .view({map.size(1), g.ho * g.wo})
      .narrow(1, tile.r0 * g.wo, tile.len(g));
}

// The tile's (products, len) matrix at the start of a buffer.
at::Tensor block_view(const at::Tensor& buffer, const ShiftGeometry& g,
                      const Tile& tile) {
  const int64_t len = tile.len(g);
  return buffer.narrow(0, 0, tile.products() * len)
      .view({tile.products(), len});
}

// Tile `row_tile` of image b, channel block `block`.
Tile make_tile(const ShiftGeometry& g, int64_t b, int64_t row_tile,
               int64_t block) {
  Tile tile;
  tile.b = b;
  tile.r0 = row_tile * g.ho / g.tiles;
  tile.r1 = (row_tile + 1) * g.ho / g.tiles;
  tile.c0 = block * g.channels;
  tile.c1 = std::min(tile.c0 + g.channels, g.c);
  return tile;
}

}  // namespace

// Every tensor reaches the worker threads detached: autograd's thread-local
// state stays on the calling thread, and out= GEMMs refuse tensors that
// require grad.
at::Tensor pixel_shift_forward(const at::Tensor& x_in,
                               const at::Tensor& weight_in,
                               const c10::optional<at::Tensor>& base,
                               int64_t distance, int64_t stride,
                               int64_t tile_positions,
                               int64_t block_bytes) {
  const at::Tensor x = x_in.detach(), weight = weight_in.detach();
  check_shift_inputs(x, weight, distance, stride, tile_positions,
                     block_bytes);
  const ShiftGeometry g(x, distance, stride, tile_positions, block_bytes,
                        weight.size(0));
  const bool accumulate = base.has_value();
  at::Tensor out;
  if (accumulate) {
    out = base->detach();
    check_output_shape(out, "base", x, weight, g);
  } else {
    out = at::empty({g.n, weight.size(0), g.ho, g.wo}, x.options());
  }
  if (out.numel() == 0) return out;
  if (g.c == 0) return accumulate ? out : out.zero_();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pixel_shift_forward", [&] {
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    const int64_t c_out = weight.size(0);
    // A thread's units, each over all channel blocks in turn: they add onto
    // the same output rows.
    at::parallel_for(0, g.n * g.tiles * g.parts, 1, [&](int64_t begin,
                                                         int64_t end) {
      const at::Tensor buffer = scratch(0, g.block_size(), x.options());
      for (int64_t k = begin * g.blocks; k < end * g.blocks; ++k) {
        const int64_t unit = k / g.blocks, part = unit % g.parts;
        const Tile tile =
            make_tile(g, unit / g.parts / g.tiles, unit / g.parts % g.tiles,
                      k % g.blocks);
        tile_products_any(buffer.data_ptr<scalar_t>(), xd, g, tile);
        const int64_t o0 = part * c_out / g.parts,
                      o1 = (part + 1) * c_out / g.parts;
        const at::Tensor columns = weight.narrow(0, o0, o1 - o0).narrow(
            1, kTaps * tile.c0, tile.products());
        at::Tensor block = output_block(out, g, tile).narrow(0, o0, o1 - o0);
        if (accumulate || tile.c0 > 0) {
          block.addmm_(columns, block_view(buffer, g, tile));
        } else {
          at::mm_out(block, columns, block_view(buffer, g, tile));
        }
      }
    });
  });
  return out;
}

std::vector<at::Tensor> pixel_shift_backward(const at::Tensor& grad_in,
                                             const at::Tensor& x_in,
                                             const at::Tensor& weight_in,
                                             int64_t distance, int64_t stride,
                                             bool need_x, bool need_weight,
                                             int64_t tile_positions,
                                             int64_t block_bytes) {
  const at::Tensor grad = grad_in.detach(), x = x_in.detach(),
                   weight = weight_in.detach();
  check_shift_inputs(x, weight, distance, stride, tile_positions,
                     block_bytes);
  const ShiftGeometry g(x, distance, stride, tile_positions, block_bytes);
  check_output_shape(grad, "grad", x, weight, g);
  at::Tensor grad_x = need_x ? at::zeros_like(x) : at::Tensor();
  at::Tensor grad_weight = need_weight ? at::zeros_like(weight) : at::Tensor();
  if (grad.numel() == 0 || g.c == 0 || !(need_x || need_weight)) {
    return {grad_x, grad_weight};
  }
  // Row tile k writes the input rows [r0 s - L, (r1 - 1) s + L]: row tiles
  // `phases` apart never share one, so each phase runs all its tiles and
  // channel blocks at once.
  const int64_t overlap = 2 * g.dist - g.s;
  const int64_t phases =
      overlap < 0 ? 1 : overlap / (std::max<int64_t>(g.min_rows, 1) * g.s) + 2;
  // The threads' partial weight gradients, summed at the end.
  std::vector<at::Tensor> partial(std::max(at::get_num_threads(), 1));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pixel_shift_backward", [&] {
    const scalar_t* xd = x.const_data_ptr<scalar_t>();
    for (int64_t phase = 0; phase < std::min(phases, g.tiles); ++phase) {
      const int64_t per_image = (g.tiles - phase + phases - 1) / phases;
      const int64_t units = g.n * per_image * g.blocks;
      at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
        const at::Tensor buffer = scratch(0, g.block_size(), x.options());
        const at::Tensor grad_buffer = scratch(1, g.block_size(), x.options());
        at::Tensor& thread_grad = partial[std::min<size_t>(
            at::get_thread_num(), partial.size() - 1)];
        if (need_weight && !thread_grad.defined()) {
          thread_grad = scratch(2, weight.numel(), weight.options())
                            .view(weight.sizes())
                            .zero_();
        }
        for (int64_t k = begin; k < end; ++k) {
          const int64_t row_tile = k / g.blocks % per_image;
          const Tile tile = make_tile(g, k / g.blocks / per_image,
                                      phase + row_tile * phases, k % g.blocks);
          tile_products_any(buffer.data_ptr<scalar_t>(), xd, g, tile);
          const at::Tensor products = block_view(buffer, g, tile);
          const at::Tensor block = output_block(grad, g, tile);
          const int64_t column = kTaps * tile.c0;
          if (need_weight) {
            thread_grad.narrow(1, column, tile.products())
                .addmm_(block, products.t());
          }
          if (need_x) {
            at::Tensor grads = block_view(grad_buffer, g, tile);
            at::mm_out(grads,
                       weight.narrow(1, column, tile.products()).t(), block);
            tile_scatter_any(grad_x.data_ptr<scalar_t>(), xd,
                             grads.data_ptr<scalar_t>(), g, tile);
          }
        }
      });
    }
  });
  if (need_weight) {
    for (const at::Tensor& part : partial) {
      if (part.defined()) grad_weight.add_(part);
    }
  }
  return {grad_x, grad_weight};
}

}  // namespace mmacmix
