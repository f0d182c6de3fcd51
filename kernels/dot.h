// One weight row dotted with one row of x (and, on AVX-512, with 2 or 4 rows at once): the inner
// loops of qmm.cpp, for each instruction set the compiler targets (-march=native: the build machine's).
// Plain C++ with no MLX in it, so that tests/test_kernels.py can build it alone, for arm64 too
// (check_dot.cpp, run under qemu), and check each against the scalar loops and a double reference.
//
// A weight row is MLX's affine layout: K integers packed from the low bits up (8 or 4 bits each), one
// scale and one bias per group of G along K; its value is scale * q + bias. So per group:
//   exact: scale * (x . q) + bias * sum(x), float32 products and sums;
//   int16: x rounded to int16 with one scale xs per group, so (xq . q) is exact in integers:
//          scale * xs * (xq . q) + bias * sum(x).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MK_AVX2 1
#endif
#if defined(MK_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MK_AVX512 1
#endif
#ifdef MK_AVX2
#define MK_DOTS 1 // dots_int16: one weight row with R rows of x (x86)
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define MK_NEON 1
#endif

namespace mixtral_kernels {

inline std::string simd_name() {
#if defined(MK_AVX512) && defined(__AVX512VNNI__)
  return "avx512-vnni";
#elif defined(MK_AVX512)
  return "avx512";
#elif defined(MK_AVX2)
  return "avx2";
#elif defined(MK_NEON)
  return "neon";
#else
  return "scalar";
#endif
}

// Scales and biases in half precision, as a checkpoint stores them (qmm.cpp passes MLX's float16_t and
// bfloat16_t as these): the x86 dot products widen them in registers, exactly.
struct Half {
  uint16_t bits;
};
struct BHalf {
  uint16_t bits;
};

template <typename S = float>
struct RowOf {
  const uint8_t* w; // the packed weight row
  const S* scales; // its groups' scales and biases
  const S* biases;
};
using Row = RowOf<float>;

// The integer at position k of a packed weight row.
inline int q_at(const uint8_t* w, int64_t k, int bits) {
  return bits == 8 ? w[k] : (w[k >> 1] >> ((k & 1) * 4)) & 0xF;
}

// --------------------------------------------------------------------------- scalar: the definition

template <int BITS>
float dot_exact_scalar(const Row& r, const float* x, const float* xsum, int64_t K, int G) {
  float total = 0;
  for (int64_t g = 0; g < K / G; ++g) {
    float acc = 0;
    for (int64_t k = g * G; k < (g + 1) * G; ++k)
      acc += x[k] * q_at(r.w, k, BITS);
    total += r.scales[g] * acc + r.biases[g] * xsum[g];
  }
  return total;
}

template <int BITS>
float dot_int16_scalar(const Row& r, const int16_t* xq, const float* xs, const float* xsum, int64_t K, int G) {
  float total = 0;
  for (int64_t g = 0; g < K / G; ++g) {
    int32_t i = 0;
    for (int64_t k = g * G; k < (g + 1) * G; ++k)
      i += int32_t(xq[k]) * q_at(r.w, k, BITS);
    total += r.scales[g] * xs[g] * float(i) + r.biases[g] * xsum[g];
  }
  return total;
}

// --------------------------------------------------------------------------- x86: AVX2, AVX-512

#ifdef MK_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 weights from position k on, as floats.
template <int BITS>
inline __m256 widen8(const uint8_t* w, int64_t k) {
  if constexpr (BITS == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(w + k))));
  } else {
    uint32_t word;
    std::memcpy(&word, w + k / 2, 4);
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), _mm256_set1_epi32(0xF));
    return _mm256_cvtepi32_ps(q);
  }
}

