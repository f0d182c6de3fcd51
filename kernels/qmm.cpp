// The CPU kernels behind mixtral_kernels.qmm. One weight row at a time: its integers are widened in
// registers and dotted with every row of x in a tile (prefill reads each weight once per tile, not
// once per row), the outputs split over a small pool of threads inside the op.
#include "qmm.h"
#include "dot.h"
#include "pool.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "mlx/backend/cpu/encoder.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mixtral_kernels {

void set_threads(int n) {
  Pool::get().size = std::max(1, n);
}

int threads() {
  return Pool::get().size;
}

std::string simd() {
  return simd_name();
}

// --------------------------------------------------------------------------- the whole product

struct Problem {
  const float* x; // (rows, K)
  const uint8_t* w; // (experts, N, K * bits / 8)
  const void* scales; // (experts, N, K / G): float32, float16 or bfloat16, as stored
  const void* biases;
  const uint32_t* expert; // one per batch element
  float* out; // (rows, N)
  int64_t batches, rows_per_batch, N, K;
  int G, bits;
  Path path;
  mx::Dtype scale_type; // of scales and biases
};

// Memory on 64-byte lines: a 32-byte load of x that straddles two lines costs two loads, and the tile
// kernels load x once for every multiply (with malloc's 16-byte alignment half of them straddle: the
// 4-row kernel 18% slower). Elements are left uninitialized (construct): every one is written before it
// is read, and zeroing them first was a memset of each product's x (a quarter of a megabyte for w2's).
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) {
    if (void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64))
      return static_cast<T*>(p);
    throw std::bad_alloc();
  }
  void deallocate(T* p, size_t) {
    std::free(p);
  }
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  bool operator==(const LineAligned&) const {
    return true;
  }
};
template <typename T>
using Buffer = std::vector<T, LineAligned<T>>;

// x's per-group sums (the biases' term), and for the int16 path x rounded to int16 with one scale per
// weight group, max|x| / 32767 (to nearest, ties to even: |error| <= scale / 2). Each row of xq starts a
// line (K is a multiple of 32: a row is whole lines).
struct Prepared {
  Buffer<float> xsum, xs;
  Buffer<int16_t> xq;
};

static Prepared allocate(const Problem& p) {
  int64_t rows = p.batches * p.rows_per_batch;
  Prepared q;
  q.xsum.resize(rows * (p.K / p.G));
  if (p.path == Path::int16) {
    q.xq.resize(rows * p.K);
    q.xs.resize(rows * (p.K / p.G));
  }
  return q;
}

