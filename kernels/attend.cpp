// Attention on the CPU, for a decode step and for prefill. MLX's CPU scaled_dot_product_attention is
// a general path (matmuls, a softmax, copies) on one thread: 0.7 ms for one query of 8 heads over 600
// cached positions of 128, where the work is 1.2 MFLOP; 226 ms for a 512-token causal prefill of 8
// heads, a third of the whole prefill. Here the threads take (KV head, block of query rows) units, and
// each cached key and value row is read once for all the query heads that share it and the block's rows.
#include "attend.h"
#include "pool.h"

#include <array>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "mlx/backend/cpu/encoder.h"

#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace mixtral_kernels {

namespace {

struct Problem {
  const float *q, *k, *v;
  float* out;
  int64_t B, Hq, Hkv, T, S, D;
  int64_t qs[3], ks[3], vs[3]; // strides (elements) of q's, k's and v's (b, h, position)
  float scale;
};

// Query rows per unit of work: the block's keys and values are read once for all its rows.
constexpr int64_t BLOCK = 16;

// x . y in float32, in SIMD lanes (the compiler keeps a sum's order, so it would not vectorize one).
inline float dot(const float* x, const float* y, int64_t n) {
  int64_t i = 0;
  float total = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), acc);
  total = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  total = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#elif defined(__aarch64__) && defined(__ARM_NEON)
  float32x4_t acc = vdupq_n_f32(0);
  for (; i + 4 <= n; i += 4)
    acc = vfmaq_f32(acc, vld1q_f32(x + i), vld1q_f32(y + i));
  total = vaddvq_f32(acc);
#endif
  for (; i < n; ++i)
    total += x[i] * y[i];
  return total;
}

// Query rows t0..t1 of the G query heads that share KV head h, batch b: scores, softmax, the weighted
// sum of values. Row t is the key position S - T + t, so it sees positions 0..S - T + t (causal,
// aligned to the end of the keys: a decode step's one row sees them all). Float32 throughout.
void head_group(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, std::vector<float>& scores) {
  const int64_t G = p.Hq / p.Hkv, S = p.S, D = p.D, rows = (t1 - t0) * G, past = S - p.T;
  const float* K = p.k + b * p.ks[0] + h * p.ks[1];
  const float* V = p.v + b * p.vs[0] + h * p.vs[1];
  // Row r = (t - t0) * G + g: query head h * G + g at position t.
  const float* q = p.q + b * p.qs[0] + h * G * p.qs[1];
  float* out = p.out + (b * p.Hq + h * G) * p.T * D;
  std::vector<const float*> q_row(rows);
  std::vector<float*> out_row(rows);
  for (int64_t r = 0; r < rows; ++r) {
    q_row[r] = q + r % G * p.qs[1] + (t0 + r / G) * p.qs[2];
    out_row[r] = out + (r % G * p.T + t0 + r / G) * D;
  }
  scores.resize(rows * S);
  float* sc = scores.data();
  // Position j is seen by the rows from (j - past - t0) * G on (causal), by all when j <= past + t0.
  auto first = [&](int64_t j) { return std::max<int64_t>(0, (j - past - t0) * G); };
  const int64_t end = past + t1; // positions the block's last row sees
  for (int64_t j = 0; j < end; ++j) {
    const float* kj = K + j * p.ks[2];
    for (int64_t r = first(j); r < rows; ++r)
      sc[r * S + j] = dot(q_row[r], kj, D) * p.scale;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* s = sc + r * S;
    const int64_t n = past + t0 + r / G + 1;
    float top = s[0];
    for (int64_t j = 1; j < n; ++j)
      top = std::max(top, s[j]);
    float total = 0;
    for (int64_t j = 0; j < n; ++j)
      total += (s[j] = std::exp(s[j] - top));
    const float inverse = 1.0f / total;
    for (int64_t j = 0; j < n; ++j)
      s[j] *= inverse;
    std::fill(out_row[r], out_row[r] + D, 0.0f);
  }
  for (int64_t j = 0; j < end; ++j) {
    const float* __restrict vj = V + j * p.vs[2];
    for (int64_t r = first(j); r < rows; ++r) {
      float* __restrict o = out_row[r];
      const float w = sc[r * S + j];
      for (int64_t d = 0; d < D; ++d)
        o[d] += w * vj[d];
    }
  }
}

