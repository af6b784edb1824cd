// Sliding-window (SASA-style) local attention for ACmix on the CPU.
//
// out[n, :, i, j] = sum_t softmax_t(q[n, :, i, j] . k[n, :, win_t(i, j)])
//                   * v[n, :, win_t(i, j)]
// over the kernel_size^2 offsets t of a window centred on (s * i, s * j),
// the map being extended by reflection folded to any size (fold_index).
//
// Nothing kernel_size^2-fold is stored.  Each thread keeps the kernel_size
// rows of k and v its current output row reads in a small ring of padded
// rows whose columns are split by phase (padded column c lives at entry
// (c % s) * wph + c / s), so that for any stride the window entries of
// consecutive output columns are consecutive in memory.  Every pass is then
// a sum of elementwise products over rows of output columns: it vectorises
// across columns for any head_dim, with no horizontal reductions, and
// blocks of columns are summed in registers.  The forward keeps only a
// per-pixel log-sum-exp; the backward recomputes the probabilities, a band
// of output rows at a time so that its buffers stay small and in cache.
#include <ATen/Parallel.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace mmacmix {
namespace {

// Reflection without repeating the edge, extended periodically so that it
// is defined for any offset and any size (size 1 maps everything to 0).
int64_t fold_index(int64_t x, int64_t n) {
  if (n == 1) return 0;
  const int64_t period = 2 * (n - 1);
  int64_t y = x % period;
  if (y < 0) y += period;
  return y < n ? y : period - y;
}

struct Geometry {
  int64_t n, d, h, w, ho, wo, k, kk, pad, s;
  // Padded rows hold s * wph entries.
  int64_t wph;
  // Backward buffers keep `margin` zeros left of each row of wo values and
  // are `row_len` long, so that shifted reads of a block stay in bounds.
  int64_t margin, row_len;

  Geometry(const at::Tensor& q, const at::Tensor& key, int64_t kernel_size,
           int64_t stride) {
    n = key.size(0);
    d = key.size(1);
    h = key.size(2);
    w = key.size(3);
    ho = q.size(2);
    wo = q.size(3);
    k = kernel_size;
    kk = k * k;
    pad = k / 2;
    s = stride;
    const int64_t wp = s * (wo - 1) + k;
    wph = (wp + s - 1) / s;
    margin = (k - 1) / s;
    row_len = margin + std::max(wph, wo);
  }

  int64_t padded_row() const { return s * wph; }
  int64_t out_plane() const { return ho * wo; }

  // Source column in the unpadded map of each entry of a padded row.
  std::vector<int64_t> column_sources() const {
    std::vector<int64_t> cols(padded_row());
    for (int64_t ph = 0; ph < s; ++ph) {
      for (int64_t m = 0; m < wph; ++m) {
        cols[ph * wph + m] = fold_index(s * m + ph - pad, w);
      }
    }
    return cols;
  }
};

// The padded rows that one thread's current output row reads, for every d
// of one n: padded row rp (input row fold(rp - pad)) sits in slot rp % k,
// planes of k slots one per d.  Moving to the next output row refills only
// the s rows that enter the window.
template <typename T>
struct PaddedRing {
  const T* src;
  const Geometry& g;
  const int64_t* cols;
  std::vector<T> data;
  int64_t n = -1, next = 0;

  PaddedRing(const T* src_, const Geometry& g_, const int64_t* cols_)
      : src(src_), g(g_), cols(cols_) {}

  int64_t plane() const { return g.k * g.padded_row(); }

  // Makes the rows of output row i of map n present.
  MMACMIX_INLINE void load(int64_t n_, int64_t i) {
    if (data.empty()) data.resize(g.d * plane());
    const int64_t first = g.s * i;
    if (n_ != n || next < first) {
      n = n_;
      next = first;
    }
    for (; next < first + g.k; ++next) fill(next);
  }

  MMACMIX_INLINE void fill(int64_t rp) {
    const int64_t row = g.padded_row();
    const int64_t y = fold_index(rp - g.pad, g.h);
    for (int64_t d = 0; d < g.d; ++d) {
      const T* in = src + ((n * g.d + d) * g.h + y) * g.w;
      T* out = data.data() + d * plane() + (rp % g.k) * row;
      if (g.s == 1) {
        // Entries [pad, pad + w) are the input row itself.
        for (int64_t e = 0; e < g.pad; ++e) out[e] = in[cols[e]];
        std::memcpy(out + g.pad, in, g.w * sizeof(T));
        for (int64_t e = g.pad + g.w; e < row; ++e) out[e] = in[cols[e]];
      } else {
        for (int64_t e = 0; e < row; ++e) out[e] = in[cols[e]];
      }
    }
  }