// A scale (or bias) as float32, exactly.
inline float to_float(float v) {
  return v;
}
#ifdef __F16C__
inline float to_float(Half v) {
  return _cvtsh_ss(v.bits);
}
#endif
inline float to_float(BHalf v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// 8 scales (or biases) as float32, the first m of them (the rest 0) where m < 8.
template <typename S>
inline __m256 load8(const S* from, int64_t m = 8) {
  if (m < 8) {
    alignas(32) float t[8] = {};
    for (int64_t i = 0; i < m; ++i)
      t[i] = to_float(from[i]);
    return _mm256_load_ps(t);
  }
  if constexpr (std::is_same_v<S, float>) {
    return _mm256_loadu_ps(from);
  } else {
    const __m128i h = _mm_loadu_si128((const __m128i*)from);
    if constexpr (std::is_same_v<S, BHalf>)
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else
      return _mm256_cvtph_ps(h);
  }
}

// 16 weights from position k on, as int16.
template <int BITS>
inline __m256i widen16(const uint8_t* w, int64_t k) {
  if constexpr (BITS == 8) {
    return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(w + k)));
  } else {
    __m128i b = _mm_loadl_epi64((const __m128i*)(w + k / 2));
    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
    return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(lo, hi));
  }
}
#endif

#ifdef MK_AVX512
// 32 weights from position k on, as int16.
template <int BITS>
inline __m512i widen32(const uint8_t* w, int64_t k) {
  if constexpr (BITS == 8) {
    return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + k)));
  } else {
    __m128i b = _mm_loadu_si128((const __m128i*)(w + k / 2));
    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
    return _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi)));
  }
}

inline __m512i dot_i16(__m512i acc, __m512i w, __m512i x) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}
#endif

// --------------------------------------------------------------------------- arm64: NEON

#ifdef MK_NEON
// 16 weights from position k on, as bytes in order.
template <int BITS>
inline uint8x16_t load16(const uint8_t* w, int64_t k) {
  if constexpr (BITS == 8) {
    return vld1q_u8(w + k);
  } else { // byte j holds weights 2j (low nibble) and 2j + 1 (high): interleave the two halves
    const uint8x8_t b = vld1_u8(w + k / 2);
    const uint8x8x2_t z = vzip_u8(vand_u8(b, vdup_n_u8(0x0F)), vshr_n_u8(b, 4));
    return vcombine_u8(z.val[0], z.val[1]);
  }
}

inline float32x4_t to_float(uint16x4_t q) {
  return vcvtq_f32_u32(vmovl_u16(q));
}
#endif

// --------------------------------------------------------------------------- one row, one x

template <int BITS>
float dot_exact(const Row& r, const float* x, const float* xsum, int64_t K, int G) {
#if defined(MK_AVX2)
  float total = 0;
  __m256 tot = _mm256_setzero_ps();
  for (int64_t g = 0, k = 0; k < K; ++g) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t end = k + G; k < end; k += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), widen8<BITS>(r.w, k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), widen8<BITS>(r.w, k + 8), a1);
    }
    tot = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(r.scales[g]), tot);
    total += r.biases[g] * xsum[g];
  }
  return total + hsum(tot);
#elif defined(MK_NEON)
  float total = 0;
  float32x4_t tot = vdupq_n_f32(0);
  for (int64_t g = 0, k = 0; k < K; ++g) {
    float32x4_t a0 = vdupq_n_f32(0), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t end = k + G; k < end; k += 16) {
      const uint8x16_t q = load16<BITS>(r.w, k);
      const uint16x8_t lo = vmovl_u8(vget_low_u8(q)), hi = vmovl_high_u8(q);
      a0 = vfmaq_f32(a0, vld1q_f32(x + k), to_float(vget_low_u16(lo)));
      a1 = vfmaq_f32(a1, vld1q_f32(x + k + 4), to_float(vget_high_u16(lo)));
      a2 = vfmaq_f32(a2, vld1q_f32(x + k + 8), to_float(vget_low_u16(hi)));
      a3 = vfmaq_f32(a3, vld1q_f32(x + k + 12), to_float(vget_high_u16(hi)));
    }
    tot = vfmaq_n_f32(tot, vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)), r.scales[g]);
    total += r.biases[g] * xsum[g];
  }
  return total + vaddvq_f32(tot);