// The sum and the largest |x| of each of the G values of `groups` groups from x on: each sum adds its
// group's values in order (its bits are the definition's).
static void group_sums(const float* x, int64_t groups, int G, float* sum, float* top) {
  int64_t g = 0;
#ifdef __AVX2__
  // Eight groups side by side, a lane each: 8 values of each group loaded and transposed in registers,
  // then added lane by lane in order. Alone, a group's sum was one chain of dependent adds (3 cycles
  // each), and preparing x 1.8% of a step of 16 sequences decoding together. A product of 8 outputs,
  // mostly this preparing (one thread, 32 rows of 3584 or 512 of 1024), 1.4-2.1x faster; that step 0.98x
  // the time (median of 24 alternating blocks of steps in one process). The same bits.
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (; g + 8 <= groups; g += 8) {
    __m256 s = _mm256_setzero_ps(), t = _mm256_setzero_ps();
    for (int k = 0; k < G; k += 8) {
      __m256 r[8], u[8], v[8];
      for (int j = 0; j < 8; ++j)
        r[j] = _mm256_loadu_ps(x + (g + j) * G + k);
      for (int j = 0; j < 8; j += 2)
        u[j] = _mm256_unpacklo_ps(r[j], r[j + 1]), u[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
      for (int j = 0; j < 8; j += 4)
        for (int h = 0; h < 2; ++h) { // v[j + m], m < 4: element m (low half) and m + 4 (high) of rows j to j + 3
          v[j + 2 * h] = _mm256_shuffle_ps(u[j + h], u[j + h + 2], 0x44);
          v[j + 2 * h + 1] = _mm256_shuffle_ps(u[j + h], u[j + h + 2], 0xEE);
        }
      for (int m = 0; m < 4; ++m) { // r[m] and r[m + 4]: element k + m and k + m + 4 of each group
        r[m] = _mm256_permute2f128_ps(v[m], v[m + 4], 0x20);
        r[m + 4] = _mm256_permute2f128_ps(v[m], v[m + 4], 0x31);
      }
      for (int m = 0; m < 8; ++m) {
        s = _mm256_add_ps(s, r[m]);
        t = _mm256_max_ps(_mm256_and_ps(r[m], magnitude), t); // as std::max(t, |x|), NaN too
      }
    }
    _mm256_storeu_ps(sum + g, s);
    _mm256_storeu_ps(top + g, t);
  }
#endif
  for (; g < groups; ++g) {
    float s = 0, t = 0;
    for (int k = 0; k < G; ++k) {
      s += x[g * G + k];
      t = std::max(t, std::fabs(x[g * G + k]));
    }
    sum[g] = s, top[g] = t;
  }
}

static void prepare(const Problem& p, Prepared& q, int64_t r0, int64_t r1) {
  const int64_t groups = p.K / p.G;
  std::vector<float> top(groups);
  for (int64_t r = r0; r < r1; ++r) {
    group_sums(p.x + r * p.K, groups, p.G, q.xsum.data() + r * groups, top.data());
    if (p.path != Path::int16)
      continue;
    for (int64_t g = 0; g < groups; ++g) {
      const float* x = p.x + r * p.K + g * p.G;
      const float inverse = top[g] > 0 ? 32767.0f / top[g] : 0.0f;
      q.xs[r * groups + g] = top[g] / 32767.0f;
      for (int k = 0; k < p.G; ++k)
        q.xq[r * p.K + g * p.G + k] = int16_t(std::nearbyint(x[k] * inverse));
    }
  }
}

// How many weight rows ahead of the one being computed to ask for, where the dot product does not ask
// ahead itself (dot.h's kAheadBytes: the int16 path on x86): the row about 4 KB on. The hardware's
// prefetcher stops at each 4 KB page, so short rows gain from one page asked for in advance (Mixtral's
// 4 KB rows: 22 -> 24-26 GB/s a projection); rows longer than a page (w2's 14 KB) read faster without
// (a whole row asked for at once: 16 against 19 GB/s).
static int64_t rows_ahead(const Problem& p, int64_t row_bytes) {
#ifdef MK_DOTS
  if (p.path == Path::int16)
    return 0;
#endif
  return row_bytes <= 4096 ? 4096 / row_bytes : 0;
}

// n scales (or biases) as float32: float32 ones in place, float16 and bfloat16 ones widened into `to`
// (exactly: each is a float). A checkpoint's scales are stored in half precision (convert.py), and read
// so they are 1/16 of an 8-bit weight's bytes, not 1/8.
template <typename S>
static const float* widened(const S* from, int64_t n, float* to) {
  if constexpr (std::is_same_v<S, float>) {
    return from;
  } else {
    int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128((const __m128i*)(from + i));
      _mm256_storeu_ps(to + i, std::is_same_v<S, mx::float16_t>
                           ? _mm256_cvtph_ps(h)
                           : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
#endif
    for (; i < n; ++i)
      to[i] = static_cast<float>(from[i]);
    return to;
  }
}

// Ask memory for weight row wr (counting every expert's rows), its scales and biases, into the caches
// __builtin_prefetch's LOCALITY names (3: L1 and out; 1: L2 and out).
template <int LOCALITY, typename S>
static void ask_row(const Problem& p, const S* scales, const S* biases, int64_t wr, int64_t row_bytes) {
  const int64_t groups = p.K / p.G;
  for (int64_t i = 0; i < row_bytes; i += 64)
    __builtin_prefetch(p.w + wr * row_bytes + i, 0, LOCALITY);
  for (int64_t i = 0; i < groups * int64_t(sizeof(S)); i += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(scales + wr * groups) + i, 0, LOCALITY);
    __builtin_prefetch(reinterpret_cast<const char*>(biases + wr * groups) + i, 0, LOCALITY);
  }
}

#ifdef MK_DOTS
// How many of the tile's `left` rows of x the next pass takes. With the two-weight-row kernel (x86) up to 6,
// the passes as even as can be (7 rows: 4 and 3; 16: 6, 5 and 5). A pass of 5 or 6 rows costs per row what
// one of 4 does (one thread, weights in L2: 45-47 billion multiply-adds a second each), where the 1 to 3 rows
// left after passes of 4 cost up to 1.6x as much per row: an expert's 5 rows took a pass of 4 and one of 1.
// Sequences decoding together, A/B in one process (alternating blocks of 15 steps, 2 threads): 16 of them
// 0.89-0.93x the time a step (random and the bench's prompts), 32 0.91x, 8 0.95x; a 512-token prefill
// 0.96x; one stream alike. On AVX-512 (AMD EPYC Zen 4, 2 threads, an expert's w1 at Mixtral's sizes from
// memory) passes of 4, 5 and 6 rows 1.3-1.4x faster than one weight row at a time (4 at most). Elsewhere 4.
static int64_t pass_rows(int64_t left) {
#ifdef MK_DOTS_ROWS
  const int64_t passes = (left + 5) / 6;
  return (left + passes - 1) / passes;
#else
  return std::min<int64_t>(4, left);
#endif
}

// f(the rows of a pass as a constant), for 1 to pass_rows' most.
template <class F>
static void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
#ifdef MK_DOTS_ROWS
    case 5:
      return f(std::integral_constant<int, 5>{});
    case 6:
      return f(std::integral_constant<int, 6>{});
#endif
    default:
      return f(std::integral_constant<int, 4>{});
  }
}
#endif