  // Entry, inside a plane, of window offset t for output row i and output
  // column 0; column j is then j entries further on.
  MMACMIX_INLINE void window_offsets(int64_t i, int64_t* offsets) const {
    for (int64_t ty = 0; ty < g.k; ++ty) {
      const int64_t slot = (g.s * i + ty) % g.k;
      for (int64_t tx = 0; tx < g.k; ++tx) {
        offsets[ty * g.k + tx] =
            slot * g.padded_row() + (tx % g.s) * g.wph + tx / g.s;
      }
    }
  }
};

// Column blocks are summed in GCC/clang vector types of B bytes, the
// register width of the instruction set a variant is compiled for (64 for
// AVX-512, 32 for AVX2, 16 for the baseline): the sums stay in registers
// and the output is stored once, not once per term.  Wider types than the
// registers would be split into several and, with the accumulators of a
// wide block, spill.
#if defined(__GNUC__)
#define MMACMIX_VECTOR_TYPES 1
template <typename T, int B>
struct VecOf {
  typedef T type __attribute__((vector_size(B)));
};

template <typename V, typename T>
MMACMIX_INLINE V load_vec(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
MMACMIX_INLINE void store_vec(T* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}
#else
#define MMACMIX_VECTOR_TYPES 0
#endif

// A block of kVecs vectors of B bytes; it converts to its width in
// columns, which is what the scalar versions take.
template <typename T, int kVecs, int B>
struct Block {
  static constexpr int64_t kWidth = kVecs * B / static_cast<int>(sizeof(T));
  constexpr operator int64_t() const { return kWidth; }
};

// y[j] = sum_e a[a_at(e) + j] * b[b_at(e) + j] for j < len.  The generic
// version, for short remainders.
template <typename T, typename OffsetA, typename OffsetB>
MMACMIX_INLINE void sum_products(T* MMACMIX_RESTRICT y,
                                 const T* MMACMIX_RESTRICT a,
                                 const OffsetA& a_at,
                                 const T* MMACMIX_RESTRICT b,
                                 const OffsetB& b_at, int64_t terms,
                                 int64_t len) {
  for (int64_t j = 0; j < len; ++j) y[j] = T(0);
  for (int64_t e = 0; e < terms; ++e) {
    const T* ae = a + a_at(e);
    const T* be = b + b_at(e);
    for (int64_t j = 0; j < len; ++j) y[j] += ae[j] * be[j];
  }
}

#if MMACMIX_VECTOR_TYPES
template <typename T, int B, typename OffsetA, typename OffsetB>
MMACMIX_INLINE void sum_products(T* MMACMIX_RESTRICT y,
                                 const T* MMACMIX_RESTRICT a,
                                 const OffsetA& a_at,
                                 const T* MMACMIX_RESTRICT b,
                                 const OffsetB& b_at, int64_t terms,
                                 Block<T, 4, B>) {
  using V = typename VecOf<T, B>::type;
  constexpr int64_t kLanes = sizeof(V) / sizeof(T);
  V acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  for (int64_t e = 0; e < terms; ++e) {
    const T* ae = a + a_at(e);
    const T* be = b + b_at(e);
    acc0 += load_vec<V>(ae) * load_vec<V>(be);
    acc1 += load_vec<V>(ae + kLanes) * load_vec<V>(be + kLanes);
    acc2 += load_vec<V>(ae + 2 * kLanes) * load_vec<V>(be + 2 * kLanes);
    acc3 += load_vec<V>(ae + 3 * kLanes) * load_vec<V>(be + 3 * kLanes);
  }
  store_vec(y, acc0);
  store_vec(y + kLanes, acc1);
  store_vec(y + 2 * kLanes, acc2);
  store_vec(y + 3 * kLanes, acc3);
}

template <typename T, int B, typename OffsetA, typename OffsetB>
MMACMIX_INLINE void sum_products(T* MMACMIX_RESTRICT y,
                                 const T* MMACMIX_RESTRICT a,
                                 const OffsetA& a_at,
                                 const T* MMACMIX_RESTRICT b,
                                 const OffsetB& b_at, int64_t terms,
                                 Block<T, 1, B>) {
  using V = typename VecOf<T, B>::type;
  // Two chains, so that consecutive terms do not wait on each other.
  V acc0 = {}, acc1 = {};
  int64_t e = 0;
  for (; e + 1 < terms; e += 2) {
    acc0 += load_vec<V>(a + a_at(e)) * load_vec<V>(b + b_at(e));
    acc1 += load_vec<V>(a + a_at(e + 1)) * load_vec<V>(b + b_at(e + 1));
  }
  if (e < terms) acc0 += load_vec<V>(a + a_at(e)) * load_vec<V>(b + b_at(e));
  store_vec(y, acc0 + acc1);
}
#endif

// Two sums of products sharing one factor: y1 from (a, b1) and y2 from
// (a, b2), with the same offsets.  Each term loads a once for two
// products, and the two sums are independent chains.
template <typename T, typename OffsetA, typename OffsetB, typename Len>
MMACMIX_INLINE void sum_products_shared(T* y1, T* y2, const T* a,
                                        const OffsetA& a_at, const T* b1,
                                        const T* b2, const OffsetB& b_at,
                                        int64_t terms, Len len) {
  sum_products(y1, a, a_at, b1, b_at, terms, len);
  sum_products(y2, a, a_at, b2, b_at, terms, len);
}

#if MMACMIX_VECTOR_TYPES
template <typename T, int B, typename OffsetA, typename OffsetB>
MMACMIX_INLINE void sum_products_shared(
    T* MMACMIX_RESTRICT y1, T* MMACMIX_RESTRICT y2,
    const T* MMACMIX_RESTRICT a, const OffsetA& a_at,
    const T* MMACMIX_RESTRICT b1, const T* MMACMIX_RESTRICT b2,
    const OffsetB& b_at, int64_t terms, Block<T, 4, B>) {
  using V = typename VecOf<T, B>::type;
  constexpr int64_t kLanes = sizeof(V) / sizeof(T);
  V p0 = {}, p1 = {}, p2 = {}, p3 = {}, r0 = {}, r1 = {}, r2 = {}, r3 = {};
  for (int64_t e = 0; e < terms; ++e) {
    const int64_t bo = b_at(e);
    const T* x = a + a_at(e);
    const T *z1 = b1 + bo, *z2 = b2 + bo;
    V w = load_vec<V>(x);
    p0 += w * load_vec<V>(z1);
    r0 += w * load_vec<V>(z2);
    w = load_vec<V>(x + kLanes);
    p1 += w * load_vec<V>(z1 + kLanes);
    r1 += w * load_vec<V>(z2 + kLanes);
    w = load_vec<V>(x + 2 * kLanes);
    p2 += w * load_vec<V>(z1 + 2 * kLanes);
    r2 += w * load_vec<V>(z2 + 2 * kLanes);
    w = load_vec<V>(x + 3 * kLanes);
    p3 += w * load_vec<V>(z1 + 3 * kLanes);
    r3 += w * load_vec<V>(z2 + 3 * kLanes);
  }
  store_vec(y1, p0);
  store_vec(y1 + kLanes, p1);
  store_vec(y1 + 2 * kLanes, p2);
  store_vec(y1 + 3 * kLanes, p3);
  store_vec(y2, r0);
  store_vec(y2 + kLanes, r1);
  store_vec(y2 + 2 * kLanes, r2);
  store_vec(y2 + 3 * kLanes, r3);
}

template <typename T, int B, typename OffsetA, typename OffsetB>
MMACMIX_INLINE void sum_products_shared(
    T* MMACMIX_RESTRICT y1, T* MMACMIX_RESTRICT y2,
    const T* MMACMIX_RESTRICT a, const OffsetA& a_at,
    const T* MMACMIX_RESTRICT b1, const T* MMACMIX_RESTRICT b2,
    const OffsetB& b_at, int64_t terms, Block<T, 1, B>) {
  using V = typename VecOf<T, B>::type;
  V p = {}, r = {};
  for (int64_t e = 0; e < terms; ++e) {
    const int64_t bo = b_at(e);
    const V w = load_vec<V>(a + a_at(e));
    p += w * load_vec<V>(b1 + bo);
    r += w * load_vec<V>(b2 + bo);
  }
  store_vec(y1, p);
  store_vec(y2, r);
}
#endif

// Calls fn(j0, width) over column blocks covering [0, len), width being a
// Block<> of B-byte vectors wherever the row is long enough.  A last
// partial block is moved back to end at len: it recomputes a few columns
// (same values; every caller overwrites) instead of running a slow
// remainder loop.
template <typename T, int B, typename Fn>
MMACMIX_INLINE void for_column_blocks(int64_t len, const Fn& fn) {
  using Wide = Block<T, 4, B>;
  using Narrow = Block<T, 1, B>;
  constexpr int64_t kWide = Wide::kWidth, kNarrow = Narrow::kWidth;
  int64_t j0 = 0;
  for (; j0 + kWide <= len; j0 += kWide) fn(j0, Wide());
  if (j0 == len) return;
  if (len >= kWide) {
    fn(len - kWide, Wide());
    return;
  }
  for (; j0 + kNarrow <= len; j0 += kNarrow) fn(j0, Narrow());
  if (j0 == len) return;
  if (len >= kNarrow) {
    fn(len - kNarrow, Narrow());
  } else {
    fn(j0, len - j0);
  }
}

// logits[t * stride + j] = sum_d x[d * x_plane + j] * xp[d * xp_plane +
// offsets[t] + j] for one output row.
template <typename T, int B>
MMACMIX_INLINE void row_logits(const T* x, int64_t x_plane, const T* xp,
                               int64_t xp_plane, const int64_t* offsets,
                               T* logits, int64_t stride, const Geometry& g) {
  const auto x_at = [=](int64_t d) MMACMIX_LAMBDA { return d * x_plane; };
  const auto xp_at = [=](int64_t d) MMACMIX_LAMBDA { return d * xp_plane; };
  int64_t t = 0;
  // Two window offsets at a time share the loads of x.
  for (; t + 1 < g.kk; t += 2) {
    const T* xp1 = xp + offsets[t];
    const T* xp2 = xp + offsets[t + 1];
    for_column_blocks<T, B>(g.wo, [&](int64_t j0, auto width) MMACMIX_LAMBDA {
      sum_products_shared(logits + t * stride + j0,
                          logits + (t + 1) * stride + j0, x + j0, x_at,
                          xp1 + j0, xp2 + j0, xp_at, g.d, width);
    });
  }
  if (t < g.kk) {
    const T* xp1 = xp + offsets[t];
    for_column_blocks<T, B>(g.wo, [&](int64_t j0, auto width) MMACMIX_LAMBDA {
      sum_products(logits + t * stride + j0, x + j0, x_at, xp1 + j0, xp_at,
                   g.d, width);
    });
  }
}

// out[d * out_plane + j] = sum_t weights[t * stride + j]
//                          * xp[d * xp_plane + offsets[t] + j] for one row.
template <typename T, int B>
MMACMIX_INLINE void row_mix(const T* weights, int64_t stride, const T* xp,
                            int64_t xp_plane, const int64_t* offsets, T* out,
                            int64_t out_plane, const Geometry& g) {
  const auto w_at = [=](int64_t t) MMACMIX_LAMBDA { return t * stride; };
  const auto xp_at = [=](int64_t t) MMACMIX_LAMBDA { return offsets[t]; };
  for_column_blocks<T, B>(g.wo, [&](int64_t j0, auto width) MMACMIX_LAMBDA {
    int64_t d = 0;
    // Two channels at a time share the loads of the weights.
    for (; d + 1 < g.d; d += 2) {
      sum_products_shared(out + d * out_plane + j0,
                          out + (d + 1) * out_plane + j0, weights + j0, w_at,
                          xp + d * xp_plane + j0,
                          xp + (d + 1) * xp_plane + j0, xp_at, g.kk, width);
    }
    if (d < g.d) {
      sum_products(out + d * out_plane + j0, weights + j0, w_at,
                   xp + d * xp_plane + j0, xp_at, g.kk, width);
    }
  });
}

// exp(x) for x <= 0 in float, branch-free so that it vectorises (std::exp
// stays a scalar libm call without -ffast-math).  Range reduction by ln 2
// in two parts and a degree-6 polynomial: within 2 ulp of std::exp.  Adding
// and removing 1.5 * 2^23 rounds to the nearest integer in plain SSE2.
MMACMIX_INLINE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

MMACMIX_INLINE double exp_nonpositive(double x) { return std::exp(x); }

#if MMACMIX_VECTOR_TYPES
// exp_nonpositive of a vector of floats, written out: GCC leaves the
// scalar version unvectorised in the AVX2 variant (a libm-speed loop).
template <typename V>
MMACMIX_INLINE V exp_nonpositive_vec(V x) {
  typedef int32_t IV __attribute__((vector_size(sizeof(V))));
  const V lowest = V{} - 87.0f;
  x = x < lowest ? lowest : x;
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const IV bits = (__builtin_convertvector(n, IV) + 127) << 23;
  return p * (V)bits;
}
#endif

// Softmax over t, in place, of columns [j_begin, j_end) of logits[t *
// stride + j] (kk rows), and their log-sum-exp, one column at a time.
template <typename T>
MMACMIX_INLINE void softmax_columns_scalar(T* logits, int64_t stride,
                                           int64_t kk, int64_t j_begin,
                                           int64_t j_end, T* lse) {
  for (int64_t j = j_begin; j < j_end; ++j) {
    T* col = logits + j;
    T peak = col[0];
    for (int64_t t = 1; t < kk; ++t) {
      peak = col[t * stride] > peak ? col[t * stride] : peak;
    }
    T total = 0;
    for (int64_t t = 0; t < kk; ++t) {
      col[t * stride] = exp_nonpositive(col[t * stride] - peak);
      total += col[t * stride];
    }
    lse[j] = peak + std::log(total);
    const T inverse = T(1) / total;
    for (int64_t t = 0; t < kk; ++t) col[t * stride] *= inverse;
  }
}

// The same for columns [0, len), float columns a vector at a time (one
// lane per column, so no horizontal operations).
template <typename T, int B>
MMACMIX_INLINE void softmax_columns(T* logits, int64_t stride, int64_t kk,
                                    int64_t len, T* lse) {
  int64_t j0 = 0;
#if MMACMIX_VECTOR_TYPES
  if constexpr (std::is_same_v<T, float>) {
    using V = typename VecOf<float, B>::type;
    constexpr int64_t kLanes = B / sizeof(float);
    for (; j0 + kLanes <= len; j0 += kLanes) {
      float* col = logits + j0;
      V peak = load_vec<V>(col);
      for (int64_t t = 1; t < kk; ++t) {
        const V x = load_vec<V>(col + t * stride);
        peak = x > peak ? x : peak;
      }
      V total = {};
      for (int64_t t = 0; t < kk; ++t) {
        const V e = exp_nonpositive_vec(load_vec<V>(col + t * stride) - peak);
        store_vec(col + t * stride, e);
        total += e;
      }
      const V inverse = 1.0f / total;
      for (int64_t t = 0; t < kk; ++t) {
        store_vec(col + t * stride, load_vec<V>(col + t * stride) * inverse);
      }
      for (int64_t l = 0; l < kLanes; ++l) {
        lse[j0 + l] = peak[l] + std::log(total[l]);
      }
    }
  }
#endif
  softmax_columns_scalar(logits, stride, kk, j0, len, lse);
}

// probs[t * stride + j] = exp(logits[t * stride + j] - lse[j]) in place,
// for t < kk and j < len.
template <typename T, int B>
MMACMIX_INLINE void exp_minus(T* logits, int64_t stride, int64_t kk,
                              int64_t len, const T* lse) {
  for (int64_t t = 0; t < kk; ++t) {
    T* row = logits + t * stride;
    int64_t j = 0;
#if MMACMIX_VECTOR_TYPES
    if constexpr (std::is_same_v<T, float>) {
      using V = typename VecOf<float, B>::type;
      constexpr int64_t kLanes = B / sizeof(float);
      for (; j + kLanes <= len; j += kLanes) {
        store_vec(row + j, exp_nonpositive_vec(load_vec<V>(row + j) -
                                               load_vec<V>(lse + j)));
      }
    }
#endif
    for (; j < len; ++j) row[j] = exp_nonpositive(row[j] - lse[j]);
  }
}

// What one thread keeps between the rows it runs in one pass.
template <typename T>
struct Scratch {
  PaddedRing<T> keys, values;
  std::vector<T> buffer;
  std::vector<int64_t> offsets, by_weight, by_value;

  Scratch(const T* k, const T* v, const Geometry& g, const int64_t* cols)
      : keys(k, g, cols), values(v, g, cols), offsets(g.kk) {}

  T* buffer_of(int64_t size) {
    if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
    return buffer.data();
  }
};

// Forward of output rows [begin, end) of the (n, i) rows.
template <typename T, int B>
MMACMIX_INLINE void forward_rows(const T* q, T* out, T* lse,
                                 const Geometry& g, Scratch<T>& scratch,
                                 int64_t begin, int64_t end) {
  const int64_t wo = g.wo, kk = g.kk, plane = g.out_plane();
  PaddedRing<T>& keys = scratch.keys;
  PaddedRing<T>& values = scratch.values;
  std::vector<int64_t>& offsets = scratch.offsets;
  T* prob = scratch.buffer_of(kk * wo);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / g.ho, i = r % g.ho;
    const int64_t row_start = n * g.d * plane + i * wo;
    keys.load(n, i);
    values.load(n, i);
    keys.window_offsets(i, offsets.data());
    row_logits<T, B>(q + row_start, plane, keys.data.data(), keys.plane(),
               offsets.data(), prob, wo, g);

    softmax_columns<T, B>(prob, wo, kk, wo, lse + r * wo);

    row_mix<T, B>(prob, wo, values.data.data(), values.plane(), offsets.data(),
            out + row_start, plane, g);
  }
}

// The backward runs over bands of output rows [i0, i0 + rows).  Its
// buffers, for the band only, hold rows of row_len entries: values after
// `margin` zeros, zeros after them, so that shifted reads of a column block
// stay in bounds and read zeros outside the row.
template <typename T>
struct Band {
  int64_t i0, rows;
  T* probs;        // (n, i - i0, t) rows
  T* grad_logits;  // (n, i - i0, t) rows
  T* q_rows;       // (n, d, i - i0) rows
  T* grad_rows;    // (n, d, i - i0) rows
};

MMACMIX_INLINE void zero_margins(float* row, const Geometry& g) {
  std::fill(row, row + g.margin, 0.0f);
  std::fill(row + g.margin + g.wo, row + g.row_len, 0.0f);
}

MMACMIX_INLINE void zero_margins(double* row, const Geometry& g) {
  std::fill(row, row + g.margin, 0.0);
  std::fill(row + g.margin + g.wo, row + g.row_len, 0.0);
}

// Backward, first pass, one output row at a time (r indexes the band's
// (n, i) rows): recomputes the probabilities, turns grad_out into logit
// gradients, gathers grad_q and fills the band buffers.
template <typename T, int B>
MMACMIX_INLINE void backward_rows(const T* q, const T* grad_out, const T* lse,
                                  T* grad_q, const Band<T>& band,
                                  const Geometry& g, Scratch<T>& scratch,
                                  int64_t begin, int64_t end) {
  const int64_t wo = g.wo, kk = g.kk, len = g.row_len;
  const int64_t plane = g.out_plane(), band_plane = band.rows * len;
  PaddedRing<T>& keys = scratch.keys;
  PaddedRing<T>& values = scratch.values;
  std::vector<int64_t>& offsets = scratch.offsets;
  T* dots = scratch.buffer_of(wo);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / band.rows, il = r % band.rows, i = band.i0 + il;
    const int64_t row_start = n * g.d * plane + i * wo;
    T* prob = band.probs + r * kk * len;
    T* glog = band.grad_logits + r * kk * len;
    for (int64_t t = 0; t < kk; ++t) {
      zero_margins(prob + t * len, g);
      zero_margins(glog + t * len, g);
    }
    for (int64_t d = 0; d < g.d; ++d) {
      const int64_t at = (n * g.d + d) * band_plane + il * len;
      zero_margins(band.q_rows + at, g);
      zero_margins(band.grad_rows + at, g);
      std::memcpy(band.q_rows + at + g.margin, q + row_start + d * plane,
                  wo * sizeof(T));
      std::memcpy(band.grad_rows + at + g.margin,
                  grad_out + row_start + d * plane, wo * sizeof(T));
    }
    prob += g.margin;
    glog += g.margin;
    keys.load(n, i);
    values.load(n, i);
    keys.window_offsets(i, offsets.data());

    row_logits<T, B>(q + row_start, plane, keys.data.data(), keys.plane(),
               offsets.data(), prob, len, g);
    exp_minus<T, B>(prob, len, kk, wo, lse + (n * g.ho + i) * wo);

    // d(loss)/d(prob_t) = grad_out . v_t, then the softmax Jacobian.
    row_logits<T, B>(grad_out + row_start, plane, values.data.data(),
               values.plane(), offsets.data(), glog, len, g);
    for_column_blocks<T, B>(wo, [&](int64_t j0, auto width) MMACMIX_LAMBDA {
      sum_products(
          dots + j0, prob + j0,
          [=](int64_t t) MMACMIX_LAMBDA { return t * len; }, glog + j0,
          [=](int64_t t) MMACMIX_LAMBDA { return t * len; }, kk, width);
    });
    for (int64_t t = 0; t < kk; ++t) {
      T* gl = glog + t * len;
      const T* p = prob + t * len;
      for (int64_t j = 0; j < wo; ++j) gl[j] = p[j] * (gl[j] - dots[j]);
    }

    row_mix<T, B>(glog, len, keys.data.data(), keys.plane(), offsets.data(),
            grad_q + row_start, plane, g);
  }
}