#else
  return dot_exact_scalar<BITS>(r, x, xsum, K, G);
#endif
}

// --------------------------------------------------------------------------- one row, R rows of x

// How far ahead of the group being computed a pass that reads its weights from memory asks for them
// (`ahead`). The hardware's prefetcher stops at each 4 KB page, so a long row streamed alone kept
// restarting it; asked for 1 KB on, every line of every row is on its way before it is needed. A
// one-row product (a decode step's) on two threads, A/B in one process: 4 KB rows (w1, w3) +7-16%,
// 14 KB rows (w2) +6-19% (1, 2 and 4 KB on measured alike; a whole row asked for a row early, as
// before, had been worse than nothing for w2's rows); a decode step at Mixtral's sizes +1-8%, 16
// sequences decoding together +9%. Nothing changes in the arithmetic: the same bits.
constexpr int64_t kAheadBytes = 1024;

// Ask for the lines of the group from position k0 on, kAheadBytes further on in the weights.
template <int BITS, int G>
inline void ask_ahead(const uint8_t* w, int64_t k0) {
  for (int64_t line = 0; line < G * BITS / 8; line += 64)
    __builtin_prefetch(w + k0 * BITS / 8 + kAheadBytes + line);
}

// dot_int16 of one weight row with R rows of x (R = 1 is dot_int16 itself; more in prefill): the
// weights are widened once for all, the R chains run side by side, and each output takes the same
// operations in the same order as alone (same bits). Per block of 16 groups (8 on AVX2), the products
// of the weight scales with x's scales are one vector multiply, and the biases' term (bias . xsum) one
// vector multiply-add into the lanes that are summed at the end: nothing scalar per group but a
// broadcast. The group size G is a constant, so a group's products are unrolled: with G a run-time
// value the loop's own instructions were the bound, and a decode step read its weights from memory at
// 15 GB/s where the unrolled one reads 23-25 (2 threads here). xq, xs, xsum: R rows of K, K / G, K / G;
// out: R outputs N apart; ahead: ask for the weights kAheadBytes on (a pass whose weights are not in cache).
#if defined(MK_AVX512)
// 16 scales (or biases) as float32, the live ones (the rest 0).
template <typename S>
inline __m512 load16(__mmask16 live, const S* from) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm512_maskz_loadu_ps(live, from);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(live, from);
    if constexpr (std::is_same_v<S, BHalf>)
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else
      return _mm512_cvtph_ps(h);
  }
}

template <int BITS, int R, int G, typename S>
void dots_int16(const RowOf<S>& r, const int16_t* xq, const float* xs, const float* xsum, int64_t K, float* out,
                int64_t N, bool ahead = false) {
  const int64_t groups = K / G;
  __m512 t[R];
  for (int i = 0; i < R; ++i)
    t[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < groups; c += 16) {
    const int64_t m = std::min<int64_t>(16, groups - c);
    const __mmask16 live = __mmask16((1u << m) - 1);
    const __m512 scale = load16(live, r.scales + c), bias = load16(live, r.biases + c);
    alignas(64) float sx[R][16];
    for (int i = 0; i < R; ++i) {
      _mm512_store_ps(sx[i], _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(live, xs + i * groups + c)));
      t[i] = _mm512_fmadd_ps(bias, _mm512_maskz_loadu_ps(live, xsum + i * groups + c), t[i]);
    }
    for (int64_t g = 0; g < m; ++g) {
      __m512i a[R];
      for (int i = 0; i < R; ++i)
        a[i] = _mm512_setzero_si512();
      const int64_t k0 = (c + g) * G;
      if (ahead)
        ask_ahead<BITS, G>(r.w, k0);
#pragma GCC unroll 4
      for (int j = 0; j < G; j += 32) {
        const __m512i w = widen32<BITS>(r.w, k0 + j);
        for (int i = 0; i < R; ++i)
          a[i] = dot_i16(a[i], w, _mm512_loadu_si512((const void*)(xq + i * K + k0 + j)));
      }
      for (int i = 0; i < R; ++i)
        t[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[i]), _mm512_set1_ps(sx[i][g]), t[i]);
    }
  }
  for (int i = 0; i < R; ++i)
    out[i * N] = _mm512_reduce_add_ps(t[i]);
}

