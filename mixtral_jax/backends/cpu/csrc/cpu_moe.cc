// CPU kernels for decode steps, where few rows multiply each weight (kernels.py).
//
// XLA:CPU's library matmuls read a weight well below the machine's read bandwidth
// when so few rows multiply it (docs/cpu-decode.md has the figures); here each
// weight is stored in column panels of P floats ("packed"), so one pass
// streams it in order while the rows' sums stay in registers.
//
// The experts of a sparse MoE layer, every expert of a layer in one call:
//
//   xs    [n, D]           rows sorted by expert (expert e owns start[e]..+count[e])
//   w13   [E, F/P, D, 2P]  panel j of w1 (gate) and of w3 (up) side by side
//   w2    [E, D/P, F, P]   panel j of w2 (down)
//   ys    [n, D]           ys[r] = w2(silu(xs[r] w1) * (xs[r] w3)); 0 outside every expert
//
// F and D are rounded up to whole panels, the padding zeros: a padded hidden unit is
// silu(0) * 0 = 0, and a padded output column is not written.
//
// With a bank of J LoRA adapters (ExpertsLoRA), row r applies adapter ids[r] (-1: none)
// of its expert: x w1 + (x A1) B1 and x w3 + (x A3) B3 before the SwiGLU, h w2 + (h A2) B2
// after it, from the factors as the model holds them (float32, row-major, each adapter's
// alpha / r folded into its B): a1, a3 [E, J, D, R], b1, b3 [E, J, R, F], a2 [E, J, F, R],
// b2 [E, J, R, D]. Each row reads only its own adapter's factors, as Punica's BGMV does.
//
// A bank of LoRA adapters on a dense weight, each row applying its own (LoRARows), on S
// segments of the weight's columns side by side (q's, k's and v's adapters on their
// concatenated projections, without the zeros of one block-diagonal B; S = 1 for one
// weight):
//
//   x [n, K], ids [n], A [J, K, S R] (the segments' A side by side), B [J, R, M] (their
//   B side by side), columns [2 S] (segment s: y's columns columns[2s]..columns[2s + 1],
//   M wide in all)  ->  y [n, N], y[r, segment s] = (x[r] A[ids[r]][:, s]) B[ids[r]][:, s],
//   0 in no segment's columns and where ids[r] is -1
//
// A dense product (an attention projection, the LM head), in tiles of rows by panels
// (8 by 3 with AVX-512); a tile's panels stay in L2 while the next rows read them:
//
//   x [n, K], w [N/P, K, P]  ->  y [n, N] = x w
//
// A decode step's attention, each row over the keys its own slot holds:
//
//   q [B, K, G, H] (G query heads per KV head), keys and values in blocks [N, K, bs, H]
//   that each row's table [B, M] lists (float32, or int8 with a scale per key and
//   head), the rows' key positions [B, M bs] (-1: empty), the queries' positions [B]
//   -> out [B, K, G, H] = softmax(q . k) v (q scaled already) over the keys at
//   positions <= the query's (and within `window` of it when window > 0)
//
// Keys outside that are never read, so a step costs what the rows hold rather than
// the S positions a slot could hold.
//
// Work is split by panels (by row and head for attention) over XLA's intra-op thread
// pool; the calling thread takes chunks too, so the call never waits on a task that
// has not started.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t P = 16;  // panel width in floats (kernels.PANEL): the packed layout

// The vector the code computes in is the machine's own: GCC keeps a vector type wider
// than the target's registers in memory, every sum a load and a store (on an AVX2 CPU
// the kernels ran far slower than XLA: docs/cpu-decode.md). A panel is V such vectors,
// and a tile keeps its sums in the registers there are: 32 of 16 floats with AVX-512,
// 16 of 8 with AVX2 (and 32 of 4 with NEON, where a vector of 8 is a pair).
// MIXTRAL_JAX_VECTOR_FLOATS overrides the choice (the tests build both).
#ifndef MIXTRAL_JAX_VECTOR_FLOATS
#if defined(__AVX512F__)
#define MIXTRAL_JAX_VECTOR_FLOATS 16
#else
#define MIXTRAL_JAX_VECTOR_FLOATS 8
#endif
#endif
constexpr int W = MIXTRAL_JAX_VECTOR_FLOATS;
static_assert(W == 8 || W == 16, "MIXTRAL_JAX_VECTOR_FLOATS is 8 or 16");
constexpr int V = P / W;  // vectors per panel
// Rows per tile: sums in registers, V vectors per row and panel; the rest of the
// registers hold the weights' vectors as they stream in.
constexpr int kGateUpRows = W == 16 ? 8 : 3;  // 2 x 8 x 1 or 2 x 3 x 2 sums
// From this many rows per expert (a prefill's; a decode step gives an expert a few), 8-float
// vectors pass over a w1/w3 panel one vector at a time, in tiles of kGateUpSplitRows
// (2 x 6 sums): GateUpTile.
constexpr int64_t kSplitFrom = 16;
constexpr int kGateUpSplitRows = 6;
constexpr int kDownRows = W == 16 ? 16 : 6;  // 16 x 1 or 6 x 2
constexpr int kDenseRows = W == 16 ? 8 : 6;  // by kDensePanels: 8 x 3 x 1 or 6 x 1 x 2
constexpr int kDensePanels = W == 16 ? 3 : 1;
constexpr int64_t kPrefetch = 64;  // panel rows ahead in each panel

