// RoPE, RMSNorm, SwiGLU and argmax as one op each (small.h says why). Each reads its inputs as they come (views,
// with strides) and writes a new row-major output; float32 throughout, RoPE and RMSNorm with MLX's own
// formulas, SwiGLU with a polynomial exp (MLX's calls a scalar one).
#include "small.h"
#include "exp.h"
#include "pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "mlx/backend/cpu/encoder.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mixtral_kernels {

namespace {

void require(bool ok, const std::string& what) {
  if (!ok)
    throw std::invalid_argument("[mixtral_kernels] " + what);
}

// The offset of row r (all axes but the last, row-major) in an array with these shape and strides.
int64_t row_offset(int64_t r, const mx::Shape& shape, const mx::Strides& strides) {
  int64_t offset = 0;
  for (int d = int(shape.size()) - 2; d >= 0; --d) {
    offset += (r % shape[d]) * strides[d];
    r /= shape[d];
  }
  return offset;
}

// The sum of a[0..n)^2, in 16 lanes where there are AVX2's (one chain of n dependent adds, 4 cycles each,
// had been most of an RMSNorm's time).
float sum_of_squares(const float* a, int64_t n) {
  int64_t k = 0;
  float total = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    const __m256 v0 = _mm256_loadu_ps(a + k), v1 = _mm256_loadu_ps(a + k + 8);
    s0 = _mm256_fmadd_ps(v0, v0, s0);
    s1 = _mm256_fmadd_ps(v1, v1, s1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(s0, s1));
  for (float lane : lanes)
    total += lane;
#endif
  for (; k < n; ++k)
    total += a[k] * a[k];
  return total;
}

// a (1, H, S, D), whatever its layout, into dst as row-major.
void copy_whole(const mx::array& a, char* dst) {
  const char* from = static_cast<const char*>(a.data<void>());
  const int64_t size = a.itemsize();
  if (a.flags().row_contiguous && a.data_size() == a.size()) {
    std::memcpy(dst, from, a.nbytes());
  } else if (a.data_size() == 1) { // one value broadcast: a new cache's zeros
    for (int64_t e = 0; e < int64_t(a.size()); ++e)
      std::memcpy(dst + e * size, from, size);
  } else {
    const auto& st = a.strides();
    for (int64_t h = 0, e = 0; h < a.shape(1); ++h)
      for (int64_t t = 0; t < a.shape(2); ++t)
        for (int64_t d = 0; d < a.shape(3); ++d, ++e)
          std::memcpy(dst + e * size, from + (h * st[1] + t * st[2] + d * st[3]) * size, size);
  }
}

} // namespace

mx::array rope_at(const mx::array& x, std::vector<int> positions, float base, mx::StreamOrDevice s) {
  require(x.ndim() == 4 && x.dtype() == mx::float32 && x.shape(3) % 2 == 0, "rope: x must be (B, H, T, D) float32, D even");
  require(int64_t(positions.size()) == x.shape(2), "rope: one position for each of x's T rows");
  return mx::array(x.shape(), mx::float32, std::make_shared<Rope>(mx::to_stream(s), std::move(positions), base), {x});
}

mx::array rope(const mx::array& x, int offset, float base, mx::StreamOrDevice s) {
  std::vector<int> positions(x.ndim() == 4 ? x.shape(2) : 0);
  for (size_t t = 0; t < positions.size(); ++t)
    positions[t] = offset + int(t);
  return rope_at(x, std::move(positions), base, s);
}

