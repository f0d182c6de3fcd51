// Attention on the CPU, for a decode step and for prefill. MLX's CPU scaled_dot_product_attention is
// a general path (matmuls, a softmax, copies) on one thread: 0.7 ms for one query of 8 heads over 600
// cached positions of 128, where the work is 1.2 MFLOP; 226 ms for a 512-token causal prefill of 8
// heads, a third of the whole prefill. Here the threads take (KV head, block of query rows) units, and
// each cached key and value row is read once for all the query heads that share it and the block's rows.
#include "attend.h"
#include "exp.h"
#include "pool.h"

#include <array>
#include <cmath>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "mlx/backend/cpu/encoder.h"

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace mixtral_kernels {

namespace {

// T: how the cache's keys and values are stored (float, float16_t or bfloat16_t); arithmetic is float32.
template <typename T>
struct Problem {
  const float* q;
  const T *k, *v;
  float* out;
  int64_t B, Hq, Hkv, T_, S, D;
  int64_t qs[3], ks[3], vs[3]; // strides (elements) of q's, k's and v's (b, h, position)
  float scale;
  int64_t out_head = 0; // elements from one of out's heads to the next; 0: T * D (out a dense (B, Hq, T, D))
  int64_t head_stride() const {
    return out_head ? out_head : T_ * D;
  }
};

// Query rows per unit of work: the block's keys and values are read once for all its rows.
constexpr int64_t BLOCK = 16;

// Lanes of T widened to float32 in registers: a half-size cache is read as it is stored, never copied.
#if defined(__AVX512F__)
#define MK_LANES 1 // Vec, load, fma, broadcast, store and sum below
constexpr int LANES = 16;
using Vec = __m512;
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load(const mx::float16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline Vec load(const mx::bfloat16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec broadcast(float w) { return _mm512_set1_ps(w); }
inline void store(float* p, Vec a) { _mm512_storeu_ps(p, a); }
inline float sum(Vec a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MK_LANES 1
constexpr int LANES = 8;
using Vec = __m256;
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load(const mx::float16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline Vec load(const mx::bfloat16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec broadcast(float w) { return _mm256_set1_ps(w); }
inline void store(float* p, Vec a) { _mm256_storeu_ps(p, a); }
inline float sum(Vec a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define MK_LANES 1
constexpr int LANES = 4;
using Vec = float32x4_t;
inline Vec load(const float* p) { return vld1q_f32(p); }
inline Vec load(const mx::float16_t* p) { return vcvt_f32_f16(vld1_f16((const __fp16*)p)); }
inline Vec load(const mx::bfloat16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t*)p), 16)); }
inline Vec fma(Vec a, Vec b, Vec c) { return vfmaq_f32(c, a, b); }
inline Vec broadcast(float w) { return vdupq_n_f32(w); }
inline void store(float* p, Vec a) { vst1q_f32(p, a); }
inline float sum(Vec a) { return vaddvq_f32(a); }
#else
constexpr int LANES = 0; // scalar only
#endif

// x . y in float32, in SIMD lanes (the compiler keeps a sum's order, so it would not vectorize one).
template <typename T>
inline float dot(const float* x, const T* y, int64_t n) {
  int64_t i = 0;
  float total = 0;
#ifdef MK_LANES
  Vec acc = broadcast(0.0f);
  for (; i + LANES <= n; i += LANES)
    acc = fma(load(x + i), load(y + i), acc);
  total = sum(acc);
#endif
  for (; i < n; ++i) // fused, as the lanes are: a float and a half cache then round alike
    total = std::fma(x[i], static_cast<float>(y[i]), total);
  return total;
}

// x . y[0..3] for four rows y[i] = y0 + i * stride: four dot()s side by side, each summed in dot()'s
// order (the same bits), so the four chains of multiply-adds overlap instead of waiting on each other.
template <typename T>
inline void dot4(const float* x, const T* y0, int64_t stride, int64_t n, float* out) {
  const T* y[4] = {y0, y0 + stride, y0 + 2 * stride, y0 + 3 * stride};
  int64_t i = 0;
  float total[4] = {0, 0, 0, 0};
#ifdef MK_LANES
  Vec acc[4] = {broadcast(0.0f), broadcast(0.0f), broadcast(0.0f), broadcast(0.0f)};
  for (; i + LANES <= n; i += LANES) {
    const Vec xi = load(x + i);
    for (int r = 0; r < 4; ++r)
      acc[r] = fma(xi, load(y[r] + i), acc[r]);
  }
  for (int r = 0; r < 4; ++r)
    total[r] = sum(acc[r]);
#endif
  for (int r = 0; r < 4; ++r) {
    for (int64_t k = i; k < n; ++k)
      total[r] = std::fma(x[k], static_cast<float>(y[r][k]), total[r]);
    out[r] = total[r];
  }
}

// o += w[0] * y[0] + ... + w[3] * y[3] (rows y[i] = y0 + i * stride), in that order: four axpy()s with
// the same bits, o kept in registers across them.
template <typename T>
inline void axpy4(float* __restrict o, const float* w, const T* __restrict y0, int64_t stride, int64_t n) {
  int64_t i = 0;
#ifdef MK_LANES
  const Vec w0 = broadcast(w[0]), w1 = broadcast(w[1]), w2 = broadcast(w[2]), w3 = broadcast(w[3]);
  for (; i + LANES <= n; i += LANES) {
    Vec a = fma(w0, load(y0 + i), load(o + i));
    a = fma(w1, load(y0 + stride + i), a);
    a = fma(w2, load(y0 + 2 * stride + i), a);
    store(o + i, fma(w3, load(y0 + 3 * stride + i), a));
  }
#endif
  for (; i < n; ++i)
    for (int r = 0; r < 4; ++r)
      o[i] = std::fma(w[r], static_cast<float>(y0[r * stride + i]), o[i]);
}

// o += w * y over n floats.
template <typename T>
inline void axpy(float* __restrict o, float w, const T* __restrict y, int64_t n) {
  int64_t i = 0;
#ifdef MK_LANES
  const Vec wv = broadcast(w);
  for (; i + LANES <= n; i += LANES)
    store(o + i, fma(wv, load(y + i), load(o + i)));
#endif
  for (; i < n; ++i)
    o[i] = std::fma(w, static_cast<float>(y[i]), o[i]);
}

// The sum (or the max) of s[0..n) in 8 running lanes, then the lanes in a fixed order: a vector loop
// where one running total was a chain of n dependent adds (a row at 16k of context: 16k of them). The
// same order for a row whatever else the op computes, so a row keeps its bits alone or in a batch.
template <bool SUM>
inline float lanes_reduce(const float* s, int64_t n) {
  float lane[8];
  for (int l = 0; l < 8; ++l)
    lane[l] = SUM ? 0.0f : s[0];
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l)
      lane[l] = SUM ? lane[l] + s[j + l] : std::max(lane[l], s[j + l]);
  for (; j < n; ++j)
    lane[j % 8] = SUM ? lane[j % 8] + s[j] : std::max(lane[j % 8], s[j]);
  auto op = [](float a, float b) { return SUM ? a + b : std::max(a, b); };
  return op(op(op(lane[0], lane[1]), op(lane[2], lane[3])), op(op(lane[4], lane[5]), op(lane[6], lane[7])));
}

// Query rows t0..t1 of the G query heads that share KV head h, batch b: scores, softmax, the weighted
// sum of values. Row t is the key position S - T + t, so it sees positions 0..S - T + t (causal,
// aligned to the end of the keys: a decode step's one row sees them all). Float32 arithmetic throughout.
template <typename T>
void head_group(const Problem<T>& p, int64_t b, int64_t h, int64_t t0, int64_t t1, std::vector<float>& scores) {
  const int64_t G = p.Hq / p.Hkv, S = p.S, D = p.D, rows = (t1 - t0) * G, past = S - p.T_;
  const T* K = p.k + b * p.ks[0] + h * p.ks[1];
  const T* V = p.v + b * p.vs[0] + h * p.vs[1];
  // Row r = (t - t0) * G + g: query head h * G + g at position t.
  const float* q = p.q + b * p.qs[0] + h * G * p.qs[1];
  float* out = p.out + (b * p.Hq + h * G) * p.head_stride();
  std::vector<const float*> q_row(rows);
  std::vector<float*> out_row(rows);
  for (int64_t r = 0; r < rows; ++r) {
    q_row[r] = q + r % G * p.qs[1] + (t0 + r / G) * p.qs[2];
    out_row[r] = out + r % G * p.head_stride() + (t0 + r / G) * D;
  }
  scores.resize(rows * S);
  float* sc = scores.data();
  // Position j is seen by the rows from (j - past - t0) * G on (causal), by all when j <= past + t0.
  auto first = [&](int64_t j) { return std::max<int64_t>(0, (j - past - t0) * G); };
  const int64_t end = past + t1; // positions the block's last row sees
  // Four positions at a time: a row scores all four from the first it sees (a score it does not see
  // is never read: its softmax stops at its own position).
  int64_t j = 0;
  for (; j + 4 <= end; j += 4) {
    for (int64_t r = first(j); r < rows; ++r) {
      float* s = sc + r * S + j;
      dot4(q_row[r], K + j * p.ks[2], p.ks[2], D, s);
      for (int i = 0; i < 4; ++i)
        s[i] *= p.scale;
    }
  }
  for (; j < end; ++j) {
    const T* kj = K + j * p.ks[2];
    for (int64_t r = first(j); r < rows; ++r)
      sc[r * S + j] = dot(q_row[r], kj, D) * p.scale;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* s = sc + r * S;
    const int64_t n = past + t0 + r / G + 1;
    const float top = lanes_reduce<false>(s, n);
    for (int64_t j = 0; j < n; ++j)
      s[j] = exp_poly(s[j] - top);
    const float inverse = 1.0f / lanes_reduce<true>(s, n);
    for (int64_t j = 0; j < n; ++j)
      s[j] *= inverse;
    std::fill(out_row[r], out_row[r] + D, 0.0f);
  }
  // Four positions at a time for the rows that see all four; one at a time where a row stops.
  j = 0;
  for (; j + 4 <= end; j += 4) {
    for (int64_t r = first(j); r < first(j + 3); ++r)
      for (int64_t i = 0; i < 4 && j + i <= past + t0 + r / G; ++i)
        axpy(out_row[r], sc[r * S + j + i], V + (j + i) * p.vs[2], D);
    for (int64_t r = first(j + 3); r < rows; ++r)
      axpy4(out_row[r], sc + r * S + j, V + j * p.vs[2], p.vs[2], D);
  }
  for (; j < end; ++j) {
    const T* vj = V + j * p.vs[2];
    for (int64_t r = first(j); r < rows; ++r)
      axpy(out_row[r], sc[r * S + j], vj, D);
  }
}

// A 4-D strided array as a dense one (rare: the cache's views keep their rows contiguous).
template <typename T>
std::vector<T> gather(const T* a, const mx::Shape& shape, const std::vector<int64_t>& st) {
  std::vector<T> out;
  out.reserve(int64_t(shape[0]) * shape[1] * shape[2] * shape[3]);
  for (int64_t i = 0; i < shape[0]; ++i)
    for (int64_t j = 0; j < shape[1]; ++j)
      for (int64_t l = 0; l < shape[2]; ++l)
        for (int64_t d = 0; d < shape[3]; ++d)
          out.push_back(a[i * st[0] + j * st[1] + l * st[2] + d * st[3]]);
  return out;
}

// Every problem's (batch, KV head, block of query rows) units over the pool, in one go.
template <typename T>
void run(const std::vector<Problem<T>>& ps) {
  std::vector<std::array<int64_t, 4>> units; // problem, batch, KV head, first row
  for (size_t i = 0; i < ps.size(); ++i)
    for (int64_t b = 0; b < ps[i].B; ++b)
      for (int64_t h = 0; h < ps[i].Hkv; ++h)
        for (int64_t t0 = 0; t0 < ps[i].T_; t0 += BLOCK)
          units.push_back({int64_t(i), b, h, t0});
  const int n = std::max<int64_t>(1, std::min<int64_t>(Pool::get().size, units.size()));
  Pool::get().run(n, [&](int i) {
    std::vector<float> scores;
    for (size_t u = i; u < units.size(); u += n) { // interleaved: later rows see more positions
      const auto [k, b, h, t0] = units[u];
      head_group(ps[k], b, h, t0, std::min(ps[k].T_, t0 + BLOCK), scores);
    }
  });
}

template <typename T>
void dispatch(mx::cpu::CommandEncoder& encoder, const std::vector<mx::array>& inputs, mx::array& out, float scale) {
  const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
  Problem<T> p{
      q.data<float>(),
      k.data<T>(),
      v.data<T>(),
      out.data<float>(),
      q.shape(0),
      q.shape(1),
      k.shape(1),
      q.shape(2),
      k.shape(2),
      k.shape(3),
      {int64_t(q.strides()[0]), int64_t(q.strides()[1]), int64_t(q.strides()[2])},
      {int64_t(k.strides()[0]), int64_t(k.strides()[1]), int64_t(k.strides()[2])},
      {int64_t(v.strides()[0]), int64_t(v.strides()[1]), int64_t(v.strides()[2])},
      scale};
  // Views as they come (a cache's first S positions); rows of D that are not contiguous are copied.
  const bool rows = q.strides()[3] == 1 && k.strides()[3] == 1 && v.strides()[3] == 1;
  std::array<std::vector<int64_t>, 3> strides;
  for (int i = 0; i < 3; ++i)
    strides[i].assign(inputs[i].strides().begin(), inputs[i].strides().end());
  encoder.dispatch([p, rows, strides, keep = inputs, out = mx::array::unsafe_weak_copy(out)]() mutable {
    std::vector<float> dense_q;
    std::vector<T> dense_k, dense_v;
    if (!rows) {
      dense_q = gather(p.q, keep[0].shape(), strides[0]);
      dense_k = gather(p.k, keep[1].shape(), strides[1]);
      dense_v = gather(p.v, keep[2].shape(), strides[2]);
      p.q = dense_q.data(), p.k = dense_k.data(), p.v = dense_v.data();
      p.qs[0] = p.Hq * p.T_ * p.D, p.qs[1] = p.T_ * p.D, p.qs[2] = p.D;
      p.ks[0] = p.vs[0] = p.Hkv * p.S * p.D, p.ks[1] = p.vs[1] = p.S * p.D, p.ks[2] = p.vs[2] = p.D;
    }
    run(std::vector<Problem<T>>{p});
  });
}

// attend_segments: segment i is q's rows starts[i]..ends[i] over the first lengths[i] positions of
// inputs[1 + 2i] and inputs[2 + 2i] (one sequence's whole cache), its output in the same rows of out.
template <typename T>
void dispatch_segments(mx::cpu::CommandEncoder& encoder, const std::vector<mx::array>& inputs, mx::array& out,
                       float scale, const std::vector<int>& starts, const std::vector<int>& ends,
                       const std::vector<int>& lengths) {
  encoder.dispatch([=, keep = inputs, out = mx::array::unsafe_weak_copy(out)]() mutable {
    // Rows of D that are not contiguous are copied (rare: q is a transposed view, the caches are whole).
    std::vector<std::vector<float>> dense_q;
    std::vector<std::vector<T>> dense_kv;
    auto rows_of = [&](const mx::array& a, auto* data, auto& dense) {
      using E = std::remove_cv_t<std::remove_pointer_t<decltype(data)>>;
      if (a.strides()[3] == 1)
        return std::pair<const E*, mx::Strides>{data, a.strides()};
      dense.push_back(gather(data, a.shape(), {a.strides().begin(), a.strides().end()}));
      const int64_t D = a.shape(3), L = a.shape(2) * D, H = a.shape(1) * L;
      return std::pair<const E*, mx::Strides>{dense.back().data(), {H, L, D, 1}};
    };
    const auto& q = keep[0];
    const auto [qd, qs] = rows_of(q, q.data<float>(), dense_q);
    const int64_t Hq = q.shape(1), rows = q.shape(2), D = q.shape(3);
    std::vector<Problem<T>> ps;
    for (size_t i = 0; i < starts.size(); ++i) {
      const auto &k = keep[1 + 2 * i], &v = keep[2 + 2 * i];
      const auto [kd, ks] = rows_of(k, k.data<T>(), dense_kv);
      const auto [vd, vs] = rows_of(v, v.data<T>(), dense_kv);
      Problem<T> p{qd + starts[i] * qs[2], kd, vd, out.data<float>() + starts[i] * D, 1, Hq, k.shape(1),
                   ends[i] - starts[i], lengths[i], D, {qs[0], qs[1], qs[2]}, {ks[0], ks[1], ks[2]},
                   {vs[0], vs[1], vs[2]}, scale, rows * D};
      ps.push_back(p);
    }
    run(ps);
  });
}

void require(bool ok, const std::string& what) {
  if (!ok)
    throw std::invalid_argument("[mixtral_kernels.attend] " + what);
}

} // namespace

mx::array attend(const mx::array& q, const mx::array& k, const mx::array& v, float scale, mx::StreamOrDevice s) {
  require(q.ndim() == 4 && k.ndim() == 4 && v.shape() == k.shape(), "q, k, v must be (B, H, T, D), k and v alike");
  require(q.dtype() == mx::float32, "q must be float32");
  require(k.dtype() == v.dtype() && (k.dtype() == mx::float32 || k.dtype() == mx::float16 || k.dtype() == mx::bfloat16),
          "k and v must be both float32, float16 or bfloat16");
  require(q.shape(2) <= k.shape(2), "q's positions must be the last of k's (at most as many)");
  require(q.shape(0) == k.shape(0) && q.shape(3) == k.shape(3), "q and k must agree in batch and head size");
  require(k.shape(1) > 0 && q.shape(1) % k.shape(1) == 0, "query heads must be a multiple of KV heads");
  require(k.shape(2) > 0, "at least one cached position");
  auto stream = mx::to_stream(s);
  return mx::array(q.shape(), mx::float32, std::make_shared<Attend>(stream, scale), {q, k, v});
}

namespace {
// out allocated, it and the inputs given to the stream's encoder, then f(encoder, T{}) for the caches' type T.
template <class F>
void evaluate(mx::Stream stream, const std::vector<mx::array>& inputs, mx::array& out, F&& f) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (auto& a : inputs)
    encoder.set_input_array(a);
  encoder.set_output_array(out);
  switch (inputs[1].dtype()) {
    case mx::float16:
      return f(encoder, mx::float16_t{});
    case mx::bfloat16:
      return f(encoder, mx::bfloat16_t{});
    default:
      return f(encoder, 0.0f);
  }
}
} // namespace

void Attend::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  evaluate(stream(), inputs, out, [&](auto& encoder, auto cache) {
    dispatch<decltype(cache)>(encoder, inputs, out, scale_);
  });
}