typedef float vec __attribute__((vector_size(W * sizeof(float)), aligned(alignof(float))));
typedef int32_t ivec __attribute__((vector_size(W * sizeof(int32_t)), aligned(alignof(int32_t))));

// Unaligned loads and stores through a may_alias vector type. (Not memcpy: tuned for
// Zen, GCC copies it in 16-byte pieces through the stack, a store-forwarding stall on
// every load.)
typedef float uvec
    __attribute__((vector_size(W * sizeof(float)), aligned(alignof(float)), may_alias));

inline vec load(const float* p) { return *reinterpret_cast<const uvec*>(p); }

inline void store(float* p, const vec& v) { *reinterpret_cast<uvec*>(p) = v; }

// The first `count` floats of v (a whole vector when count >= W): an output's last
// panel may hold padding columns, which are not written.
inline void store_first(float* p, const vec& v, int64_t count) {
  if (count >= W) {
    store(p, v);
  } else {
    for (int64_t j = 0; j < count; ++j) p[j] = v[j];
  }
}

// exp(x) for float32 to ~1 ulp (Cephes' expf: exp(x) = 2^n exp(r), |r| <= ln2 / 2).
inline vec exp_vec(vec x) {
  x = x < 88.3762626647949f ? x : 88.3762626647949f;
  x = x > -88.3762626647949f ? x : -88.3762626647949f;
  vec t = x * 1.44269504088896341f + (x >= 0 ? 0.5f : -0.5f);
  ivec n = __builtin_convertvector(t, ivec);  // round to nearest
  vec nf = __builtin_convertvector(n, vec);
  vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vec p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  ivec bits = (n + 127) << 23;  // 2^n
  return p * (vec)bits;  // a vector cast keeps the bits
}

// A weight's vector loaded into a register, once for the tile's rows. (GCC folds a load
// into each row's FMA instead, one load per row; with 8-float vectors on Zen 3 the load
// ports then set the pace of a tall tile, not the FMA units.)
inline vec load_held(const float* p) {
  vec v = load(p);
  asm("" : "+x"(v));
  return v;
}

// hT[f][r] = silu(x w1 + add1) * (x w3 + add3) for RT rows from r0 and the P columns of
// one panel, VP of its V vectors a pass; add (or null: zeros) is [R, 2F], each row's
// add1 then add3. All of them (VP = V) reads the panel once, as a decode step
// wants. With 8-float vectors, one a pass (VP = 1) fits twice the rows' sums beside the
// weights, held in registers, and keeps a prefill's many rows on the FMA units; its
// second pass reads the panel from L2.
template <int RT, int VP>
void GateUpTile(const float* xT, int64_t R, int64_t r0, int64_t D, const float* panel,
                float* hT, int64_t f0, const float* add, int64_t F) {
  constexpr bool held = VP < V;
  for (int v0 = 0; v0 < V; v0 += VP) {
    vec gate[RT][VP] = {}, up[RT][VP] = {};
    if (add != nullptr)
      for (int r = 0; r < RT; ++r)
        for (int v = 0; v < VP; ++v) {
          const float* row = add + (r0 + r) * 2 * F + f0 + (v0 + v) * W;
          gate[r][v] = load(row);
          up[r][v] = load(row + F);
        }
    for (int64_t d = 0; d < D; ++d) {
      const float* w = panel + d * 2 * P + v0 * W;
      vec w1[VP], w3[VP];
      for (int v = 0; v < VP; ++v) {
        w1[v] = held ? load_held(w + v * W) : load(w + v * W);
        w3[v] = held ? load_held(w + P + v * W) : load(w + P + v * W);
      }
      const float* x = xT + d * R + r0;
      for (int r = 0; r < RT; ++r)
        for (int v = 0; v < VP; ++v) {
          gate[r][v] += x[r] * w1[v];
          up[r][v] += x[r] * w3[v];
        }
    }
    for (int r = 0; r < RT; ++r)
      for (int v = 0; v < VP; ++v) {
        const vec h = gate[r][v] / (1.0f + exp_vec(-gate[r][v])) * up[r][v];
        for (int64_t j = 0; j < W; ++j) hT[(f0 + (v0 + v) * W + j) * R + r0 + r] = h[j];
      }
  }
}