void Rope::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(inputs[0]);
  encoder.set_output_array(out);
  encoder.dispatch([x = inputs[0], out = mx::array::unsafe_weak_copy(out), positions = positions_, base = base_]() mutable {
    const int64_t T = x.shape(2), D = x.shape(3), half = D / 2, rows = x.size() / D;
    // As MLX's: inv_freq_i = exp(-i * (log(base) / half)), theta = position * inv_freq, all float32.
    const float step = float(std::log(base) / half);
    std::vector<float> inv_freq(half), cosines(T * half), sines(T * half);
    for (int64_t i = 0; i < half; ++i)
      inv_freq[i] = std::exp(float(-i) * step);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < half; ++i) {
        const float theta = float(positions[t]) * inv_freq[i];
        cosines[t * half + i] = std::cos(theta);
        sines[t * half + i] = std::sin(theta);
      }
    const float* src = x.data<float>();
    float* dst = out.data<float>();
    const int64_t k_stride = x.strides()[3];
    for (int64_t r = 0; r < rows; ++r) {
      const float* a = src + row_offset(r, x.shape(), x.strides());
      const float *c = cosines.data() + (r % T) * half, *sn = sines.data() + (r % T) * half;
      float* o = dst + r * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = a[i * k_stride], x2 = a[(i + half) * k_stride];
        o[i] = x1 * c[i] - x2 * sn[i];
        o[i + half] = x1 * sn[i] + x2 * c[i];
      }
    }
  });
}

void Rope::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mixtral_kernels.rope] runs on the CPU only; use mx.fast.rope");
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  require(x.dtype() == mx::float32 && weight.dtype() == mx::float32, "rms_norm: float32 only");
  require(x.ndim() >= 1 && weight.ndim() == 1 && weight.shape(0) == x.shape(-1), "rms_norm: weight must match x's last axis");
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(mx::to_stream(s), eps), {x, weight});
}

void RmsNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs)
    encoder.set_input_array(a);
  encoder.set_output_array(out);
  encoder.dispatch([x = inputs[0], w = inputs[1], out = mx::array::unsafe_weak_copy(out), eps = eps_]() mutable {
    const int64_t D = x.shape(-1), rows = x.size() / D, k_stride = x.strides().back(), w_stride = w.strides()[0];
    const float *src = x.data<float>(), *weight = w.data<float>();
    float* dst = out.data<float>();
    std::vector<float> row(k_stride == 1 ? 0 : D);
    for (int64_t r = 0; r < rows; ++r) {
      const float* a = src + row_offset(r, x.shape(), x.strides());
      if (k_stride != 1) { // a view: its row laid out first, so that it sums as any row does
        for (int64_t k = 0; k < D; ++k)
          row[k] = a[k * k_stride];
        a = row.data();
      }
      const float scale = 1.0f / std::sqrt(sum_of_squares(a, D) / float(D) + eps);
      for (int64_t k = 0; k < D; ++k)
        dst[r * D + k] = a[k] * scale * weight[k * w_stride];
    }
  });
}

void RmsNorm::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mixtral_kernels.rms_norm] runs on the CPU only; use mx.fast.rms_norm");
}

mx::array swiglu(const mx::array& a, const mx::array& b, mx::StreamOrDevice s) {
  require(a.dtype() == mx::float32 && b.dtype() == mx::float32, "swiglu: float32 only");
  require(a.shape() == b.shape() && a.ndim() >= 1, "swiglu: a and b must have one shape");
  return mx::array(a.shape(), mx::float32, std::make_shared<Swiglu>(mx::to_stream(s)), {a, b});
}

void Swiglu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& x : inputs)
    encoder.set_input_array(x);
  encoder.set_output_array(out);
  encoder.dispatch([a = inputs[0], b = inputs[1], out = mx::array::unsafe_weak_copy(out)]() mutable {
    const int64_t D = a.shape(-1), rows = a.size() / D, sa = a.strides().back(), sb = b.strides().back();
    const float *pa = a.data<float>(), *pb = b.data<float>();
    float* dst = out.data<float>();
    auto some_rows = [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* x = pa + row_offset(r, a.shape(), a.strides());
        const float* y = pb + row_offset(r, b.shape(), b.strides());
        float* o = dst + r * D;
        if (sa == 1 && sb == 1) // the usual case, vectorized
          for (int64_t k = 0; k < D; ++k)
            o[k] = x[k] * y[k] / (1.0f + exp_poly(-x[k]));
        else
          for (int64_t k = 0; k < D; ++k)
            o[k] = x[k * sa] * y[k * sb] / (1.0f + exp_poly(-x[k * sa]));
      }
    };
    // Threads only where the work outweighs waking them: a decode step's 2 x 3584 does not, 16 sequences'
    // 32 x 3584 do (1% of their step on one thread).
    const int n = std::max<int64_t>(1, std::min<int64_t>(Pool::get().size, a.size() / 32768));
    Pool::get().run(n, [&](int t) { some_rows(rows * t / n, rows * (t + 1) / n); });
  });
}