// out[x] += sum of the padded row entries that copy input column x.
template <typename T>
MMACMIX_INLINE void fold_row(const T* padded, T* out, const Geometry& g,
                             const int64_t* cols) {
  for (int64_t ph = 0; ph < g.s; ++ph) {
    // Entries m in [lo, hi) of this phase copy column s * m + ph - pad
    // itself; the others (reflections, and entries past the last padded
    // column, which gathered only zeros) go through the table.
    const int64_t lo = std::min(g.wph, (g.pad - ph + g.s - 1) / g.s);
    const int64_t hi =
        std::max(lo, std::min(g.wph, (g.w + g.pad - ph + g.s - 1) / g.s));
    const T* in = padded + ph * g.wph;
    const int64_t* src = cols + ph * g.wph;
    for (int64_t m = 0; m < lo; ++m) out[src[m]] += in[m];
    if (g.s == 1) {
      for (int64_t m = lo; m < hi; ++m) out[m - g.pad] += in[m];
    } else {
      for (int64_t m = lo; m < hi; ++m) out[g.s * m + ph - g.pad] += in[m];
    }
    for (int64_t m = hi; m < g.wph; ++m) out[src[m]] += in[m];
  }
}

// Backward, second pass, over (n, input row) tasks so that no two threads
// write the same place: grad_k gets grad_logits * q and grad_v gets
// probs * grad_out from every window of the band that reads the row.  Each
// entry of a padded row is gathered in registers from the output columns
// that read it, then the padded row is folded onto the input columns.
template <typename T, int B>
MMACMIX_INLINE void scatter_rows(const Band<T>& band, T* grad_k, T* grad_v,
                                 const Geometry& g, const int64_t* cols,
                                 const int64_t* in_rows,
                                 const int64_t* pair_start,
                                 const int64_t* pairs, int64_t n_in_rows,
                                 Scratch<T>& scratch, int64_t begin,
                                 int64_t end) {
  const int64_t row = g.padded_row(), len = g.row_len, kk = g.kk;
  const int64_t band_plane = band.rows * len;
  T* acc_k = scratch.buffer_of(2 * g.d * row);
  T* acc_v = acc_k + g.d * row;
  std::vector<int64_t>& by_weight = scratch.by_weight;
  std::vector<int64_t>& by_value = scratch.by_value;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / n_in_rows, y = in_rows[r % n_in_rows];
    for (int64_t ph = 0; ph < g.s; ++ph) {
      // Entry m of phase ph gathers column j = m - tx / s of every window
      // offset with tx % s == ph; the zero margins stand in for j outside
      // [0, wo).
      by_weight.clear();
      by_value.clear();
      for (int64_t e = pair_start[y]; e < pair_start[y + 1]; ++e) {
        const int64_t il = pairs[e] / g.k - band.i0, ty = pairs[e] % g.k;
        if (il < 0 || il >= band.rows) continue;
        for (int64_t tx = ph; tx < g.k; tx += g.s) {
          const int64_t shift = g.margin - tx / g.s;
          by_weight.push_back(
              ((n * band.rows + il) * kk + ty * g.k + tx) * len + shift);
          by_value.push_back(n * g.d * band_plane + il * len + shift);
        }
      }
      const int64_t* wt = by_weight.data();
      const int64_t* vt = by_value.data();
      const int64_t terms = static_cast<int64_t>(by_weight.size());
      const auto w_at = [=](int64_t e) MMACMIX_LAMBDA { return wt[e]; };
      const auto v_at = [=](int64_t e) MMACMIX_LAMBDA { return vt[e]; };
      for_column_blocks<T, B>(g.wph, [&](int64_t m0, auto width) MMACMIX_LAMBDA {
        // Two channels at a time share the loads of the weights.
        int64_t d = 0;
        for (; d + 1 < g.d; d += 2) {
          const int64_t at = d * row + ph * g.wph + m0;
          const int64_t plane_at = d * band_plane + m0;
          sum_products_shared(acc_k + at, acc_k + at + row,
                              band.grad_logits + m0, w_at,
                              band.q_rows + plane_at,
                              band.q_rows + plane_at + band_plane, v_at,
                              terms, width);
          sum_products_shared(acc_v + at, acc_v + at + row, band.probs + m0,
                              w_at, band.grad_rows + plane_at,
                              band.grad_rows + plane_at + band_plane, v_at,
                              terms, width);
        }
        if (d < g.d) {
          const int64_t at = d * row + ph * g.wph + m0;
          const int64_t plane_at = d * band_plane + m0;
          sum_products(acc_k + at, band.grad_logits + m0, w_at,
                       band.q_rows + plane_at, v_at, terms, width);
          sum_products(acc_v + at, band.probs + m0, w_at,
                       band.grad_rows + plane_at, v_at, terms, width);
        }
      });
    }
    for (int64_t d = 0; d < g.d; ++d) {
      const int64_t at = ((n * g.d + d) * g.h + y) * g.w;
      fold_row(acc_k + d * row, grad_k + at, g, cols);
      fold_row(acc_v + d * row, grad_v + at, g, cols);
    }
  }
}

