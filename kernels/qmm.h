// Quantized projections on the CPU: y = x @ dequantize(w).T for MLX's affine 4- and 8-bit layout
// (w: (..., N, K * bits / 32) uint32, packed along K; scales, biases: (..., N, K / group_size)),
// dense or gathered over stacked experts, as mx.quantized_matmul and mx.gather_qmm compute them.
#pragma once

#include <optional>
#include <string>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mixtral_kernels {

// How the dot products are computed.
//   exact: float32 products of x and the dequantized weights, float32 sums (MLX's own arithmetic,
//          in another order).
//   int16: x rounded to int16 with one float scale per weight group, then integer dot products
//          with the weights' integers (exact), scaled back once per group (dot.h).
enum class Path : int { exact = 0, int16 = 1 };

// x (..., M, K) float32 times w (N, K) quantized -> (..., M, N); with `indices`, w is (E, N, K) and
// x's batch dimensions broadcast with indices' to pick each batch element's expert (gather_qmm).
mx::array qmm(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    const std::optional<mx::array>& indices,
    int group_size,
    int bits,
    Path path,
    mx::StreamOrDevice s = {});

// Threads each projection runs on (the caller's included); default: the cores this process may use.
void set_threads(int n);
int threads();
// The instruction set the kernels were built for ("avx2", "scalar").
std::string simd();

class QuantizedMatmul : public mx::UnaryPrimitive {
 public:
  // batch: the product's batch shape (empty for one matrix: all of x's rows); rows: x's rows per batch
  // element.
  QuantizedMatmul(mx::Stream stream, mx::Shape batch, int rows, int group_size, int bits, Path path)
      : mx::UnaryPrimitive(stream),
        batch_(std::move(batch)),
        rows_(rows),
        group_size_(group_size),
        bits_(bits),
        path_(path) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MixtralQuantizedMatmul";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  mx::Shape batch_;
  int rows_, group_size_, bits_;
  Path path_;
};

} // namespace mixtral_kernels