template <int BITS, int G, typename S>
static void compute(const Problem& p, const Prepared& q, int64_t n0, int64_t n1) {
  const int64_t row_bytes = p.K * BITS / 8, groups = p.K / p.G;
  const S *scales = static_cast<const S*>(p.scales), *biases = static_cast<const S*>(p.biases);
  // Cache blocking, as a GEMM's: a tile of x rows (up to 64, in L2) against a block of weight rows
  // (about 128 KB, in L2), the x rows 4 at a time (in L1) against each weight row of the block in
  // turn: every widened weight vector serves 4 rows of x, and x is read from L1, not L2 (a weight row
  // re-read from L2 per 4 rows of x, where reading each x row from L2 for every weight row was the
  // bound: a 512-token prefill's projections 49-55 -> 77-81 billion multiply-adds per second).
  const int64_t x_bytes = p.path == Path::int16 ? 2 : 4;
  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(64, (256 << 10) / (p.K * x_bytes)));
  const int64_t block = std::max<int64_t>(8, (128 << 10) / row_bytes), ahead = rows_ahead(p, row_bytes);
  // The scales' type as dot.h reads them in registers (on x86 with F16C: every AVX2 machine).
  using Stored = std::conditional_t<std::is_same_v<S, mx::float16_t>, Half,
                                    std::conditional_t<std::is_same_v<S, mx::bfloat16_t>, BHalf, float>>;
  static_assert(sizeof(Stored) == sizeof(S) && alignof(Stored) <= alignof(S));
#if defined(MK_DOTS) && defined(__F16C__)
  constexpr bool in_registers = true;
#else
  constexpr bool in_registers = false;