// Non-template entry points, one per dtype and instruction set, each
// carrying its target attribute (the templates they call are inlined into
// them, so they compile for that target too).
#define MMACMIX_ENTRY_POINTS(T, SUFFIX, TARGET, BYTES)                       \
  TARGET void forward_rows_##SUFFIX(const T* q, T* out, T* lse,              \
                                    const Geometry& g, Scratch<T>& scratch,  \
                                    int64_t begin, int64_t end) {            \
    forward_rows<T, BYTES>(q, out, lse, g, scratch, begin, end);             \
  }                                                                          \
  TARGET void backward_rows_##SUFFIX(                                        \
      const T* q, const T* grad_out, const T* lse, T* grad_q,                \
      const Band<T>& band, const Geometry& g, Scratch<T>& scratch,           \
      int64_t begin, int64_t end) {                                          \
    backward_rows<T, BYTES>(q, grad_out, lse, grad_q, band, g, scratch,      \
                            begin, end);                                     \
  }                                                                          \
  TARGET void scatter_rows_##SUFFIX(                                         \
      const Band<T>& band, T* grad_k, T* grad_v, const Geometry& g,          \
      const int64_t* cols, const int64_t* in_rows,                           \
      const int64_t* pair_start, const int64_t* pairs, int64_t n_in_rows,    \
      Scratch<T>& scratch, int64_t begin, int64_t end) {                     \
    scatter_rows<T, BYTES>(band, grad_k, grad_v, g, cols, in_rows,           \
                           pair_start, pairs, n_in_rows, scratch, begin,     \
                           end);                                             \
  }

