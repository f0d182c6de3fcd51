// Attention on the CPU: softmax(q . K^T * scale) . V, the KV heads shared by groups of query heads
// (GQA), q's T rows being the last T positions of the keys (causal, aligned to the end): what
// mx.fast.scaled_dot_product_attention computes with mask="causal", or with no mask for one row.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mixtral_kernels {

// q (B, Hq, T, D) float32, k and v (B, Hkv, S, D) float32, float16 or bfloat16 (a half-size cache, read in
// place and widened in registers), with Hq a multiple of Hkv and T <= S -> (B, Hq, T, D).
// q, k and v may be views (of a larger cache, say): any strides, the last axis contiguous.
mx::array attend(const mx::array& q, const mx::array& k, const mx::array& v, float scale, mx::StreamOrDevice s = {});

class Attend : public mx::UnaryPrimitive {
 public:
  Attend(mx::Stream stream, float scale) : mx::UnaryPrimitive(stream), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MixtralAttend";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const Attend&>(other).scale_;
  }

 private:
  float scale_;
};

} // namespace mixtral_kernels
