// Attention for one new token (decode): softmax(q . K^T * scale) . V over the whole KV cache, the KV
// heads shared by groups of query heads (GQA), as mx.fast.scaled_dot_product_attention computes it
// for one query row and no mask.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mixtral_kernels {

// q (B, Hq, 1, D), k and v (B, Hkv, S, D) float32 with Hq a multiple of Hkv -> (B, Hq, 1, D). k and v
// may be views of a larger cache (any strides, the last axis contiguous).
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