#define MMACMIX_NO_TARGET
MMACMIX_ENTRY_POINTS(float, f32_baseline, MMACMIX_NO_TARGET, 16)
MMACMIX_ENTRY_POINTS(double, f64_baseline, MMACMIX_NO_TARGET, 16)
#if MMACMIX_X86_TARGETS
MMACMIX_ENTRY_POINTS(float, f32_avx2, MMACMIX_TARGET_AVX2, 32)
MMACMIX_ENTRY_POINTS(double, f64_avx2, MMACMIX_TARGET_AVX2, 32)
MMACMIX_ENTRY_POINTS(float, f32_avx512, MMACMIX_TARGET_AVX512, 64)
MMACMIX_ENTRY_POINTS(double, f64_avx512, MMACMIX_TARGET_AVX512, 64)
#endif
#undef MMACMIX_ENTRY_POINTS
#undef MMACMIX_NO_TARGET

// Dispatch on the active instruction set (cpu_isa.cpp), per dtype.
#if MMACMIX_X86_TARGETS
#define MMACMIX_DISPATCH(T, NAME, ...)                 \
  switch (active_cpu_isa()) {                          \
    case CpuIsa::kAvx512:                              \
      return NAME##_##T##_avx512(__VA_ARGS__);         \
    case CpuIsa::kAvx2:                                \
      return NAME##_##T##_avx2(__VA_ARGS__);           \
    default:                                           \
      return NAME##_##T##_baseline(__VA_ARGS__);       \
  }