// dots_int16 of NW weight rows that lie one after another with the same R rows of x (qmm.cpp: 3 to 6 rows
// of x against 2 weight rows), each output the operations dots_int16 gives it, in its order: the same bits
// (check_dot.cpp). Each vector of x, loaded once, serves the NW rows, and the NW x R sums stay in registers
// (2 x 6 float and 2 x 6 integer: 24 of the 32). ahead: as on AVX2 below, the same group of the row NW on.
// On an AMD EPYC Zen 4 (VNNI, 2 threads), an expert's w1 at Mixtral's sizes from memory against 4, 5 and 6
// rows of x: 3.1, 3.4 and 3.6 ms where one weight row at a time (passes of 4 at most) took 4.0, 4.7 and 5.1;
// 16 sequences decoding together at those sizes 41-42 -> 54-55 tokens/s, on the bench checkpoint 1.07x
// (geometric mean of 6 alternating pairs of processes).
template <int BITS, int NW, int R, int G, typename S>
void dots_int16_rows(const RowOf<S>& first, const int16_t* xq, const float* xs, const float* xsum, int64_t K,
                     float* out, int64_t N, bool ahead = false) {
  const int64_t groups = K / G, row_bytes = K * BITS / 8;
  __m512 t[NW][R];
  for (int o = 0; o < NW; ++o)
    for (int i = 0; i < R; ++i)
      t[o][i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < groups; c += 16) {
    const int64_t m = std::min<int64_t>(16, groups - c);
    const __mmask16 live = __mmask16((1u << m) - 1);
    alignas(64) float sx[NW][R][16];
    for (int o = 0; o < NW; ++o) {
      const __m512 scale = load16(live, first.scales + o * groups + c);
      const __m512 bias = load16(live, first.biases + o * groups + c);
      for (int i = 0; i < R; ++i) {
        _mm512_store_ps(sx[o][i], _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(live, xs + i * groups + c)));
        t[o][i] = _mm512_fmadd_ps(bias, _mm512_maskz_loadu_ps(live, xsum + i * groups + c), t[o][i]);
      }
    }
    for (int64_t g = 0; g < m; ++g) {
      const int64_t k0 = (c + g) * G;
      if (ahead)
        for (int o = 0; o < NW; ++o)
          for (int64_t line = 0; line < G * BITS / 8; line += 64)
            __builtin_prefetch(first.w + (o + NW) * row_bytes + k0 * BITS / 8 + line);
      __m512i a[NW][R];
      for (int o = 0; o < NW; ++o)
        for (int i = 0; i < R; ++i)
          a[o][i] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int j = 0; j < G; j += 32) {
        __m512i w[NW];
        for (int o = 0; o < NW; ++o)
          w[o] = widen32<BITS>(first.w + o * row_bytes, k0 + j);
        for (int i = 0; i < R; ++i) {
          const __m512i x = _mm512_loadu_si512((const void*)(xq + i * K + k0 + j));
          for (int o = 0; o < NW; ++o)
            a[o][i] = dot_i16(a[o][i], w[o], x);
        }
      }
      for (int o = 0; o < NW; ++o)
        for (int i = 0; i < R; ++i)
          t[o][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[o][i]), _mm512_set1_ps(sx[o][i][g]), t[o][i]);
    }
  }
  for (int o = 0; o < NW; ++o)
    for (int i = 0; i < R; ++i)
      out[i * N + o] = _mm512_reduce_add_ps(t[o][i]);
}
#define MK_DOTS_ROWS 1 // dots_int16_rows: several weight rows at once
#elif defined(MK_AVX2)
// One group's integer dot products, from position k0 on, for R rows of x (exact: any order gives
// the same integers).
template <int BITS, int R, int G>
inline void group_int16(const uint8_t* w, const int16_t* xq, int64_t K, int64_t k0, __m256i* a, bool ahead) {
  if (ahead)
    ask_ahead<BITS, G>(w, k0);
  const __m256i v = widen16<BITS>(w, k0);
  for (int i = 0; i < R; ++i)
    a[i] = _mm256_madd_epi16(v, _mm256_loadu_si256((const __m256i*)(xq + i * K + k0)));
#pragma GCC unroll 8
  for (int j = 16; j < G; j += 16) {
    const __m256i v = widen16<BITS>(w, k0 + j);
    for (int i = 0; i < R; ++i)
      a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(v, _mm256_loadu_si256((const __m256i*)(xq + i * K + k0 + j))));
  }
}

