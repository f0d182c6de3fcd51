// Python bindings of the kernels (nanobind, as MLX's own; its version must match the one mlx was built with).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "attend.h"
#include "qmm.h"
#include "small.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mk = mixtral_kernels;

NB_MODULE(_ext, m) {
  m.doc() = "Quantized projections for Mixtral on the CPU: SIMD, threads inside the op.";
  m.def(
      "qmm",
      [](const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
         const std::optional<mx::array>& indices, int group_size, int bits, int path, mx::StreamOrDevice s) {
        return mk::qmm(x, w, scales, biases, indices, group_size, bits, static_cast<mk::Path>(path), s);
      },
      "x"_a, "w"_a, "scales"_a, "biases"_a, "indices"_a = nb::none(), nb::kw_only(), "group_size"_a = 64,
      "bits"_a = 8, "path"_a = 0, "stream"_a = nb::none(),
      "x @ dequantize(w).T (w: (N, K) or, with indices, stacked experts (E, N, K)); path 0 exact, 1 int16.");
  m.def("attend", &mk::attend, "q"_a, "k"_a, "v"_a, nb::kw_only(), "scale"_a, "stream"_a = nb::none(),
        "softmax(q . k^T * scale) . v, q's T rows the last T of k's positions (causal, aligned to the end), KV "
        "heads shared by groups of query heads.");
  m.def("attend_segments", &mk::attend_segments, "q"_a, "keys"_a, "values"_a, "lengths"_a, "starts"_a, "ends"_a,
        nb::kw_only(), "scale"_a, "stream"_a = nb::none(),
        "attend() of q's rows starts[i]:ends[i] over keys[i][:, :, :lengths[i]] and values[i] alike, for each i, in one op.");
  m.def("rope_at", &mk::rope_at, "x"_a, "positions"_a, nb::kw_only(), "base"_a, "stream"_a = nb::none(),
        "Rotary embedding (rotate-half) of x (B, H, T, D), row t at positions[t].");
  m.def("rope", &mk::rope, "x"_a, nb::kw_only(), "offset"_a, "base"_a, "stream"_a = nb::none(),
        "Rotary embedding (rotate-half) of x (B, H, T, D) at positions offset..offset+T-1.");
  m.def("rms_norm", &mk::rms_norm, "x"_a, "weight"_a, nb::kw_only(), "eps"_a, "stream"_a = nb::none(),
        "x / sqrt(mean(x^2) + eps) * weight over the last axis.");
  m.def("swiglu", &mk::swiglu, "a"_a, "b"_a, nb::kw_only(), "stream"_a = nb::none(),
        "silu(a) * b, elementwise (a and b of one shape).");
  m.def("argmax", &mk::argmax, "x"_a, nb::kw_only(), "stream"_a = nb::none(),
        "The index of the largest value along x's last axis, as mx.argmax(x, axis=-1).");
  m.def("write_rows", &mk::write_rows, "rows"_a, "caches"_a, "offsets"_a, "starts"_a, "ends"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "The caches with rows[:, :, starts[i]:ends[i]] written into cache i at positions offsets[i] on, in one op.");
  m.def("set_threads", &mk::set_threads, "n"_a, "Threads each projection runs on.");
  m.def("threads", &mk::threads);
  m.def("simd", &mk::simd);
  m.def("accepts_arrays", [](const mx::array& a) { return a.ndim() >= 0; },
        "True: MLX's arrays reach this module (a nanobind that differs from mlx's own refuses them).");
}