#else
#define MMACMIX_DISPATCH(T, NAME, ...) \
  return NAME##_##T##_baseline(__VA_ARGS__);
#endif

#define MMACMIX_DISPATCHERS(T, SUFFIX)                                       \
  void forward_rows_any(const T* q, T* out, T* lse, const Geometry& g,       \
                        Scratch<T>& scratch, int64_t begin, int64_t end) {   \
    MMACMIX_DISPATCH(SUFFIX, forward_rows, q, out, lse, g, scratch, begin,   \
                     end)                                                    \
  }                                                                          \
  void backward_rows_any(const T* q, const T* grad_out, const T* lse,        \
                         T* grad_q, const Band<T>& band, const Geometry& g,  \
                         Scratch<T>& scratch, int64_t begin, int64_t end) {  \
    MMACMIX_DISPATCH(SUFFIX, backward_rows, q, grad_out, lse, grad_q, band,  \
                     g, scratch, begin, end)                                 \
  }                                                                          \
  void scatter_rows_any(const Band<T>& band, T* grad_k, T* grad_v,           \
                        const Geometry& g, const int64_t* cols,              \
                        const int64_t* in_rows, const int64_t* pair_start,   \
                        const int64_t* pairs, int64_t n_in_rows,             \
                        Scratch<T>& scratch, int64_t begin, int64_t end) {   \
    MMACMIX_DISPATCH(SUFFIX, scatter_rows, band, grad_k, grad_v, g, cols,    \
                     in_rows, pair_start, pairs, n_in_rows, scratch, begin,  \
                     end)                                                    \
  }