template <int BITS, int R, int G, typename S>
void dots_int16(const RowOf<S>& r, const int16_t* xq, const float* xs, const float* xsum, int64_t K, float* out,
                int64_t N, bool ahead = false) {
  const int64_t groups = K / G;
  __m256 t[R];
  for (int i = 0; i < R; ++i)
    t[i] = _mm256_setzero_ps();
  // A block of 8 groups from group c on; `whole` (a constant) when all 8 are there, as in every row whose
  // groups are a multiple of 8 (Mixtral's): the compiler then unrolls the block and keeps it in
  // registers, and the loads need no mask (4 rows of x, weights in L2: 31 -> 45 billion multiply-adds a
  // second on one thread; a 512-token prefill 300-330 -> 400-440 tokens/s). Same operations either way.
  auto block = [&](int64_t c, auto whole) {
    const int64_t m = whole() ? 8 : std::min<int64_t>(8, groups - c);
    auto load = [&](const auto* from) { return load8(from, m); };
    const __m256 scale = load(r.scales + c), bias = load(r.biases + c);
    alignas(32) float sx[R][8];
    for (int i = 0; i < R; ++i) {
      _mm256_store_ps(sx[i], _mm256_mul_ps(scale, load(xs + i * groups + c)));
      t[i] = _mm256_fmadd_ps(bias, load(xsum + i * groups + c), t[i]);
    }
    int64_t g = 0;
    for (; g + 2 <= m; g += 2) { // two groups to one add into t: the chain through t is half as long
      __m256i a[R];
      __m256 p[R];
      group_int16<BITS, R, G>(r.w, xq, K, (c + g) * G, a, ahead);
      for (int i = 0; i < R; ++i)
        p[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(a[i]), _mm256_set1_ps(sx[i][g]));
      group_int16<BITS, R, G>(r.w, xq, K, (c + g + 1) * G, a, ahead);
      for (int i = 0; i < R; ++i)
        t[i] = _mm256_add_ps(t[i], _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[i]), _mm256_set1_ps(sx[i][g + 1]), p[i]));
    }
    if (g < m) {
      __m256i a[R];
      group_int16<BITS, R, G>(r.w, xq, K, (c + g) * G, a, ahead);
      for (int i = 0; i < R; ++i)
        t[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[i]), _mm256_set1_ps(sx[i][g]), t[i]);
    }
  };
  int64_t c = 0;
  for (; c + 8 <= groups; c += 8)
    block(c, std::true_type{});
  if (c < groups)
    block(c, std::false_type{});
  for (int i = 0; i < R; ++i)
    out[i * N] = hsum(t[i]);
}