// ys[r0 + r][d0 : d0 + P] = h[r] w2[:, d0 : d0 + P] for RT rows (columns below D).
template <int RT>
void DownTile(const float* hT, int64_t R, int64_t r0, int64_t F, const float* panel,
              float* ys, int64_t D, int64_t d0) {
  vec acc[RT][V] = {};
  for (int64_t f = 0; f < F; ++f) {
    vec w[V];
    for (int v = 0; v < V; ++v) w[v] = load(panel + f * P + v * W);
    const float* h = hT + f * R + r0;
    for (int r = 0; r < RT; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] += h[r] * w[v];
  }
  for (int r = 0; r < RT; ++r)
    for (int v = 0; v < V; ++v)
      store_first(ys + (r0 + r) * D + d0 + v * W, acc[r][v], D - d0 - v * W);
}

// y[r0 + r][n0 : n0 + NP P] = x[r0 + r] w for RT rows and NP panels from n0 (columns
// below N): each weight vector loaded once feeds RT rows, RT x NP x V sums in registers.
template <int RT, int NP>
void DenseTile(const float* xT, int64_t R, int64_t r0, int64_t K, const float* panels,
               float* y, int64_t N, int64_t n0) {
  vec acc[RT][NP][V] = {};
  // The first rows' pass reads the panels from memory: ask for them 4 KB ahead. A last
  // pass after it reads them from L2, and asks for the next panels meanwhile.
  const bool first = r0 == 0, last = r0 > 0 && r0 + RT == R;
  const float* next = panels + NP * K * P;
  for (int64_t k = 0; k < K; ++k) {
    vec w[NP][V];
    for (int p = 0; p < NP; ++p) {
      for (int v = 0; v < V; ++v) w[p][v] = load(panels + (p * K + k) * P + v * W);
      if (first) __builtin_prefetch(panels + (p * K + k + kPrefetch) * P);
      if (last) __builtin_prefetch(next + (p * K + k) * P, 0, 2);
    }
    const float* x = xT + k * R + r0;
    for (int r = 0; r < RT; ++r)
      for (int p = 0; p < NP; ++p)
        for (int v = 0; v < V; ++v) acc[r][p][v] += x[r] * w[p][v];
  }
  for (int r = 0; r < RT; ++r)
    for (int p = 0; p < NP; ++p)
      for (int v = 0; v < V; ++v)
        store_first(y + (r0 + r) * N + n0 + p * P + v * W, acc[r][p][v],
                    N - n0 - p * P - v * W);
}

template <typename Fn, int... I>
constexpr auto Table(std::integer_sequence<int, I...>, Fn make) {
  return std::array{make(std::integral_constant<int, I + 1>{})...};
}

using GateUpFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, float*, int64_t,
                          const float*, int64_t);
using DownFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, float*, int64_t,
                        int64_t);
constexpr auto kGateUp = Table(std::make_integer_sequence<int, kGateUpRows>{},
                               [](auto rt) -> GateUpFn { return GateUpTile<rt(), V>; });
constexpr auto kGateUpSplit = Table(std::make_integer_sequence<int, kGateUpSplitRows>{},
                                    [](auto rt) -> GateUpFn { return GateUpTile<rt(), 1>; });
constexpr auto kDown = Table(std::make_integer_sequence<int, kDownRows>{},
                             [](auto rt) -> DownFn { return DownTile<rt()>; });
using DenseFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, float*, int64_t,
                         int64_t);
template <int NP>
constexpr auto DenseTiles() {
  return Table(std::make_integer_sequence<int, kDenseRows>{},
               [](auto rt) -> DenseFn { return DenseTile<rt(), NP>; });
}
template <int... NP>
constexpr auto DenseTable(std::integer_sequence<int, NP...>) {
  // The element type spelled out: from one element, std::array{...} would copy it.
  return std::array<decltype(DenseTiles<1>()), sizeof...(NP)>{DenseTiles<NP + 1>()...};
}
// kDense[np - 1][rt - 1]: rt rows by np panels, np up to kDensePanels.
constexpr auto kDense = DenseTable(std::make_integer_sequence<int, kDensePanels>{});