MMACMIX_DISPATCHERS(float, f32)
MMACMIX_DISPATCHERS(double, f64)
#undef MMACMIX_DISPATCHERS
#undef MMACMIX_DISPATCH

// Runs run(scratch, begin, end) over chunks of [0, total), each thread with
// its own Scratch from make().  With OpenMP, chunks are handed out
// dynamically: on a busy machine a descheduled thread then delays the
// others by one small chunk, not by a whole static share.
// Runs rows [0, total) on PyTorch's thread pool (sharing its threads and
// torch.set_num_threads), one scratch per task.  Rows are split into
// several chunks per thread; inside a parallel region this runs inline.
template <typename Make, typename Run>
void parallel_rows(int64_t total, const Make& make, const Run& run) {
  if (total <= 0) return;
  const int64_t grain =
      std::max<int64_t>(1, total / (4 * at::get_num_threads()));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    auto scratch = make();
    run(scratch, begin, end);
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, int64_t kernel_size, int64_t stride) {
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1,
              "kernel_size must be odd and >= 1, got ", kernel_size);
  TORCH_CHECK(stride >= 1, "stride must be >= 1, got ", stride);
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "local_attention: CPU tensors only");
    TORCH_CHECK(t->dim() == 4, "local_attention: 4-d tensors expected");
    TORCH_CHECK(t->is_contiguous(), "local_attention: contiguous expected");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(),
                "local_attention: q, k and v must share a dtype");
  }
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  TORCH_CHECK(k.size(2) >= 1 && k.size(3) >= 1, "empty feature map");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                  q.size(2) == (k.size(2) + stride - 1) / stride &&
                  q.size(3) == (k.size(3) + stride - 1) / stride,
              "q must be (N, D, ceil(H / stride), ceil(W / stride))");
}

// Output rows per backward band: the band buffers stay near 4 MB, about
// what the L2 caches of two cores hold, so that the second pass reads them
// back from there rather than from L3 or memory; with at least 8 rows so
// that the input rows shared by two bands stay few.
int64_t band_rows(const Geometry& g, int64_t element_size) {
  const int64_t per_row =
      g.n * (2 * g.kk + 2 * g.d) * g.row_len * element_size;
  const int64_t rows = (int64_t(4) << 20) / std::max<int64_t>(per_row, 1);
  return std::min(g.ho, std::max<int64_t>(rows, 8));
}

}  // namespace