// dots_int16 of NW weight rows that lie one after another (row `first` and the NW - 1 after it) with the
// same R rows of x: each vector of x, loaded once, serves all NW. With one weight row the bound was the
// loads (one of x for every multiply, plus spills: llvm-mca -mcpu=znver3 puts the load pipes first), not
// the multiplies. qmm.cpp takes 3 to 6 rows of x against 2 weight rows. With 4 (AMD EPYC Zen 3, 2 threads,
// separate builds alternated): a 64-row projection 74-80 -> 89-91 billion multiply-adds a second, a 512-token
// prefill 1.07x faster (median of 6 pairs), a step of 16 sequences decoding together 1.03x (only its
// dense projections gain: the experts' few rows stream their weights from memory, and measured alike).
// The registers hold the NW x R integer sums; the float sums and the first group's products of each pair
// wait in L1 (kept there on purpose: left to the compiler, it spilled the integer sums instead). The asm
// statements keep each integer sum and each vector of x in one register (GCC otherwise re-associates the
// sums into a tree of temporaries and loads x once per multiply). Each output takes dots_int16's
// operations in its order: the same bits (check_dot.cpp compares them).
// ahead: ask, for each row, for the same group of the row NW on (the next call's): the group kAheadBytes
// on, as one row asks, is a row the other calls are reading already.
// Always inlined: called, the sums went through memory (half the speed of one row).
template <int BITS, int NW, int R, int G>
[[gnu::always_inline]] inline void group_int16_rows(const uint8_t* w, int64_t row_bytes, const int16_t* xq, int64_t K,
                                                    int64_t k0, __m256i (*a)[R], bool ahead) {
  if (ahead)
    for (int o = 0; o < NW; ++o)
      for (int64_t line = 0; line < G * BITS / 8; line += 64)
        __builtin_prefetch(w + (o + NW) * row_bytes + k0 * BITS / 8 + line);
#pragma GCC unroll 8
  for (int j = 0; j < G; j += 16) {
    __m256i v[NW];
    for (int o = 0; o < NW; ++o)
      v[o] = widen16<BITS>(w + o * row_bytes, k0 + j);
    for (int i = 0; i < R; ++i) {
      __m256i x = _mm256_loadu_si256((const __m256i*)(xq + i * K + k0 + j));
      asm("" : "+x"(x));
      for (int o = 0; o < NW; ++o) {
        const __m256i m = _mm256_madd_epi16(v[o], x);
        a[o][i] = j == 0 ? m : _mm256_add_epi32(a[o][i], m);
        asm("" : "+x"(a[o][i]));
      }
    }
  }
}