// fn(begin, end) over [0, n) in chunks, on the pool's threads and this one.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  struct Work {
    std::atomic<int64_t> next{0}, done{0};
  };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
  const int64_t chunk = std::max<int64_t>(1, (n + 2 * workers - 1) / (2 * workers));
  auto work = std::make_shared<Work>();
  // A task that starts after the work is gone finds `next` >= n and touches nothing else.
  auto run = [work, n, chunk, &fn] {
    for (int64_t b; (b = work->next.fetch_add(chunk)) < n;) {
      const int64_t e = std::min(n, b + chunk);
      fn(b, e);
      work->done.fetch_add(e - b, std::memory_order_release);
    }
  };
  for (int64_t w = 1; w < workers; ++w) pool.Schedule(decltype(run)(run));
  run();
  while (work->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// The factors of a bank of adapters on the experts (see the top of the file).
struct ExpertAdapters {
  const int32_t* ids;  // [n]: each sorted row's adapter, -1 for none
  const float *a1, *b1, *a3, *b3, *a2, *b2;
  int64_t J, R, F;  // F: the factors' own (unpadded) hidden size
};

constexpr int64_t kMaxRank = 1024;  // kernels.MAX_LORA_RANK, for q, k and v side by side

// h[0:R] = x[0:K] A for one row, A [K, R] row-major, R <= kMaxRank: each vector of h
// summed in registers over K, four rows of A at a time (four chains of FMAs in flight).
inline void LowRankIn(const float* x, int64_t K, const float* A, int64_t R, float* h) {
  int64_t r0 = 0;
  for (; r0 + W <= R; r0 += W) {
    vec s0 = {}, s1 = {}, s2 = {}, s3 = {};
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      const float* a = A + k * R + r0;
      s0 += x[k] * load(a);
      s1 += x[k + 1] * load(a + R);
      s2 += x[k + 2] * load(a + 2 * R);
      s3 += x[k + 3] * load(a + 3 * R);
    }
    for (; k < K; ++k) s0 += x[k] * load(A + k * R + r0);
    store(h + r0, (s0 + s1) + (s2 + s3));
  }
  for (; r0 < R; ++r0) {  // a rank that is not a whole number of vectors
    float sum = 0.0f;
    for (int64_t k = 0; k < K; ++k) sum += x[k] * A[k * R + r0];
    h[r0] = sum;
  }
}

// out[0:N] += h[0:R] B for one row, B's rows `ldb` floats apart: a chunk of out stays in
// registers while B's rows stream through it, so out is read and written once.
inline void LowRankOut(const float* h, const float* B, int64_t R, int64_t N, int64_t ldb,
                       float* out) {
  constexpr int C = 8;  // vectors of out per chunk
  int64_t n0 = 0;
  for (; n0 + C * W <= N; n0 += C * W) {
    vec acc[C];
    for (int c = 0; c < C; ++c) acc[c] = load(out + n0 + c * W);
    for (int64_t r = 0; r < R; ++r) {
      const float* b = B + r * ldb + n0;
      for (int c = 0; c < C; ++c) acc[c] += h[r] * load(b + c * W);
    }
    for (int c = 0; c < C; ++c) store(out + n0 + c * W, acc[c]);
  }
  for (; n0 + W <= N; n0 += W) {
    vec acc = load(out + n0);
    for (int64_t r = 0; r < R; ++r) acc += h[r] * load(B + r * ldb + n0);
    store(out + n0, acc);
  }
  for (; n0 < N; ++n0) {
    float acc = out[n0];
    for (int64_t r = 0; r < R; ++r) acc += h[r] * B[r * ldb + n0];
    out[n0] = acc;
  }
}

// out[0:N] += (x[0:K] A) B for one row; A [K, R] and B [R, N] row-major.
inline void AddLowRank(const float* x, int64_t K, const float* A, const float* B, int64_t R,
                       int64_t N, float* out) {
  alignas(64) float h[kMaxRank];
  LowRankIn(x, K, A, R, h);
  LowRankOut(h, B, R, N, N, out);
}

// The rows r of [0, n) with 0 <= key[r] < keys, ordered by key (stably). A LoRA pass
// takes its rows in this order, keyed by the factors they read: rows sharing an
// adapter's factors then run one after another, on one thread, which reads the factors
// from memory once and from its cache after (rows that share factors rarely lie side by
// side in a batch).
std::vector<int32_t> RowsByKey(const int32_t* key, int64_t n, int64_t keys) {
  std::vector<int32_t> first(keys + 1, 0), order;
  for (int64_t r = 0; r < n; ++r)
    if (key[r] >= 0 && key[r] < keys) ++first[key[r] + 1];
  for (int64_t k = 0; k < keys; ++k) first[k + 1] += first[k];
  order.resize(first[keys]);
  for (int64_t r = 0; r < n; ++r)
    if (key[r] >= 0 && key[r] < keys) order[first[key[r]]++] = static_cast<int32_t>(r);
  return order;
}

