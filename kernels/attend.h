// Attention on the CPU: softmax(q . K^T * scale) . V, the KV heads shared by groups of query heads
// (GQA), q's T rows being the last T positions of the keys (causal, aligned to the end): what
// mx.fast.scaled_dot_product_attention computes with mask="causal", or with no mask for one row.
#pragma once

#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mixtral_kernels {

// q (B, Hq, T, D) float32, k and v (B, Hkv, S, D) float32, float16 or bfloat16 (a half-size cache, read in
// place and widened in registers), with Hq a multiple of Hkv and T <= S -> (B, Hq, T, D).
// q, k and v may be views (of a larger cache, say): any strides, the last axis contiguous.
mx::array attend(const mx::array& q, const mx::array& k, const mx::array& v, float scale, mx::StreamOrDevice s = {});

// Several sequences' rows one after another in q (1, Hq, T, D), each over its own cache: segment i is
// rows starts[i]..ends[i] - 1, the last of the first lengths[i] positions of keys[i] and values[i]
// (1, Hkv, capacity, D), as attend(q[:, :, start:end], k[:, :, :length], v[:, :, :length]) with the same
// bits; the segments cover q's rows in order. One op for a batch.py step's attention, not one per sequence.
mx::array attend_segments(const mx::array& q, const std::vector<mx::array>& keys, const std::vector<mx::array>& values,
                          std::vector<int> lengths, std::vector<int> starts, std::vector<int> ends, float scale,
                          mx::StreamOrDevice s = {});

class AttendSegments : public mx::UnaryPrimitive {
 public:
  AttendSegments(mx::Stream stream, float scale, std::vector<int> lengths, std::vector<int> starts, std::vector<int> ends)
      : mx::UnaryPrimitive(stream), scale_(scale), lengths_(std::move(lengths)), starts_(std::move(starts)),
        ends_(std::move(ends)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MixtralAttendSegments";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const AttendSegments&>(other);
    return scale_ == o.scale_ && lengths_ == o.lengths_ && starts_ == o.starts_ && ends_ == o.ends_;
  }

 private:
  float scale_;
  std::vector<int> lengths_, starts_, ends_;
};

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