void Swiglu::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mixtral_kernels.swiglu] runs on the CPU only; use nn.silu(a) * b");
}

std::vector<mx::array> write_rows(const mx::array& rows, const std::vector<mx::array>& caches, std::vector<int> offsets,
                                  std::vector<int> starts, std::vector<int> ends, mx::StreamOrDevice s) {
  require(rows.ndim() == 4 && rows.shape(0) == 1, "write_rows: rows must be (1, H, T, D)");
  require(offsets.size() == caches.size() && starts.size() == caches.size() && ends.size() == caches.size(),
          "write_rows: one offset, start and end for each cache");
  std::vector<mx::array> inputs{rows};
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (size_t i = 0; i < caches.size(); ++i) {
    const mx::array& c = caches[i];
    require(c.ndim() == 4 && c.shape(0) == 1 && c.shape(1) == rows.shape(1) && c.shape(3) == rows.shape(3) &&
                c.dtype() == rows.dtype(),
            "write_rows: each cache must be (1, H, capacity, D) of the rows' H, D and dtype");
    require(0 <= starts[i] && starts[i] <= ends[i] && ends[i] <= rows.shape(2) && 0 <= offsets[i] &&
                offsets[i] + ends[i] - starts[i] <= c.shape(2),
            "write_rows: each run of rows must lie within the rows and fit its cache");
    inputs.push_back(c);
    shapes.push_back(c.shape());
    dtypes.push_back(c.dtype());
  }
  if (caches.empty())
    return {};
  auto op = std::make_shared<WriteRows>(mx::to_stream(s), std::move(offsets), std::move(starts), std::move(ends));
  return mx::array::make_arrays(std::move(shapes), dtypes, op, inputs);
}

void WriteRows::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  // Every output holds a copy of the inputs (MLX's siblings), so no cache could be donated; the one
  // `inputs` names is enough now (MLX drops them all once this returns).
  for (auto& o : outputs)
    if (&o.inputs() != &inputs)
      o.inputs().clear();
  std::vector<bool> donated(outputs.size());
  for (size_t i = 0; i < outputs.size(); ++i) {
    const mx::array& in = inputs[i + 1];
    donated[i] = in.is_donatable() && in.flags().row_contiguous && in.data_size() == in.size();
    if (donated[i])
      outputs[i].copy_shared_buffer(in);
    else
      outputs[i].set_data(mx::allocator::malloc(outputs[i].nbytes()));
  }
  std::vector<mx::array> outs;
  for (auto& a : inputs)
    encoder.set_input_array(a);
  for (auto& o : outputs) {
    encoder.set_output_array(o);
    outs.push_back(mx::array::unsafe_weak_copy(o));
  }
  encoder.dispatch([inputs, outs, donated, offsets = offsets_, starts = starts_, ends = ends_]() mutable {
    const mx::array& rows = inputs[0];
    const int64_t H = rows.shape(1), D = rows.shape(3), size = rows.itemsize();
    const char* src = static_cast<const char*>(rows.data<void>());
    for (size_t i = 0; i < outs.size(); ++i) {
      const mx::array& in = inputs[i + 1];
      char* dst = static_cast<char*>(outs[i].data<void>());
      const int64_t cap = in.shape(2);
      if (!donated[i])
        copy_whole(in, dst);
      const auto& rs = rows.strides();
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = starts[i]; t < ends[i]; ++t) {
          char* to = dst + ((h * cap + offsets[i] + t - starts[i]) * D) * size;
          const char* from = src + (h * rs[1] + t * rs[2]) * size;
          if (rs[3] == 1)
            std::memcpy(to, from, D * size);
          else
            for (int64_t d = 0; d < D; ++d)
              std::memcpy(to + d * size, from + d * rs[3] * size, size);
        }
    }
  });
}