// A 4-D strided array as a dense one (rare: the cache's views keep their rows contiguous).
std::vector<float> gather(const float* a, const mx::Shape& shape, const std::vector<int64_t>& st) {
  std::vector<float> out;
  out.reserve(int64_t(shape[0]) * shape[1] * shape[2] * shape[3]);
  for (int64_t i = 0; i < shape[0]; ++i)
    for (int64_t j = 0; j < shape[1]; ++j)
      for (int64_t l = 0; l < shape[2]; ++l)
        for (int64_t d = 0; d < shape[3]; ++d)
          out.push_back(a[i * st[0] + j * st[1] + l * st[2] + d * st[3]]);
  return out;
}

void run(const Problem& p) {
  const int64_t blocks = (p.T + BLOCK - 1) / BLOCK, units = p.B * p.Hkv * blocks;
  const int n = std::max<int64_t>(1, std::min<int64_t>(Pool::get().size, units));
  Pool::get().run(n, [&](int i) {
    std::vector<float> scores;
    for (int64_t u = i; u < units; u += n) { // interleaved: later rows see more positions
      const int64_t t0 = u % blocks * BLOCK;
      head_group(p, u / blocks / p.Hkv, u / blocks % p.Hkv, t0, std::min(p.T, t0 + BLOCK), scores);
    }
  });
}

void require(bool ok, const std::string& what) {
  if (!ok)
    throw std::invalid_argument("[mixtral_kernels.attend] " + what);
}

} // namespace

mx::array attend(const mx::array& q, const mx::array& k, const mx::array& v, float scale, mx::StreamOrDevice s) {
  require(q.ndim() == 4 && k.ndim() == 4 && v.shape() == k.shape(), "q, k, v must be (B, H, T, D), k and v alike");
  require(q.dtype() == mx::float32 && k.dtype() == mx::float32 && v.dtype() == mx::float32, "float32 only");
  require(q.shape(2) <= k.shape(2), "q's positions must be the last of k's (at most as many)");
  require(q.shape(0) == k.shape(0) && q.shape(3) == k.shape(3), "q and k must agree in batch and head size");
  require(k.shape(1) > 0 && q.shape(1) % k.shape(1) == 0, "query heads must be a multiple of KV heads");
  require(k.shape(2) > 0, "at least one cached position");
  auto stream = mx::to_stream(s);
  return mx::array(q.shape(), mx::float32, std::make_shared<Attend>(stream, scale), {q, k, v});
}

void Attend::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs)
    encoder.set_input_array(a);
  encoder.set_output_array(out);
  const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
  Problem p{
      q.data<float>(),
      k.data<float>(),
      v.data<float>(),
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
      scale_};
  // Views as they come (a cache's first S positions); rows of D that are not contiguous are copied.
  const bool rows = q.strides()[3] == 1 && k.strides()[3] == 1 && v.strides()[3] == 1;
  std::array<std::vector<int64_t>, 3> strides;
  for (int i = 0; i < 3; ++i)
    strides[i].assign(inputs[i].strides().begin(), inputs[i].strides().end());
  encoder.dispatch([p, rows, strides, keep = inputs, out = mx::array::unsafe_weak_copy(out)]() mutable {
    std::array<std::vector<float>, 3> dense;
    if (!rows) {
      const float* src[3] = {p.q, p.k, p.v};
      for (int i = 0; i < 3; ++i)
        dense[i] = gather(src[i], keep[i].shape(), strides[i]);
      p.q = dense[0].data(), p.k = dense[1].data(), p.v = dense[2].data();
      p.qs[0] = p.Hq * p.T * p.D, p.qs[1] = p.T * p.D, p.qs[2] = p.D;
      p.ks[0] = p.vs[0] = p.Hkv * p.S * p.D, p.ks[1] = p.vs[1] = p.S * p.D, p.ks[2] = p.vs[2] = p.D;
    }
    run(p);
  });
}

void Attend::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mixtral_kernels.attend] runs on the CPU only; use mx.fast.scaled_dot_product_attention");
}

} // namespace mixtral_kernels