// The LoRA passes' work (multiply-adds) below which one thread does it: waking the pool
// costs more than one row's adapter takes. Above it two threads read the rows' factors,
// which come from memory (a decode step rarely finds them in cache), faster than one.
constexpr int64_t kParallelLoRAWork = 1 << 14;

// fn(row) for each row of `order`, in that order: on the pool when the rows hold enough
// work (rows x per_row multiply-adds), else on this thread.
template <typename Fn>
void LoRAFor(ffi::ThreadPool& pool, const std::vector<int32_t>& order, int64_t per_row,
             const Fn& fn) {
  const int64_t n = static_cast<int64_t>(order.size());
  const auto rows = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(order[i]);
  };
  if (n * per_row < kParallelLoRAWork) {
    rows(0, n);
  } else {
    ParallelFor(pool, n, rows);
  }
}

ffi::Error RunExperts(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& xs,
                      ffi::Buffer<ffi::S32>& start, ffi::Buffer<ffi::S32>& count,
                      ffi::Buffer<ffi::F32>& w13, ffi::Buffer<ffi::F32>& w2,
                      ffi::ResultBuffer<ffi::F32>& ys, const ExpertAdapters* lora) {
  const auto wd = w13.dimensions(), w2d = w2.dimensions();
  const int64_t n = xs.dimensions()[0], D = xs.dimensions()[1];
  if (wd.size() != 4 || w2d.size() != 4) {
    return ffi::Error::InvalidArgument("cpu_moe: w13 and w2 must be 4-D (packed)");
  }
  const int64_t E = wd[0], F = wd[1] * P, D_panels = (D + P - 1) / P;
  if (wd[2] != D || wd[3] != 2 * P || w2d[0] != E || w2d[1] != D_panels || w2d[2] != F ||
      w2d[3] != P || start.element_count() != E || count.element_count() != E) {
    return ffi::Error::InvalidArgument("cpu_moe: operand shapes do not fit together");
  }
  const float* x = xs.typed_data();
  float* y = ys->typed_data();
  std::fill(y, y + n * D, 0.0f);
  std::vector<float> xT, hT, add, hs;
  std::vector<int32_t> factors_of, order;  // each row's (expert, adapter) e J + j, or -1
  if (lora != nullptr) {
    const int64_t J = lora->J;
    factors_of.assign(n, -1);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = 0; r < count.typed_data()[e]; ++r) {
        const int64_t row = start.typed_data()[e] + r;
        if (row >= 0 && row < n && lora->ids[row] >= 0 && lora->ids[row] < J)
          factors_of[row] = static_cast<int32_t>(e * J + lora->ids[row]);
      }
    order = RowsByKey(factors_of.data(), n, E * J);
    if (order.empty()) lora = nullptr;  // no row applies an adapter: the plain experts' work
  }
  if (lora != nullptr) {
    const int64_t Q = lora->R, Fq = lora->F;
    // Every row's (x A1) B1 and (x A3) B3 first, in one pass over the rows (a pass per
    // expert would wake the thread pool twice as often as the experts' own work does).
    add.assign(n * 2 * F, 0.0f);
    hs.assign(n * Fq, 0.0f);
    LoRAFor(pool, order, 2 * Q * (D + Fq), [&](int64_t r) {
      const int64_t ej = factors_of[r];
      AddLowRank(x + r * D, D, lora->a1 + ej * D * Q, lora->b1 + ej * Q * Fq, Q, Fq,
                 add.data() + r * 2 * F);
      AddLowRank(x + r * D, D, lora->a3 + ej * D * Q, lora->b3 + ej * Q * Fq, Q, Fq,
                 add.data() + r * 2 * F + F);
    });
  }
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r_begin = start.typed_data()[e], R = count.typed_data()[e];
    if (R <= 0) continue;  // an expert no row chose is never read
    if (r_begin < 0 || r_begin + R > n) {
      return ffi::Error::InvalidArgument("cpu_moe: an expert's rows lie outside xs");
    }
    xT.resize(D * R);
    hT.resize(F * R);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t d = 0; d < D; ++d) xT[d * R + r] = x[(r_begin + r) * D + d];
    const float* adds = lora != nullptr ? add.data() + r_begin * 2 * F : nullptr;
    const float* w13_e = w13.typed_data() + e * F * D * 2;
    const float* w2_e = w2.typed_data() + e * F * D_panels * P;
    const bool split = V > 1 && R >= kSplitFrom;
    const int64_t rows = split ? kGateUpSplitRows : kGateUpRows;
    const GateUpFn* tiles = split ? kGateUpSplit.data() : kGateUp.data();
    ParallelFor(pool, F / P, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j)
        for (int64_t r0 = 0; r0 < R; r0 += rows) {
          const int64_t rt = std::min<int64_t>(rows, R - r0);
          tiles[rt - 1](xT.data(), R, r0, D, w13_e + j * D * 2 * P, hT.data(), j * P, adds, F);
        }
    });
    float* y_e = y + r_begin * D;
    ParallelFor(pool, D_panels, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j)
        for (int64_t r0 = 0; r0 < R; r0 += kDownRows) {
          const int64_t rt = std::min<int64_t>(kDownRows, R - r0);
          kDown[rt - 1](hT.data(), R, r0, F, w2_e + j * F * P, y_e, D, j * P);
        }
    });
    if (lora != nullptr)  // the rows' h, for their (h A2) B2
      for (int64_t r = 0; r < R; ++r)
        for (int64_t f = 0; f < lora->F; ++f) hs[(r_begin + r) * lora->F + f] = hT[f * R + r];
  }
  if (lora != nullptr) {  // every row's (h A2) B2, in one pass
    const int64_t Q = lora->R, Fq = lora->F;
    LoRAFor(pool, order, Q * (Fq + D), [&](int64_t r) {
      const int64_t ej = factors_of[r];
      AddLowRank(hs.data() + r * Fq, Fq, lora->a2 + ej * Fq * Q, lora->b2 + ej * Q * D, Q, D,
                 y + r * D);
    });
  }
  return ffi::Error::Success();
}