mx::array argmax(const mx::array& x, mx::StreamOrDevice s) {
  require(x.dtype() == mx::float32 && x.ndim() >= 1 && x.shape(-1) >= 1,
          "argmax: x must be float32, its last axis not empty");
  mx::Shape shape(x.shape().begin(), x.shape().end() - 1);
  return mx::array(shape, mx::uint32, std::make_shared<ArgMax>(mx::to_stream(s)), {x});
}

namespace {

// Whether value v at index i comes before the best so far (value best at index at) in argmax's order: a
// NaN first (the first of them), then larger values, equal ones by their index.
inline bool before(float v, uint32_t i, float best, uint32_t at) {
  if (std::isnan(v) || std::isnan(best))
    return std::isnan(v) && (!std::isnan(best) || i < at);
  return v > best || (v == best && i < at);
}

uint32_t argmax_row(const float* a, int64_t n, int64_t stride) {
  float best = a[0];
  uint32_t at = 0;
  int64_t j = 1;
#if defined(__AVX2__)
  if (stride == 1 && n >= 64) {
    // 32 lanes, lane l over the positions l, l + 32, ...: each keeps its first NaN, else the first of its
    // largest values (from a[0] on: a lane's best is never behind position 0's). The lanes' bests, in
    // argmax's order, give the row's. Four vectors of lanes, so that four compare-and-blend chains overlap.
    constexpr int V = 4;
    __m256 top[V];
    __m256i where[V], here[V];
    for (int u = 0; u < V; ++u) {
      top[u] = _mm256_set1_ps(a[0]);
      where[u] = _mm256_setzero_si256();
      here[u] = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * u));
    }
    const __m256i step = _mm256_set1_epi32(8 * V);
    for (j = 0; j + 8 * V <= n; j += 8 * V)
      for (int u = 0; u < V; ++u) {
        const __m256 v = _mm256_loadu_ps(a + j + 8 * u);
        const __m256 nan_over_number =
            _mm256_and_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), _mm256_cmp_ps(top[u], top[u], _CMP_ORD_Q));
        const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, top[u], _CMP_GT_OQ), nan_over_number);
        top[u] = _mm256_blendv_ps(top[u], v, take);
        where[u] = _mm256_castps_si256(
            _mm256_blendv_ps(_mm256_castsi256_ps(where[u]), _mm256_castsi256_ps(here[u]), take));
        here[u] = _mm256_add_epi32(here[u], step);
      }
    alignas(32) float tops[V][8];
    alignas(32) uint32_t wheres[V][8];
    for (int u = 0; u < V; ++u) {
      _mm256_store_ps(tops[u], top[u]);
      _mm256_store_si256((__m256i*)wheres[u], where[u]);
      for (int l = 0; l < 8; ++l)
        if (before(tops[u][l], wheres[u][l], best, at))
          best = tops[u][l], at = wheres[u][l];
    }
  }
#endif
  for (; j < n && !std::isnan(best); ++j)
    if (before(a[j * stride], uint32_t(j), best, at))
      best = a[j * stride], at = uint32_t(j);
  return at;
}

} // namespace

void ArgMax::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(inputs[0]);
  encoder.set_output_array(out);
  encoder.dispatch([x = inputs[0], out = mx::array::unsafe_weak_copy(out)]() mutable {
    const int64_t n = x.shape(-1), rows = x.size() / n, stride = x.strides().back();
    const float* src = x.data<float>();
    uint32_t* dst = out.data<uint32_t>();
    auto some_rows = [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        dst[r] = argmax_row(src + row_offset(r, x.shape(), x.strides()), n, stride);
    };
    // Threads only where the work outweighs waking them (one row of 32000 does not).
    const int t = std::max<int64_t>(1, std::min<int64_t>({Pool::get().size, rows, int64_t(x.size()) / 65536}));
    Pool::get().run(t, [&](int i) { some_rows(rows * i / t, rows * (i + 1) / t); });
  });
}

void ArgMax::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mixtral_kernels.argmax] runs on the CPU only; use mx.argmax");
}

void WriteRows::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[mixtral_kernels.write_rows] runs on the CPU only; use slice updates");
}

} // namespace mixtral_kernels
