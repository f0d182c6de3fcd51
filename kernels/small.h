// The small ops, each one op in the graph: MLX's CPU backend composes RoPE from 28 ops and RMSNorm
// from 10, and a decode step dispatches each op to its stream's thread (microseconds apiece, more than
// their work). SwiGLU's sigmoid is scalar there, one std::exp per element on one thread: 55 ms a
// layer in a 512-token prefill, a sixth of the layer.
#pragma once

#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace mixtral_kernels {

// Rotary embedding, the "rotate half" form (traditional=False), of x (B, H, T, D) float32 at positions
// offset..offset+T-1: as mx.fast.rope(x, D, traditional=False, base=base, scale=1.0, offset=offset),
// its angles computed in float32 the same way.
mx::array rope(const mx::array& x, int offset, float base, mx::StreamOrDevice s = {});

// The same at the given positions, one for each of x's T rows (several sequences' tokens one after
// another in a row, each at its own place: batch.py). A row gets the bits it gets from rope() at its offset.
mx::array rope_at(const mx::array& x, std::vector<int> positions, float base, mx::StreamOrDevice s = {});

// x / sqrt(mean(x^2) + eps) * weight over the last axis, float32: as mx.fast.rms_norm.
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s = {});

// silu(a) * b = a * b / (1 + exp(-a)), float32, a and b of one shape (views read in place); exp by
// a polynomial within 2 ulp of the true value, vectorized by the compiler, threads over the pool.
mx::array swiglu(const mx::array& a, const mx::array& b, mx::StreamOrDevice s = {});

// Several caches (1, H, capacity, D), each given its own run of rows (1, H, T, D) (the caches' dtype):
// cache i gets rows starts[i]..ends[i] - 1 at positions offsets[i] on -> the new caches, as
// cache[:, :, o:o + n] = rows[:, :, a:b] would give each. Each new cache takes its old one's buffer
// where nothing else holds it (as MLX's slice_update). One op for a batch.py step's cache writes: a
// sequence's were four ops a layer (two slices, two updates): a step of 16 decoding together 2% faster.
std::vector<mx::array> write_rows(const mx::array& rows, const std::vector<mx::array>& caches, std::vector<int> offsets,
                                  std::vector<int> starts, std::vector<int> ends, mx::StreamOrDevice s = {});

// The index of the largest value along x's last axis (float32; rows read as they are laid out) -> uint32,
// as mx.argmax(x, axis=-1) (and numpy) give it: the first NaN if there is one, else the first of the largest
// values. Greedy decoding's draw: MLX's CPU loop compares one value at a time, 0.55 ms for 16 rows of 32000
// logits where this takes 0.05 (a step of 16 sequences decoding together 0.98x the time, A/B in one process).
mx::array argmax(const mx::array& x, mx::StreamOrDevice s = {});

class ArgMax : public mx::UnaryPrimitive {
 public:
  explicit ArgMax(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override;
  const char* name() const override {
    return "MixtralArgMax";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class WriteRows : public mx::Primitive {
 public:
  WriteRows(mx::Stream stream, std::vector<int> offsets, std::vector<int> starts, std::vector<int> ends)
      : mx::Primitive(stream), offsets_(std::move(offsets)), starts_(std::move(starts)), ends_(std::move(ends)) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override;
  const char* name() const override {
    return "MixtralWriteRows";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const WriteRows&>(other);
    return offsets_ == o.offsets_ && starts_ == o.starts_ && ends_ == o.ends_;
  }

 private:
  std::vector<int> offsets_, starts_, ends_;
};

class Rope : public mx::UnaryPrimitive {
 public:
  Rope(mx::Stream stream, std::vector<int> positions, float base)
      : mx::UnaryPrimitive(stream), positions_(std::move(positions)), base_(base) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override;
  const char* name() const override {
    return "MixtralRope";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Rope&>(other);
    return positions_ == o.positions_ && base_ == o.base_;
  }

 private:
  std::vector<int> positions_; // of x's rows along T
  float base_;
};

class RmsNorm : public mx::UnaryPrimitive {
 public:
  RmsNorm(mx::Stream stream, float eps) : mx::UnaryPrimitive(stream), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override;
  const char* name() const override {
    return "MixtralRmsNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }

 private:
  float eps_;
};

class Swiglu : public mx::UnaryPrimitive {
 public:
  explicit Swiglu(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override;
  const char* name() const override {
    return "MixtralSwiglu";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

} // namespace mixtral_kernels