#endif
  // With F16C (every AVX2 machine) every pass reads the weight rows' scales and biases as stored and
  // widens them in registers. Widened once for the block into a float32 buffer (as tiles of more than
  // 4 rows had them), a second pass over them cost more than it shared: a 512-token prefill 1.19x faster
  // in place (bench checkpoint; 1.14x at Mixtral's sizes), 16 sequences decoding together 1.07x (each
  // A/B in one process, alternating rounds; one-row decode was in place already: the buffer had cost it
  // 4-8%). The same floats either way, and the same passes: the same bits.
  const bool in_place = in_registers && p.path == Path::int16;
  // Elsewhere (the exact path, arm64) a block's scales and biases as float32, widened once for all the
  // passes of x rows over it (widened per row and pass in scalar code, they were 3-5% of a prefill).
  std::vector<float> widened_block(std::is_same_v<S, float> || in_place ? 0 : 2 * block * groups);
  for (int64_t b0 = 0; b0 < p.batches;) {
    int64_t b1 = b0 + 1; // a run of batch elements with the same expert: one weight read
    while (b1 < p.batches && p.expert[b1] == p.expert[b0])
      ++b1;
    const int64_t e = p.expert[b0], r_begin = b0 * p.rows_per_batch, r_end = b1 * p.rows_per_batch;
    auto read_ahead = [&](int64_t n) { // ask for weight row n now: memory works while this one computes
      ask_row<3>(p, scales, biases, e * p.N + n, row_bytes);
    };
    for (int64_t t0 = r_begin; t0 < r_end; t0 += tile) {
      const int64_t t1 = std::min(r_end, t0 + tile);
      for (int64_t nb = n0; nb < n1; nb += block) {
        const int64_t nb1 = std::min(n1, nb + block), first = (e * p.N + nb) * groups, count = (nb1 - nb) * groups;
        const float* block_scales = in_place ? nullptr : widened(scales + first, count, widened_block.data());
        const float* block_biases =
            in_place ? nullptr : widened(biases + first, count, widened_block.data() + block * groups);
        auto row = [&](int64_t n) { // weight row n of expert e, its scales and biases as float32
          return Row{p.w + (e * p.N + n) * row_bytes, block_scales + (n - nb) * groups, block_biases + (n - nb) * groups};
        };
        auto stored_row = [&](int64_t n) { // the same, its scales and biases as stored
          const int64_t wr = e * p.N + n;
          return RowOf<Stored>{p.w + wr * row_bytes, reinterpret_cast<const Stored*>(scales + wr * groups),
                               reinterpret_cast<const Stored*>(biases + wr * groups)};
        };
        int64_t r = t0;
#ifdef MK_DOTS
        // The block the next first pass reads: this expert's next, else the next tile's or the next expert's first. A
        // pass over weights already in L2 (the second, at `second`) asks memory for it meanwhile, row for row, into L2
        // (prefetcht2: in L1 it would push out x), so that the next first pass finds it there. Otherwise memory idled
        // through the passes over L2 and the compute waited on memory in the first. With 2 threads: 16 rows against the
        // bench checkpoint's output projection (32000 x 1024) 0.90x the time (median of 5 alternating runs of separate
        // builds); an expert's 5 and 8 rows, weights from memory, 0.91x and 0.83x; a step of 16 sequences decoding
        // together 0.965x and 0.978x (median of 18 alternating pairs, geometric mean of 16 more). An expert's 6 rows or
        // fewer have one pass only: nothing to hide it under.
        int64_t we = e, wn0 = nb1, wn1 = std::min(n1, nb1 + block);
        if (nb1 >= n1) {
          we = t0 + tile < r_end ? e : b1 < p.batches ? p.expert[b1] : -1;
          wn0 = n0, wn1 = std::min(n1, n0 + block);
        }
        const int64_t second = t0 + pass_rows(t1 - t0); // where the second pass starts, if there is one
        auto warm = [&](int64_t n, int64_t pass) {
          const int64_t m = wn0 + (n - nb);
          if (we < 0 || pass != second || m >= wn1)
            return;
          ask_row<1>(p, scales, biases, we * p.N + m, row_bytes);
        };
#endif
        auto each_row = [&](auto&& f) { // f(n) for the block's weight rows, the first time reading ahead
          for (int64_t n = nb; n < nb1; ++n) {
            if (r == t0 && ahead && n + ahead < n1)
              read_ahead(n + ahead);
            f(n);
          }
        };
#ifdef MK_DOTS
        // The tile's rows of x in passes (pass_rows) against each weight row of the block; the first pass reads the
        // block from memory (and asks ahead), the others find it in L2.
        auto passes = [&](auto row_of) {
          auto pass = [&](auto rows) {
            const int16_t* xq = q.xq.data() + r * p.K;
            const float *xs = q.xs.data() + r * groups, *xsum = q.xsum.data() + r * groups;
            int64_t n = nb;
#ifdef MK_DOTS_ROWS
            // Two weight rows at a time: each load of x serves both (for 1 or 2 rows of x one at a time measured
            // faster, weights in L2: 1.2x and 1.05x the multiply-adds a second; for 3 rows 0.88-0.93x).
            if constexpr (rows() >= 3)
              for (; n + 2 <= nb1; n += 2) {
                warm(n, r), warm(n + 1, r);
                dots_int16_rows<BITS, 2, rows(), G>(row_of(n), xq, xs, xsum, p.K, p.out + r * p.N + n, p.N, r == t0);
              }
#endif
            for (; n < nb1; ++n) {
              warm(n, r);
              dots_int16<BITS, rows(), G>(row_of(n), xq, xs, xsum, p.K, p.out + r * p.N + n, p.N, r == t0);
            }
          };
          for (int64_t rows; p.path == Path::int16 && r < t1; r += rows)
            with_rows(rows = pass_rows(t1 - r), pass);
        };
        if constexpr (in_registers) {
          if (in_place)
            passes(stored_row);
        }
        if (!in_place)
          passes(row);
#endif
        for (; r < t1; ++r)
          each_row([&](int64_t n) {
            p.out[r * p.N + n] = p.path == Path::int16
                ? dot_int16<BITS>(row(n), q.xq.data() + r * p.K, q.xs.data() + r * groups, q.xsum.data() + r * groups,
                                  p.K, G)
                : dot_exact<BITS>(row(n), p.x + r * p.K, q.xsum.data() + r * groups, p.K, G);
          });
      }
    }
    b0 = b1;
  }
}