ffi::Error Experts(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::S32> start,
                   ffi::Buffer<ffi::S32> count, ffi::Buffer<ffi::F32> w13,
                   ffi::Buffer<ffi::F32> w2, ffi::ResultBuffer<ffi::F32> ys) {
  return RunExperts(pool, xs, start, count, w13, w2, ys, nullptr);
}

ffi::Error ExpertsLoRA(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs,
                       ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::S32> count,
                       ffi::Buffer<ffi::F32> w13, ffi::Buffer<ffi::F32> w2,
                       ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::F32> a1,
                       ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> a3,
                       ffi::Buffer<ffi::F32> b3, ffi::Buffer<ffi::F32> a2,
                       ffi::Buffer<ffi::F32> b2, ffi::ResultBuffer<ffi::F32> ys) {
  const auto ad = a1.dimensions(), a2d = a2.dimensions();
  const int64_t n = xs.dimensions()[0], D = xs.dimensions()[1];
  if (ad.size() != 4 || a2d.size() != 4) {
    return ffi::Error::InvalidArgument("cpu_moe: the adapters' factors must be 4-D");
  }
  const int64_t E = ad[0], J = ad[1], R = ad[3], F = a2d[2];
  const auto fits = [&](ffi::Buffer<ffi::F32>& b, std::array<int64_t, 4> shape) {
    const auto d = b.dimensions();
    return d.size() == 4 && d[0] == shape[0] && d[1] == shape[1] && d[2] == shape[2] &&
           d[3] == shape[3];
  };
  if (ids.element_count() != n || ad[2] != D || R > kMaxRank || F > w13.dimensions()[1] * P ||
      !fits(a3, {E, J, D, R}) || !fits(b1, {E, J, R, F}) || !fits(b3, {E, J, R, F}) ||
      !fits(a2, {E, J, F, R}) || !fits(b2, {E, J, R, D})) {
    return ffi::Error::InvalidArgument("cpu_moe: the adapters' shapes do not fit together");
  }
  const ExpertAdapters lora{ids.typed_data(), a1.typed_data(), b1.typed_data(), a3.typed_data(),
                            b3.typed_data(),  a2.typed_data(), b2.typed_data(), J,
                            R,                F};
  return RunExperts(pool, xs, start, count, w13, w2, ys, &lora);
}