mx::array attend_segments(const mx::array& q, const std::vector<mx::array>& keys, const std::vector<mx::array>& values,
                          std::vector<int> lengths, std::vector<int> starts, std::vector<int> ends, float scale,
                          mx::StreamOrDevice s) {
  const size_t n = keys.size();
  require(q.ndim() == 4 && q.shape(0) == 1 && q.dtype() == mx::float32, "q must be (1, H, T, D) float32");
  require(n > 0 && values.size() == n && lengths.size() == n && starts.size() == n && ends.size() == n,
          "one key cache, value cache, length, start and end for each segment");
  std::vector<mx::array> inputs = {q};
  for (size_t i = 0; i < n; ++i) {
    const auto &k = keys[i], &v = values[i];
    require(k.ndim() == 4 && v.shape() == k.shape() && k.shape(0) == 1 && k.shape(3) == q.shape(3),
            "each segment's k and v must be (1, H, S, D), alike, with q's D");
    require(k.dtype() == keys[0].dtype() && v.dtype() == k.dtype() &&
                (k.dtype() == mx::float32 || k.dtype() == mx::float16 || k.dtype() == mx::bfloat16),
            "the caches must all be float32, float16 or bfloat16, the same");
    require(k.shape(1) > 0 && q.shape(1) % k.shape(1) == 0, "query heads must be a multiple of KV heads");
    require(starts[i] == (i ? ends[i - 1] : 0) && starts[i] < ends[i], "the segments must cover q's rows in order");
    require(ends[i] - starts[i] <= lengths[i] && lengths[i] <= k.shape(2),
            "a segment's rows must be the last of its cache's first `length` positions");
    inputs.push_back(k);
    inputs.push_back(v);
  }
  require(ends.back() == q.shape(2), "the segments must cover q's rows in order");
  return mx::array(
      q.shape(), mx::float32,
      std::make_shared<AttendSegments>(mx::to_stream(s), scale, std::move(lengths), std::move(starts), std::move(ends)),
      std::move(inputs));
}

void AttendSegments::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  evaluate(stream(), inputs, out, [&](auto& encoder, auto cache) {
    dispatch_segments<decltype(cache)>(encoder, inputs, out, scale_, starts_, ends_, lengths_);
  });
}

void AttendSegments::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mixtral_kernels.attend_segments] runs on the CPU only");
}

void Attend::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mixtral_kernels.attend] runs on the CPU only; use mx.fast.scaled_dot_product_attention");
}

} // namespace mixtral_kernels