static void run(const Problem& p) {
  Prepared q = allocate(p);
  const int64_t rows = p.batches * p.rows_per_batch;
  const int m = std::max<int64_t>(1, std::min<int64_t>(Pool::get().size, rows / 16)); // many rows: threads
  Pool::get().run(m, [&](int t) { prepare(p, q, rows * t / m, rows * (t + 1) / m); });
  // Outputs cut into pieces of whole multiples of 8 rows (no two threads share a cache line of a one-row
  // output), each taken by whichever thread is free. Cut once into equal halves, a thread the OS paused
  // (for Python building the next step, or a neighbour on a shared machine) left the other spinning
  // until it came back: 20% of a decode step's samples were that wait. About 4 pieces a thread, and 16
  // where each weight read serves 8 to 64 rows (a step of many sequences decoding together: the dense
  // projections): the first thread done waits half a piece on average, and a step of 16 sequences went
  // from 1.7% to 1.0% of its samples in that wait, 0.965x the time (geometric mean of 16 alternating pairs of
  // separate builds). Not for a stream's one row, which streams its weights and which shorter pieces
  // restart more often (16 a thread: 9% slower), nor a prefill's many rows (alike: 1.02x the time).
  const int n = std::max<int64_t>(1, std::min<int64_t>(Pool::get().size, p.N / 8));
  int64_t reads = 1; // of a weight matrix: one per run of batch elements with the same expert
  for (int64_t b = 1; b < p.batches; ++b)
    reads += p.expert[b] != p.expert[b - 1];
  const int64_t each = rows >= 8 * reads && rows <= 64 * reads ? 16 : 4;
  const int64_t piece = std::max<int64_t>(8, (p.N + each * n - 1) / (each * n) + 7) / 8 * 8;
  const int64_t pieces = (p.N + piece - 1) / piece;
  std::atomic<int64_t> next{0};
  Pool::get().run(n, [&](int) {
    with_group(p.G, [&](auto g) {
      auto as = [&](auto s) { // the scales' type
        using S = decltype(s);
        for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < pieces;) {
          const int64_t n0 = i * piece, n1 = std::min(p.N, n0 + piece);
          p.bits == 8 ? compute<8, g(), S>(p, q, n0, n1) : compute<4, g(), S>(p, q, n0, n1);
        }
      };
      p.scale_type == mx::float16 ? as(mx::float16_t{}) : p.scale_type == mx::bfloat16 ? as(mx::bfloat16_t{}) : as(0.0f);
    });
  });
}