std::vector<at::Tensor> local_attention_forward(const at::Tensor& q,
                                                const at::Tensor& k,
                                                const at::Tensor& v,
                                                int64_t kernel_size,
                                                int64_t stride) {
  check_inputs(q, k, v, kernel_size, stride);
  const Geometry g(q, k, kernel_size, stride);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({g.n, g.ho, g.wo}, q.options());
  if (q.numel() == 0) return {out.zero_(), lse.zero_()};
  const std::vector<int64_t> cols = g.column_sources();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attention_forward", [&] {
    const scalar_t* qd = q.data_ptr<scalar_t>();
    const scalar_t* kd = k.data_ptr<scalar_t>();
    const scalar_t* vd = v.data_ptr<scalar_t>();
    scalar_t* od = out.data_ptr<scalar_t>();
    scalar_t* ld = lse.data_ptr<scalar_t>();
    parallel_rows(
        g.n * g.ho,
        [&] { return Scratch<scalar_t>(kd, vd, g, cols.data()); },
        [&](Scratch<scalar_t>& scratch, int64_t b, int64_t e) {
          forward_rows_any(qd, od, ld, g, scratch, b, e);
        });
  });
  return {out, lse};
}

std::vector<at::Tensor> local_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& lse, int64_t kernel_size,
    int64_t stride) {
  check_inputs(q, k, v, kernel_size, stride);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == q.scalar_type(),
              "grad_out must be a contiguous tensor shaped like q");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == q.scalar_type() &&
                  lse.numel() == q.size(0) * q.size(2) * q.size(3),
              "lse must be a contiguous (N, Ho, Wo) tensor of q's dtype");
  const Geometry g(q, k, kernel_size, stride);
  at::Tensor grad_q = at::empty_like(q);
  // Bands add onto the input rows they share.
  at::Tensor grad_k = at::zeros_like(k);
  at::Tensor grad_v = at::zeros_like(v);
  if (q.numel() == 0) return {grad_q.zero_(), grad_k, grad_v};
  const std::vector<int64_t> cols = g.column_sources();

  // For every input row, the (output row, window row) pairs that read it,
  // in increasing output row.
  std::vector<int64_t> pair_start(g.h + 1, 0), pairs(g.ho * g.k);
  for (int64_t i = 0; i < g.ho; ++i) {
    for (int64_t ty = 0; ty < g.k; ++ty) {
      ++pair_start[fold_index(g.s * i + ty - g.pad, g.h) + 1];
    }
  }
  for (int64_t y = 0; y < g.h; ++y) pair_start[y + 1] += pair_start[y];
  std::vector<int64_t> next(pair_start.begin(), pair_start.end() - 1);
  for (int64_t i = 0; i < g.ho; ++i) {
    for (int64_t ty = 0; ty < g.k; ++ty) {
      pairs[next[fold_index(g.s * i + ty - g.pad, g.h)]++] = i * g.k + ty;
    }
  }

  const int64_t rows = band_rows(g, q.element_size());
  at::Tensor buffer = at::empty(
      {2 * g.n * rows * (g.kk + g.d) * g.row_len}, q.options());
  std::vector<int64_t> in_rows;
  std::vector<char> seen(g.h);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "local_attention_backward", [&] {
    const scalar_t* qd = q.data_ptr<scalar_t>();
    const scalar_t* kd = k.data_ptr<scalar_t>();
    const scalar_t* vd = v.data_ptr<scalar_t>();
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const scalar_t* ld = lse.data_ptr<scalar_t>();
    scalar_t* gq = grad_q.data_ptr<scalar_t>();
    scalar_t* gk = grad_k.data_ptr<scalar_t>();
    scalar_t* gv = grad_v.data_ptr<scalar_t>();
    for (int64_t i0 = 0; i0 < g.ho; i0 += rows) {
      Band<scalar_t> band;
      band.i0 = i0;
      band.rows = std::min(rows, g.ho - i0);
      const int64_t weights = g.n * band.rows * g.kk * g.row_len;
      const int64_t maps = g.n * g.d * band.rows * g.row_len;
      band.probs = buffer.data_ptr<scalar_t>();
      band.grad_logits = band.probs + weights;
      band.q_rows = band.grad_logits + weights;
      band.grad_rows = band.q_rows + maps;
      parallel_rows(
          g.n * band.rows,
          [&] { return Scratch<scalar_t>(kd, vd, g, cols.data()); },
          [&](Scratch<scalar_t>& scratch, int64_t b, int64_t e) {
            backward_rows_any(qd, go, ld, gq, band, g, scratch, b, e);
          });

      // The input rows this band's windows read.
      in_rows.clear();
      std::fill(seen.begin(), seen.end(), 0);
      for (int64_t i = i0; i < i0 + band.rows; ++i) {
        for (int64_t ty = 0; ty < g.k; ++ty) {
          const int64_t y = fold_index(g.s * i + ty - g.pad, g.h);
          if (!seen[y]) {
            seen[y] = 1;
            in_rows.push_back(y);
          }
        }
      }
      const int64_t n_in = static_cast<int64_t>(in_rows.size());
      parallel_rows(
          g.n * n_in,
          [&] { return Scratch<scalar_t>(kd, vd, g, cols.data()); },
          [&](Scratch<scalar_t>& scratch, int64_t b, int64_t e) {
            scatter_rows_any(band, gk, gv, g, cols.data(), in_rows.data(),
                             pair_start.data(), pairs.data(), n_in, scratch,
                             b, e);
          });
    }
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace mmacmix