// A bank of LoRA adapters on S column segments of y (see the top of the file), each row
// applying its own (BGMV). The rows run in order of their adapters.
ffi::Error LoRARows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::S32> ids,
                    ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                    ffi::Span<const int64_t> columns, ffi::ResultBuffer<ffi::F32> ys) {
  const auto ad = a.dimensions(), bd = b.dimensions();
  const int64_t n = xs.dimensions()[0], K = xs.dimensions()[1], N = ys->dimensions()[1];
  const int64_t S = static_cast<int64_t>(columns.size()) / 2;
  if (ad.size() != 3 || bd.size() != 3 || S < 1 || ad[1] != K || bd[0] != ad[0] ||
      ad[2] != S * bd[1] || ad[2] > kMaxRank || ids.element_count() != n) {
    return ffi::Error::InvalidArgument("cpu_moe: LoRA operand shapes do not fit together");
  }
  const int64_t J = ad[0], R = bd[1], M = bd[2];
  int64_t width = 0;
  for (int64_t s = 0; s < S; ++s) {
    if (columns[2 * s] < 0 || columns[2 * s + 1] > N || columns[2 * s] > columns[2 * s + 1]) {
      return ffi::Error::InvalidArgument("cpu_moe: a LoRA segment lies outside the output");
    }
    width += columns[2 * s + 1] - columns[2 * s];
  }
  if (width != M) {
    return ffi::Error::InvalidArgument("cpu_moe: the LoRA segments' widths are not B's");
  }
  float* y = ys->typed_data();
  std::fill(y, y + n * N, 0.0f);
  const std::vector<int32_t> order = RowsByKey(ids.typed_data(), n, J);
  LoRAFor(pool, order, S * R * K + R * M, [&](int64_t r) {
    const int64_t j = ids.typed_data()[r];
    alignas(64) float h[kMaxRank];
    LowRankIn(xs.typed_data() + r * K, K, a.typed_data() + j * K * S * R, S * R, h);
    const float* b_j = b.typed_data() + j * R * M;
    for (int64_t s = 0, offset = 0; s < S; ++s) {
      const int64_t begin = columns[2 * s], w = columns[2 * s + 1] - begin;
      LowRankOut(h + s * R, b_j + offset, R, w, M, y + r * N + begin);
      offset += w;
    }
  });
  return ffi::Error::Success();
}

// y [n, N] = x [n, K] w, w packed as [ceil(N / P), K, P] (zero padded columns).
ffi::Error Dense(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w,
                 ffi::ResultBuffer<ffi::F32> ys) {
  const auto wd = w.dimensions();
  const int64_t n = xs.dimensions()[0], K = xs.dimensions()[1], N = ys->dimensions()[1];
  if (wd.size() != 3 || wd[1] != K || wd[2] != P || wd[0] != (N + P - 1) / P ||
      ys->dimensions()[0] != n) {
    return ffi::Error::InvalidArgument("cpu_moe: dense operand shapes do not fit together");
  }
  std::vector<float> xT(K * n);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t k = 0; k < K; ++k) xT[k * n + r] = xs.typed_data()[r * K + k];
  const int64_t panels = wd[0], groups = (panels + kDensePanels - 1) / kDensePanels;
  // A group of panels (196 KB for K = 1024 with AVX-512) stays in L2 while every tile
  // of rows reads it.
  ParallelFor(pool, groups, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t j = g * kDensePanels, np = std::min<int64_t>(kDensePanels, panels - j);
      for (int64_t r0 = 0; r0 < n; r0 += kDenseRows) {
        const int64_t rt = std::min<int64_t>(kDenseRows, n - r0);
        kDense[np - 1][rt - 1](xT.data(), n, r0, K, w.typed_data() + j * K * P,
                               ys->typed_data(), N, j * P);
      }
    }
  });
  return ffi::Error::Success();
}

// What a cache holds: float32, or int8 with a float32 scale per key (value) and head.
typedef int8_t bvec __attribute__((vector_size(W), aligned(1), may_alias));

inline vec load_as_float(const float* p) { return load(p); }
inline vec load_as_float(const int8_t* p) {
  return __builtin_convertvector(*reinterpret_cast<const bvec*>(p), vec);
}

// a . b over n elements, in vectors of W with a scalar tail.
template <typename T>
inline float Dot(const float* a, const T* b, int64_t n) {
  vec sum = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) sum += load(a + i) * load_as_float(b + i);
  float total = 0.0f;
  for (int64_t j = 0; j < W; ++j) total += sum[j];
  for (; i < n; ++i) total += a[i] * static_cast<float>(b[i]);
  return total;
}