// --------------------------------------------------------------------------- the op

static void require(bool ok, const std::string& what) {
  if (!ok)
    throw std::invalid_argument("[mixtral_kernels.qmm] " + what);
}

mx::array qmm(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    const std::optional<mx::array>& indices,
    int group_size,
    int bits,
    Path path,
    mx::StreamOrDevice s) {
  require(bits == 4 || bits == 8, "bits must be 4 or 8");
  require(group_size == 32 || group_size == 64 || group_size == 128, "group_size must be 32, 64 or 128");
  const auto stored_as = scales.dtype();
  require(x.dtype() == mx::float32, "x must be float32");
  require((stored_as == mx::float32 || stored_as == mx::float16 || stored_as == mx::bfloat16) &&
              biases.dtype() == stored_as,
          "scales and biases must be float32, float16 or bfloat16, both the same");
  require(w.dtype() == mx::uint32 && x.ndim() >= 2, "w must be uint32 and x at least 2-D");
  const int K = x.shape(-1), N = w.shape(-2);
  int M = x.shape(-2);
  require(int64_t(w.shape(-1)) * 32 / bits == K, "x's last axis must match w's packed inputs");
  require(scales.shape(-1) * group_size == K && scales.shape(-2) == N && biases.shape() == scales.shape(),
          "scales and biases must have one value per group of each weight row");
  auto stream = mx::to_stream(s);
  mx::Shape batch(x.shape().begin(), x.shape().end() - 2);
  if (indices) {
    require(w.ndim() == 3 && scales.ndim() == 3, "with indices, w must be stacked experts (E, N, K)");
    batch = mx::broadcast_shapes(batch, indices->shape());
  } else {
    require(w.ndim() == 2 && scales.ndim() == 2, "without indices, w must be one matrix (N, K)");
  }
  // No op in the graph but ours (a decode step runs about 30 of them, and every op MLX dispatches costs
  // microseconds): x and the indices are read as they are, views and broadcasts included; the
  // weights, already loaded, are used in place when they are contiguous (else copied once here).
  auto stored = [&](const mx::array& a) {
    return a.is_available() && a.flags().row_contiguous ? a : mx::contiguous(a, false, stream);
  };
  std::vector<mx::array> inputs = {x, stored(w), stored(scales), stored(biases)};
  if (indices)
    inputs.push_back(indices->dtype() == mx::uint32 ? *indices : mx::astype(*indices, mx::uint32, stream));
  mx::Shape out_shape = batch;
  out_shape.insert(out_shape.end(), {M, N});
  if (!indices) { // one matrix: every row of x is a row of the product
    batch = {};
    M = int(x.size() / K);
  }
  return mx::array(
      out_shape, mx::float32, std::make_shared<QuantizedMatmul>(stream, batch, M, group_size, bits, path), inputs);
}