template <int BITS, int NW, int R, int G, typename S>
void dots_int16_rows(const RowOf<S>& first, const int16_t* xq, const float* xs, const float* xsum, int64_t K,
                     float* out, int64_t N, bool ahead = false) {
  const int64_t groups = K / G, row_bytes = K * BITS / 8;
  alignas(32) float t[NW][R][8], p[NW][R][8], sx[NW][R][8]; // t: from the first block on (no memset)
  auto in_memory = [&] { asm volatile("" : "+m"(t), "+m"(p)); };
  in_memory();
  // Inlined (as group_int16_rows is): a block called as a function reloaded its captures after every store.
  auto block = [&](int64_t c, auto whole) __attribute__((always_inline)) {
    const int64_t m = whole() ? 8 : std::min<int64_t>(8, groups - c);
    auto load = [&](const auto* from) { return load8(from, m); };
    for (int o = 0; o < NW; ++o) {
      const __m256 scale = load(first.scales + o * groups + c), bias = load(first.biases + o * groups + c);
      for (int i = 0; i < R; ++i) {
        _mm256_store_ps(sx[o][i], _mm256_mul_ps(scale, load(xs + i * groups + c)));
        const __m256 before = c == 0 ? _mm256_setzero_ps() : _mm256_load_ps(t[o][i]);
        _mm256_store_ps(t[o][i], _mm256_fmadd_ps(bias, load(xsum + i * groups + c), before));
      }
    }
    int64_t g = 0;
    __m256i a[NW][R];
    for (; g + 2 <= m; g += 2) {
      group_int16_rows<BITS, NW, R, G>(first.w, row_bytes, xq, K, (c + g) * G, a, ahead);
      for (int o = 0; o < NW; ++o)
        for (int i = 0; i < R; ++i)
          _mm256_store_ps(p[o][i], _mm256_mul_ps(_mm256_cvtepi32_ps(a[o][i]), _mm256_set1_ps(sx[o][i][g])));
      in_memory();
      group_int16_rows<BITS, NW, R, G>(first.w, row_bytes, xq, K, (c + g + 1) * G, a, ahead);
      for (int o = 0; o < NW; ++o)
        for (int i = 0; i < R; ++i) {
          const __m256 q = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[o][i]), _mm256_set1_ps(sx[o][i][g + 1]),
                                           _mm256_load_ps(p[o][i]));
          _mm256_store_ps(t[o][i], _mm256_add_ps(_mm256_load_ps(t[o][i]), q));
        }
      in_memory();
    }
    if (g < m) {
      group_int16_rows<BITS, NW, R, G>(first.w, row_bytes, xq, K, (c + g) * G, a, ahead);
      for (int o = 0; o < NW; ++o)
        for (int i = 0; i < R; ++i)
          _mm256_store_ps(t[o][i], _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[o][i]), _mm256_set1_ps(sx[o][i][g]),
                                                   _mm256_load_ps(t[o][i])));
      in_memory();
    }
  };
  int64_t c = 0;
  for (; c + 8 <= groups; c += 8)
    block(c, std::true_type{});
  if (c < groups)
    block(c, std::false_type{});
  for (int o = 0; o < NW; ++o)
    for (int i = 0; i < R; ++i)
      out[i * N + o] = hsum(_mm256_load_ps(t[o][i]));
}
#define MK_DOTS_ROWS 1 // dots_int16_rows: several weight rows at once
#endif

// f(the group size as a constant) for the group sizes the kernels take: 32, 64, 128.
template <class F>
decltype(auto) with_group(int G, F&& f) {
  switch (G) {
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    default:
      return f(std::integral_constant<int, 64>{});
  }
}

// --------------------------------------------------------------------------- one row, one x: int16

template <int BITS>
float dot_int16(const Row& r, const int16_t* xq, const float* xs, const float* xsum, int64_t K, int G) {
#if defined(MK_DOTS)
  float out;
  with_group(G, [&](auto g) { dots_int16<BITS, 1, g()>(r, xq, xs, xsum, K, &out, 1); });
  return out;
#elif defined(MK_NEON)
  // int16 x int16 multiply-accumulates into int32 lanes (vmlal): exact, as madd_epi16 on x86. (The
  // dot-product instructions, sdot/udot, take bytes only: int8 activations, which cost 26% more error.)
  float total = 0;
  float32x4_t tot = vdupq_n_f32(0);
  for (int64_t g = 0, k = 0; k < K; ++g) {
    int32x4_t a0 = vdupq_n_s32(0), a1 = a0;
    for (int64_t end = k + G; k < end; k += 16) {
      const uint8x16_t q = load16<BITS>(r.w, k);
      const int16x8_t w0 = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(q)));
      const int16x8_t w1 = vreinterpretq_s16_u16(vmovl_high_u8(q));
      const int16x8_t x0 = vld1q_s16(xq + k), x1 = vld1q_s16(xq + k + 8);
      a0 = vmlal_high_s16(vmlal_s16(a0, vget_low_s16(w0), vget_low_s16(x0)), w0, x0);
      a1 = vmlal_high_s16(vmlal_s16(a1, vget_low_s16(w1), vget_low_s16(x1)), w1, x1);
    }
    tot = vfmaq_n_f32(tot, vcvtq_f32_s32(vaddq_s32(a0, a1)), r.scales[g] * xs[g]);
    total += r.biases[g] * xsum[g];
  }
  return total + vaddvq_f32(tot);
#else
  return dot_int16_scalar<BITS>(r, xq, xs, xsum, K, G);
#endif
}

} // namespace mixtral_kernels