// A decode step's attention over a paged cache: keys and values are blocks
// [N, K, bs, H], and row b's slot s is slot s % bs of block blocks[b, s / bs]
// (contiguous rows: N = B, bs = S, blocks[b] = {b}). int8 keys and values come with
// their scales [N, K, bs] (nullptr for float32).
template <typename T>
ffi::Error AttendOver(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& q, const T* keys,
                      const T* values, const float* key_scales, const float* value_scales,
                      ffi::Span<const int64_t> kd, ffi::Span<const int64_t> vd,
                      ffi::Buffer<ffi::S32>& blocks, ffi::Buffer<ffi::S32>& key_positions,
                      ffi::Buffer<ffi::S32>& query_positions, int64_t window,
                      ffi::ResultBuffer<ffi::F32>& out) {
  const auto qd = q.dimensions(), td = blocks.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || td.size() != 2) {
    return ffi::Error::InvalidArgument("cpu_moe: attention operands must be 4-D, blocks 2-D");
  }
  const int64_t B = qd[0], K = qd[1], G = qd[2], H = qd[3];
  const int64_t N = kd[0], bs = kd[2], M = td[1], S = M * bs;
  // Q queries a row (a speculative step's draft): heads [q G/Q, (q+1) G/Q) are query q's.
  const int64_t Q = B > 0 ? query_positions.element_count() / B : 1;
  if (kd[1] != K || kd[3] != H || vd[0] != N || vd[1] != K || vd[2] != bs || vd[3] != H ||
      td[0] != B || key_positions.element_count() != B * S || Q < 1 ||
      query_positions.element_count() != B * Q || G % Q != 0) {
    return ffi::Error::InvalidArgument("cpu_moe: attention operand shapes do not fit together");
  }
  const int64_t heads_per_query = G / Q;
  ParallelFor(pool, B * K, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> seen;  // where the keys seen are, in elements from the pool's start
    std::vector<int32_t> seen_at;  // and their positions
    std::vector<float> scores;
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / K, head = bk % K;
      const int32_t* tq = query_positions.typed_data() + b * Q;
      const int32_t last = *std::max_element(tq, tq + Q), first = *std::min_element(tq, tq + Q);
      const int32_t* kp = key_positions.typed_data() + b * S;
      const int32_t* table = blocks.typed_data() + b * M;
      seen.clear();
      seen_at.clear();
      // The keys some query sees, each read once for all of them.
      for (int64_t s = 0; s < S; ++s) {
        const int32_t p = kp[s], block = table[s / bs];
        if (p >= 0 && p <= last && (window <= 0 || first - p < window) && block >= 0 &&
            block < N) {
          seen.push_back(((block * K + head) * bs + s % bs) * H);
          seen_at.push_back(p);
        }
      }
      const int64_t n = seen.size();
      float* o = out->typed_data() + bk * G * H;
      std::fill(o, o + G * H, 0.0f);
      if (n == 0) continue;  // an idle row: its output is never used
      scores.resize(G * n);
      for (int64_t i = 0; i < n; ++i) {
        const float scale = key_scales ? key_scales[seen[i] / H] : 1.0f;
        for (int64_t g = 0; g < G; ++g) {
          const int32_t t = tq[g / heads_per_query], p = seen_at[i];
          const bool sees = p <= t && (window <= 0 || t - p < window);
          scores[g * n + i] =
              sees ? scale * Dot(q.typed_data() + (bk * G + g) * H, keys + seen[i], H)
                   : -std::numeric_limits<float>::infinity();
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* w = scores.data() + g * n;
        const float top = *std::max_element(w, w + n);
        if (top == -std::numeric_limits<float>::infinity()) continue;  // sees nothing
        float total = 0.0f;
        for (int64_t i = 0; i < n; ++i) total += (w[i] = std::exp(w[i] - top));
        float* og = o + g * H;
        for (int64_t i = 0; i < n; ++i) {
          const float weight = w[i] / total * (value_scales ? value_scales[seen[i] / H] : 1.0f);
          const T* vi = values + seen[i];
          for (int64_t h = 0; h < H; ++h) og[h] += weight * static_cast<float>(vi[h]);
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                  ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> blocks,
                  ffi::Buffer<ffi::S32> key_positions, ffi::Buffer<ffi::S32> query_positions,
                  int64_t window, ffi::ResultBuffer<ffi::F32> out) {
  return AttendOver(pool, q, keys.typed_data(), values.typed_data(), nullptr, nullptr,
                    keys.dimensions(), values.dimensions(), blocks, key_positions,
                    query_positions, window, out);
}

ffi::Error AttendInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S8> keys,
                      ffi::Buffer<ffi::S8> values, ffi::Buffer<ffi::F32> key_scales,
                      ffi::Buffer<ffi::F32> value_scales, ffi::Buffer<ffi::S32> blocks,
                      ffi::Buffer<ffi::S32> key_positions,
                      ffi::Buffer<ffi::S32> query_positions, int64_t window,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto kd = keys.dimensions();
  if (key_scales.element_count() * kd.back() != keys.element_count() ||
      value_scales.element_count() * kd.back() != values.element_count()) {
    return ffi::Error::InvalidArgument("cpu_moe: attention operand shapes do not fit together");
  }
  return AttendOver(pool, q, keys.typed_data(), values.typed_data(), key_scales.typed_data(),
                    value_scales.typed_data(), kd, values.dimensions(), blocks, key_positions,
                    query_positions, window, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MixtralCpuMoE, Experts,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MixtralCpuMoELoRA, ExpertsLoRA,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::S32>>()  // start
                                  .Arg<ffi::Buffer<ffi::S32>>()  // count
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w13
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w2
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a3
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b3
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b2
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MixtralCpuLoRARows, LoRARows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Attr<ffi::Span<const int64_t>>("columns")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MixtralCpuDense, Dense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MixtralCpuAttend, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MixtralCpuAttendInt8, AttendInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