// The offset of batch element i's entry in an array of `shape` and `strides` whose leading axes
// broadcast against `batch` (right-aligned); `skip` trailing axes are not batch axes.
static int64_t batch_offset(int64_t i, const mx::Shape& batch, const mx::Shape& shape, const mx::Strides& strides,
                            int skip) {
  int64_t offset = 0;
  for (int d = int(batch.size()) - 1, a = int(shape.size()) - skip - 1; d >= 0; --d, --a) {
    const int64_t m = i % batch[d];
    i /= batch[d];
    if (a >= 0 && shape[a] != 1)
      offset += m * strides[a];
  }
  return offset;
}

// A view's elements in row-major order (x as an op before us left it: transposed, sliced).
static std::vector<float> row_major(const mx::array& a) {
  std::vector<float> out(a.size());
  const float* src = a.data<float>();
  std::vector<int64_t> index(a.ndim(), 0);
  for (size_t i = 0; i < out.size(); ++i) {
    int64_t offset = 0;
    for (int d = 0; d < a.ndim(); ++d)
      offset += index[d] * a.strides()[d];
    out[i] = src[offset];
    for (int d = a.ndim() - 1; d >= 0 && ++index[d] == a.shape(d); --d)
      index[d] = 0;
  }
  return out;
}

void QuantizedMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs)
    encoder.set_input_array(a);
  encoder.set_output_array(out);
  const auto& x = inputs[0];
  const int64_t K = x.shape(-1), N = inputs[1].shape(-2);
  int64_t batches = 1;
  for (auto b : batch_)
    batches *= b;
  Problem p{
      nullptr,
      reinterpret_cast<const uint8_t*>(inputs[1].data<uint32_t>()),
      inputs[2].data<void>(),
      inputs[3].data<void>(),
      nullptr,
      out.data<float>(),
      batches,
      rows_,
      N,
      K,
      group_size_,
      bits_,
      path_,
      inputs[2].dtype()};
  encoder.dispatch([p, batch = batch_, keep = inputs, out = mx::array::unsafe_weak_copy(out)]() mutable {
    const auto& x = keep[0];
    std::vector<float> copy, rows;
    const float* xd = x.data<float>();
    mx::Strides strides = x.strides();
    if (!x.flags().row_contiguous) {
      copy = row_major(x);
      xd = copy.data();
      for (int d = x.ndim() - 1, step = 1; d >= 0; step *= x.shape(d), --d)
        strides[d] = step;
    }
    // The rows each batch element multiplies, one after another: x itself when it is laid out so, else
    // gathered (x broadcast over the experts: decode's few rows).
    if (keep.size() == 4 || int64_t(x.size()) == p.batches * p.rows_per_batch * p.K) {
      p.x = xd;
    } else {
      rows.resize(p.batches * p.rows_per_batch * p.K);
      for (int64_t i = 0; i < p.batches; ++i) {
        const float* xi = xd + batch_offset(i, batch, x.shape(), strides, 2);
        std::copy(xi, xi + p.rows_per_batch * p.K, rows.data() + i * p.rows_per_batch * p.K);
      }
      p.x = rows.data();
    }
    std::vector<uint32_t> experts(p.batches, 0);
    if (keep.size() > 4) {
      const uint32_t* idx = keep[4].data<uint32_t>();
      for (int64_t i = 0; i < p.batches; ++i)
        experts[i] = idx[batch_offset(i, batch, keep[4].shape(), keep[4].strides(), 0)];
    }
    p.expert = experts.data();
    run(p);
  });
}

void QuantizedMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mixtral_kernels.qmm] runs on the CPU only; use mx.quantized_matmul on a GPU");
}

bool QuantizedMatmul::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const QuantizedMatmul&>(other);
  return batch_ == o.batch_ && rows_ == o.rows_ && group_size_ == o.group_size_ && bits_ == o.bits_ &&
      path_ == o.path_;
}

} // namespace mixtral_kernels
